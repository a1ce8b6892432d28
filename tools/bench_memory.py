"""Memory benchmarks (results and commands in docs/MEMORY.md and docs/PERFORMANCE.md). Each prints a table and
writes JSON; each is rerunnable (models and runs are cached or restarted under --work).

    python tools/bench_memory.py rss        # peak RSS of block-ap vs layers and vs samples (< 10 % change)
    python tools/bench_memory.py iowait     # share of wall time the loop waits on weight/activation I/O (< 5 %)
    python tools/bench_memory.py block70b   # one Llama-2-70B-shaped block: Block-AP and E2E-QP vs the planner

rss:      random Llama models of SmolLM2's width (hidden 576, intermediate 1536, 9/3 heads, vocab 49152) with L
          layers, ``frugal-qat block-ap`` on N calibration windows, each run in a fresh process; the figure is the
          run's own RSS high-water mark (summary.json ``peak_rss_bytes``, VmHWM), beside the planner's RAM peak.
iowait:   ``frugal-qat block-ap`` on SmolLM2-135M with recipes/demo.yaml, after dropping the page cache when
          allowed (root: a cold-disk run); share = ``io_wait_seconds`` / wall seconds of the run.
block70b: in fresh processes, one decoder block with Llama-2-70B's dimensions and random weights: a few Block-AP
          steps through the real code (wrap_linears / make_optimizer / train_block with its epoch-end training
          checkpoint, then freeze and pack), and a
          few E2E-QP steps of the same block over packed 2-bit PackedLinear layers with 8-bit AdamW; peaks from
          the kernel's RSS high-water mark and from live-tensor tracking, against the planner's terms.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from frugal_qat.planner import PlanSettings, load_model_config, plan  # noqa: E402

MiB, GiB = 2**20, 2**30
SMOLLM2 = Path("/tmp/demo/smollm2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SMOL_WIDTH = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                  vocab_size=49152)
LLAMA2_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  vocab_size=32000)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("FRUGAL_QAT_CACHE", "/tmp/fqcache")
    e.setdefault("HF_HUB_OFFLINE", "1")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"results: {path}")


def block_ap(model: Path, out: Path, log: Path, *args: str) -> dict:
    """``frugal-qat block-ap`` in a fresh process; its summary.json, with the wall time seen from outside."""
    cmd = [sys.executable, "-m", "frugal_qat", "block-ap", "--model", str(model), "--out", str(out), "--restart",
           "--device", "cpu", *args]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=REPO).returncode
    if rc != 0:
        sys.exit(f"block-ap failed (exit {rc}); see {log}")
    summary = json.loads((out / "summary.json").read_text())
    summary["outer_seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def planned_block_ap(model: Path | dict, **settings) -> dict:
    config = model if isinstance(model, dict) else load_model_config(model)
    p = plan(config, PlanSettings(device="cpu", gpu_mem=None, **settings), phases=("block_ap",)).phase("block_ap")
    return {"ram_peak": p.ram_peak, "device_peak": p.device_peak}


# ---- rss: flat in depth and in samples ------------------------------------------------------------------------------


def random_smol_model(path: Path, layers: int, tokenizer_from: Path) -> Path:
    """A random Llama of SmolLM2's width (HF init, fp16, tied embeddings, 50 MB shards) with SmolLM2's tokenizer."""
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(layers)
    cfg = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=True, max_position_embeddings=2048, **SMOL_WIDTH)
    tmp = path.with_name(path.name + ".tmp")
    LlamaForCausalLM(cfg).half().save_pretrained(tmp, max_shard_size="50MB")
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, tmp / name)
    tmp.rename(path)
    return path


def bench_rss(args) -> None:
    work = args.work / "rss"
    work.mkdir(parents=True, exist_ok=True)
    common = dict(wbits=3, group_size=64, seqlen=args.seqlen, batch_size=2, val_size=8, epochs=args.epochs,
                  chunk_mb=args.chunk_mb)
    flags = ["--calib", "demo", "--wbits", "3", "--group-size", "64", "--seqlen", str(args.seqlen), "--val-size", "8",
             "--epochs", str(args.epochs), "--batch-size", "2", "--chunk-mb", str(args.chunk_mb)]
    cases = [("baseline", args.layers, args.samples), ("2x layers", 2 * args.layers, args.samples),
             ("4x samples", args.layers, 4 * args.samples)]
    rows = []
    for name, layers, n in cases:
        model = random_smol_model(work / f"smolwidth-{layers}L", layers, args.tokenizer)
        print(f"{name}: {layers} layers, {n} windows ...", flush=True)
        s = block_ap(model, work / f"run-{layers}L-{n}N", work / f"run-{layers}L-{n}N.log", "--train-size", str(n), *flags)
        planned = planned_block_ap(model, train_size=n, **common)
        rows.append({"case": name, "layers": layers, "train_size": n, "peak_rss_bytes": s["peak_rss_bytes"],
                     "block_peak_rss_bytes": [b["peak_rss_bytes"] for b in s["blocks"]],
                     "planned_ram_peak_bytes": planned["ram_peak"], "seconds": s["seconds"],
                     "io_wait_seconds": s["io_wait_seconds"]})
    base = rows[0]["peak_rss_bytes"]
    print(f"\n{'case':<12}{'layers':>7}{'windows':>9}{'peak RSS MiB':>14}{'vs baseline':>13}{'planned MiB':>13}"
          f"{'meas/plan':>11}{'seconds':>9}")
    for r in rows:
        r["change_vs_baseline"] = round(r["peak_rss_bytes"] / base - 1, 4)
        r["measured_over_planned"] = round(r["peak_rss_bytes"] / r["planned_ram_peak_bytes"], 4)
        print(f"{r['case']:<12}{r['layers']:>7}{r['train_size']:>9}{r['peak_rss_bytes'] / MiB:14.0f}"
              f"{r['change_vs_baseline'] * 100:+12.1f}%{r['planned_ram_peak_bytes'] / MiB:13.0f}"
              f"{r['measured_over_planned']:11.3f}{r['seconds']:9.0f}")
    worst = max(abs(r["change_vs_baseline"]) for r in rows)
    print(f"largest change vs baseline: {worst * 100:.1f} % (target < 10 %): {'PASS' if worst < 0.10 else 'FAIL'}")
    write_json(args.out or work / "rss.json", {"settings": {**common, "calib": "demo"}, "rows": rows,
                                               "max_abs_change": worst})


# ---- iowait: how long the loop waits on the disk ------------------------------------------------------------------


def drop_page_cache() -> str:
    """Write back and drop the page cache (needs root); returns "cold" or why the run is warm."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        return f"warm (could not drop the page cache: {e.strerror})"
    return "cold"


