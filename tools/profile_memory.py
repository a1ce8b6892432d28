"""Run block-ap or e2e-qp in this process under the memory profiler: JSON + PNG timeline beside the planner.

    python tools/profile_memory.py block-ap --model /tmp/demo/smollm2 --out /tmp/prof/run --recipe recipes/demo.yaml \
        --device cpu --profile docs/img/profile_smollm2_block_ap
    python tools/profile_memory.py e2e-qp --run /tmp/prof/run --out /tmp/prof/run-e2e --data demo --seqlen 256 \
        --train-size 4 --batch-size 1 --grad-accum 1 --device cpu --profile docs/img/profile_smollm2_e2e_qp

Takes exactly the flags of ``frugal-qat block-ap`` / ``e2e-qp`` plus ``--profile PREFIX`` (writes PREFIX.json and
PREFIX.png) and prints the per-phase and per-block table. Until the run modules emit marks themselves (the lead
wires ``--profile`` into the CLI), this tool derives them by wrapping the functions the run loops call:
``update_in_place`` (block i starts with its fp-stream update), ``train_block``, ``save_block``, ``build_packed_model``
and ``chunked_lm_loss``. The wrappers only mark; arguments and results pass through untouched.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from frugal_qat.cli import main as cli  # noqa: E402
from frugal_qat.planner import PlanSettings, plan  # noqa: E402
from frugal_qat.planner.profile import Profiler, format_profile, predicted_peaks  # noqa: E402


@contextlib.contextmanager
def wrapped(module, name: str, before):
    """Replace ``module.name`` by a function that calls ``before(*args, **kwargs)`` and then the original."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        before(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def profile_block_ap(args, prefix: Path) -> dict:
    from frugal_qat.block_ap import run as bap
    from frugal_qat.offload.blocks import ModelSource

    cfg = cli._run_config(args)
    model = Path(args.model)
    windows = cli.calibration_windows(model, cfg)
    device = bap.pick_device(cfg.offload.device)
    settings = bap.plan_settings(cfg, device)
    predicted = predicted_peaks(plan(ModelSource(model).config, settings, phases=("block_ap",)))

    with Profiler(prefix.with_suffix(".json"), prefix.with_suffix(".png"), prediction=predicted,
                  title=f"block-ap {model.name}: w{cfg.quant.wbits}g{cfg.quant.group_size}, {cfg.data.train_size}x"
                        f"{cfg.data.seqlen} windows, {cfg.block_ap.epochs} epochs, batch {cfg.block_ap.batch_size}, "
                        f"{device.type}") as prof:
        def on_update(stream, fn, chunk, journal, tag, **kw):
            block, kind = tag.removeprefix("block").split("-")
            if kind == "fp":
                prof.mark("block", int(block))
            prof.mark("stage", f"{kind} update")

        prof.mark("phase", "block_ap")
        prof.mark("stage", "embed")
        with (wrapped(bap, "update_in_place", on_update),
              wrapped(bap, "train_block", lambda *a, **k: prof.mark("stage", "train")),
              wrapped(bap, "save_block", lambda *a, **k: prof.mark("stage", "save")),
              wrapped(bap, "extra_tensors", lambda *a, **k: (prof.end("block"), prof.mark("stage", "finalize")))):
            summary = bap.run_block_ap(model, args.out, cfg, windows, restart=args.restart)
    cli._print_summary(summary, Path(args.out))
    return prof.result


def profile_e2e_qp(args, prefix: Path) -> dict:
    from frugal_qat.block_ap.run import pick_device
    from frugal_qat.checkpoint.run_dir import read_quant_config
    from frugal_qat.data.windows import load_token_stream, sample_windows
    from frugal_qat.e2e_qp import run as e2e
    from frugal_qat.offload.weights import read_config

    cfg = cli._run_config(args, cli.E2E_FLAGS)
    e, run = cfg.e2e_qp, Path(args.run)
    if e.format != "pretrain":
        raise SystemExit("profile_memory.py profiles E2E-QP on pretraining windows only (--format pretrain)")
    tok = cli.load_tokenizer(run)
    ids = sample_windows(load_token_stream(tok, e.data, cli.cache_dir() / "tokens"), e.train_size, e.seqlen, e.seed)
    device = pick_device(cfg.offload.device)
    quant = read_quant_config(run)
    settings = PlanSettings(wbits=quant["bits"], group_size=quant["group_size"], e2e_seqlen=e.seqlen,
                            e2e_batch_size=e.batch_size, grad_accum=e.grad_accum, e2e_train_size=e.train_size,
                            e2e_epochs=e.epochs, logits_chunk=e.logits_chunk, device=device.type,
                            gpu_mem=None if device.type == "cpu" else 80 * 2**30)
    predicted = predicted_peaks(plan(read_config(run), settings, phases=("e2e_qp",)))
    out = Path(args.out) if args.out else run.with_name(run.name + "-e2e")
    micro_batches, saved = [], []

    def on_loss(*a, **k):  # called once per micro-batch: a step starts every grad_accum calls
        if len(micro_batches) % e.grad_accum == 0:
            prof.mark("stage", f"step {len(micro_batches) // e.grad_accum + 1}")
        micro_batches.append(1)

    def on_save(*a, **k):  # called once per block when the new run is written
        if not saved:
            prof.mark("stage", "write")
        saved.append(1)

    with Profiler(prefix.with_suffix(".json"), prefix.with_suffix(".png"), prediction=predicted,
                  title=f"e2e-qp {run.name}: {e.train_size}x{e.seqlen} tokens, batch {e.batch_size} x accumulation "
                        f"{e.grad_accum}, {device.type}") as prof:
        prof.mark("phase", "e2e_qp")
        with (wrapped(e2e, "build_packed_model", lambda *a, **k: prof.mark("stage", "build model")),
              wrapped(e2e, "chunked_lm_loss", on_loss),
              wrapped(e2e, "save_block", on_save)):
            summary = e2e.run_e2e_qp(run, out, cfg, (ids, ids), device=device, restart=args.restart)
    print(f"E2E-QP: {summary['steps']} steps in {summary['seconds']:.1f} s with {summary['optimizer']}")
    return prof.result


def main(argv: list[str] | None = None) -> int:
    parser = cli.build_parser()
    for command in ("block-ap", "e2e-qp"):
        sub = parser._subparsers._group_actions[0].choices[command]
        sub.add_argument("--profile", type=Path, required=True, help="writes PREFIX.json and PREFIX.png")
    args = parser.parse_args(argv)
    if args.command not in ("block-ap", "e2e-qp"):
        parser.error("profile_memory.py profiles block-ap or e2e-qp")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(0)
    result = (profile_block_ap if args.command == "block-ap" else profile_e2e_qp)(args, args.profile)
    print()
    print(format_profile(result))
    print(f"profile: {args.profile.with_suffix('.json')}, {args.profile.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
