"""The `frugal-qat` command: one entry point, one subcommand per job.

Flags override the recipe, which overrides the defaults (see config.py). A :class:`FrugalQATError` becomes one
line on stderr and exit status 2; ``--debug`` shows its traceback. This is the only module that configures logging.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from frugal_qat import __version__
from frugal_qat.errors import ConfigError, FrugalQATError
from frugal_qat.planner.profile import return_large_frees_to_os
from frugal_qat.precision import deterministic

log = logging.getLogger("frugal_qat")

# flag -> "section.field" of RunConfig
RUN_FLAGS = {
    "wbits": "quant.wbits",
    "group_size": "quant.group_size",
    "calib": "data.calib",
    "train_size": "data.train_size",
    "val_size": "data.val_size",
    "seqlen": "data.seqlen",
    "seed": "data.seed",
    "sampling": "data.sampling",
    "gguf": "quant.gguf",
    "epochs": "block_ap.epochs",
    "batch_size": "block_ap.batch_size",
    "grad_accum": "block_ap.grad_accum",
    "weight_lr": "block_ap.weight_lr",
    "quant_lr": "block_ap.quant_lr",
    "max_grad_norm": "block_ap.max_grad_norm",
    "ckpt_every": "block_ap.ckpt_every_steps",
    "work_dir": "offload.work_dir",
    "chunk_mb": "offload.chunk_mb",
    "io": "offload.io",
    "device": "offload.device",
    "precision": "offload.precision",
    "stream_dtype": "offload.stream_dtype",
    "deterministic": "offload.deterministic",
}


# e2e-qp flag -> "section.field"
E2E_FLAGS = {
    "data": "e2e_qp.data",
    "format": "e2e_qp.format",
    "seqlen": "e2e_qp.seqlen",
    "train_size": "e2e_qp.train_size",
    "batch_size": "e2e_qp.batch_size",
    "grad_accum": "e2e_qp.grad_accum",
    "lr": "e2e_qp.lr",
    "epochs": "e2e_qp.epochs",
    "optimizer": "e2e_qp.optimizer",
    "ckpt_every": "e2e_qp.ckpt_every_steps",
    "logits_chunk": "e2e_qp.logits_chunk",
    "seed": "e2e_qp.seed",
    "device": "offload.device",
    "precision": "offload.precision",
    "deterministic": "offload.deterministic",
}


def cache_dir() -> Path:
    return Path(os.environ.get("FRUGAL_QAT_CACHE", Path.home() / ".cache" / "frugal_qat"))


class StopFlag:
    """Ctrl-C asks the run to stop at its next safe point; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> None:
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            log.warning("stop requested: finishing the current step and saving a checkpoint (Ctrl-C again to abort)")

        signal.signal(signal.SIGINT, handler)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"no usable tokenizer in {model_dir} ({e}); copy the tokenizer files next to config.json") from None


def calibration_windows(model_dir: Path, cfg):
    import torch

    from frugal_qat.data.windows import build_calibration

    tok = load_tokenizer(model_dir)
    d = cfg.data
    train, val = build_calibration(tok, d.calib, d.train_size, d.val_size, d.seqlen, d.seed, cache_dir() / "tokens",
                                   d.sampling)
    return torch.cat([train, val])


def _run_config(args, flags: dict[str, str] = RUN_FLAGS):
    from frugal_qat.config import load_recipe, resolve

    recipe = load_recipe(args.recipe) if args.recipe else None
    return resolve(recipe, {flags[k]: getattr(args, k) for k in flags if hasattr(args, k)})


@contextlib.contextmanager
def _profiled(args, phase: str, plan_for: Callable[[], object], title: str):
    """With ``--profile PREFIX``: run the body under the memory profiler (PREFIX.json, PREFIX.png) with the
    planner's prediction beside each measured peak, and print the per-block table. Yields the run's ``mark``
    (which also logs the stages for the random-kill harness when FRUGAL_QAT_STAGE_FILE is set)."""
    from frugal_qat.checkpoint.store import stage_log
    from frugal_qat.planner.profile import Profiler, format_profile, no_mark, predicted_peaks

    prefix = getattr(args, "profile", None)
    if not prefix or not _is_rank0():
        yield stage_log(no_mark)
        return
    prefix = Path(prefix)
    with Profiler(prefix.with_suffix(".json"), prefix.with_suffix(".png"), prediction=predicted_peaks(plan_for()),
                  title=title) as prof:
        prof.mark("phase", phase)
        yield stage_log(prof.mark)
    print(format_profile(prof.result))
    print(f"profile: {prefix.with_suffix('.json')}, {prefix.with_suffix('.png')}")