def bench_iowait(args) -> None:
    if not (args.model / "config.json").is_file():
        sys.exit(f"no model at {args.model}; make it with: python tools/make_smollm2_checkpoint.py --out {args.model}")
    work = args.work / "iowait"
    work.mkdir(parents=True, exist_ok=True)
    # The demo's calibration windows are cached by fingerprint: tokenize first, so the cold run reads only the model.
    cache = "warm (page cache kept: --no-drop)" if args.no_drop else drop_page_cache()
    s = block_ap(args.model, work / "run", work / "run.log", "--recipe", str(REPO / "recipes/demo.yaml"),
                 "--io", args.io, *(["--epochs", str(args.epochs)] if args.epochs is not None else []))
    blocks = sum(b["seconds"] for b in s["blocks"])
    row = {"model": str(args.model), "recipe": "recipes/demo.yaml", "epochs": args.epochs, "io": args.io,
           "page_cache": cache,
           "seconds": s["seconds"], "block_seconds": round(blocks, 3), "io_wait_seconds": s["io_wait_seconds"],
           "share_of_wall": round(s["io_wait_seconds"] / s["seconds"], 5),
           "share_of_block_loop": round(s["io_wait_seconds"] / blocks, 5), "peak_rss_bytes": s["peak_rss_bytes"]}
    print(f"\n{'model':<28}{'cache':>7}{'wall s':>9}{'blocks s':>10}{'I/O wait s':>12}{'share':>9}")
    print(f"{args.model.name:<28}{cache.split()[0]:>7}{row['seconds']:9.1f}{blocks:10.1f}{row['io_wait_seconds']:12.2f}"
          f"{row['share_of_wall'] * 100:8.2f}%")
    print(f"page cache: {cache}; target < 5 %: {'PASS' if row['share_of_wall'] < 0.05 else 'FAIL'}")
    write_json(args.out or work / "iowait.json", row)


