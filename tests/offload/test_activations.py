"""The shifted in-place stream update: every chunk updated once, written once, crash-safe, data-parallel safe."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from frugal_qat.errors import CorruptCheckpoint, OutOfSpace
from frugal_qat.offload.activations import (
    ActivationStream,
    StreamFile,
    StreamGeometry,
    chunk_samples,
    new_stream,
)
from frugal_qat.offload.aio import ALIGN, AioStream, aio_available
from frugal_qat.offload.prefetch import WaitClock, prefetch


def _fn(c: torch.Tensor) -> torch.Tensor:
    return (c.float() * 1.5 + 3).half()


@pytest.fixture(params=["buffered", "aio"])
def file_cls(request, tmp_path):
    if request.param == "buffered":
        return StreamFile
    ok, why = aio_available(tmp_path)
    if not ok:
        pytest.skip(why)
    return lambda path, shape, create=False, dtype=torch.float16: AioStream(path, shape, create, dtype, piece=2 * ALIGN)


def _stream(file_cls, path, x: torch.Tensor, spare: int, base: int) -> ActivationStream:
    g = StreamGeometry(x.shape[0], spare, base)
    s = ActivationStream(file_cls(path, (g.rows, *x.shape[1:]), create=True, dtype=x.dtype), g)
    s.write(0, x)
    return s


@pytest.mark.parametrize("base", [0, 3], ids=["downward", "upward"])
def test_update_applies_fn_once_per_chunk_and_flips_the_base(file_cls, tmp_path, base):
    x = torch.randn(10, 33, 100).half()  # 6600-byte rows: aio writes straddle blocks
    s = _stream(file_cls, tmp_path / "a.bin", x, spare=3, base=base)
    seen = []

    def fn(c):
        seen.append(c.shape[0])
        return _fn(c)

    g = s.update(fn, progress=tmp_path / "p.json", tag="t")
    assert sorted(seen) == [1, 3, 3, 3] and g.base == 3 - base and s.geometry == g
    assert torch.equal(s.read(0, 10), _fn(x))
    g2 = s.update(fn, progress=tmp_path / "p.json", tag="t2")  # and back
    assert g2.base == base and torch.equal(s.read(0, 10), _fn(_fn(x)))


def test_each_row_is_written_exactly_once(tmp_path):
    """The journal of earlier versions wrote every chunk twice; the shifted update writes each row once."""
    x = torch.randn(11, 4, 8).half()
    s = _stream(StreamFile, tmp_path / "a.bin", x, spare=4, base=4)
    written = []
    real_write = s.file.write
    s.file.write = lambda row, y: (written.append((row, y.shape[0])), real_write(row, y))[1]
    s.update(_fn, progress=tmp_path / "p.json", tag="t")
    rows = sorted(r for start, n in written for r in range(start, start + n))
    assert rows == list(range(11))  # base 4 -> 0: rows 0..10 of the file, each once


def _progress(path, tag, done, chunk=3):
    path.write_text(f'{{"tag": "{tag}", "chunk": {chunk}, "done": {done}}}')


@pytest.mark.parametrize("base", [0, 3], ids=["downward", "upward"])
def test_resume_after_a_torn_chunk_is_bit_identical(file_cls, tmp_path, base):
    """Simulate what a kill leaves: 2 chunks recorded done, the third chunk's output half written (torn), later
    chunks untouched. Resume recomputes from the third chunk and ends exactly as an uninterrupted update."""
    x = torch.randn(10, 33, 100).half()
    ref = _stream(file_cls, tmp_path / "ref.bin", x, 3, base)
    ref.update(_fn, progress=None, tag="t")
    s = _stream(file_cls, tmp_path / "a.bin", x, 3, base)
    upward, dst = base == 3, 3 - base
    starts = [0, 3, 6, 9] if upward else [9, 6, 3, 0]
    for k in range(2):  # the two recorded chunks
        a = starts[k]
        s.file.write(a + dst, _fn(x[a : a + 3]))
    a = starts[2]
    s.file.write(a + dst, _fn(x[a : a + 3])[:1])  # torn: one row of three
    _progress(tmp_path / "p.json", "t", 2)
    s.update(_fn, progress=tmp_path / "p.json", tag="t")
    assert torch.equal(s.read(0, 10), ref.read(0, 10))


def test_progress_of_another_update_is_ignored(tmp_path):
    x = torch.randn(6, 2, 8).half()
    s = _stream(StreamFile, tmp_path / "a.bin", x, 2, 2)
    _progress(tmp_path / "p.json", "an-earlier-block", 3, chunk=2)
    s.update(_fn, progress=tmp_path / "p.json", tag="this-block")
    assert torch.equal(s.read(0, 6), _fn(x))


def test_finished_update_recorded_but_not_committed_only_flips(tmp_path):
    """Killed after the last chunk was recorded but before the manifest took the new base: nothing is redone."""
    x = torch.randn(6, 2, 8).half()
    s = _stream(StreamFile, tmp_path / "a.bin", x, 2, 2)
    s.update(_fn, progress=tmp_path / "p.json", tag="t")
    again = ActivationStream(StreamFile(tmp_path / "a.bin", (8, 2, 8)), StreamGeometry(6, 2, 2))  # old base
    calls = []
    g = again.update(lambda c: calls.append(1) or _fn(c), progress=tmp_path / "p.json", tag="t")
    assert calls == [] and g.base == 0 and torch.equal(again.read(0, 6), _fn(x))


KILLED_UPDATE = """
import sys, torch
from pathlib import Path
from frugal_qat.offload.activations import ActivationStream, StreamFile, StreamGeometry
from frugal_qat.offload.aio import AioStream, ALIGN
backend, d = sys.argv[1], Path(sys.argv[2])
f = StreamFile(d / "a.bin", (12, 33, 100)) if backend == "buffered" else AioStream(d / "a.bin", (12, 33, 100), piece=2 * ALIGN)
s = ActivationStream(f, StreamGeometry(9, 3, 3))
s.update(lambda c: (c.float() * 1.5 + 3).half(), progress=d / "p.json", tag="blk")
"""


@pytest.mark.parametrize("point", ["stream_write@2", "stream_sync@2", "stream_update@3", "atomic_write@1"])
def test_sigkill_inside_the_write_path_resumes_bit_identical(file_cls, tmp_path, point):
    """A real SIGKILL at points of the writer thread (mid-write, after sync before the record, mid-record) and of
    the compute thread while writes are queued; the same update then finishes bit-identical."""
    x = torch.randn(9, 33, 100).half()
    s = _stream(file_cls, tmp_path / "a.bin", x, 3, 3)
    s.file.sync()
    s.close()
    backend = "buffered" if file_cls is StreamFile else "aio"
    env = dict(os.environ, FRUGAL_QAT_KILL_AT=point)
    proc = subprocess.run([sys.executable, "-c", KILLED_UPDATE, backend, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    s = ActivationStream(file_cls(tmp_path / "a.bin", (12, 33, 100)), StreamGeometry(9, 3, 3))
    s.update(_fn, progress=tmp_path / "p.json", tag="blk")
    assert torch.equal(s.read(0, 9), _fn(x))


def test_data_parallel_ranks_never_lose_a_neighbours_input(tmp_path):
    """Two ranks update their halves concurrently; the first writes of each land on the other's boundary
    chunk, which each saved to its journal before the barrier. The result equals one process's."""
    x = torch.randn(12, 4, 8).half()
    for base in (3, 0):
        _stream(StreamFile, tmp_path / f"a{base}.bin", x, 3, base).file.close()
        barrier = threading.Barrier(2)
        errors = []

        def rank(r):
            try:
                view = ActivationStream(StreamFile(tmp_path / f"a{base}.bin", (15, 4, 8)), StreamGeometry(12, 3, base))
                slow = (lambda c: (threading.Event().wait(0.05), _fn(c))[1]) if r == (0 if base == 3 else 1) else _fn
                view.update(slow, progress=tmp_path / f"p{base}.{r}.json", tag="t", rows=(0, 6) if r == 0 else (6, 12),
                            journal=tmp_path / f"j{base}.{r}.safetensors", before_writes=barrier.wait)
            except Exception as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        done = ActivationStream(StreamFile(tmp_path / f"a{base}.bin", (15, 4, 8)), StreamGeometry(12, 3, 3 - base))
        assert torch.equal(done.read(0, 12), _fn(x)), f"base {base}"
        assert (tmp_path / f"j{base}.{0 if base == 3 else 1}.safetensors").is_file()


