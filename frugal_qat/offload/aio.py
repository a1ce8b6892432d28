"""Activation streams on DeepSpeed's async_io op (``--io aio``): O_DIRECT reads and writes through pinned buffers.

:class:`AioStream` has exactly :class:`~frugal_qat.offload.activations.StreamFile`'s interface and file layout:
the same ``rows x L x H x itemsize`` bytes, samples packed back to back, so a run started with one backend resumes
with the other. What differs is the path of the bytes: no page cache (O_DIRECT), no memory map, and reads and writes
go in pieces of ``piece`` bytes through two page-locked buffers, so the disk fills one while the CPU copies the
other out (reads) or in (writes). Pinned memory is ``2 x piece`` (16 MiB by default) whatever the chunk size.

O_DIRECT transfers whole aligned blocks (``ALIGN`` = 4096 bytes: the largest logical block size of common disks,
a multiple of DeepSpeed's 512-byte alignment). Sample boundaries need not be aligned, so:

- a read of bytes ``[lo, hi)`` reads the aligned superset ``[floor(lo), ceil(hi))`` and copies out the middle;
- a write whose first or last block is shared with neighbouring samples first reads those two blocks and writes
  them back unchanged around the new bytes (read-modify-write, under the stream's lock);
- the file's last ``nbytes % ALIGN`` bytes (not a whole block) go through ``pread``/``pwrite``: an O_DIRECT
  write of a whole block there would grow the file past ``nbytes``.

DeepSpeed's op does not report per-request errors (it ignores each AIO completion's result), only a file that
cannot be opened. So the file's size is checked at open and every request lies inside the file and is aligned,
which leaves no expected source of a short or refused request.

No build inside a run: ``--io auto`` uses async_io only when the op is already built (``tools/setup.sh`` builds it
once, about 3 minutes on 2 cores, with a progress line; or ``python -m frugal_qat.offload.aio``), else buffered
files, and says how to build it. An explicit ``--io aio`` builds it when needed, saying so before it starts.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frugal_qat.checkpoint.store import kill_point
from frugal_qat.errors import ConfigError, CorruptCheckpoint
from frugal_qat.offload.activations import StreamFile, init_stream_file

log = logging.getLogger(__name__)

IO_CHOICES = ("auto", "aio", "buffered")
ALIGN = 4096
STALE_LOCK_S = 15 * 60  # a JIT build of async_io takes ~3 min on 2 cores; 5x that has no live owner
MiB = 2**20
_FIX = "apt-get install -y libaio-dev (DeepSpeed async_io needs libaio's headers and .so), or use --io buffered"
BUILD_HINT = "build it once with `python -m frugal_qat.offload.aio` (about 3 min on 2 cores; tools/setup.sh does it)"


def _extensions_dir() -> Path:
    """Where torch builds DeepSpeed's ops: TORCH_EXTENSIONS_DIR, set to the virtual environment's own folder when
    unset (builds for other venvs, whose paths are baked into build.ninja, then neither rebuild over each other nor
    leave this one a lock to wait on)."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def aio_built() -> bool:
    """Whether DeepSpeed's async_io op loads without a build: installed prebuilt, or JIT-built here before."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get("async_io")) or (_extensions_dir() / "async_io" / "async_io.so").is_file()


@functools.cache
def _load_op() -> tuple[Any, str]:
    """DeepSpeed's async_io module (built on first use), or ``None`` and the reason.

    Cached because the extension loads once per process anyway, and a failed build must not be retried (and its
    minutes paid) for every stream.
    """
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except ImportError as e:
        return None, f"DeepSpeed is not importable ({e}); pip install deepspeed"
    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        return None, f"DeepSpeed async_io cannot be built here: {_FIX}"
    where = _extensions_dir()
    clear_stale_build_locks()
    if not aio_built():
        log.warning("building DeepSpeed async_io now (once; about 3 min on 2 cores, cached in %s)", where)
    try:
        return builder.load(verbose=False), ""
    except Exception as e:  # compiler and loader failures come in many types; all mean "not available"
        return None, f"building DeepSpeed async_io failed ({type(e).__name__}: {e}); {_FIX}"


def clear_stale_build_locks(root: str | Path | None = None, max_age_s: float = STALE_LOCK_S) -> list[Path]:
    """Delete torch extension build locks older than ``max_age_s``; returns the ones deleted.

    torch's JIT build takes a ``lock`` file in the op's build directory and every other process waits, forever,
    until it is gone. A build killed midway (a session or a CI job ended, a timeout) leaves it behind, and then
    every later ``--io aio|auto`` run hangs in its first stream open. A build takes minutes, so a lock far older
    than that has no live owner. ``root``: TORCH_EXTENSIONS_DIR, or torch's default build root.
    """
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    removed = []
    for lock in Path(root).glob("**/lock"):
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
                log.warning("removed a stale torch extension build lock (%s, left by a build that was killed)", lock)
        except FileNotFoundError:  # its build just finished
            pass
    return removed


def piece_bytes(memlock_limit: int | None, want: int = 8 * MiB) -> int:
    """Size of each of the two pinned buffers: ``want``, or less so that both fit in ``memlock_limit`` bytes.

    ``None`` means no limit (root has CAP_IPC_LOCK). Pieces are whole MiB (DeepSpeed's 1 MiB request size) and
    take at most a quarter of the limit, leaving room for other page-locked memory. 0: the limit is too small.
    """
    if memlock_limit is None:
        return want
    return min(want, memlock_limit // 4 // MiB * MiB)


def _memlock_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if os.geteuid() == 0 or soft == resource.RLIM_INFINITY else soft


def aio_available(directory: str | Path | None = None, build: bool = True) -> tuple[bool, str]:
    """Whether :class:`AioStream` can be used (with files in ``directory``, if given), and if not, why.

    Checks that DeepSpeed's async_io op loads (building it first when ``build``, else refusing an op not built
    yet), that enough memory may be page-locked, and that ``directory``'s filesystem accepts O_DIRECT (tmpfs and
    some network filesystems do not).
    """
    if not build and not aio_built():
        return False, f"DeepSpeed async_io is not built; {BUILD_HINT}"
    op, why = _load_op()
    if op is None:
        return False, why
    if piece_bytes(_memlock_limit()) == 0:
        return False, (f"the locked-memory limit (ulimit -l) is {_memlock_limit() // 1024} KiB, async_io needs at "
                       "least 4 MiB: raise it (ulimit -l unlimited; docker --ulimit memlock=-1) or use --io buffered")
    if directory is not None:
        try:
            fd, probe = tempfile.mkstemp(dir=directory, prefix=".odirect-probe-")
            os.close(fd)
            try:
                os.close(os.open(probe, os.O_RDWR | os.O_DIRECT))
            finally:
                os.unlink(probe)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            return False, (f"the filesystem of {directory} does not support O_DIRECT; put the work dir on a disk "
                           "or use --io buffered")
    return True, ""


def open_stream(path: str | Path, shape: tuple[int, int, int], create: bool = False, dtype=torch.float16,
                io: str = "auto") -> StreamFile | AioStream:
    """Open a stream file with the ``io`` backend: ``aio``, ``buffered``, or ``auto`` (aio when already built and
    usable here, buffered otherwise: a run never waits minutes for a build it did not ask for)."""
    if io not in IO_CHOICES:
        raise ConfigError(f"offload.io={io!r}; choose one of {', '.join(IO_CHOICES)}")
    if io == "buffered":
        return StreamFile(path, shape, create, dtype)
    ok, why = aio_available(Path(path).parent, build=io == "aio")
    if ok:
        return AioStream(path, shape, create, dtype)
    if io == "aio":
        raise ConfigError(f"--io aio is not available: {why}")
    log.info("activation stream %s uses buffered files, not DeepSpeed async_io: %s", Path(path).name, why)
    return StreamFile(path, shape, create, dtype)


def _up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class AioStream:
    """A ``[N, L, H]`` array in a file, read and written by sample ranges with O_DIRECT through DeepSpeed async_io.

    Same interface and semantics as :class:`~frugal_qat.offload.activations.Stream`. Thread-safe: each read or
    write holds the stream's lock while it uses the buffers and the handle (the prefetch thread reads chunk k+1
    while the caller writes chunk k); the lock is free while the caller computes.
    """

    def __init__(self, path: str | Path, shape: tuple[int, int, int], create: bool = False, dtype=torch.float16,
                 *, piece: int | None = None):
        op, why = _load_op()
        if op is None:
            raise ConfigError(f"--io aio is not available: {why}")
        piece = piece_bytes(_memlock_limit()) if piece is None else piece
        if piece <= 0 or piece % ALIGN:
            raise ConfigError(f"async_io buffer size {piece} bytes is not a positive multiple of {ALIGN} "
                              "(is ulimit -l below 4 MiB?); raise ulimit -l or use --io buffered")
        init_stream_file(self, path, shape, create, dtype)
        self._name = str(self.path)
        self._direct_end = self.nbytes - self.nbytes % ALIGN  # past this, a partial block: pread/pwrite
        self._fd = os.open(self.path, os.O_RDWR)  # buffered: the ragged tail and fdatasync
        self._lock = threading.Lock()
        # 1 MiB requests, 8 in flight: the settings measured on this machine (docs/IO.md); one piece fills the queue.
        self._handle = op.aio_handle(MiB, 8, False, True, 1)
        self._piece = piece
        self._pending = False  # an async transfer was started and not waited for
        self._bufs = [self._handle.new_cpu_locked_tensor(piece, torch.empty(0, dtype=torch.uint8)) for _ in range(2)]
        self._views = [b.numpy() for b in self._bufs]  # the same memory, for numpy's copies

    def _bytes(self, start: int, stop: int) -> tuple[int, int]:
        per = self.sample_elems * self.itemsize
        return start * per, stop * per

    def read(self, start: int, stop: int) -> torch.Tensor:
        """A copy of samples [start, stop) in the stream's dtype; ``stop`` is clipped to N, as in a slice."""
        if start < 0 or stop < 0:
            raise ValueError(f"negative sample range [{start}, {stop}) of stream {self.path}")
        stop = min(stop, self.shape[0])
        start = min(start, stop)
        lo, hi = self._bytes(start, stop)
        if hi == lo:  # numpy gives an empty array stride 0, which torch cannot view as another dtype
            return torch.empty(0, *self.shape[1:], dtype=self.dtype)
        # numpy, not torch.empty: numpy asks for transparent huge pages, and faulting in a fresh 32 MiB buffer
        # was 5x cheaper that way here (the copy into fresh memory, not the disk, bounds reads on 2 busy cores).
        out = np.empty(hi - lo, dtype=np.uint8)
        with self._lock:
            self._read_into(lo, hi, out)
        return torch.from_numpy(out).view(self.dtype).reshape(stop - start, *self.shape[1:])

    def write(self, start: int, x: torch.Tensor) -> None:
        x = x.detach().to("cpu", self.dtype).contiguous()
        stop = start + x.shape[0]
        if tuple(x.shape[1:]) != self.shape[1:] or stop > self.shape[0] or start < 0:
            raise ValueError(f"cannot write {tuple(x.shape)} at {start} into stream {self.shape}")
        raw = x.view(-1).view(torch.uint8).numpy()
        lo, hi = self._bytes(start, stop)
        mid = self._bytes(start, start + x.shape[0] // 2)[1]
        # Half the rows first: a kill between the two halves leaves a torn chunk, which resume must survive.
        with self._lock:
            self._write_from(lo, mid, raw[: mid - lo])
        kill_point("stream_write")
        with self._lock:
            self._write_from(mid, hi, raw[mid - lo :])

    def sync(self) -> None:
        """Make written samples durable. O_DIRECT data is already out of RAM; this flushes the disk's cache (and
        the ragged tail), for the whole file: fdatasync has no range."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._handle is None:
                return
            for buf in self._bufs:
                self._handle.free_cpu_locked_tensor(buf)
            self._bufs = self._views = []
            self._handle = None  # its destructor stops DeepSpeed's I/O thread
            os.close(self._fd)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown or a half-built object: nothing left to release
            pass

    # ---- the byte level -------------------------------------------------------------------------------------------

    def _pieces(self, a_lo: int, a_hi: int) -> list[tuple[int, int]]:
        return [(p, min(p + self._piece, a_hi)) for p in range(a_lo, a_hi, self._piece)]

    def _submit(self, fn, buf: torch.Tensor, offset: int) -> None:
        if fn(buf, self._name, offset) != 0:  # -1: the file could not be opened (DeepSpeed printed errno)
            self._wait()  # an earlier piece may be in flight into our buffers; DeepSpeed aborts if a handle dies busy
            raise OSError(f"DeepSpeed async_io could not start a transfer at byte {offset} of {self.path}")
        self._pending = True

    def _wait(self) -> None:
        """Wait for the transfer in flight. The handle's ``wait`` collects every op it has: hence one user at a time."""
        if self._pending:
            self._handle.wait()
            self._pending = False

    def _read_into(self, lo: int, hi: int, dst: np.ndarray) -> None:
        """Bytes [lo, hi) of the file into ``dst``: the aligned superset in O_DIRECT pieces, the tail by pread."""
        a_lo, a_hi = lo - lo % ALIGN, min(_up(hi), self._direct_end)
        pieces = self._pieces(a_lo, a_hi) if a_hi > a_lo else []
        if pieces:
            self._submit(self._handle.async_pread, self._bufs[0][: pieces[0][1] - a_lo], a_lo)
        for i, (p_lo, p_hi) in enumerate(pieces):
            self._wait()
            if i + 1 < len(pieces):  # the disk fills the other buffer while this one is copied out
                n_lo, n_hi = pieces[i + 1]
                self._submit(self._handle.async_pread, self._bufs[(i + 1) % 2][: n_hi - n_lo], n_lo)
            s, e = max(lo, p_lo), min(hi, p_hi)
            dst[s - lo : e - lo] = self._views[i % 2][s - p_lo : e - p_lo]
        if hi > self._direct_end:
            t = max(lo, self._direct_end)
            tail = os.pread(self._fd, hi - t, t)
            if len(tail) != hi - t:
                raise CorruptCheckpoint(f"activation stream {self.path} is shorter than {hi} bytes; "
                                        "start over with --restart")
            dst[t - lo :] = np.frombuffer(tail, dtype=np.uint8)

    def _write_from(self, lo: int, hi: int, src: np.ndarray) -> None:
        """``src`` into bytes [lo, hi) of the file, leaving every other byte as it was."""
        if hi <= lo:
            return
        a_lo, a_hi = lo - lo % ALIGN, min(_up(hi), self._direct_end)
        pieces = self._pieces(a_lo, a_hi) if a_hi > a_lo else []
        # O_DIRECT writes whole blocks: the neighbours' bytes in the first and last block are read first.
        head = self._read_block(a_lo) if pieces and lo > a_lo else None
        tail = self._read_block(a_hi - ALIGN) if pieces and hi < a_hi else None
        for i, (p_lo, p_hi) in enumerate(pieces):
            buf = self._views[i % 2][: p_hi - p_lo]  # piece i-2 used this buffer and is done: we waited for it
            if head is not None and p_lo == a_lo:
                buf[:ALIGN] = head
            if tail is not None and p_hi == a_hi:
                buf[-ALIGN:] = tail
            s, e = max(lo, p_lo), min(hi, p_hi)
            buf[s - p_lo : e - p_lo] = src[s - lo : e - lo]
            self._wait()  # piece i-1 is on disk; it was written while this one was filled
            self._submit(self._handle.async_pwrite, self._bufs[i % 2][: p_hi - p_lo], p_lo)
        self._wait()
        if hi > self._direct_end:
            t = max(lo, self._direct_end)
            os.pwrite(self._fd, src[t - lo :], t)

    def _read_block(self, offset: int) -> np.ndarray:
        self._submit(self._handle.async_pread, self._bufs[0][:ALIGN], offset)
        self._wait()
        return self._views[0][:ALIGN].copy()


if __name__ == "__main__":  # python -m frugal_qat.offload.aio: build the op once, so no run ever waits for it
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ok, why = aio_available()
    print(f"DeepSpeed async_io: {'ready' if ok else 'not available: ' + why}")
    sys.exit(0 if ok else 1)