# ---- block70b: one Llama-2-70B-shaped block -----------------------------------------------------------------------


def block70b_config(scale: int) -> dict:
    """config.json of a 1-layer Llama-2-70B (dimensions divided by ``scale`` for a quick dry run)."""
    d = {k: v // scale for k, v in LLAMA2_70B.items() if k != "vocab_size"}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1,
            "vocab_size": LLAMA2_70B["vocab_size"], "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 4096, "tie_word_embeddings": False,
            "_name_or_path": "llama-2-70b-shaped block" + (f" / {scale}" if scale > 1 else ""), **d}


def guard_memory(margin: int) -> int:
    """Fail allocations with an error instead of invoking the OOM killer on a shared machine: cap this process's
    data segment (RLIMIT_DATA counts anonymous mmaps, i.e. every large tensor) at available RAM minus ``margin``,
    and volunteer as the OOM killer's first choice."""
    import psutil

    cap = int(psutil.Process().memory_info().rss + psutil.virtual_memory().available - margin)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass  # not Linux, or not allowed: the rlimit alone still protects the other processes
    return cap


def worker_train(args, config: dict, prof) -> dict:
    """Block-AP on one block: build from random weights, wrap, a few steps, freeze, pack (block_ap/run.py's order)."""
    import torch

    from frugal_qat.arch import BlockRunner, arch_for, build_block, hf_config
    from frugal_qat.block_ap.train_block import freeze_block, make_optimizer, train_block, wrap_linears
    from frugal_qat.checkpoint.state import save_train_checkpoint

    arch, hf = arch_for(config), hf_config(config, args.seqlen)
    H, b, L = config["hidden_size"], 1, args.seqlen
    prof.mark("phase", "setup")  # random weights stand in for the read from the shards: not part of the comparison
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in arch.layer_cls(hf, layer_idx=0).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) * 0.02 if len(s) == 2 else torch.ones(s)) for k, s in shapes.items()}
    block = build_block(hf, arch, 0, state)
    del state  # the block holds the weights now, as run.py drops the prefetched state
    runner = BlockRunner(hf, arch)
    prof.mark("phase", "block_ap")
    prof.mark("stage", "wrap")
    linears = wrap_linears(block, args.wbits, args.group_size, name="layers.0")
    optimizer = make_optimizer(block, linears, weight_lr=2e-5, quant_lr=1e-4)
    x_all = torch.randn(args.steps * b, L, H, generator=g)
    y_all = x_all + 0.1 * torch.randn(args.steps * b, L, H, generator=g)

    def batches(first: int):
        for j in range(first, args.steps):
            yield [(x_all[j * b:(j + 1) * b], y_all[j * b:(j + 1) * b])]

    step_times = []
    ckpt = Path(args.result).with_suffix(".ckpt.safetensors")

    def checkpoint(step: int) -> None:  # what run.py does at every epoch end: the whole training state to disk
        prof.mark("stage", "checkpoint save")
        save_train_checkpoint(ckpt, block.state_dict(), optimizer, step)
        prof.mark("stage", "after steps")

    def on_step(loss: float) -> None:
        step_times.append(time.perf_counter())
        print(f"  step {len(step_times)}: loss {loss:.4e}", flush=True)
        prof.mark("stage", f"step {len(step_times) + 1}" if len(step_times) < args.steps else "after steps")
        prof.save()  # this run lives next to the OOM killer: keep what was measured so far

    prof.mark("stage", "step 1")
    t0 = time.perf_counter()
    train_block(block, lambda mod, x: runner(mod, 0, x), batches,
                lambda: float("nan"), optimizer, epochs=1, steps_per_epoch=args.steps, min_lr_ratio=0.05,
                max_grad_norm=0.0, start_step=0, checkpoint=checkpoint, ckpt_every=0, block_idx=0,
                device=torch.device("cpu"), on_step=on_step)
    ckpt_bytes = ckpt.stat().st_size
    ckpt.unlink()
    prof.mark("stage", "freeze + pack")
    freeze_block(block)
    packed = {}
    for name, lin in linears.items():
        packed.update({f"{name}.{k}": v for k, v in lin.pack().items()})
    return {"step_seconds": [round(t - s, 2) for s, t in zip([t0] + step_times, step_times)],
            "checkpoint_bytes": ckpt_bytes, "packed_bytes": sum(t.numel() * t.element_size() for t in packed.values())}


