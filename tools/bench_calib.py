"""Benchmark: Block-AP's calibration step on local corpora from 10 MB to several GB (docs/DATA.md).

Builds the corpora under --work (never the repository) from any text: the Python documentation sources
(``/usr/share/doc/python3.11/html/_sources``, one document per file), written as ``.jsonl``:

- ``small.jsonl``: every document of the set but each tenth (the same mix of lengths), up to --small-mb MB;
- ``mid.jsonl``: the whole set repeated to about --mid-mb MB;
- ``big.jsonl``: the whole set repeated to about --big-gb GB, one file;
- ``folder/part-NNNN.jsonl``: the same repeats, one file per copy.

Each measurement runs in a fresh process (so peak RSS is that process's own): load the tokenizer, then
``build_calibration`` exactly as ``frugal-qat block-ap`` calls it, without a cache (the windows are drawn every
time). It reports the time to build the windows (what stands between the start of Block-AP and its first block,
besides opening the model, which does not depend on the corpus) in wall and CPU seconds (CPU time is less
disturbed by other jobs on a shared machine), the process's peak RSS, and the windows' sha256, so a second run
with the same seed shows the same windows.

    python tools/bench_calib.py --model /tmp/smollm2 --work /tmp/calib_bench --reps 5
    python tools/bench_calib.py --model /tmp/smollm2 --work /tmp/calib_bench --sets paper   # 4096 + 64 windows
    python tools/bench_calib.py --model /tmp/smollm2 --work /tmp/calib_bench --sets old --old-tree /tmp/old

``--old-tree`` points at a checkout of the code before streaming calibration (``git archive 1eec440 | tar -x -C
/tmp/old``); its rows load the whole corpus (only the small corpora: the old loader needs ~20 GB for 4 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
REPO = Path(__file__).resolve().parent.parent


def make_corpora(work: Path, small_mb: float, big_gb: float, mid_mb: float) -> dict[str, Path]:
    """Write the corpora (once; kept between runs) and return their paths by name."""
    work.mkdir(parents=True, exist_ok=True)
    files = sorted(DOCS.rglob("*.rst.txt"))
    if not files:
        sys.exit(f"no text under {DOCS}: apt-get install -y python3.11-doc")
    lines = [json.dumps({"text": f.read_text(encoding="utf-8")}) + "\n" for f in files]
    one_copy = "".join(lines)
    out = {"small": work / "small.jsonl", "mid": work / "mid.jsonl", "big": work / "big.jsonl",
           "folder": work / "folder"}
    if not out["small"].exists():
        take, size = [], 0
        for i, line in enumerate(lines):
            if i % 10 == 9:
                continue
            if size + len(line) > small_mb * 1e6:
                break
            take.append(line)
            size += len(line)
        out["small"].write_text("".join(take))
    copies_mid = max(1, round(mid_mb * 1e6 / len(one_copy)))
    if not out["mid"].exists():
        out["mid"].write_text(one_copy * copies_mid)
    copies = max(1, round(big_gb * 1e9 / len(one_copy)))
    if not out["big"].exists():
        tmp = out["big"].with_suffix(".partial")
        with open(tmp, "w") as f:
            for _ in range(copies):
                f.write(one_copy)
        tmp.rename(out["big"])
    if not out["folder"].exists():
        tmp = work / "folder.partial"
        tmp.mkdir(exist_ok=True)
        for k in range(copies):
            (tmp / f"part-{k:04d}.jsonl").write_text(one_copy)
        tmp.rename(out["folder"])
    return out


def corpus_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def child(args) -> None:
    """One measurement, in this process; prints one JSON line."""
    import logging

    import psutil

    read = {}

    class Capture(logging.Handler):  # the draw's "read N documents, C characters, T tokens" line
        def emit(self, record):
            if "read %d documents" in str(record.msg):
                read.update(documents=record.args[-3], tokens=record.args[-1])

    logging.getLogger("frugal_qat.data.windows").addHandler(Capture())
    logging.getLogger("frugal_qat.data.windows").setLevel(logging.INFO)
    t0 = time.perf_counter()
    from frugal_qat.cli.main import load_tokenizer
    from frugal_qat.data.windows import build_calibration, fingerprint_windows

    tok = load_tokenizer(Path(args.model))
    rss_before = psutil.Process().memory_info().rss
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    t1 = time.perf_counter()
    kwargs = {} if args.sampling == "old" else {"sampling": args.sampling}
    train, val = build_calibration(tok, args.source, args.n_train, args.n_val, args.seqlen, args.seed, None, **kwargs)
    t2 = time.perf_counter()
    end = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"build_s": t2 - t1, "process_s": t2 - t0, "peak_rss": end.ru_maxrss * 1024,
                      "rss_before": rss_before,
                      "build_cpu_s": end.ru_utime + end.ru_stime - cpu.ru_utime - cpu.ru_stime,
                      "sha": fingerprint_windows(__import__("torch").cat([train, val]))[:12], **read}))


def measure(args, source: Path, sampling: str, n_train: int, n_val: int, seed: int, tree: Path = REPO) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", str(args.model), "--source", str(source),
           "--sampling", sampling, "--n-train", str(n_train), "--n-val", str(n_val), "--seqlen", str(args.seqlen),
           "--seed", str(seed)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"child failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "seed": seed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/tmp/smollm2", help="checkpoint whose tokenizer is used")
    p.add_argument("--work", default="/tmp/calib_bench", help="where the corpora are written (not the repository)")
    p.add_argument("--small-mb", type=float, default=10)
    p.add_argument("--mid-mb", type=float, default=100)
    p.add_argument("--big-gb", type=float, default=4)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-val", type=int, default=64)
    p.add_argument("--seed", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--seeds", default="2,3,4", help="seeds measured (the cost depends on the documents drawn)")
    p.add_argument("--reps", type=int, default=2, help="fresh processes per seed and row (the second run checks that "
                   "the windows are the same)")
    p.add_argument("--sets", default="main", help="comma-separated: main (every corpus, --n-train + --n-val windows), "
                   "paper (4096 + 64 windows from the 4 GB corpora), old (the loader before streaming)")
    p.add_argument("--old-tree", type=Path, help="a checkout of the loader before streaming, for --sets old")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--sampling", default="documents", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    corpora = make_corpora(Path(args.work), args.small_mb, args.big_gb, args.mid_mb)
    plan = []
    if "main" in args.sets:  # the same windows from every corpus size
        plan += [(name, s, args.n_train, args.n_val, REPO) for s in ("documents", "joined")
                 for name in ("small", "mid", "big", "folder")]
    if "paper" in args.sets:  # the paper's 4096 + 64 windows (the 10 MB corpus holds too few)
        plan += [(name, s, 4096, 64, REPO) for s in ("documents", "joined") for name in ("big", "folder")]
    if "old" in args.sets:  # the loader before streaming (whole load): only the small corpora
        if not args.old_tree:
            sys.exit("--sets old needs --old-tree")
        plan += [(name, "old", args.n_train, args.n_val, args.old_tree) for name in ("small", "mid")]
    # Repetitions go round the whole plan, so a burst of load on the (shared) machine hits every row alike.
    seeds = [int(x) for x in args.seeds.split(",")]
    results: dict[int, list[dict]] = {i: [] for i in range(len(plan))}
    for _ in range(args.reps):
        for seed in seeds:
            for i, (name, sampling, n_train, n_val, tree) in enumerate(plan):
                results[i].append(measure(args, corpora[name], sampling, n_train, n_val, seed, tree))
    print(f"tokenizer {args.model}, windows of {args.seqlen}, seeds {args.seeds}, {args.reps} fresh processes per "
          "seed and row. Build: wall seconds, median over the runs; CPU: user + system seconds of all threads, mean; "
          "read: documents and tokens tokenized, mean over the seeds; same windows: every seed's runs agree")
    print("| corpus | size | code / sampling | windows | read: docs, M tokens | build s | build CPU s | "
          "process s | peak RSS GiB | RSS before build GiB | same windows |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for i, (name, sampling, n_train, n_val, _) in enumerate(plan):
        runs = results[i]
        code = "before (whole load)" if sampling == "old" else f"streaming / {sampling}"
        same = all(len({r["sha"] for r in runs if r["seed"] == s}) == 1 for s in seeds)
        first = [next(r for r in runs if r["seed"] == s) for s in seeds]
        read = (f"{statistics.mean(r['documents'] for r in first):.0f}, "
                f"{statistics.mean(r['tokens'] for r in first) / 1e6:.2f}") if "tokens" in runs[0] else "all"
        print(f"| {name} | {corpus_bytes(corpora[name]) / 1e9:.3f} GB | {code} | {n_train}+{n_val} | {read} | "
              f"{statistics.median(r['build_s'] for r in runs):.2f} | "
              f"{statistics.mean(r['build_cpu_s'] for r in runs):.2f} | "
              f"{statistics.median(r['process_s'] for r in runs):.1f} | {max(r['peak_rss'] for r in runs) / 2**30:.3f} | "
              f"{statistics.median(r['rss_before'] for r in runs) / 2**30:.3f} | {'yes' if same else 'NO'} |",
              flush=True)

if __name__ == "__main__":
    main()