def _block_ap_profile(args, model_dir: Path, cfg):
    from frugal_qat.block_ap.run import pick_device
    from frugal_qat.offload.weights import read_config
    from frugal_qat.planner import plan
    from frugal_qat.planner.check import settings_from_config

    device = pick_device(cfg.offload.device)
    q, d, b = cfg.quant, cfg.data, cfg.block_ap
    return _profiled(args, "block_ap", lambda: plan(read_config(model_dir), settings_from_config(cfg, device.type),
                                                    phases=("block_ap",)),
                     f"block-ap {model_dir.name}: w{q.wbits}g{q.group_size}, {d.train_size}x{d.seqlen} windows, "
                     f"{b.epochs} epochs, batch {b.batch_size}, {device.type}")


def cmd_block_ap(args) -> int:
    from frugal_qat.block_ap.run import run_block_ap

    cfg = _run_config(args)
    model = Path(args.model)
    from frugal_qat.arch import hf_config
    from frugal_qat.offload.weights import read_config

    hf_config(read_config(model))  # a missing, malformed or unsupported model is reported before tokenizing anything
    windows = calibration_windows(model, cfg)
    _init_distributed(args)
    stop = StopFlag()
    stop.install()
    with _block_ap_profile(args, model, cfg) as mark:
        with deterministic(cfg.offload.deterministic):
            summary = run_block_ap(model, args.out, cfg, windows, restart=args.restart, should_stop=stop, mark=mark)
    _print_summary(summary, Path(args.out))
    return 0


def cmd_resume(args) -> int:
    """Continue a run from its manifest alone: same model, settings and calibration windows."""
    from frugal_qat.block_ap.run import run_block_ap
    from frugal_qat.checkpoint.state import load_manifest
    from frugal_qat.checkpoint.store import load_tensors
    from frugal_qat.config import from_dict

    run = Path(args.run)
    m = load_manifest(run)
    if m.command != "block-ap":
        raise ConfigError(f"{run} is a {m.command} run; resume it with `frugal-qat {m.command}` and the same --out")
    cfg = from_dict(m.config)
    windows = load_tensors(run / "calib.safetensors")["windows"].long()
    _init_distributed(args)
    stop = StopFlag()
    stop.install()
    with _block_ap_profile(args, Path(m.model["path"]), cfg) as mark:
        with deterministic(cfg.offload.deterministic):
            summary = run_block_ap(m.model["path"], run, cfg, windows, should_stop=stop, mark=mark)
    _print_summary(summary, run)
    return 0


def _init_distributed(args) -> None:
    if getattr(args, "deepspeed", False):
        from frugal_qat.distributed import init_from_env

        init_from_env()


def _is_rank0() -> bool:
    from frugal_qat.distributed import rank_world

    return rank_world()[0] == 0


def _print_summary(summary: dict, out: Path) -> None:
    if not _is_rank0():
        return
    blocks = summary["blocks"]
    grid = summary.get("gguf") or f"w{summary['wbits']}g{summary['group_size']}"  # a GGUF type names its grid
    if summary.get("already_complete"):
        print(f"{out} is already complete (block-ap, {len(blocks)} blocks, {grid}); nothing to do")
        return
    last = [b["val_mse"][-1] for b in blocks if b["val_mse"]]
    print(f"quantized {len(blocks)} blocks to {grid} in {summary['seconds']:.1f} s; "
          f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB; I/O wait {summary['io_wait_seconds']:.1f} s; "
          f"output {summary['output_bytes'] / 2**20:.1f} MiB")
    if last:
        print(f"final block val MSE: {last[-1]:.4e}")
    print(f"run directory: {out}")


