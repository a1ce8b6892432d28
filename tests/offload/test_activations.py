import os
import subprocess
import sys

import pytest
import torch

from frugal_qat.checkpoint.store import atomic_save_tensors
from frugal_qat.errors import CorruptCheckpoint
from frugal_qat.offload.activations import Stream, chunk_samples, update_in_place
from frugal_qat.offload.prefetch import WaitClock, prefetch


def test_stream_round_trip_and_reopen(tmp_path):
    x = torch.randn(7, 5, 12).half()
    s = Stream(tmp_path / "a.bin", x.shape, create=True)
    s.write(0, x[:3])
    s.write(3, x[3:])
    assert torch.equal(s.read(0, 7), x)
    s.close()
    again = Stream(tmp_path / "a.bin", x.shape)
    assert torch.equal(again.read(2, 5), x[2:5])


def test_stream_refuses_wrong_size(tmp_path):
    Stream(tmp_path / "a.bin", (2, 3, 4), create=True).close()
    with pytest.raises(CorruptCheckpoint, match="wrong size"):
        Stream(tmp_path / "a.bin", (3, 3, 4))


def test_update_in_place_applies_fn_to_every_chunk(tmp_path):
    x = torch.randn(10, 4, 8).half()
    s = Stream(tmp_path / "a.bin", x.shape, create=True)
    s.write(0, x)
    seen = []

    def fn(c):
        seen.append(c.shape[0])
        return (c.float() * 2 + 1).half()

    update_in_place(s, fn, chunk=3, journal=tmp_path / "j.safetensors", tag="t")
    assert seen == [3, 3, 3, 1]
    assert torch.equal(s.read(0, 10), (x.float() * 2 + 1).half())


def test_journal_repairs_a_torn_chunk(tmp_path):
    """Simulate a kill in the middle of chunk 1: rows of chunk 1 half new, journal holds its old rows."""
    x = torch.randn(9, 4, 8).half()
    fn = lambda c: (c.float() + 3).half()  # noqa: E731
    expected = fn(x)
    s = Stream(tmp_path / "a.bin", x.shape, create=True)
    s.write(0, torch.cat([expected[:3], expected[3:4], x[4:]]))  # chunk 0 done, chunk 1 torn
    journal = tmp_path / "j.safetensors"
    atomic_save_tensors(journal, {"chunk": x[3:6]}, metadata={"tag": "blk", "start": "3"})
    update_in_place(s, fn, chunk=3, journal=journal, tag="blk")
    assert torch.equal(s.read(0, 9), expected)


def test_journal_of_another_update_is_ignored(tmp_path):
    x = torch.randn(4, 2, 8).half()
    s = Stream(tmp_path / "a.bin", x.shape, create=True)
    s.write(0, x)
    journal = tmp_path / "j.safetensors"
    atomic_save_tensors(journal, {"chunk": torch.zeros(2, 2, 8).half()}, metadata={"tag": "old", "start": "2"})
    update_in_place(s, lambda c: -c, chunk=2, journal=journal, tag="new")
    assert torch.equal(s.read(0, 4), -x)


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
    """Reading a 256 MiB stream end to end keeps RSS within a few chunks (pages are released after each read)."""
    code = f"""
import psutil, torch
from frugal_qat.offload.activations import Stream
s = Stream(r"{tmp_path}/big.bin", (128, 512, 2048), create=True)
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