def test_a_writer_error_reaches_the_caller(tmp_path):
    x = torch.randn(9, 2, 8).half()
    s = _stream(StreamFile, tmp_path / "a.bin", x, 3, 3)

    def full(row, y):
        raise OutOfSpace("disk full (simulated)")

    s.file.write = full
    with pytest.raises(OutOfSpace, match="simulated"):
        s.update(_fn, progress=tmp_path / "p.json", tag="t")
    assert not (tmp_path / "p.json").exists()  # nothing recorded as done


def test_stream_file_round_trip_reopen_and_size_checks(tmp_path):
    x = torch.randn(7, 5, 12).to(torch.bfloat16)  # bf16 streams (models whose activations overflow fp16)
    f = StreamFile(tmp_path / "a.bin", x.shape, create=True, dtype=torch.bfloat16)
    f.write(0, x[:3])
    f.write(3, x[3:])
    assert torch.equal(f.read(0, 7), x)
    f.close()
    assert torch.equal(StreamFile(tmp_path / "a.bin", x.shape, dtype=torch.bfloat16).read(2, 5), x[2:5])
    with pytest.raises(CorruptCheckpoint, match="has 840 bytes, not the 960"):
        StreamFile(tmp_path / "a.bin", (8, 5, 12), dtype=torch.bfloat16)
    with pytest.raises(CorruptCheckpoint, match="missing"):
        StreamFile(tmp_path / "none.bin", (8, 5, 12))
    with pytest.raises(CorruptCheckpoint, match="rows, its geometry"):
        ActivationStream(StreamFile(tmp_path / "a.bin", x.shape, dtype=torch.bfloat16), StreamGeometry(7, 2, 0))


