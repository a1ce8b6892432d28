"""Activations side of the offload manager: fp16 streams ``[N, L, H]`` in memory-mapped files, updated in place.

Block-AP keeps two such streams (the full-precision teacher's hidden states and the quantized model's), each
``N x L x H x 2`` bytes: 64 GiB for Llama-2-7B at the paper's 4096 x 2048, which is why they live on disk.

RAM stays flat: a read copies a range out of the map and then tells the kernel we are done with those pages
(``MADV_DONTNEED``; safe on a shared file mapping, the data stays in the page cache and the file), so resident
memory is bounded by the chunks in flight, not by N.

Crash safety of the in-place update (:func:`update_in_place`): before chunk k is overwritten, its old contents are
written to a one-chunk journal (atomic rename). A kill at any instant leaves chunks < k updated, chunk k either old,
torn or new, and the journal holding old chunk k; resume restores chunk k from the journal and continues. Since the
update of a chunk is a pure function of the chunk's old contents, the result is bit-identical to an uninterrupted
run. Disk cost: the two streams plus one chunk (``offload.chunk_mb``).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from frugal_qat.checkpoint.store import atomic_save_tensors, kill_point
from frugal_qat.errors import CorruptCheckpoint, OutOfSpace
from frugal_qat.offload.prefetch import WaitClock, prefetch

log = logging.getLogger(__name__)
PAGE = mmap.PAGESIZE


class Stream:
    """A ``[N, L, H]`` fp16 array in a file, read and written by sample ranges through a shared memory map."""

    def __init__(self, path: str | Path, shape: tuple[int, int, int], create: bool = False, dtype=torch.float16):
        init_stream_file(self, path, shape, create, dtype)  # fp16 for the Block-AP streams; evaluation may keep fp32
        self._fd = os.open(self.path, os.O_RDWR)
        self._mm = mmap.mmap(self._fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._arr = np.frombuffer(self._mm, dtype={torch.float16: np.float16, torch.float32: np.float32}[dtype])
        self._arr = self._arr.reshape(self.shape)

    def _span(self, start: int, stop: int) -> tuple[int, int]:
        """Byte range of samples [start, stop), widened to whole pages (madvise/msync need page alignment)."""
        lo = start * self.sample_elems * self.itemsize
        hi = stop * self.sample_elems * self.itemsize
        lo -= lo % PAGE
        hi = min(self.nbytes, -(-hi // PAGE) * PAGE)
        return lo, hi - lo

    def _release(self, start: int, stop: int) -> None:
        if stop <= start:
            return
        lo, n = self._span(start, stop)
        self._mm.madvise(mmap.MADV_DONTNEED, lo, n)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """A copy of samples [start, stop) as a tensor of the stream's dtype; the mapped pages are released afterwards."""
        out = torch.from_numpy(np.array(self._arr[start:stop], copy=True))
        self._release(start, stop)
        return out

    def write(self, start: int, x: torch.Tensor) -> None:
        x = x.detach().to("cpu", self.dtype).contiguous()
        stop = start + x.shape[0]
        if tuple(x.shape[1:]) != self.shape[1:] or stop > self.shape[0]:
            raise ValueError(f"cannot write {tuple(x.shape)} at {start} into stream {self.shape}")
        # Half the rows first: a kill between the two halves is a torn chunk, the case the journal must repair.
        half = x.shape[0] // 2
        self._arr[start : start + half] = x[:half].numpy()
        kill_point("stream_write")
        self._arr[start + half : stop] = x[half:].numpy()
        self.flush(start, stop)
        self._release(start, stop)

    def flush(self, start: int = 0, stop: int | None = None) -> None:
        lo, n = self._span(start, self.shape[0] if stop is None else stop)
        self._mm.flush(lo, n)

    def close(self) -> None:
        if self._mm is not None:
            del self._arr
            self._mm.close()
            os.close(self._fd)
            self._mm = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass


def init_stream_file(stream, path: str | Path, shape: tuple[int, int, int], create: bool, dtype) -> None:
    """The file layout every stream backend shares: ``[N, L, H]`` samples of ``dtype``, row-major, no header.
    Sets the geometry attributes, then allocates the file (``create``) or checks its size."""
    stream.path = Path(path)
    stream.shape = tuple(int(s) for s in shape)
    stream.dtype = dtype
    stream.itemsize = torch.empty((), dtype=dtype).element_size()
    stream.sample_elems = stream.shape[1] * stream.shape[2]
    stream.nbytes = stream.shape[0] * stream.sample_elems * stream.itemsize
    if create:
        _allocate(stream.path, stream.nbytes)
    elif not stream.path.is_file() or stream.path.stat().st_size != stream.nbytes:
        raise CorruptCheckpoint(
            f"activation stream {stream.path} is missing or has the wrong size for shape {stream.shape}; "
            "the run directory is damaged: start over with --restart"
        )


def _allocate(path: Path, nbytes: int) -> None:
    """Create the file with all its blocks reserved, so a full disk fails now and not mid-run."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfSpace(f"not enough disk for {path} ({nbytes / 2**30:.2f} GiB); free space or use --work-dir") from None
        raise
    os.close(fd)


def chunk_samples(shape: tuple[int, int, int], chunk_mb: float, itemsize: int = 2) -> int:
    """How many samples one chunk holds: ``chunk_mb`` MiB, at least one sample."""
    per_sample = shape[1] * shape[2] * itemsize
    return max(1, int(chunk_mb * 2**20) // per_sample)


def _journal_state(journal: Path, tag: str) -> tuple[int, torch.Tensor] | None:
    if not journal.is_file():
        return None
    try:
        with safe_open(str(journal), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("tag") != tag:
                return None
            return int(meta["start"]), f.get_tensor("chunk")
    except Exception as e:  # a journal is written atomically, so damage means outside interference
        raise CorruptCheckpoint(f"stream journal {journal} is damaged ({e}); start over with --restart") from None


def update_in_place(
    stream: Stream,
    fn: Callable[[torch.Tensor], torch.Tensor],
    chunk: int,
    journal: Path | None,
    tag: str,
    clock: WaitClock | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """``stream[k] <- fn(stream[k])`` chunk by chunk, crash-safe, with the next chunk read while this one computes.

    ``tag`` names this update uniquely (block, stream, phase): a journal with another tag belongs to an earlier
    update that finished, so nothing of this one was written yet.
    """
    n = stream.shape[0]
    start = 0
    found = _journal_state(journal, tag) if journal is not None else None
    if found is not None:
        start, old = found
        log.info("resuming stream update %s at sample %d (restoring the journaled chunk)", tag, start)
        stream.write(start, old)
    starts = list(range(start, n, chunk))
    for s, x in prefetch(lambda s: stream.read(s, min(n, s + chunk)), starts, depth=1, clock=clock):
        if journal is not None:  # None: a scratch stream (evaluation) that nothing resumes from
            atomic_save_tensors(journal, {"chunk": x}, metadata={"tag": tag, "start": str(s)})
        kill_point("stream_update")
        y = fn(x)
        if y.shape != x.shape:
            raise ValueError(f"update of {tag} changed the chunk shape {tuple(x.shape)} -> {tuple(y.shape)}")
        stream.write(s, y)
        if progress is not None:
            progress(x.shape[0])
