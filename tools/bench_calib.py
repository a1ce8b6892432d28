"""Benchmark: Block-AP's start on local calibration corpora from 10 MB to 4 GB (docs/DATA.md section 6).

Builds the corpora under --work (never the repository) from any text: the Python documentation sources
(``/usr/share/doc/python3.11/html/_sources``, 497 files, one document each), written as ``.jsonl``. Copy k of the
set holds every document once, in a seeded order of its own, each headed by a line ``[copy k]`` (so copies do not
repeat a document's text or a stretch of the file):

- ``small.jsonl``: copy 0's documents up to --small-mb MB (a seeded sample of the set: the same document mix);
- ``mid.jsonl``: copies 0, 1, ... to about --mid-mb MB;
- ``big.jsonl``: copies 0, 1, ... to about --big-gb GB, one file;
- ``folder/part-NNNN.jsonl``: the same copies, one file each.

``--sets cli`` (the default; issue 14's row): real ``frugal-qat block-ap`` starts on SmolLM2 (w2g64, windows of
--seqlen, --n-train + --n-val of them, --device cpu) on the small and the big corpus (--corpora), each killed
exactly where block 0 starts (the run's ``FRUGAL_QAT_STAGE_FILE`` is a named pipe that holds it at its marks), with
a fresh windows cache so every run draws its windows. It reports the wall seconds from the launch to the embedding
stage and to block 0, the process's CPU seconds and peak RSS to block 0 (``wait4``) and to the embedding stage
(``VmHWM``), what the draw read, and whether a second run with the same seed wrote the same windows (sha256 of
``calib.safetensors`` / the manifest's ``windows_sha256``).

``--sets main,paper,old``: the draw alone, in a fresh process per measurement (load the tokenizer, then
``build_calibration`` as the CLI calls it, without a cache): wall and CPU seconds, peak RSS, the windows' sha256.

    python tools/bench_calib.py --seeds 2,3 --reps 2                       # issue 14's row (--sets cli)
    python tools/bench_calib.py --sets main --reps 5
    python tools/bench_calib.py --sets paper                               # 4096 + 64 windows, the draw alone
    python tools/bench_calib.py --sets old --old-tree /tmp/old

``--old-tree`` points at a checkout of the code before streaming calibration (``git archive 1eec440 | tar -x -C
/tmp/old``); its rows load the whole corpus (only the small corpora: the old loader needs ~20 GB for 4 GB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
REPO = Path(__file__).resolve().parent.parent


def corpus_copy(docs: list[str], copy: int) -> list[str]:
    """Copy ``copy`` of the document set as ``.jsonl`` lines: the documents in a seeded order of the copy's own,
    each headed by a line naming the copy, so no two copies hold the same document text or the same stretches."""
    order = random.Random(copy).sample(range(len(docs)), len(docs))
    return [json.dumps({"text": f"[copy {copy}]\n{docs[i]}"}) + "\n" for i in order]


def make_corpora(work: Path, names: set[str], small_mb: float, big_gb: float, mid_mb: float) -> dict[str, Path]:
    """Write the corpora in ``names`` (once; kept between runs) and return their paths by name."""
    work.mkdir(parents=True, exist_ok=True)
    files = sorted(DOCS.rglob("*.rst.txt"))
    if not files:
        sys.exit(f"no text under {DOCS}: apt-get install -y python3.11-doc")
    docs = [f.read_text(encoding="utf-8") for f in files]
    set_bytes = sum(len(line) for line in corpus_copy(docs, 0))
    out = {"small": work / "small.jsonl", "mid": work / "mid.jsonl", "big": work / "big.jsonl",
           "folder": work / "folder"}
    if "small" in names and not out["small"].exists():  # copy 0's first documents: a seeded sample of the set
        take, size = [], 0
        for line in corpus_copy(docs, 0):
            if size + len(line) > small_mb * 1e6:
                break
            take.append(line)
            size += len(line)
        out["small"].write_text("".join(take))
    for name, target in (("mid", mid_mb * 1e6), ("big", big_gb * 1e9)):
        if name in names and not out[name].exists():
            tmp = out[name].with_suffix(".partial")
            with open(tmp, "w") as f:
                for k in range(max(1, round(target / set_bytes))):
                    f.writelines(corpus_copy(docs, k))
            tmp.rename(out[name])
    if "folder" in names and not out["folder"].exists():
        tmp = work / "folder.partial"
        tmp.mkdir(exist_ok=True)
        for k in range(max(1, round(big_gb * 1e9 / set_bytes))):
            (tmp / f"part-{k:04d}.jsonl").write_text("".join(corpus_copy(docs, k)))
        tmp.rename(out["folder"])
    return {k: v for k, v in out.items() if k in names}


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


def measure_cli(args, source: Path, sampling: str, n_train: int, n_val: int, seed: int) -> dict:
    """One real ``frugal-qat block-ap`` start, held at its first two stage marks and killed (SIGKILL) at block 0's.

    The run's stage log (``FRUGAL_QAT_STAGE_FILE``) is a named pipe without a reader, so each mark holds the run
    in opening it (its main thread waits in ``wait_for_partner``). At the embedding stage's mark (the windows are
    drawn, the run directory written) the process's peak RSS so far (``VmHWM``) and the time are taken and the mark
    let through; at block 0's mark the time is taken and the run killed. Killing there exactly, not after polling,
    keeps block 0's first stream update and its memory out by a load-independent amount (none). The child's own
    resource usage (``wait4``) gives its peak RSS and CPU seconds to block 0. A fresh windows cache
    (``FRUGAL_QAT_CACHE``) per run, so every run draws its windows; the windows are compared through the sha256
    of the run's ``calib.safetensors`` and the manifest's ``windows_sha256``."""
    scratch = Path(args.work) / "runs"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    stages, out, log = scratch / "stages.fifo", scratch / "run", scratch / "log.txt"
    os.mkfifo(stages)
    cmd = [sys.executable, "-m", "frugal_qat", "block-ap", "--model", str(args.model), "--out", str(out),
           "--calib", str(source), "--sampling", sampling, "--seqlen", str(args.seqlen), "--train-size",
           str(n_train), "--val-size", str(n_val), "--seed", str(seed), "--device", "cpu",
           "--wbits", "2", "--group-size", "64"]  # the paper's w2g64 (SmolLM2's 576 columns have no groups of 128)
    env = {**os.environ, "PYTHONPATH": str(REPO), "FRUGAL_QAT_STAGE_FILE": str(stages),
           "FRUGAL_QAT_CACHE": str(scratch / "cache")}
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=scratch)

    def held() -> bool:  # the run's main thread waits in opening the stage log, which has no reader
        return Path(f"/proc/{proc.pid}/wchan").read_text() == "wait_for_partner"

    reader, pending, t_embed, rss_embed, t_block = None, b"", None, None, None
    while t_block is None:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = status
            sys.exit(f"block-ap ended before block 0 ({' '.join(cmd)}):\n{log.read_text()[-3000:]}")
        if reader is not None:  # let the embedding stage's mark through, then close again
            try:
                pending += os.read(reader, 1 << 16)
            except BlockingIOError:
                pass
            if b"\n" in pending:
                if not pending.startswith(b"-/embed\t"):
                    sys.exit(f"expected the embedding stage's mark first, got {pending!r}")
                os.close(reader)
                reader = None
        elif held() and t_embed is None:  # the embedding stage's mark: the draw and the run's set-up are done
            t_embed = time.time()
            status_lines = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            rss_embed = next(int(x.split()[1]) * 1024 for x in status_lines if x.startswith("VmHWM:"))
            reader = os.open(stages, os.O_RDONLY | os.O_NONBLOCK)
        elif held():  # block 0's mark
            t_block = time.time()
            proc.send_signal(signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = status
        time.sleep(0.005)
    read = re.search(r"read (\d+) documents, \d+ characters, (\d+) tokens", log.read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    calib_sha = hashlib.sha256((out / "calib.safetensors").read_bytes()).hexdigest()
    row = {"first_block_s": t_block - t0, "embed_s": t_embed - t0, "peak_rss": usage.ru_maxrss * 1024,
           "peak_rss_embed": rss_embed,
           "cpu_s": usage.ru_utime + usage.ru_stime,
           "sha": f"{calib_sha[:12]}/{manifest['data']['windows_sha256'][:12]}",
           "seed": seed, "documents": int(read.group(1)), "tokens": int(read.group(2))}
    shutil.rmtree(scratch)
    return row


def cli_table(plan: list, results: dict, corpora: dict, seeds: list[int]) -> None:
    print("| corpus | size | sampling | windows x 2048 | runs | read: docs, M tokens | to embedding s | to block 0 s | "
          "CPU s to block 0 | peak RSS GiB to embedding: max (min) | peak RSS GiB to block 0: max (min) | same windows "
          "(2nd run, same seed) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for i, (name, sampling, n_train, n_val) in enumerate(plan):
        runs = results[i]
        same = all(len({r["sha"] for r in runs if r["seed"] == s}) == 1 for s in seeds)
        summary[(name, sampling)] = row = {
            "embed": statistics.median(r["embed_s"] for r in runs),
            "first": statistics.median(r["first_block_s"] for r in runs),
            "cpu": statistics.median(r["cpu_s"] for r in runs),
            "rss": max(r["peak_rss"] for r in runs), "rss_min": min(r["peak_rss"] for r in runs),
            "rss_e": max(r["peak_rss_embed"] for r in runs), "rss_e_min": min(r["peak_rss_embed"] for r in runs)}
        first = [next(r for r in runs if r["seed"] == s) for s in seeds]
        read = (f"{statistics.mean(r['documents'] for r in first):.0f}, "
                f"{statistics.mean(r['tokens'] for r in first) / 1e6:.2f}")
        print(f"| {name} | {corpus_bytes(corpora[name]) / 1e9:.3f} GB | {sampling} | {n_train}+{n_val} | {len(runs)} | "
              f"{read} | {row['embed']:.1f} | {row['first']:.1f} | {row['cpu']:.1f} | "
              f"{row['rss_e'] / 2**30:.3f} ({row['rss_e_min'] / 2**30:.3f}) | "
              f"{row['rss'] / 2**30:.3f} ({row['rss_min'] / 2**30:.3f}) | "
              f"{'yes' if same else 'NO'} ({', '.join(sorted({r['sha'] for r in runs}))}) |", flush=True)
    for sampling in sorted({s for _, s, _, _ in plan}):
        small, big = summary.get(("small", sampling)), summary.get(("big", sampling))
        if small and big:
            print(f"big / small ({sampling}): to block 0 {big['first'] / small['first']:.3f}, CPU "
                  f"{big['cpu'] / small['cpu']:.3f}, peak RSS to embedding {big['rss_e'] / small['rss_e']:.3f}, "
                  f"to block 0 {big['rss'] / small['rss']:.3f} (max over runs; target: <= 1.10)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/work/cache/smollm2",
                   help="checkpoint (its tokenizer; with --sets cli, the model)")
    p.add_argument("--work", default="/work/cache/calib_corpus",
                   help="where the corpora are written (not the repository)")
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
    p.add_argument("--sets", default="cli", help="comma-separated: cli (real block-ap starts up to block 0 on the "
                   "10 MB and 4 GB corpora; issue 14's row), main (the draw alone, every corpus, --n-train + --n-val "
                   "windows), paper (the draw alone, 4096 + 64 windows from the 4 GB corpora), old (the loader "
                   "before streaming)")
    p.add_argument("--samplings", default="documents,joined", help="samplings measured by --sets cli and main")
    p.add_argument("--corpora", help="corpora measured by --sets cli and main (default: small,big for cli; "
                   "small,mid,big,folder for main)")
    p.add_argument("--old-tree", type=Path, help="a checkout of the loader before streaming, for --sets old")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--sampling", default="documents", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    sets = set(args.sets.split(","))
    cli_names = args.corpora.split(",") if args.corpora else ["small", "big"]
    main_names = args.corpora.split(",") if args.corpora else ["small", "mid", "big", "folder"]
    needs = {"cli": set(cli_names), "main": set(main_names),
             "paper": {"big", "folder"}, "old": {"small", "mid"}}
    names = set().union(*(needs[k] for k in sets if k in needs))
    corpora = make_corpora(Path(args.work), names, args.small_mb, args.big_gb, args.mid_mb)
    seeds = [int(x) for x in args.seeds.split(",")]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs", flush=True)
    if "cli" in sets:
        cli_plan = [(name, s, args.n_train, args.n_val) for s in args.samplings.split(",")
                    for name in cli_names]
        cli_results: dict[int, list[dict]] = {i: [] for i in range(len(cli_plan))}
        for _ in range(args.reps):  # round the whole plan, so a burst of load hits every row alike
            for seed in seeds:
                for i, (name, sampling, n_train, n_val) in enumerate(cli_plan):
                    cli_results[i].append(measure_cli(args, corpora[name], sampling, n_train, n_val, seed))
        print(f"frugal-qat block-ap --model {args.model} --seqlen {args.seqlen} --device cpu, seeds {args.seeds}, "
              f"{args.reps} runs per seed and row, each stopped when block 0 starts. Seconds: wall from the launch, "
              "median; CPU: user + system of the process, median; peak RSS: the process's, max over the runs")
        cli_table(cli_plan, cli_results, corpora, seeds)
    plan = []
    if "main" in sets:  # the same windows from every corpus size
        plan += [(name, s, args.n_train, args.n_val, REPO) for s in args.samplings.split(",") for name in main_names]
    if "paper" in sets:  # the paper's 4096 + 64 windows (the 10 MB corpus holds too few)
        plan += [(name, s, 4096, 64, REPO) for s in ("documents", "joined") for name in ("big", "folder")]
    if "old" in sets:  # the loader before streaming (whole load): only the small corpora
        if not args.old_tree:
            sys.exit("--sets old needs --old-tree")
        plan += [(name, "old", args.n_train, args.n_val, args.old_tree) for name in ("small", "mid")]
    # Repetitions go round the whole plan, so a burst of load on the (shared) machine hits every row alike.
    results: dict[int, list[dict]] = {i: [] for i in range(len(plan))}
    for _ in range(args.reps):
        for seed in seeds:
            for i, (name, sampling, n_train, n_val, tree) in enumerate(plan):
                results[i].append(measure(args, corpora[name], sampling, n_train, n_val, seed, tree))
    if plan:
        print(f"tokenizer {args.model}, windows of {args.seqlen}, seeds {args.seeds}, {args.reps} fresh processes "
              "per seed and row. Build: wall seconds, median over the runs; CPU: user + system seconds of all threads, "
              "mean; read: documents and tokens tokenized, mean over the seeds; same windows: every seed's runs agree")
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
                  f"{statistics.median(r['process_s'] for r in runs):.1f} | "
                  f"{max(r['peak_rss'] for r in runs) / 2**30:.3f} | "
                  f"{statistics.median(r['rss_before'] for r in runs) / 2**30:.3f} | {'yes' if same else 'NO'} |",
                  flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
