"""Activations side of the offload manager: the Block-AP streams ``[N, L, H]`` in files, updated in place.

Block-AP keeps two such streams (the full-precision teacher's hidden states and the quantized model's), each
``N x L x H x 2`` bytes: 64 GiB for Llama-2-7B at the paper's 4096 x 2048, which is why they live on disk.

Two layers:

- a *stream file* holds rows of ``[L, H]`` samples back to back, no header, read and written by row ranges:
  :class:`StreamFile` (``pread``/``pwrite`` through the page cache, the default) or ``offload.aio.AioStream``
  (DeepSpeed async_io, O_DIRECT). Reads copy into fresh memory and writes copy out of ours, so resident memory is
  the chunks in flight, not the file; ``sync()`` makes written rows durable.
- an :class:`ActivationStream` is the N logical samples of one stream inside a file of ``N + S`` rows (``S`` spare
  rows, one chunk): logical row r lives at file row ``r + base``, ``base`` in {0, S}.

The update ``stream[k] <- fn(stream[k])`` (:meth:`ActivationStream.update`) reads every row once and writes it once,
shifted by S: from base S to base 0 walking the chunks upward, or from 0 to S walking downward. So the output of
chunk k lands on the input rows of the chunk processed just before it, never on rows not yet read, and the file
is never more than N + S rows. Writes run on a writer thread behind the compute (a bounded queue), reads one chunk
ahead on a reader thread: an update takes about max(compute, I/O), not their sum (``tools/bench_streams.py``).

Crash safety without writing any byte twice: the writer makes chunk k's output durable (``sync``), then records
"k chunks done" in a small progress file (atomic, fsync'ed), and only then starts chunk k+1, whose output is the
first write that overwrites chunk k's input. A kill at any instant (SIGKILL or power loss) therefore leaves chunks
< done written, chunk ``done``'s input intact (its output may be torn), and every later chunk untouched; resume
recomputes from chunk ``done``. Since each chunk's output is a pure function of its input, the result is
bit-identical to an uninterrupted update. The caller records the new ``base`` in the manifest once the update is
complete. Disk cost: the two streams plus one spare chunk each, and the bytes written per block are exactly the
two streams' (the journal of earlier versions wrote every chunk twice).

Data parallel (several ranks, each updating a contiguous run of whole chunks): the first write of rank r+1 (r-1,
walking downward) lands on the last (first) S input rows of rank r, which rank r may not have read yet. Those
rows are copied into a per-rank journal, durably, before a barrier that every rank passes before its first write;
rank r reads them from the journal.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from frugal_qat.checkpoint.store import atomic_save_tensors, atomic_write_json, kill_point, load_tensors, read_json
from frugal_qat.errors import CorruptCheckpoint, OutOfSpace
from frugal_qat.offload.prefetch import WaitClock, prefetch

log = logging.getLogger(__name__)

WRITES_AHEAD = 2  # output chunks computed and queued for the writer thread beyond the one it is writing
READS_AHEAD = 1  # input chunks read ahead of the one being computed (prefetch depth)


# ---- stream files ---------------------------------------------------------------------------------------------


def init_stream_file(stream, path: str | Path, shape: tuple[int, int, int], create: bool, dtype) -> None:
    """The file layout every stream backend shares: ``[rows, L, H]`` samples of ``dtype``, row-major, no header.
    Sets the geometry attributes, then allocates the file (``create``) or checks its size."""
    stream.path = Path(path)
    stream.shape = tuple(int(s) for s in shape)
    stream.dtype = dtype
    stream.itemsize = torch.empty((), dtype=dtype).element_size()
    stream.sample_elems = stream.shape[1] * stream.shape[2]
    stream.row_bytes = stream.sample_elems * stream.itemsize
    stream.nbytes = stream.shape[0] * stream.row_bytes
    if create:
        _allocate(stream.path, stream.nbytes)
    elif not stream.path.is_file():
        raise CorruptCheckpoint(f"activation stream {stream.path} is missing; the run directory lost a file that "
                                "only the whole run can rebuild: start over with --restart")
    elif stream.path.stat().st_size != stream.nbytes:
        raise CorruptCheckpoint(
            f"activation stream {stream.path} has {stream.path.stat().st_size} bytes, not the {stream.nbytes} of "
            f"{stream.shape} {dtype} rows (truncated or replaced); start over with --restart"
        )


def _allocate(path: Path, nbytes: int) -> None:
    """Create the file with all its blocks reserved, so a full disk fails now and not mid-run."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        os.ftruncate(fd, nbytes)  # a longer file left by another shape must not pass the size check
    except OSError as e:
        os.close(fd)
        path.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfSpace(f"not enough disk for {path} ({nbytes / 2**30:.2f} GiB); free space or use --work-dir") from None
        raise
    os.close(fd)


