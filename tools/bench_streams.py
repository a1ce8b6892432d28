"""Stream updates with a disk made slow on purpose: is an update's wall time max(compute, I/O) or their sum?

    python tools/bench_streams.py                       # the table of docs/PERFORMANCE.md
    python tools/bench_streams.py --ms-per-mib 20 --compute-ms-per-mib 10 --mib 256

One stream of ``--mib`` MiB (fp16, ``--chunk-mib`` chunks) is updated in place three ways:

- ``serial + journal``: the design before this one, re-enacted here: read a chunk, copy it to a journal file (written
  and synced), compute, write it back, sync, all on one thread (reads one chunk ahead, as before);
- ``serial``: the same without the journal;
- ``write-behind``: frugal-qat's update (``ActivationStream.update``): reads ahead on one thread, writes and syncs
  on another, crash-safe through a progress record instead of a journal copy.

The file is wrapped so that every read and write sleeps ``--ms-per-mib`` per MiB more (a disk of 1000/ms MiB/s;
sleeping releases the GIL, as a real blocking read does) and the update's function sleeps ``--compute-ms-per-mib``
(the GPU's share: it does not hold the CPU either). "read s" and "write s" are the seconds spent in reads and in
writes + syncs, the real I/O included. The table gives each way's wall time against the sum of its parts and
against max(compute, read + write), the time of an update whose I/O hides entirely behind compute or vice versa
on one disk, and the bytes it wrote.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from frugal_qat.checkpoint.store import atomic_save_tensors
from frugal_qat.offload.activations import ActivationStream, StreamFile, StreamGeometry
from frugal_qat.offload.prefetch import prefetch

MiB = 2**20


class SlowFile:
    """A StreamFile whose reads and writes take ``ms_per_mib`` per MiB more, counting bytes and the seconds each
    thread spent in them (the real I/O and sync included)."""

    def __init__(self, file: StreamFile, ms_per_mib: float):
        self.file, self.ms = file, ms_per_mib
        self.path, self.shape, self.dtype = file.path, file.shape, file.dtype
        self.read_s = self.write_s = 0.0
        self.written = 0

    def slow(self, nbytes: int) -> None:
        time.sleep(nbytes / MiB * self.ms / 1000)

    def read(self, start: int, stop: int) -> torch.Tensor:
        t0 = time.perf_counter()
        x = self.file.read(start, stop)
        self.slow(x.numel() * x.element_size())
        self.read_s += time.perf_counter() - t0
        return x

    def write(self, start: int, x: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.file.write(start, x)
        self.slow(x.numel() * x.element_size())
        self.written += x.numel() * x.element_size()
        self.write_s += time.perf_counter() - t0

    def sync(self) -> None:
        t0 = time.perf_counter()
        self.file.sync()
        self.write_s += time.perf_counter() - t0

    def close(self) -> None:
        self.file.close()


def make_stream(d: Path, rows: int, spare: int, sample: tuple[int, int], ms: float) -> tuple[ActivationStream, SlowFile]:
    file = StreamFile(d / "s.bin", (rows + spare, *sample), create=True)
    g = torch.Generator().manual_seed(0)
    for s in range(0, rows + spare, spare):
        file.write(s, torch.randn((min(spare, rows + spare - s), *sample), generator=g).half())
    slow = SlowFile(file, ms)
    return ActivationStream(slow, StreamGeometry(rows, spare, spare)), slow


def serial(stream: ActivationStream, slow: SlowFile, fn, journal: Path | None) -> None:
    """The earlier design: journal copy, compute and write-back on the compute thread (reads one chunk ahead)."""
    g, chunk = stream.geometry, stream.geometry.spare
    for s, x in prefetch(lambda s: stream.read(s, min(g.n, s + chunk)), range(0, g.n, chunk), depth=1):
        if journal is not None:  # the old chunk copied to the journal (written, fsynced), on the same slow disk
            t0 = time.perf_counter()
            atomic_save_tensors(journal, {"chunk": x})
            slow.slow(x.numel() * x.element_size())
            slow.written += x.numel() * x.element_size()
            slow.write_s += time.perf_counter() - t0
        y = fn(x)
        stream.write(s, y)
        slow.sync()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, default=128, help="stream size")
    ap.add_argument("--chunk-mib", type=float, default=4)
    ap.add_argument("--ms-per-mib", type=float, nargs="+", default=[5.0, 10.0, 20.0], help="disk slowness(es)")
    ap.add_argument("--compute-ms-per-mib", type=float, default=10.0, help="the update function's time per MiB")
    args = ap.parse_args()
    sample = (256, 1024)  # 0.5 MiB per fp16 sample
    per_sample = sample[0] * sample[1] * 2
    rows, spare = int(args.mib * MiB // per_sample), max(1, int(args.chunk_mib * MiB // per_sample))

    print(f"stream {rows * per_sample / MiB:.0f} MiB in {spare * per_sample / MiB:.0f} MiB chunks; compute "
          f"{args.compute_ms_per_mib:g} ms/MiB")
    print(f"{'disk ms/MiB':>11}  {'way':<16} {'compute s':>9} {'read s':>7} {'write s':>8} {'sum s':>7} "
          f"{'max(C,R+W)':>10} {'wall s':>7} {'wall/max':>8} {'MiB written':>11}")
    for ms in args.ms_per_mib:
        for way in ("serial + journal", "serial", "write-behind"):
            with tempfile.TemporaryDirectory(prefix="bench-streams-") as d:
                stream, slow = make_stream(Path(d), rows, spare, sample, ms)
                compute = [0.0]

                def fn(x: torch.Tensor) -> torch.Tensor:
                    t = x.numel() * x.element_size() / MiB * args.compute_ms_per_mib / 1000
                    time.sleep(t)
                    compute[0] += t
                    return x + 1

                slow.read_s = slow.write_s = 0.0
                slow.written = 0
                t0 = time.perf_counter()
                if way == "write-behind":
                    stream.update(fn, progress=Path(d) / "progress.json", tag="bench")
                else:
                    serial(stream, slow, fn, Path(d) / "journal.safetensors" if "journal" in way else None)
                wall = time.perf_counter() - t0
                parts = (compute[0], slow.read_s, slow.write_s)
                bound = max(parts[0], parts[1] + parts[2])  # one disk: its reads and writes share it
                print(f"{ms:>11g}  {way:<16} {parts[0]:>9.2f} {parts[1]:>7.2f} {parts[2]:>8.2f} {sum(parts):>7.2f} "
                      f"{bound:>10.2f} {wall:>7.2f} {wall / bound:>8.2f} {slow.written / MiB:>11.0f}")
                stream.close()


if __name__ == "__main__":
    main()
