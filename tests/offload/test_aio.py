"""Both stream-file backends (buffered StreamFile and DeepSpeed-aio AioStream) pass the same behaviour tests.

The aio cases skip, with the reason, only where DeepSpeed's async_io op cannot be built (no libaio: apt-get install
libaio-dev). The op's first build takes minutes; tools/setup.sh can prebuild it.
"""

import errno
import logging
import os
import threading
import time

import pytest
import torch

from frugal_qat.errors import ConfigError, CorruptCheckpoint
from frugal_qat.offload import aio
from frugal_qat.offload.activations import StreamFile
from frugal_qat.offload.aio import ALIGN, AioStream, aio_available, open_stream, piece_bytes

# buffered; aio with its default 8 MiB pieces (every test file is one piece); aio with 2-block pieces, so that ranges
# span several pieces and the double-buffered pipeline and its first/last-piece edges run.
BACKENDS = ["buffered", "aio", "aio-small-pieces"]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    if request.param != "buffered":
        ok, why = aio_available(tmp_path)
        if not ok:
            pytest.skip(why)
    return request.param


def opener(backend: str):
    if backend == "buffered":
        return StreamFile
    piece = 2 * ALIGN if backend == "aio-small-pieces" else None
    return lambda path, shape, create=False, dtype=torch.float16: AioStream(path, shape, create, dtype, piece=piece)


# Sample sizes in bytes: 120 (all in the file's ragged tail), 6600 (straddles blocks), 8192 (aligned), fp32 1892.
RAGGED = [((7, 5, 12), torch.float16), ((9, 33, 100), torch.float16), ((6, 4, 1024), torch.float16),
          ((11, 11, 43), torch.float32)]


def test_round_trip_and_reopen(backend, tmp_path):
    x = torch.randn(9, 33, 100).half()
    s = opener(backend)(tmp_path / "a.bin", x.shape, create=True)
    s.write(0, x[:3])
    s.write(3, x[3:])
    assert torch.equal(s.read(0, 9), x)
    s.close()
    again = opener(backend)(tmp_path / "a.bin", x.shape)
    assert torch.equal(again.read(2, 5), x[2:5])
    assert torch.equal(again.read(7, 20), x[7:])  # a stop past N is clipped, as a slice is
    assert again.read(4, 4).shape == (0, 33, 100)
    again.close()


def test_refuses_wrong_size(backend, tmp_path):
    opener(backend)(tmp_path / "a.bin", (2, 3, 4), create=True).close()
    with pytest.raises(CorruptCheckpoint, match="has 48 bytes, not the 72 .* start over with --restart"):
        opener(backend)(tmp_path / "a.bin", (3, 3, 4))
    with pytest.raises(CorruptCheckpoint, match="missing"):
        opener(backend)(tmp_path / "none.bin", (3, 3, 4))


