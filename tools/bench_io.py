"""Activation-stream I/O of one Block-AP block, per backend (buffered, aio), against the disk's raw bandwidth (dd).

    sudo .venv/bin/python tools/bench_io.py --dir /path/on/the/disk --json io.json

One block's stream traffic, as block_ap/run.py does it: the fp stream updated in place (read + write, chunk by
chunk), one epoch of training reads (quant and fp streams, batch by batch, read ahead on a thread), and the quant
stream updated in place (``ActivationStream.update``: reads ahead, writes behind on a thread). Raw bandwidth is
``dd`` with O_DIRECT on a file of one stream's size in the same directory, before and after the backends (the mean
is used). The page cache is dropped before every phase (needs root; otherwise the numbers say so). "vs raw" is the
time dd would need for the same bytes in the same directions divided by the measured time: 1.0 = disk speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from frugal_qat.offload.activations import ActivationStream, StreamGeometry, chunk_samples
from frugal_qat.offload.aio import aio_available, open_stream
from frugal_qat.offload.prefetch import prefetch

DD_BLOCK = 16 * 2**20


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def dd(args: list[str]) -> float:
    drop_caches()
    t = time.perf_counter()
    subprocess.run(["dd", *args, f"bs={DD_BLOCK}", "status=none"], check=True)
    return time.perf_counter() - t


def raw_bandwidth(path: Path, nbytes: int) -> dict:
    """Sequential O_DIRECT write then read of ``nbytes`` with dd, in GB/s."""
    count = -(-nbytes // DD_BLOCK)
    w = dd(["if=/dev/zero", f"of={path}", f"count={count}", "oflag=direct", "conv=fdatasync"])
    r = dd([f"if={path}", "of=/dev/null", "iflag=direct"])
    path.unlink()
    size = count * DD_BLOCK
    return {"write_gbs": size / w / 1e9, "read_gbs": size / r / 1e9}


def phase(name: str, fn, read: int, written: int) -> dict:
    dropped = drop_caches()
    t, cpu = time.perf_counter(), time.process_time()
    fn()
    os.sync()  # count write-back that is still pending (buffered) in the phase that caused it
    return {"phase": name, "seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu,
            "read": read, "written": written, "cache_dropped": dropped}


def score(row: dict, raw: dict) -> dict:
    """GB/s, and the time dd needs for the same bytes in the same directions over the measured time."""
    raw_t = row["read"] / (raw["read_gbs"] * 1e9) + row["written"] / (raw["write_gbs"] * 1e9)
    moved = row["read"] + row["written"]
    return row | {"gbytes": moved / 1e9, "gbs": moved / row["seconds"] / 1e9, "vs_raw": raw_t / row["seconds"]}


def bench_backend(io: str, d: Path, shape: tuple[int, int, int], batch: int, chunk_mb: float) -> list[dict]:
    n, chunk = shape[0], chunk_samples(shape, chunk_mb)
    geometry, rows = StreamGeometry(n, chunk, chunk), (n + chunk, *shape[1:])
    fp = ActivationStream(open_stream(d / f"fp_{io}.bin", rows, create=True, io=io), geometry)
    qs = ActivationStream(open_stream(d / f"quant_{io}.bin", rows, create=True, io=io), geometry)
    x = torch.randn(chunk, *shape[1:]).half()  # incompressible, reused: the data does not matter, its size does
    for s in range(0, n, chunk):
        fp.write(s, x[: min(chunk, n - s)])
        qs.write(s, x[: min(chunk, n - s)])
    S = n * shape[1] * shape[2] * 2

    def train_epoch():
        for _ in prefetch(lambda a: (qs.read(a, a + batch), fp.read(a, a + batch)), range(0, n, batch), depth=2):
            pass

    rows = [
        phase("fp update (read+write)", lambda: fp.update(lambda c: c, progress=d / "progress.json", tag="fp"), S, S),
        phase("train epoch (read both)", train_epoch, 2 * S, 0),
        phase("quant update (read+write)", lambda: qs.update(lambda c: c, progress=d / "progress.json", tag="q"), S, S),
    ]
    summed = {k: sum(r[k] for r in rows) for k in ("seconds", "cpu_seconds", "read", "written")}
    rows.append({"phase": "block total", **summed,
                 "cache_dropped": all(r["cache_dropped"] for r in rows)})
    for r in rows:
        r["backend"] = io
    fp.close()
    qs.close()
    (d / f"fp_{io}.bin").unlink()
    (d / f"quant_{io}.bin").unlink()
    (d / "progress.json").unlink(missing_ok=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, required=True, help="a directory on the disk to measure")
    p.add_argument("--samples", type=int, default=96, help="N: calibration samples per stream")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=4096, help="H (4096: Llama-2-7B; 16 MiB per fp16 sample)")
    p.add_argument("--batch", type=int, default=2, help="samples per training read (block_ap.batch_size)")
    p.add_argument("--chunk-mb", type=float, default=64, help="offload.chunk_mb of the in-place updates")
    p.add_argument("--repeat", type=int, default=1, help="runs per backend, alternating; medians shown")
    p.add_argument("--json", type=Path, help="write the results (every run) here")
    args = p.parse_args(argv)
    shape = (args.samples, args.seqlen, args.hidden)
    nbytes = shape[0] * shape[1] * shape[2] * 2
    args.dir.mkdir(parents=True, exist_ok=True)
    if not drop_caches():
        print("warning: cannot drop the page cache (not root): buffered numbers include cached reads", file=sys.stderr)
    ok, why = aio_available(args.dir)  # builds the op now (first use: minutes), not inside a timed phase
    backends = ["buffered", "aio"] if ok else ["buffered"]
    if not ok:
        print(f"warning: aio not measured: {why}", file=sys.stderr)

    t0 = time.time()
    before = raw_bandwidth(args.dir / "raw_dd.bin", nbytes)
    order = [io for k in range(args.repeat) for io in (backends if k % 2 == 0 else backends[::-1])]
    rows = [r for io in order for r in bench_backend(io, args.dir, shape, args.batch, args.chunk_mb)]
    after = raw_bandwidth(args.dir / "raw_dd.bin", nbytes)
    raw = {k: (before[k] + after[k]) / 2 for k in before}
    rows = [score(r, raw) for r in rows]

    print(f"disk under {args.dir}: dd O_DIRECT {nbytes / 2**30:.2f} GiB, bs=16M: "
          f"write {before['write_gbs']:.3f} / {after['write_gbs']:.3f} GB/s, "
          f"read {before['read_gbs']:.3f} / {after['read_gbs']:.3f} GB/s (before / after)")
    print(f"streams: 2 x {shape} fp16 = 2 x {nbytes / 2**30:.2f} GiB, batch {args.batch}, chunk {args.chunk_mb:g} MiB")
    print(f"{'backend':8} {'phase':28} {'GB':>6} {'s':>7} {'GB/s':>7} {'vs raw':>7} {'CPU s':>7}")
    for io in backends:
        for name in dict.fromkeys(r["phase"] for r in rows):
            runs = [r for r in rows if r["backend"] == io and r["phase"] == name]
            med = {k: statistics.median(r[k] for r in runs)
                   for k in ("gbytes", "seconds", "gbs", "vs_raw", "cpu_seconds")}
            print(f"{io:8} {name:28} {med['gbytes']:6.2f} {med['seconds']:7.2f} {med['gbs']:7.3f} "
                  f"{med['vs_raw']:7.2f} {med['cpu_seconds']:7.2f}")
    if args.json:
        result = {"shape": shape, "batch": args.batch, "chunk_mb": args.chunk_mb, "repeat": args.repeat,
                  "raw_before": before, "raw_after": after, "raw_mean": raw, "rows": rows, "aio": ok or why,
                  "wall_seconds": time.time() - t0}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
