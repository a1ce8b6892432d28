"""E2E-QP memory: a packed layer against dense fp16 layers, and a run's planned breakdown against its measured peak.

    .venv/bin/python tools/bench_e2e_qp.py layer [--out-features 11008 --in-features 4096 --tokens 256]
    .venv/bin/python tools/bench_e2e_qp.py breakdown --row /tmp/fq_bench/e2e_w3

``layer``: one linear layer's forward + backward on ``tokens`` tokens (the input requires grad, as inside a model
whose earlier layers train), for
  - ``PackedLinear`` at 2/3/4 bits, group 64: int32 codes and zeros, fp32 scales that train (E2E-QP);
  - a dense fp16 layer with a frozen weight (what E2E-QP would hold without packing);
  - a dense fp16 layer whose weight trains (a full fine-tune of the same layer).
Memory = the layer's resident tensors (parameters, buffers, and after backward the gradients of what trains)
plus the peak of the tensors the forward and backward create (``LiveTensors``, which sees every tensor torch
allocates in this thread). Each variant runs in its own fresh process.

``breakdown``: a bench_quality.py E2E-QP row directory (recipe.yaml, run/, profile.json written by ``--profile``):
the planner's E2E-QP terms for that recipe (CPU run), their sum, and the measured peak RSS beside them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MiB = 2**20
VARIANTS = ("packed-w2", "packed-w3", "packed-w4", "dense-fp16-frozen", "dense-fp16-trained")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measure_layer(variant: str, out_f: int, in_f: int, tokens: int, group_size: int) -> dict:
    """One variant in this process; returns resident and transient bytes."""
    import torch
    from torch import nn

    from frugal_qat.planner.profile import LiveTensors
    from frugal_qat.quantizer import init_qparams, pack_linear, quantize
    from frugal_qat.quantizer.packed import PackedLinear

    torch.manual_seed(0)
    w = torch.randn(out_f, in_f) * 0.02
    if variant.startswith("packed"):
        bits = int(variant[-1])
        scale, zero = init_qparams(w, bits, group_size)
        packed = pack_linear(quantize(w, scale, zero, bits, group_size), scale, zero, bits, group_size)
        layer = PackedLinear.from_packed(packed, bits, group_size, in_f, out_f)
        trained = [layer.scales]
    else:
        layer = nn.Linear(in_f, out_f, bias=False, dtype=torch.float16)
        layer.weight.data.copy_(w)
        layer.weight.requires_grad_(variant.endswith("trained"))
        trained = [layer.weight] if variant.endswith("trained") else []
    del w
    x = (torch.randn(1, tokens, in_f) * 0.5).half().requires_grad_(True)
    resident = _bytes([*layer.parameters(), *layer.buffers()])
    with LiveTensors() as live:
        y = layer(x)
        y.float().pow(2).mean().backward()
        transient_peak = live.peak
    grads = _bytes([p.grad for p in trained])
    return {"variant": variant, "resident_bytes": resident, "grad_bytes": grads,
            "transient_peak_bytes": transient_peak, "input_grad_bytes": _bytes([x.grad]),
            "total_bytes": resident + transient_peak}


def cmd_layer(args) -> None:
    rows = []
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "_one", v, str(args.out_features), str(args.in_features), str(args.tokens),
               str(args.group_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    dense = next(r for r in rows if r["variant"] == "dense-fp16-frozen")["total_bytes"]
    print(f"one linear layer [{args.out_features} x {args.in_features}], {args.tokens} tokens, forward + backward, "
          f"input requires grad, CPU")
    head = f"{'variant':<20}{'resident MiB':>14}{'fwd+bwd peak MiB':>18}{'total MiB':>11}{'of dense fp16':>15}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['variant']:<20}{r['resident_bytes'] / MiB:>14.1f}{r['transient_peak_bytes'] / MiB:>18.1f}"
              f"{r['total_bytes'] / MiB:>11.1f}{r['total_bytes'] / dense:>15.2f}")
    print("resident: weights or codes + zeros + scales; fwd+bwd peak: every tensor made during forward and backward "
          "(outputs, saved tensors, dequantized tiles, gradients)")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args) | {"fn": None}, "rows": rows}, indent=1))


def cmd_breakdown(args) -> None:
    import yaml

    from frugal_qat.checkpoint.run_dir import read_quant_config
    from frugal_qat.config import resolve
    from frugal_qat.e2e_qp.run import plan_settings
    from frugal_qat.offload.weights import read_config
    from frugal_qat.planner import plan

    row = Path(args.row)
    cfg = resolve(yaml.safe_load((row / "recipe.yaml").read_text()), {})
    quant = read_quant_config(row / "run")
    import torch

    p = plan(read_config(row / "run"), plan_settings(cfg, row / "run", torch.device("cpu")),
             phases=("e2e_qp",)).phase("e2e_qp")
    prof = json.loads((row / "profile.json").read_text())
    (phase,) = [s for s in prof["segments"] if s["kind"] == "phase"]
    steps = [s for s in prof["segments"] if s["kind"] == "stage" and str(s["value"]).startswith("step")]
    e = cfg.e2e_qp
    print(f"E2E-QP {row.name}: w{quant['bits']}g{quant['group_size']}, {e.train_size} x {e.seqlen} tokens, "
          f"batch {e.batch_size} x {e.grad_accum}, CPU")
    print(f"{'term (planner)':<48}{'MiB':>10}")
    for t in sorted(p.device_terms, key=lambda t: -t.bytes):
        print(f"{t.name:<48}{t.bytes / MiB:>10.1f}")
    print(f"{'= compute (planned)':<48}{p.device_peak / MiB:>10.1f}")
    for t in p.host_terms:
        print(f"{'+ host: ' + t.name:<48}{t.bytes / MiB:>10.1f}")
    print(f"{'= RAM peak (planned)':<48}{p.ram_peak / MiB:>10.1f}")
    print(f"{'measured peak RSS, whole run':<48}{phase['peak_rss'] / MiB:>10.1f}   "
          f"measured / planned {phase['peak_rss'] / p.ram_peak:.3f}")
    if steps:
        peak = max(s["peak_rss"] for s in steps)
        print(f"{'measured peak RSS, training steps only':<48}{peak / MiB:>10.1f}   "
              f"measured / planned {peak / p.ram_peak:.3f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_one":  # a fresh process for one layer variant
        v, o, i, t, g = argv[1:6]
        print(json.dumps(measure_layer(v, int(o), int(i), int(t), int(g))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("layer", help="packed vs dense fp16 layer, forward + backward memory")
    p.add_argument("--out-features", type=int, default=11008)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--json")
    p.set_defaults(fn=cmd_layer)
    p = sub.add_parser("breakdown", help="planned E2E-QP terms against a profiled run's measured peak")
    p.add_argument("--row", required=True, help="a bench_quality.py E2E-QP row directory")
    p.set_defaults(fn=cmd_breakdown)
    args = ap.parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