def worker_e2e(args, config: dict, prof) -> dict:
    """E2E-QP on one block over packed weights: only the scales train, 8-bit AdamW, the block checkpointed."""
    import torch
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    from frugal_qat.arch import BlockRunner, arch_for, hf_config
    from frugal_qat.e2e_qp.run import make_optimizer
    from frugal_qat.quantizer import init_qparams, pack_linear, quantize
    from frugal_qat.quantizer.packed import PackedLinear

    arch, hf = arch_for(config), hf_config(config, args.seqlen)
    H, L = config["hidden_size"], args.seqlen
    prof.mark("phase", "setup")  # quantizing random weights stands in for reading the Block-AP run's packed files
    with torch.device("meta"):
        block = arch.layer_cls(hf, layer_idx=0)
    g = torch.Generator().manual_seed(0)
    for name in arch.linears:  # one dense weight at a time, as a Block-AP run writes them
        lin = block.get_submodule(name)
        w = torch.randn(lin.out_features, lin.in_features, generator=g) * 0.02
        scale, zero = init_qparams(w, args.wbits, args.group_size)
        packed = pack_linear(quantize(w, scale, zero, args.wbits, args.group_size), scale, zero, args.wbits,
                             args.group_size)
        del w
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent), child,
                PackedLinear.from_packed(packed, args.wbits, args.group_size, lin.in_features, lin.out_features))
    for mod in (block.input_layernorm, block.post_attention_layernorm):
        mod.weight = nn.Parameter(torch.ones(H), requires_grad=False)
    scales = [p for n, p in block.named_parameters() if n.endswith(".scales")]
    optimizer = make_optimizer(scales, "adamw8bit", 2e-5, torch.device("cpu"))
    runner = BlockRunner(hf, arch)
    block.train()
    prof.mark("phase", "e2e_qp")
    for step in range(args.steps):
        prof.mark("stage", f"step {step + 1}")
        # the block's input carries a gradient (earlier blocks' scales train too) and is all autograd keeps of
        # the block until backward recomputes it (gradient checkpointing per block, as e2e_qp/run.py)
        x = torch.randn(1, L, H, generator=g).requires_grad_(True)
        optimizer.zero_grad(set_to_none=True)
        out = checkpoint(lambda t: runner(block, 0, t), x, use_reentrant=False)
        loss = out.float().pow(2).mean()  # stands in for the rest of the model and the LM loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(scales, 0.3)
        optimizer.step()
        with torch.no_grad():
            for p in scales:
                p.clamp_(min=1e-4)
        print(f"  step {step + 1}: loss {loss.item():.4e}", flush=True)
    return {}