@pytest.mark.parametrize("shape,dtype", RAGGED)
def test_random_ranges_match_a_reference(backend, tmp_path, shape, dtype):
    """Random writes and reads of sample ranges whose bytes are not block-aligned agree with an in-RAM copy."""
    n = shape[0]
    ref = torch.zeros(shape, dtype=dtype)  # a fresh (fallocated) file reads as zeros
    s = opener(backend)(tmp_path / "a.bin", shape, create=True, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        a, b = sorted(torch.randint(0, n + 1, (2,), generator=g).tolist())
        if b > a:
            x = torch.randn((b - a, *shape[1:]), generator=g).to(dtype)
            s.write(a, x)
            ref[a:b] = x
        c, d = sorted(torch.randint(0, n, (2,), generator=g).tolist())
        assert torch.equal(s.read(c, d + 1), ref[c : d + 1])
    s.close()
    assert (tmp_path / "a.bin").stat().st_size == ref.numel() * ref.element_size()  # same layout as buffered
    assert (tmp_path / "a.bin").read_bytes() == ref.view(-1).view(torch.uint8).numpy().tobytes()


def test_concurrent_writers_of_neighbouring_samples_lose_nothing(backend, tmp_path):
    """Two threads write interleaved samples that share disk blocks (aio: read-modify-write under the lock)."""
    shape = (16, 3, 700)  # 4200 bytes per sample: every block holds bytes of two samples
    s = opener(backend)(tmp_path / "a.bin", shape, create=True)
    x = torch.randn(shape).half()

    def writer(parity: int):
        for _ in range(5):
            for i in range(parity, shape[0], 2):
                s.write(i, x[i : i + 1])

    threads = [threading.Thread(target=writer, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(s.read(0, shape[0]), x)


@pytest.mark.parametrize("first", ["buffered", "aio"])
def test_backends_share_the_file_format(tmp_path, first):
    """A run written with one backend resumes with the other: same bytes, same size."""
    ok, why = aio_available(tmp_path)
    if not ok:
        pytest.skip(why)
    x = torch.randn(5, 33, 100).half()
    opener(first)(tmp_path / "a.bin", x.shape, create=True).write(0, x)
    other = opener("aio" if first == "buffered" else "buffered")(tmp_path / "a.bin", x.shape)
    assert torch.equal(other.read(0, 5), x)


# ---- choosing the backend ------------------------------------------------------------------------------------------


def test_open_stream_buffered_and_unknown(tmp_path):
    s = open_stream(tmp_path / "a.bin", (2, 3, 4), create=True, io="buffered")
    assert isinstance(s, StreamFile)
    with pytest.raises(ConfigError, match="choose one of auto, aio, buffered"):
        open_stream(tmp_path / "b.bin", (2, 3, 4), create=True, io="uring")


def test_forced_aio_without_the_op_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(aio, "_load_op", lambda: (None, "DeepSpeed async_io cannot be built here: " + aio._FIX))
    with pytest.raises(ConfigError, match="apt-get install -y libaio-dev"):
        open_stream(tmp_path / "a.bin", (2, 3, 4), create=True, io="aio")
    assert not (tmp_path / "a.bin").exists()  # refused before anything was written


def test_auto_falls_back_to_buffered_with_a_logged_reason(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(aio, "aio_built", lambda: True)
    monkeypatch.setattr(aio, "_load_op", lambda: (None, "no libaio here"))
    with caplog.at_level(logging.INFO, logger="frugal_qat.offload.aio"):
        s = open_stream(tmp_path / "a.bin", (2, 3, 4), create=True, io="auto")
    assert isinstance(s, StreamFile)
    assert "no libaio here" in caplog.text


def test_auto_never_builds_the_op_inside_a_run(tmp_path, monkeypatch, caplog):
    """With the op not built, --io auto takes buffered files at once and says how to build it; it does not start
    a minutes-long build (which _load_op would do)."""
    monkeypatch.setattr(aio, "aio_built", lambda: False)
    monkeypatch.setattr(aio, "_load_op", lambda: pytest.fail("--io auto started a build"))
    with caplog.at_level(logging.INFO, logger="frugal_qat.offload.aio"):
        s = open_stream(tmp_path / "a.bin", (2, 3, 4), create=True, io="auto")
    assert isinstance(s, StreamFile)
    assert "python -m frugal_qat.offload.aio" in caplog.text


def test_auto_takes_aio_where_available(tmp_path):
    ok, why = aio_available(tmp_path)
    if not ok:
        pytest.skip(why)
    s = open_stream(tmp_path / "a.bin", (2, 3, 4), create=True, io="auto")
    assert isinstance(s, AioStream)
    s.close()


def test_a_filesystem_without_o_direct_is_refused(tmp_path, monkeypatch):
    """Such filesystems fail open(O_DIRECT) with EINVAL (tmpfs before Linux 6.6, some network filesystems)."""
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(aio, "_load_op", lambda: (object(), ""))  # only the filesystem probe is under test
    monkeypatch.setattr(os, "open", no_direct)
    ok, why = aio_available(tmp_path)
    assert not ok and "O_DIRECT" in why and "--io buffered" in why
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_piece_bytes_fits_the_locked_memory_limit():
    assert piece_bytes(None) == 8 * 2**20
    assert piece_bytes(2**40) == 8 * 2**20
    assert piece_bytes(8 * 2**20) == 2 * 2**20  # the common 8 MiB default: two 2 MiB buffers
    assert piece_bytes(3 * 2**20) == 0  # too small: aio is reported unavailable


def test_stale_build_locks_are_cleared_and_fresh_ones_kept(tmp_path):
    # A build killed midway leaves its lock; torch then waits forever in every later process (this hung CI once).
    stale, fresh = tmp_path / "py311_cpu" / "pin_memory" / "lock", tmp_path / "py311_cpu" / "async_io" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - 2 * aio.STALE_LOCK_S
    os.utime(stale, (old, old))
    assert aio.clear_stale_build_locks(tmp_path) == [stale]
    assert not stale.exists() and fresh.exists()  # a lock of a build going on now is left to its owner