def cmd_e2e_qp(args) -> int:
    from frugal_qat.block_ap.run import pick_device
    from frugal_qat.checkpoint.state import load_manifest
    from frugal_qat.data.instructions import alpaca_examples
    from frugal_qat.e2e_qp.run import plan_settings, run_e2e_qp
    from frugal_qat.offload.weights import read_config
    from frugal_qat.planner import plan

    cfg = _run_config(args, E2E_FLAGS)
    run = Path(args.run)
    m = load_manifest(run)
    if m.progress.stage != "done":
        raise ConfigError(f"{run} is not finished ({m.progress.stage} at block {m.progress.block}); "
                          f"finish it first: frugal-qat resume {run}")
    e = cfg.e2e_qp
    tok = load_tokenizer(run)
    if e.format == "alpaca":
        data = alpaca_examples(tok, e.data, e.source_len, e.target_len, e.train_size, e.seed)
    else:
        from frugal_qat.data.windows import sample_text_windows

        # Streamed like the calibration (docs/DATA.md): only train_size x seqlen tokens and the documents around
        # them are read and tokenized, whatever the size of --data; consecutive slices of the EOS-joined stream.
        ids = sample_text_windows(tok, e.data, e.train_size, e.seqlen, e.seed, sampling="joined",
                                  cache_dir=cache_dir() / "tokens")
        data = (ids, ids)
    out = Path(args.out) if args.out else run.with_name(run.name + "-e2e")
    stop = StopFlag()
    stop.install()
    device = pick_device(cfg.offload.device)

    def plan_for():  # only under --profile
        return plan(read_config(run), plan_settings(cfg, run, device), phases=("e2e_qp",))

    title = (f"e2e-qp {run.name}: {e.train_size}x{e.seqlen} tokens, batch {e.batch_size} x accumulation "
             f"{e.grad_accum}, {device.type}")
    with _profiled(args, "e2e_qp", plan_for, title) as mark:
        with deterministic(cfg.offload.deterministic):
            summary = run_e2e_qp(run, out, cfg, data, device=device, restart=args.restart, should_stop=stop,
                                 ds_config=args.deepspeed, mark=mark)
    if not _is_rank0():
        return 0
    if summary.get("already_complete"):
        print(f"{out} is already complete (e2e-qp, {summary['steps']} steps); nothing to do")
        return 0
    losses = summary["losses"]
    print(f"E2E-QP: {summary['steps']} steps in {summary['seconds']:.1f} s with {summary['optimizer']}; "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "E2E-QP: nothing to do")
    print(f"run directory: {out}")
    return 0


def cmd_ppl(args) -> int:
    from frugal_qat.block_ap.run import pick_device
    from frugal_qat.data.windows import eval_windows, load_token_stream
    from frugal_qat.eval.ppl import perplexity

    model = Path(args.model)
    tok = load_tokenizer(model)
    tokens = load_token_stream(tok, args.data, cache_dir() / "tokens")
    protocol = args.protocol or ("random" if args.data.startswith("c4") else "sequential")
    max_windows = args.max_windows if args.max_windows else (256 if protocol == "random" else None)
    windows = eval_windows(tokens, args.seqlen, max_windows, protocol=protocol, seed=0)
    res = perplexity(model, windows, device=pick_device(args.device), batch_size=args.batch_size)
    res.update({"model": str(model), "data": args.data, "protocol": protocol})
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"ppl: {res['ppl']:.4f}")
    return 0


def cmd_plan(args) -> int:
    import shutil

    import psutil

    from frugal_qat.planner import format_plan, load_model_config, parse_bytes, plan, plan_to_json
    from frugal_qat.planner.check import settings_from_config

    cfg = _run_config(args)  # the recipe + flags, validated like a real run
    cuda = args.plan_device == "cuda"
    overrides = {k: v for k, v in (("gpu_tflops", args.gpu_tflops), ("gpu_util", args.gpu_util),
                                   ("disk_gbps", args.disk_gbps)) if v is not None}
    settings = settings_from_config(
        cfg, args.plan_device, gpu=args.gpu,
        gpu_mem=(parse_bytes(args.gpu_mem) if args.gpu_mem else "auto") if cuda else None,
        cpu_mem=parse_bytes(args.cpu_mem) if args.cpu_mem else psutil.virtual_memory().total,
        disk_free=shutil.disk_usage(args.disk).free if args.disk else None, **overrides,
    )
    config = load_model_config(args.model)
    p = plan(config, settings)
    simulated = None
    if args.simulate:
        from frugal_qat.planner.simulate import simulate

        simulated = simulate(config, settings)
    if args.json:
        Path(args.json).write_text(json.dumps(plan_to_json(p, simulated), indent=2) + "\n")
    print(format_plan(p, simulated))
    return 0 if p.fits else 1