def _byte_view(x: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a numpy uint8 array (bf16 has no numpy dtype)."""
    return x.reshape(-1).view(torch.uint8).numpy()


class StreamFile:
    """A ``[rows, L, H]`` array in a file, read and written by row ranges with ``pread``/``pwrite``.

    Both calls release the GIL, so the reader and writer threads of an update overlap with the compute. The page
    cache holds the file, not this process: RSS stays at the buffers in flight. Thread-safe (positional I/O).
    """

    def __init__(self, path: str | Path, shape: tuple[int, int, int], create: bool = False, dtype=torch.float16):
        init_stream_file(self, path, shape, create, dtype)
        self._fd = os.open(self.path, os.O_RDWR)

    def _check(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) are outside stream {self.path} of {self.shape[0]} rows")

    def read(self, start: int, stop: int) -> torch.Tensor:
        """A copy of rows [start, stop) as a tensor of the stream's dtype; ``stop`` is clipped to the rows, as in a
        slice."""
        stop = min(stop, self.shape[0])
        self._check(start, stop)
        # numpy, not torch.empty: freed torch buffers of this size stayed in the heap (RSS +200 MiB over a 256 MiB
        # stream, measured), numpy's are returned to the OS.
        buf, off = np.empty((stop - start) * self.row_bytes, dtype=np.uint8), start * self.row_bytes
        done = 0
        while done < buf.size:
            n = os.preadv(self._fd, [buf[done:]], off + done)
            if n == 0:
                raise CorruptCheckpoint(f"activation stream {self.path} ended at byte {off + done}; it was "
                                        "truncated: start over with --restart")
            done += n
        if not buf.size:  # torch cannot view an empty buffer as another dtype
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        return torch.from_numpy(buf).view(self.dtype).reshape(stop - start, *self.shape[1:])

    def write(self, start: int, x: torch.Tensor) -> None:
        """Rows [start, start + len(x)) <- x (not yet durable: see :meth:`sync`)."""
        x = x.detach().to("cpu", self.dtype).contiguous()
        if tuple(x.shape[1:]) != self.shape[1:]:
            raise ValueError(f"cannot write {tuple(x.shape)} into stream {self.shape}")
        self._check(start, start + x.shape[0])
        buf, off = _byte_view(x), start * self.row_bytes
        half = (x.shape[0] // 2) * self.row_bytes
        # Half the rows first: a kill between the two halves leaves a torn chunk, which resume must survive.
        self._pwrite_all(buf[:half], off)
        kill_point("stream_write")
        self._pwrite_all(buf[half:], off + half)

    def _pwrite_all(self, buf: np.ndarray, off: int) -> None:
        done = 0
        while done < buf.size:
            try:
                done += os.pwritev(self._fd, [buf[done:]], off + done)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):  # cannot happen on a fallocated file, unless it was
                    raise OutOfSpace(f"disk full while writing {self.path}; free space and run the same command "
                                     "again to resume") from None
                raise

    def sync(self) -> None:
        """Make every written row durable (fdatasync)."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass


def chunk_samples(shape: tuple[int, int, int], chunk_mb: float, itemsize: int = 2) -> int:
    """How many samples one chunk holds: ``chunk_mb`` MiB, at least one sample."""
    per_sample = shape[1] * shape[2] * itemsize
    return max(1, int(chunk_mb * 2**20) // per_sample)


# ---- the logical stream and its shifted update ----------------------------------------------------------------


@dataclass(frozen=True)
class StreamGeometry:
    """Where a stream's N logical samples live in its file of ``n + spare`` rows."""

    n: int
    spare: int  # S: one chunk, fixed when the file is created
    base: int  # 0 or S: logical row r is file row r + base

    def __post_init__(self):
        if self.spare < 1 or self.base not in (0, self.spare):
            raise CorruptCheckpoint(f"stream geometry {self} is invalid (base must be 0 or spare >= 1)")

    @property
    def rows(self) -> int:
        return self.n + self.spare

    def flipped(self) -> StreamGeometry:
        return StreamGeometry(self.n, self.spare, self.spare - self.base)


class ActivationStream:
    """The N logical samples ``[N, L, H]`` of one stream inside its file (see the module docstring)."""

    def __init__(self, file, geometry: StreamGeometry):
        if file.shape[0] != geometry.rows:
            raise CorruptCheckpoint(f"activation stream {file.path} has {file.shape[0]} rows, its geometry "
                                    f"{geometry} needs {geometry.rows}; start over with --restart")
        self.file, self.geometry = file, geometry
        self.shape = (geometry.n, *file.shape[1:])
        self.dtype = file.dtype

    @property
    def path(self) -> Path:
        return self.file.path

    def read(self, start: int, stop: int) -> torch.Tensor:
        stop = min(stop, self.geometry.n)
        return self.file.read(start + self.geometry.base, stop + self.geometry.base)

    def write(self, start: int, x: torch.Tensor) -> None:
        if start + x.shape[0] > self.geometry.n:
            raise ValueError(f"cannot write {x.shape[0]} rows at {start} into a stream of {self.geometry.n}")
        self.file.write(start + self.geometry.base, x)

    def sync(self) -> None:
        self.file.sync()

    def close(self) -> None:
        self.file.close()

    def update(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        progress: Path | None,
        tag: str,
        rows: tuple[int, int] | None = None,
        journal: Path | None = None,
        before_writes: Callable[[], None] = lambda: None,
        clock: WaitClock | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> StreamGeometry:
        """``stream[k] <- fn(stream[k])`` for every chunk of logical ``rows`` (all by default); returns the new
        geometry (base flipped), which the caller must record once every rank is done. A chunk is the S spare rows
        (a larger one would overwrite input not yet read); a rank's rows are whole chunks (``shard_rows``).

        ``progress``: the file recording how far this update got (None: a scratch stream nothing resumes from).
        ``tag`` names the update uniquely (block, stream): a progress file with another tag belongs to an update
        that finished. ``rows``, ``journal``, ``before_writes``: one rank's share of a data-parallel update, its
        journal of boundary rows, and the barrier every rank passes before writing. ``fn`` must be a pure function
        of its input chunk (resume recomputes from the first chunk not recorded done).
        """
        g = self.geometry
        lo, hi = rows if rows is not None else (0, g.n)
        chunk, src, dst = g.spare, g.base, g.spare - g.base
        if lo % chunk or (hi % chunk and hi != g.n):
            raise ValueError(f"rows [{lo}, {hi}) of {tag} are not whole chunks of {chunk}")
        upward = dst < src
        starts = list(range(lo, hi, chunk))
        if not upward:
            starts.reverse()
        state = _read_progress(progress, tag) if progress is not None else None
        done = 0 if state is None else state["done"]
        if done:
            log.info("resuming stream update %s at chunk %d of %d", tag, done, len(starts))
        # Our first chunk in walking order whose input a neighbouring rank's first write lands on (data parallel).
        risky = starts[-1] if starts and ((upward and hi < g.n) or (not upward and lo > 0)) else None
        saved = None
        if risky is not None and done < len(starts):
            saved = _boundary_rows(self, (risky, min(hi, risky + chunk)), journal, tag)
        before_writes()

        def load(s: int) -> torch.Tensor:
            if s == risky:
                return saved
            return self.file.read(s + src, min(hi, s + chunk) + src)

        with _Writer(self.file, progress, tag, chunk, done) as writer:
            for s, x in prefetch(load, starts[done:], depth=READS_AHEAD, clock=clock):
                kill_point("stream_update")
                y = fn(x)
                if y.shape != x.shape:
                    raise ValueError(f"update of {tag} changed the chunk shape {tuple(x.shape)} -> {tuple(y.shape)}")
                writer.put(s + dst, y)
                if on_chunk is not None:
                    on_chunk(x.shape[0])
        self.geometry = g.flipped()
        return self.geometry


def new_stream(path: str | Path, shape: tuple[int, int, int], chunk_mb: float, dtype=torch.float16) -> ActivationStream:
    """A new stream of ``shape`` [N, L, H] in a buffered file, with one chunk (``chunk_mb``) of spare rows."""
    spare = min(shape[0], chunk_samples(shape, chunk_mb, torch.empty((), dtype=dtype).element_size()))
    geometry = StreamGeometry(shape[0], max(spare, 1), max(spare, 1))
    return ActivationStream(StreamFile(path, (geometry.rows, *shape[1:]), create=True, dtype=dtype), geometry)


def _read_progress(path: Path, tag: str) -> dict | None:
    if not path.is_file():
        return None
    state = read_json(path)
    if not isinstance(state, dict) or not {"tag", "chunk", "done"} <= set(state):
        raise CorruptCheckpoint(f"stream progress file {path} is malformed; start over with --restart")
    return state if state["tag"] == tag else None


def _boundary_rows(stream: ActivationStream, risky: tuple[int, int], journal: Path | None, tag: str) -> torch.Tensor:
    """Rows ``risky`` of the stream's input, from the journal when a killed attempt of this update already saved
    them (the file's copy may be overwritten by now), else read now and saved durably."""
    if journal is None:
        raise ValueError("a data-parallel stream update needs a journal for its boundary rows")
    if journal.is_file():
        from safetensors import safe_open

        with safe_open(str(journal), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("tag") == tag:
            return load_tensors(journal)["rows"]
    base = stream.geometry.base
    rows = stream.file.read(risky[0] + base, risky[1] + base)
    atomic_save_tensors(journal, {"rows": rows}, metadata={"tag": tag})
    return rows


class _Writer:
    """The writer thread of an update: writes queued chunks in order, makes each durable, then records it done.

    At most ``WRITES_AHEAD`` chunks wait in the queue (``put`` blocks beyond that), so memory is bounded. An error
    on the thread (a full disk...) is raised in the caller at its next ``put`` or at the end.
    """

    def __init__(self, file, progress: Path | None, tag: str, chunk: int, done: int):
        self.file, self.progress, self.tag, self.chunk, self.done = file, progress, tag, chunk, done
        self._q: queue.Queue = queue.Queue(maxsize=WRITES_AHEAD)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="frugal-stream-writer", daemon=True)

    def __enter__(self) -> _Writer:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain: the caller raises the first error
            try:
                row, y = item
                self.file.write(row, y)
                del y, item
                self.file.sync()  # this chunk's output is durable before it is recorded ...
                kill_point("stream_sync")
                self.done += 1
                if self.progress is not None:  # ... and recorded before the next write overwrites its input
                    atomic_write_json(self.progress, {"tag": self.tag, "chunk": self.chunk, "done": self.done})
            except BaseException as e:  # re-raised in the caller's thread
                self._error = e

    def put(self, row: int, y: torch.Tensor) -> None:
        self._raise()
        self._q.put((row, y))

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def __exit__(self, exc_type, exc, tb) -> None:
        self._q.put(None)
        self._thread.join()
        if exc_type is None:
            self._raise()
