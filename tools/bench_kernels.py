"""Cost model of the packed matmul paths at the Llama-2-70B shapes: bytes, FLOPs, arithmetic intensity, time.

For each quantized linear of a Llama-2-70B block (hidden 8192, intermediate 28672, 64 heads, 8 kv heads) and each
token count (generation M = 1..16; E2E-QP's micro-batch 4 x 4096 = 16384), prints per call the fused Triton path and
the tiled path (dequantize the layer once to bf16, then cuBLAS), forward and backward:

- bytes moved (HBM) and tensor-core FLOPs, from the launch plans' grids and block sizes (kernel_configs);
- arithmetic intensity (FLOP per byte);
- modelled time on an A100 and an H100 (datasheet peaks; kernel_cost.py), where the fused kernels' instruction
  issue is priced from the instruction counts of their main loops in the compiled sm80 / sm90 SASS.

Then the token count at which the tiled path overtakes the fused one per layer, which sets
``packed.FUSED_MAX_TOKENS``. No GPU is needed (the kernels are compiled ahead of time, as in
tools/compile_kernels.py); nothing here is a measurement of a GPU.

    PYTHONPATH=. python tools/bench_kernels.py [--bits 2] [--group-size 64] [--tokens 1 16 256 16384] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from frugal_qat.quantizer import kernel_compile, kernel_cost
from frugal_qat.quantizer import packed as packed_mod

# Llama-2-70B: hidden 8192, intermediate 28672, 64 heads of 128, 8 kv heads (GQA): k/v project to 1024.
LAYERS = {
    "q_proj / o_proj": (8192, 8192),
    "k_proj / v_proj": (8192, 1024),
    "gate_proj / up_proj": (8192, 28672),
    "down_proj": (28672, 8192),
}
ARCH_OF = {"a100": "sm80", "h100": "sm90"}
DEFAULT_TOKENS = (1, 4, 16, 64, 128, 256, 1024, 16384)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, default=2, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS))
    p.add_argument("--gpu", nargs="+", default=list(kernel_cost.GPUS), choices=list(kernel_cost.GPUS))
    p.add_argument("--json", metavar="OUT", help="write every row as JSON")
    args = p.parse_args(argv)

    label = "3" if args.bits == 3 else "2,4,8"
    start = time.perf_counter()
    counts = {}
    for gpu in args.gpu:
        raw = kernel_compile.sass_counts_all(ARCH_OF[gpu], label)
        counts[gpu] = {key: kernel_cost.SassCount(loop, total) for key, (loop, total) in raw.items()}
    print(f"compiled the kernels for {', '.join(ARCH_OF[g] for g in args.gpu)} in {time.perf_counter() - start:.0f} s")
    print("\nSASS instructions per warp (main loop body / whole kernel), bf16, bits " + label)
    print("| kernel | config | " + " | ".join(f"{ARCH_OF[g]} loop / total" for g in args.gpu) + " |")
    print("|---|---|" + "---|" * len(args.gpu))
    for key in counts[args.gpu[0]]:
        cells = " | ".join(f"{counts[g][key].loop} / {counts[g][key].total}" for g in args.gpu)
        print(f"| {key[0]} | {key[1]} | {cells} |")

    rows = []
    print(f"\nPer call, {args.bits}-bit, group {args.group_size}, bf16. GB: bytes moved (HBM, as on {args.gpu[0]}); "
          f"GFLOP: 2MNK per matmul; FLOP/B: their ratio (arithmetic intensity); us: modelled time and what bounds "
          f"its slowest kernel")
    head = "| layer [K x N] | M | pass | path | GB | GFLOP | FLOP/B | " + " | ".join(
        f"{g} us (bound)" for g in args.gpu) + " |"
    print(head)
    print("|" + "---|" * (7 + len(args.gpu)))
    for name, (K, N) in LAYERS.items():
        layer = kernel_cost.Layer(K, N, args.bits, args.group_size)
        for M in args.tokens:
            for i, direction in enumerate(("forward", "backward")):
                for path, fns in kernel_cost.PATHS.items():
                    useful = kernel_cost.useful_flops(layer, M, direction)
                    row = {"layer": name, "K": K, "N": N, "tokens": M, "pass": direction, "path": path,
                           "flops": useful}
                    cells = []
                    for gpu in args.gpu:
                        g = kernel_cost.GPUS[gpu]
                        costs = fns[i](layer, M, counts[gpu], g)
                        s = kernel_cost.summarize(costs, g)
                        worst = max(costs, key=lambda k, g=g: k.seconds(g))
                        row[gpu] = {"seconds": s["seconds"], "bytes": s["bytes"], "executed_flops": s["flops"],
                                    "slowest_kernel": worst.name, "bound": worst.bound(g),
                                    "kernels": [k.name for k in costs]}
                        cells.append(f"{s['seconds'] * 1e6:,.0f} ({worst.bound(g)})")
                    nbytes = row[args.gpu[0]]["bytes"]
                    rows.append(row)
                    print(f"| {name} [{K} x {N}] | {M} | {direction} | {path} | {nbytes / 1e9:.3f} | "
                          f"{useful / 1e9:,.1f} | {useful / nbytes:,.1f} | " + " | ".join(cells) + " |")

    print(f"\nTokens at which the tiled path's modelled time first beats the fused path's (powers of two; "
          f"FUSED_MAX_TOKENS = {packed_mod.FUSED_MAX_TOKENS})")
    print("| layer | pass | " + " | ".join(args.gpu) + " |")
    print("|---|---|" + "---|" * len(args.gpu))
    cross = {}
    for name, (K, N) in LAYERS.items():
        layer = kernel_cost.Layer(K, N, args.bits, args.group_size)
        for direction in ("forward", "backward"):
            found = {gpu: kernel_cost.crossover(layer, counts[gpu], kernel_cost.GPUS[gpu], direction)
                     for gpu in args.gpu}
            cross[f"{name} {direction}"] = found
            print(f"| {name} | {direction} | " + " | ".join(str(found[g]) for g in args.gpu) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bits": args.bits, "group_size": args.group_size, "rows": rows, "crossover": cross,
                       "sass": {g: {f"{k[0]} {k[1]}": [v.loop, v.total] for k, v in counts[g].items()}
                                for g in args.gpu}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