def cmd_export(args) -> int:
    from frugal_qat.checkpoint.store import stage_log
    from frugal_qat.export import export_run
    from frugal_qat.planner.profile import no_mark

    kwargs = {"zero_point": args.zero_point} if args.zero_point else {}
    report = export_run(Path(args.run), args.format, Path(args.out), verify=not args.no_verify, dtype=args.dtype,
                        verify_tokens=args.verify_tokens, mark=stage_log(no_mark), **kwargs)
    if report.get("already_complete"):
        print(f"{report['out_dir']}: this {args.format} export is already complete (made by the same command); "
              f"nothing to do")
        return 0
    print(f"engines: {report['engine_line']}")
    verify = report.get("verify", {})
    for r in verify.get("loaders", []):
        if r["status"] in ("ok", "differs"):
            print(f"  {r['loader']:<30} {r['compute_dtype']:<9} ppl {r['ppl']:.4f} ({100 * r['rel_diff']:+.2f} % "
                  f"against frugal-qat's {verify['ppl_frugal_qat']:.4f}) {'ok' if r['status'] == 'ok' else 'DIFFERS'}")
        else:
            print(f"  {r['loader']:<30} {r['status']}: {r.get('reason') or r.get('error')}")
    for w in verify.get("warnings", []):
        print(f"warning: {w}")
    if verify.get("skipped"):
        print(f"loaders not checked: {verify['skipped']}")
    if args.format == "gguf":
        fallbacks = report.get("fallbacks") or {}
        if fallbacks:
            print(f"stored in a legacy type (rows not a multiple of 256): {', '.join(sorted(fallbacks))} -> "
                  f"{', '.join(sorted(set(fallbacks.values())))}")
        print(f"exported gguf to {report['out_dir']} (report: {report['files'][1]})")
        return 0
    print(f"exported {args.format} to {report['out_dir']} (report: frugal_qat_export.json, README.md)")
    return 0


def cmd_lm_eval(args) -> int:
    from frugal_qat.block_ap.run import pick_device
    from frugal_qat.eval.lm_eval import run_lm_eval

    res = run_lm_eval(Path(args.model), args.tasks.split(","), limit=args.limit, include_path=args.include_path,
                      batch_size=args.batch_size, device=pick_device(args.device), num_fewshot=args.num_fewshot,
                      max_length=args.max_length)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(json.dumps(res, indent=2, default=str))
    return 0