def block70b_worker(args) -> None:
    """One part (train or e2e) in this fresh process; writes its measurements to ``args.result``."""
    import torch

    from frugal_qat.planner.profile import Profiler, read_rss_hwm

    torch.set_num_threads(args.threads)
    cap = guard_memory(args.margin_gib * GiB)
    config = block70b_config(args.scale)
    phase = {"train": "block_ap", "e2e": "e2e_qp"}[args.part]
    baseline = read_rss_hwm()
    out = Path(args.result)
    with Profiler(out.with_suffix(".profile.json"), out.with_suffix(".png"), track_tensors=True, interval=0.2,
                  prediction=json.loads(args.prediction),
                  title=f"{config['_name_or_path']}: {phase}, seqlen {args.seqlen}, batch 1, "
                        f"w{args.wbits}g{args.group_size}, device cpu") as prof:
        extra = (worker_train if args.part == "train" else worker_e2e)(args, config, prof)
    res = prof.result
    (run,) = [s for s in res["segments"] if s["kind"] == "phase" and s["value"] == phase]
    stages = [{k: s[k] for k in ("value", "seconds", "peak_rss", "peak_live")} for s in res["segments"]
              if s["kind"] == "stage"]
    write_json(out, {"part": args.part, "baseline_rss": baseline, "rlimit_data": cap, "peak_rss": run["peak_rss"],
                     "peak_live": run["peak_live"], "setup_peak_rss": res["peak_rss"], "seconds": run["seconds"],
                     "stages": stages, **extra})


def block70b_planned(config: dict, args) -> dict:
    """The planner's figures for exactly what the workers run (device="cpu"), term by term."""
    s = PlanSettings(wbits=args.wbits, group_size=args.group_size, seqlen=args.seqlen, batch_size=1,
                     train_size=args.steps, val_size=0, epochs=1, e2e_seqlen=args.seqlen, e2e_batch_size=1,
                     e2e_train_size=args.steps, grad_accum=1, device="cpu", gpu_mem=None)
    p = plan(config, s, phases=("block_ap", "e2e_qp"))
    ap, e2e = p.phase("block_ap"), p.phase("e2e_qp")
    # The E2E bench runs one block without embeddings, lm_head and logits: compare the per-block terms only.
    not_run = ("embeddings, lm_head, norms, biases", "logits chunk, recomputed, and its grads")
    e2e_terms = [t for t in e2e.device_terms if t.name not in not_run]
    baseline = s.host_baseline
    return {
        "settings": {"wbits": args.wbits, "group_size": args.group_size, "seqlen": args.seqlen, "batch_size": 1,
                     "steps": args.steps},
        "block_ap": {"compute_peak": ap.device_peak, "rss_peak": ap.device_peak + baseline,
                     "terms": {t.name + (f" [{', '.join(t.stages)}]" if t.stages else ""): t.bytes for t in ap.device_terms},
                     "full_run_ram_peak": ap.ram_peak},
        "e2e_qp": {"compute_peak": sum(t.bytes for t in e2e_terms),
                   "rss_peak": sum(t.bytes for t in e2e_terms) + baseline,
                   "terms": {t.name: t.bytes for t in e2e_terms}},
    }


