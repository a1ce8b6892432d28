"""Block-AP quality on a real model: held-out perplexity of fp16, RTN and Block-AP settings, as a table.

    FRUGAL_QAT_CACHE=/tmp/fqcache .venv/bin/python tools/bench_quality.py [--model smollm2-135m | gemma3-270m]
        [--checkpoint DIR] [--root DIR] [--only NAME]...

``--model`` picks the model and its rows (docs/QUALITY.md has a table for each): SmolLM2-135M (Llama, the
checkpoint made by tools/make_smollm2_checkpoint.py, default root /tmp/fq_bench) or Gemma 3 270M (made by
tools/make_gemma3_checkpoint.py, default root /tmp/fq_bench_gemma3; its Block-AP and E2E-QP rows run the shipped
recipes ``recipes/gemma3_270m_w{4,3,2}g64.yaml`` unchanged, so each recipe reproduces its rows).

Every row goes through the real CLI in a subprocess (``frugal-qat block-ap`` then ``frugal-qat ppl``), so the
numbers are those a user gets. A row's settings are a base recipe plus overrides; the merged recipe is written to
``ROOT/NAME/recipe.yaml`` and passed with ``--recipe``, so it documents the row exactly. Results land in
``ROOT/NAME/result.json``; a row whose result exists is skipped (the benchmark resumes after a kill), ``--only NAME``
runs that row again from scratch. Rows run one at a time: each already uses both cores.

Per row: perplexity on the held-out demo text (40 windows x 512 tokens, the demo protocol), Block-AP wall time
(from the run's summary.json) and the CPU seconds of its subprocess (wall time is noisy on a shared machine; CPU
time is not), peak RSS (summary.json ``peak_rss_bytes``), packed output size, and the share of the fp16 -> RTN gap
that Block-AP closed at the same bits. ``--table`` prints the table from the stored results without running.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "frugal_qat"]
# Buffered streams: the I/O backend does not change the numbers, and the default (auto -> DeepSpeed async_io) can
# spend minutes JIT-building its op on a fresh machine, which would land in the first row's wall time. (The
# SmolLM2 rows of docs/QUALITY.md ran with the mmap backend, since removed.)
BLOCK_AP_ARGS = ["--device", "cpu", "--io", "buffered"]
PPL_ARGS = ["--data", "demo-heldout", "--seqlen", "512", "--max-windows", "40", "--device", "cpu"]
DEMO = REPO / "recipes" / "demo.yaml"


def gemma3_recipe(bits: int) -> Path:
    return REPO / "recipes" / f"gemma3_270m_w{bits}g64.yaml"


@dataclass
class Row:
    """One configuration: ``recipe`` (None: the fp16 model itself) plus ``set`` = {"section.field": value}.

    ``after``: the name of a Block-AP row; this row then runs E2E-QP (the recipe's ``e2e_qp`` section) on that
    row's run directory, under ``--profile`` (the memory breakdown of docs/E2E_QP.md), instead of Block-AP.
    """

    name: str
    recipe: Path | None
    set: dict = field(default_factory=dict)
    note: str = ""
    after: str | None = None


def rtn(bits: int, recipe: Path = DEMO) -> Row:
    """Round-to-nearest: the recipe with 0 epochs (min-max init, no training; 32 windows, which only feed the
    validation MSE: the weights do not depend on the calibration data)."""
    return Row(f"rtn_w{bits}g64", recipe, {"quant.wbits": bits, "block_ap.epochs": 0, "data.train_size": 32},
               "round-to-nearest (min-max)")


def demo(bits: int, **extra) -> dict:
    return {"quant.wbits": bits, **extra}


def e2e(bits: int, lr: float, after: str) -> Row:
    """E2E-QP sized for this CPU: 64 windows x 256 tokens of the calibration text, batch 4, 1 epoch (16 steps)."""
    settings = {"quant.wbits": bits, "e2e_qp.data": "demo", "e2e_qp.seqlen": 256, "e2e_qp.train_size": 64,
                "e2e_qp.batch_size": 4, "e2e_qp.grad_accum": 1, "e2e_qp.epochs": 1, "e2e_qp.lr": lr,
                "e2e_qp.logits_chunk": 256}
    return Row(f"e2e_w{bits}", DEMO, settings, f"E2E-QP after {after}", after=after)


# SmolLM2-135M: the measured configurations, in the order they were run (docs/QUALITY.md discusses each).
SMOLLM2_ROWS: list[Row] = [
    Row("fp16", None, note="the unquantized checkpoint"),
    rtn(3),
    rtn(4),
    rtn(2),
    # The demo budget (32 windows x 256 tokens, 2 epochs, batch 2: 32 steps per block) with learning rates sized
    # for ~32 steps per block, not the paper's 4096 (docs/QUALITY.md)...
    Row("bap_w3_lr", DEMO, demo(3, **{"block_ap.weight_lr": 1e-3, "block_ap.quant_lr": 1e-3}), "demo budget, larger lrs"),
    Row("bap_w4_lr", DEMO, demo(4, **{"block_ap.weight_lr": 3e-4, "block_ap.quant_lr": 3e-4}), "demo budget, larger lrs"),
    Row("bap_w2_lr", DEMO, demo(2, **{"block_ap.weight_lr": 1e-3, "block_ap.quant_lr": 1e-3}), "demo budget, larger lrs"),
    # E2E-QP on top of the Block-AP rows (issue 4): only the step sizes train, on the LM loss.
    e2e(3, 1e-4, "bap_w3_lr"),
    e2e(2, 2e-4, "bap_w2_lr"),
    e2e(4, 1e-4, "bap_w4_lr"),
    # w4g64 short of 5 % of fp16 at the demo budget: a larger lr, then 4x the calibration windows (the streams
    # live on disk, so more windows cost time, not memory).
    Row("bap_w4_lr1e3", DEMO, demo(4, **{"block_ap.weight_lr": 1e-3, "block_ap.quant_lr": 1e-3}), "demo budget, lr 1e-3"),
    Row("bap_w4_n128", DEMO, demo(4, **{"data.train_size": 128, "block_ap.weight_lr": 3e-4, "block_ap.quant_lr": 3e-4}),
        "4x the windows"),
    Row("bap_w4_n256", DEMO, demo(4, **{"data.train_size": 256, "block_ap.weight_lr": 3e-4, "block_ap.quant_lr": 3e-4}),
        "8x the windows"),
    Row("bap_w4_n256_s3", DEMO, demo(4, **{"data.train_size": 256, "data.seed": 3, "block_ap.weight_lr": 3e-4,
                                           "block_ap.quant_lr": 3e-4}), "8x the windows, another calibration draw"),
    # ...and the paper's learning rates at the same budget, for comparison.
    Row("bap_w3_paper", DEMO, demo(3), "demo recipe: paper lrs"),
]

# Gemma 3 270M: the SmolLM2 recipes' budgets, each Block-AP / E2E-QP row one shipped recipe as it is.
GEMMA3_ROWS: list[Row] = [
    Row("fp16", None, note="the unquantized checkpoint (the GGUF's Q4_K_M/Q5_0 weights in fp16)"),
    *(rtn(bits, gemma3_recipe(bits)) for bits in (4, 3, 2)),
    *(Row(f"bap_w{bits}", gemma3_recipe(bits), note=f"recipes/{gemma3_recipe(bits).name}") for bits in (3, 2, 4)),
    *(Row(f"e2e_w{bits}", gemma3_recipe(bits), note=f"E2E-QP after bap_w{bits}", after=f"bap_w{bits}")
      for bits in (3, 2)),
    # The SmolLM2 lrs, tried first: Gemma's weights and step sizes are ~6x smaller than SmolLM2's, and Adam moves
    # every parameter by about lr per step, so 1e-3 is ~6x too large here (docs/QUALITY.md).
    Row("bap_w3_lr1e3", gemma3_recipe(3), {"block_ap.weight_lr": 1e-3, "block_ap.quant_lr": 1e-3},
        "the SmolLM2 lrs (1e-3)"),
    # SmolLM2's w4 recipe: 8x the windows (~1 h here; not run yet)
    Row("bap_w4_n256", gemma3_recipe(4), {"data.train_size": 256}, "8x the windows"),
]


@dataclass
class Model:
    """A benchmarked model: its rows, where its checkpoint and results go by default, how its checkpoint is made."""

    rows: list[Row]
    checkpoint: Path
    root: Path
    make: list[str]  # the command (argv after the python executable) that writes the checkpoint; {out} = its path


MODELS = {
    "smollm2-135m": Model(SMOLLM2_ROWS, Path("/tmp/demo/smollm2"), Path("/tmp/fq_bench"),
                          ["tools/make_smollm2_checkpoint.py", "--out", "{out}"]),
    "gemma3-270m": Model(GEMMA3_ROWS, Path("/tmp/gemma3-270m"), Path("/tmp/fq_bench_gemma3"),
                         ["tools/make_gemma3_checkpoint.py", "--out", "{out}"]),
}


def merged_recipe(row: Row) -> dict:
    recipe = yaml.safe_load(row.recipe.read_text()) or {}
    for key, value in row.set.items():
        section, _, name = key.partition(".")
        recipe.setdefault(section, {})[name] = value
    return recipe


def run_cli(args: list[str], log: Path) -> tuple[float, float]:
    """Run ``frugal-qat ARGS`` with output to ``log``; return (wall seconds, CPU seconds of the subprocess)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(CLI + args, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        tail = log.read_text().splitlines()[-5:]
        raise RuntimeError(f"frugal-qat {args[0]} failed (exit {proc.returncode}); see {log}:\n" + "\n".join(tail))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.time() - t, cpu


def run_row(row: Row, root: Path, model: Path) -> dict:
    d = root / row.name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    res: dict = {"name": row.name, "note": row.note}
    target = model
    if row.recipe is not None:
        recipe = merged_recipe(row)
        (d / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        res["recipe"] = recipe
        target = d / "run"
        if row.after:
            res.update(e2e_qp=run_e2e(root / row.after / "run", d), wbits=recipe["quant"]["wbits"])
        else:
            _, res["block_ap_cpu_s"] = run_cli(["block-ap", "--model", str(model), "--out", str(target),
                                                "--recipe", str(d / "recipe.yaml"), *BLOCK_AP_ARGS,
                                                "--profile", str(d / "profile")], d / "block_ap.log")
            summary = json.loads((target / "summary.json").read_text())
            (phase,) = [s for s in json.loads((d / "profile.json").read_text())["segments"] if s["kind"] == "phase"]
            res.update(block_ap_s=summary["seconds"], peak_rss_bytes=summary["peak_rss_bytes"],
                       output_bytes=summary["output_bytes"], wbits=summary["wbits"], planned_ram_bytes=phase["predicted"],
                       last_val_mse=[b["val_mse"][-1] for b in summary["blocks"] if b["val_mse"]][-1])
    res["ppl_s"], _ = run_cli(["ppl", "--model", str(target), "--json", str(d / "ppl.json"), *PPL_ARGS], d / "ppl.log")
    res["ppl"] = json.loads((d / "ppl.json").read_text())["ppl"]
    (d / "result.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def run_e2e(run: Path, d: Path) -> dict:
    """E2E-QP on the Block-AP run ``run`` into ``d/run`` under the memory profiler; its figures for the result."""
    if not (run / "summary.json").is_file():
        raise RuntimeError(f"{run} is missing: run its Block-AP row first")
    wall, cpu = run_cli(["e2e-qp", "--run", str(run), "--out", str(d / "run"), "--recipe", str(d / "recipe.yaml"),
                         "--device", "cpu", "--profile", str(d / "profile")], d / "e2e_qp.log")
    summary = json.loads((d / "run" / "summary.json").read_text())
    prof = json.loads((d / "profile.json").read_text())
    (phase,) = [s for s in prof["segments"] if s["kind"] == "phase"]
    return {"wall_s": wall, "cpu_s": cpu, "steps": summary["steps"], "loss_first": summary["losses"][0],
            "loss_last": summary["losses"][-1], "peak_rss_bytes": phase["peak_rss"], "planned_bytes": phase["predicted"]}


def describe(res: dict) -> str:
    """The settings that matter, compactly: N x L, epochs, batch, lrs (and min lr ratio / clipping when set)."""
    r = res.get("recipe")
    if r is None:
        return "-"
    if "e2e_qp" in res:
        e = r["e2e_qp"]
        return f"E2E-QP {e['train_size']}x{e['seqlen']} b{e['batch_size']} ({res['e2e_qp']['steps']} st) lr {e['lr']:g}"
    d, b = r.get("data", {}), r.get("block_ap", {})
    if b.get("epochs", 2) == 0:
        return "RTN"
    wbits = r["quant"]["wbits"]
    wlr = b.get("weight_lr") or (2e-5 if wbits == 2 else 1e-5)
    steps = d["train_size"] // b.get("batch_size", 2) * b.get("epochs", 2)
    s = f"{d['train_size']}x{d['seqlen']} e{b.get('epochs', 2)} b{b.get('batch_size', 2)} ({steps} st) " \
        f"wlr {wlr:g} qlr {b.get('quant_lr', 1e-4):g}"
    if "min_lr_ratio" in b:
        s += f" min {b['min_lr_ratio']:g}"
    if b.get("max_grad_norm"):
        s += f" clip {b['max_grad_norm']:g}"
    if "seed" in d:
        s += f" seed {d['seed']}"
    return s


def table(results: list[dict]) -> str:
    fp = next((r["ppl"] for r in results if r["name"] == "fp16"), None)
    rtn_ppl = {r["wbits"]: r["ppl"] for r in results if r.get("recipe") and describe(r) == "RTN"}
    head = f"{'row':<16} {'bits':>4} {'settings':<52} {'ppl':>10} {'gap':>5} {'B-AP s':>7} {'CPU s':>7} {'RSS GiB':>7} {'MiB':>6}"
    lines = [head, "-" * len(head)]
    for r in results:
        bits = r.get("wbits", 16)
        gap = "-"
        if fp and bits in rtn_ppl and describe(r) != "RTN":
            gap = f"{(rtn_ppl[bits] - r['ppl']) / (rtn_ppl[bits] - fp):.0%}"
        lines.append(
            f"{r['name']:<16} {bits:>4} {describe(r):<52} {r['ppl']:>10.2f} {gap:>5} "
            f"{r.get('block_ap_s', r.get('e2e_qp', {}).get('wall_s', 0)):>7.0f} "
            f"{r.get('block_ap_cpu_s', r.get('e2e_qp', {}).get('cpu_s', 0)):>7.0f} "
            f"{r.get('peak_rss_bytes', r.get('e2e_qp', {}).get('peak_rss_bytes', 0)) / 2**30:>7.2f} {r.get('output_bytes', 0) / 2**20:>6.1f}"
        )
    lines.append("gap: share of the RTN -> fp16 perplexity gap closed; B-AP s: Block-AP (E2E-QP rows: E2E-QP) wall "
                 "time; CPU s: its CPU time")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2-135m", help="which model's rows to run")
    ap.add_argument("--checkpoint", type=Path, help="its fp16 checkpoint (default /tmp/demo/smollm2 or "
                    "/tmp/gemma3-270m; made with tools/make_{smollm2,gemma3}_checkpoint.py if missing)")
    ap.add_argument("--root", type=Path, help="where runs and results go (default /tmp/fq_bench or "
                    "/tmp/fq_bench_gemma3)")
    ap.add_argument("--only", action="append", metavar="NAME", help="run only this row, again (repeat the flag for several rows)")
    ap.add_argument("--table", action="store_true", help="print the table of stored results and exit")
    ap.add_argument("--list", action="store_true", help="list the rows and their settings")
    args = ap.parse_args(argv)
    model = MODELS[args.model]
    rows, checkpoint, root = model.rows, args.checkpoint or model.checkpoint, args.root or model.root
    names = [r.name for r in rows]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        ap.error(f"unknown row(s) {unknown}; choose from {names}")
    if args.list:
        for r in rows:
            print(f"{r.name:<16} {r.recipe.name if r.recipe else '-':<28} {r.set}  {r.note}")
        return 0
    if not args.table:
        if not (checkpoint / "config.json").exists():
            subprocess.run([sys.executable, *(a.format(out=checkpoint) for a in model.make)], cwd=REPO, check=True)
        os.environ.setdefault("FRUGAL_QAT_CACHE", str(root / "cache"))
        for row in rows:
            done = (root / row.name / "result.json").exists()
            if (args.only and row.name not in args.only) or (done and not args.only):
                continue
            print(f"== {row.name}: {row.note}", flush=True)
            res = run_row(row, root, checkpoint)
            print(f"   ppl {res['ppl']:.2f}" + (f", Block-AP {res['block_ap_s']:.0f} s" if "block_ap_s" in res else ""),
                  flush=True)
    results = [json.loads(p.read_text()) for n in names if (p := root / n / "result.json").exists()]
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