def test_new_stream_has_one_chunk_of_spare_rows(tmp_path):
    s = new_stream(tmp_path / "s.bin", (10, 4, 8), chunk_mb=3 * 4 * 8 * 4 / 2**20, dtype=torch.float32)
    assert s.geometry == StreamGeometry(10, 3, 3) and s.file.shape == (13, 4, 8)


def test_chunk_samples():
    assert chunk_samples((100, 2048, 4096), 64) == 4  # 16 MiB per sample
    assert chunk_samples((100, 2048, 8192), 16) == 1  # never zero


def test_prefetch_yields_every_item_once_in_order():
    clock = WaitClock()
    out = list(prefetch(lambda i: i * i, range(20), depth=2, clock=clock))
    assert out == [(i, i * i) for i in range(20)]
    assert clock.items == 20


def test_prefetch_propagates_loader_errors():
    def load(i):
        if i == 3:
            raise RuntimeError("disk gone")
        return i

    with pytest.raises(RuntimeError, match="disk gone"):
        list(prefetch(load, range(6)))


@pytest.mark.slow
def test_reading_does_not_grow_rss(tmp_path):
    """Reading a 256 MiB stream end to end keeps RSS within a few chunks (the page cache holds the file)."""
    code = f"""
import psutil, torch
from frugal_qat.offload.activations import StreamFile
s = StreamFile(r"{tmp_path}/big.bin", (128, 512, 2048), create=True)
base = psutil.Process().memory_info().rss
x = torch.ones(8, 512, 2048, dtype=torch.float16)
for i in range(0, 128, 8):
    s.write(i, x)
for i in range(0, 128, 8):
    s.read(i, i + 8)
print((psutil.Process().memory_info().rss - base) / 2**20)
"""
    grown = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env=dict(os.environ)).stdout.strip())
    assert grown < 100, f"RSS grew by {grown:.0f} MiB while streaming 256 MiB"


def test_prefetch_runs_at_most_depth_loads_ahead():
    started = []

    def load(i):
        started.append(i)
        return i

    import time

    for item, _ in prefetch(load, range(8), depth=2):
        time.sleep(0.02)  # let the worker run as far ahead as it may
        assert max(started) <= item + 2, f"while holding {item}, loads up to {max(started)} had started"