def bench_block70b(args) -> None:
    work = args.work / ("block70b" if args.scale == 1 else f"block70b-div{args.scale}")
    work.mkdir(parents=True, exist_ok=True)
    config = block70b_config(args.scale)
    planned = block70b_planned(config, args)
    out = args.out or work / "block70b.json"
    # parts run separately (each needs its own quiet moment on a shared machine) add up in one file
    measured = json.loads(out.read_text())["measured"] if out.is_file() else {}
    for part, phase in (("e2e", "e2e_qp"), ("train", "block_ap")):
        if part not in args.parts:
            continue
        result = work / f"{part}.json"
        cmd = [sys.executable, __file__, "_worker", part, "--result", str(result), "--scale", str(args.scale),
               "--seqlen", str(args.seqlen), "--steps", str(args.steps), "--wbits", str(args.wbits),
               "--group-size", str(args.group_size), "--threads", str(args.threads), "--margin-gib", str(args.margin_gib),
               "--prediction", json.dumps({phase: planned[phase]["rss_peak"]})]
        print(f"{part}: running in a fresh process ...", flush=True)
        rc = subprocess.run(cmd, env=env(), cwd=REPO).returncode
        if rc != 0:
            sys.exit(f"the {part} worker failed (exit {rc}); its timeline, if any: {result.with_suffix('.png')}")
        measured[phase] = json.loads(result.read_text())
    print(f"\n{config['_name_or_path']}, seqlen {args.seqlen}, batch 1, {args.steps} steps, w{args.wbits}g{args.group_size}")
    print(f"{'phase':<10}{'what':<28}{'measured GiB':>14}{'planned GiB':>13}{'meas/plan':>11}")
    for phase, m in measured.items():
        pl = planned[phase]
        for what, meas, plan_ in (("live tensors vs compute", m["peak_live"], pl["compute_peak"]),
                                  ("RSS vs compute + baseline", m["peak_rss"], pl["rss_peak"])):
            print(f"{phase:<10}{what:<28}{meas / GiB:14.2f}{plan_ / GiB:13.2f}{meas / plan_:11.3f}")
        print(f"{'':<10}by stage (live / RSS GiB): "
              + ", ".join(f"{s['value']} {s['peak_live'] / GiB:.2f}/{s['peak_rss'] / GiB:.2f}" for s in m["stages"]))
    write_json(out, {"config": config, "planned": planned, "measured": measured})


# ---- command line -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_memory"), help="models, runs and results")
    ap.add_argument("--out", type=Path, help="results JSON (default: under --work)")
    sub = ap.add_subparsers(dest="bench", required=True)

    p = sub.add_parser("rss", help="peak RSS against layers and against calibration samples")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--chunk-mb", type=float, default=64,
                   help="stream chunk cap (a chunk is whole samples up to this size, so RSS grows with the samples "
                        "until a chunk reaches it)")
    p.add_argument("--tokenizer", type=Path, default=SMOLLM2, help="a directory with SmolLM2's tokenizer files")
    p.set_defaults(fn=bench_rss)

    p = sub.add_parser("iowait", help="I/O-wait share of the SmolLM2 demo run")
    p.add_argument("--model", type=Path, default=SMOLLM2)
    p.add_argument("--epochs", type=int, help="override the demo recipe's epochs")
    p.add_argument("--no-drop", action="store_true", help="keep the page cache (a warm run)")
    p.add_argument("--io", choices=["auto", "aio", "mmap"], default="auto", help="activation-stream backend")
    p.set_defaults(fn=bench_iowait)

    for name in ("block70b", "_worker"):
        p = sub.add_parser(name, help="one Llama-2-70B-shaped block vs the planner" if name == "block70b" else None)
        if name == "_worker":
            p.add_argument("part", choices=["train", "e2e"])
            p.add_argument("--result", required=True)
            p.add_argument("--prediction", default="{}")
        else:
            p.add_argument("--parts", nargs="+", default=["e2e", "train"], choices=["e2e", "train"])
        p.add_argument("--scale", type=int, default=1, help="divide the block's dimensions (dry run)")
        p.add_argument("--seqlen", type=int, default=128)
        p.add_argument("--steps", type=int, default=3)
        p.add_argument("--wbits", type=int, default=2)
        p.add_argument("--group-size", type=int, default=64)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--margin-gib", type=float, default=1.0, help="RAM left to the other processes")
        p.set_defaults(fn=block70b_worker if name == "_worker" else bench_block70b)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