def cmd_demo(args) -> int:
    from frugal_qat.demo import format_table, run_demo

    rows = run_demo(Path(args.dir), wbits=args.wbits, group_size=args.group_size, recipe=args.recipe, device=args.device)
    print()
    print(format_table(rows))
    from frugal_qat.demo import PROMPT

    print(f"\ngreedy continuation of {PROMPT!r}:")
    for r in rows:
        if r.get("generation") is not None:
            print(f"  {r['method']:<16} ...{r['generation']!r}")
    print(f"results: {Path(args.dir) / 'demo_results.json'}")
    return 0


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="YAML recipe (see recipes/); flags override it")
    p.add_argument("--wbits", type=int, help="weight bits: 2, 3, 4 or 8")
    p.add_argument("--group-size", type=int, help="columns per quantization group, or -1 for one per row")
    p.add_argument("--calib", help="calibration text: .txt, .jsonl, a directory, demo, or redpajama|c4|wikitext2 (online)")
    p.add_argument("--train-size", type=int, help="calibration windows for training")
    p.add_argument("--val-size", type=int, help="held-out windows for the validation MSE")
    p.add_argument("--seqlen", type=int, help="tokens per window")
    p.add_argument("--seed", type=int)
    p.add_argument("--sampling", choices=["documents", "joined"],
                   help="calibration windows: inside single documents (the reference's way) or cut from all text joined")
    p.add_argument("--gguf", choices=["q4_k", "q3_k", "q2_k", "q4_0", "q4_1", "q5_0", "q8_0"],
                   help="train in a GGUF (llama.cpp) grid, so `export --format gguf` holds exactly what was trained")
    p.add_argument("--epochs", type=int, help="epochs per block; 0 = round-to-nearest")
    p.add_argument("--batch-size", type=int, help="samples per optimizer step")
    p.add_argument("--grad-accum", type=int, help="split each step into this many micro-batches (same result, less memory)")
    p.add_argument("--weight-lr", type=float)
    p.add_argument("--quant-lr", type=float)
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument("--ckpt-every", type=int, help="also checkpoint every K steps inside a block (default: epoch ends)")
    p.add_argument("--work-dir", help="where the activation streams live (default RUN/work)")
    p.add_argument("--chunk-mb", type=float, help="MiB per stream read/write chunk")
    p.add_argument("--io", choices=["auto", "aio", "buffered"], help="activation-stream I/O backend (docs/IO.md)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=["auto", "cpu", "cuda"],
                   help="dtype policy: the device's (auto), or another's forced (cuda on a CPU: tests)")
    p.add_argument("--stream-dtype", choices=["auto", "float16", "bfloat16"],
                   help="activation streams on disk (auto: fp16, bf16 for models whose activations overflow it)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="bit-identical results across a kill and resume on CUDA too (slower attention backward)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="frugal-qat", description="Memory-frugal EfficientQAT quantization.")
    ap.add_argument("--version", action="version", version=f"frugal-qat {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it first
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("block-ap", help="Block-AP: quantize a model block by block")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--out", required=True, help="run directory (re-running the same command resumes)")
    p.add_argument("--restart", action="store_true", help="delete an existing run in --out and start over")
    p.add_argument("--deepspeed", action="store_true",
                   help="data parallel over the processes the deepspeed launcher (or torchrun) started")
    p.add_argument("--profile", metavar="PREFIX",
                   help="profile memory: PREFIX.json + PREFIX.png timeline, planner beside each peak (docs/MEMORY.md)")
    _add_run_flags(p)
    p.set_defaults(fn=cmd_block_ap)

    p = sub.add_parser("resume", help="resume an interrupted run from its directory")
    p.add_argument("run")
    p.add_argument("--deepspeed", action="store_true", help="as for block-ap")
    p.add_argument("--profile", metavar="PREFIX",
                   help="profile memory: PREFIX.json + PREFIX.png timeline, planner beside each peak (docs/MEMORY.md)")
    p.set_defaults(fn=cmd_resume)

    p = sub.add_parser("e2e-qp", help="E2E-QP: train the step sizes end to end over the packed weights")
    p.add_argument("--run", required=True, help="a finished block-ap run directory")
    p.add_argument("--out", help="output run directory (default: RUN-e2e); re-running resumes")
    p.add_argument("--restart", action="store_true")
    p.add_argument("--recipe", help="YAML recipe; its e2e_qp section applies")
    p.add_argument("--data", help="text source (like --calib) or an Alpaca .json/.jsonl with --format alpaca")
    p.add_argument("--format", choices=["pretrain", "alpaca"])
    p.add_argument("--seqlen", type=int)
    p.add_argument("--train-size", type=int, help="training sequences")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--optimizer", choices=["auto", "adamw8bit", "paged_adamw8bit", "adamw"])
    p.add_argument("--ckpt-every", type=int, help="checkpoint every K optimizer steps")
    p.add_argument("--logits-chunk", type=int, help="tokens per lm_head/loss chunk")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=["auto", "cpu", "cuda"],
                   help="dtype policy: the device's (auto), or another's forced (cuda on a CPU: tests)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="bit-identical results across a kill and resume on CUDA too (slower attention backward)")
    p.add_argument("--deepspeed", nargs="?", const=True, metavar="CONFIG.json",
                   help="data parallel on DeepSpeed ZeRO-2; a JSON merged over OUT/deepspeed_config.json")
    p.add_argument("--profile", metavar="PREFIX",
                   help="profile memory: PREFIX.json + PREFIX.png timeline, planner beside each peak (docs/MEMORY.md)")
    p.set_defaults(fn=cmd_e2e_qp)

    p = sub.add_parser("ppl", help="perplexity of a checkpoint or run directory, streamed block by block")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help=".txt/.jsonl/directory, demo-heldout, or wikitext2 | c4 (online)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=0, help="0: all (sequential) or 256 (random)")
    p.add_argument("--protocol", choices=["sequential", "random"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.set_defaults(fn=cmd_ppl)

    from frugal_qat.planner.estimate import GPUS  # no torch import: the parser stays quick to build

    p = sub.add_parser("plan", help="memory (GPU, RAM, disk) and time a run needs, from config.json alone")
    p.add_argument("--model", required=True, help="model directory, config.json, or a shipped name (e.g. llama-2-70b)")
    _add_run_flags(p)
    p.add_argument("--plan-device", choices=["cuda", "cpu"], default="cuda", help="plan for a GPU or a CPU-only run")
    p.add_argument("--gpu", choices=sorted(GPUS), default="a100-80gb",
                   help="the GPU the time and memory are planned for (peaks, bandwidth, memory)")
    p.add_argument("--gpu-mem", help="GPU memory to plan against (default: the --gpu's)")
    p.add_argument("--gpu-tflops", type=float,
                   help="override the GPU's peak 16-bit TFLOP/s (its other peaks scale with it)")
    p.add_argument("--gpu-util", type=float, help="override the achieved fraction of peak of every matmul, e.g. 0.6")
    p.add_argument("--disk-gbps", type=float, help="disk bandwidth in GB/s for the activation streams (default 2)")
    p.add_argument("--cpu-mem", help="host RAM available (default: this machine's)")
    p.add_argument("--disk", help="a directory on the disk the run will use (its free space is checked)")
    p.add_argument("--simulate", action="store_true",
                   help="also run the real code on fake tensors (no data, no compute) and report its peak memory")
    p.add_argument("--json", help="also write the plan as JSON")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("export", help="export a run to gptq, compressed-tensors, fp16 or gguf, checked as users load "
                                      "it")
    p.add_argument("--run", required=True)
    p.add_argument("--format", required=True, choices=["gptq", "compressed-tensors", "fp16", "gguf"])
    p.add_argument("--out", required=True, help="a new or empty folder; gguf: the file, FILE.gguf, its report beside "
                                                "it (a complete export by the same command: no-op)")
    p.add_argument("--zero-point", choices=["v1", "v2"], help="gptq: zero-point convention (v1 refused when lossy)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="the dtype loaders compute in by default (auto: the source model's, bfloat16 for bf16-native "
                        "models, else float16); float32: fp16 format only")
    p.add_argument("--verify-tokens", type=int, help="tokens of the run's calibration text the loaders are scored on "
                                                       "(default 2048)")
    p.add_argument("--no-verify", action="store_true", help="skip decoding, reloading and comparing the export")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("lm-eval", help="zero-shot accuracy with lm-eval on a run (weights packed on the device) or "
                                         "checkpoint; refused before loading when it does not fit")
    p.add_argument("--model", required=True)
    p.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande")
    p.add_argument("--limit", type=int)
    p.add_argument("--include-path", help="directory of local lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-length", type=int,
                   help="longest sequence fed to the model, longer contexts cut from the left (default: the model's "
                        "context, at most 2048); the memory check sizes the forward for batch-size of them")
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    p.set_defaults(fn=cmd_lm_eval)

    p = sub.add_parser("demo", help="the built-in demo: SmolLM2-135M, fp16 vs RTN vs Block-AP")
    p.add_argument("--dir", default="demo", help="where the demo writes its model, runs and results")
    p.add_argument("--wbits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--recipe", help="Block-AP settings (default: recipes/demo.yaml)")
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "transformers", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return_large_frees_to_os()  # a fragmented heap held 0.6 GB of freed tiles in E2E-QP (planner.profile)
    try:
        return args.fn(args)
    except FrugalQATError as e:
        if args.debug:
            traceback.print_exc()
        print(f"frugal-qat: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _is_out_of_memory(e):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"frugal-qat: error: {out_of_memory_message(args, e)}", file=sys.stderr)
        return 2


# The settings that shrink each command's GPU peak, mildest first (frugal-qat plan prints the same table).
OOM_FIXES = {
    "block-ap": "--grad-accum 2 (same results, half the activations), then --chunk-mb 16",
    "resume": "resume with the same settings after freeing the GPU (other processes?); a smaller --grad-accum "
              "split needs the same command with --grad-accum",
    "e2e-qp": "--grad-accum 2x with --batch-size halved (same results), --logits-chunk 256",
    "ppl": "--batch-size 1",
    "lm-eval": "--batch-size 1, then --max-length 1024",
    "demo": "--device cpu",
}


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def out_of_memory_message(args, e: BaseException) -> str:
    """One line for a CUDA out-of-memory error: where, how much, what else holds the GPU, and the fix."""
    import torch

    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    held = ""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        peak = torch.cuda.max_memory_allocated() / 2**30
        held = f"; the GPU has {free / 2**30:.1f} of {total / 2**30:.1f} GiB free now, this run peaked at {peak:.1f} GiB"
    fix = OOM_FIXES.get(args.command, "a smaller batch")
    return (f"out of GPU memory in `frugal-qat {args.command}` ({first}){held}; run `frugal-qat plan` for this model "
            f"and settings to see what fits, then retry with {fix}; the run resumes where it stopped")


if __name__ == "__main__":
    sys.exit(main())
