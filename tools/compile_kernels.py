"""Compile every packed-matmul Triton kernel ahead of time for real GPUs (no GPU needed) and check the binaries.

One row per kernel, bit variant, dtype and launch configuration (every binary the launchers can run; see
frugal_qat/quantizer/kernel_compile.py): registers, spill stores and loads, shared memory against the target's
per-block limit. Exits 1 if any binary fails to compile, spills registers or needs too much shared memory.

    PYTHONPATH=. python tools/compile_kernels.py --arch sm80 --arch sm90 [--json OUT] [--jobs N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from frugal_qat.quantizer import kernel_compile


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", action="append", choices=list(kernel_compile.ARCHS),
                   help="target architecture; repeat for several (default: sm80 and sm90)")
    p.add_argument("--json", metavar="OUT", help="also write the rows as a JSON list")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    args = p.parse_args(argv)
    archs = args.arch or list(kernel_compile.ARCHS)

    start = time.perf_counter()
    rows = kernel_compile.compile_all(archs, args.jobs)
    wall = time.perf_counter() - start
    print(kernel_compile.format_table(rows))
    bad = [r for r in rows if not r.ok]
    print(f"\n{len(rows)} binaries for {', '.join(archs)} in {wall:.0f} s wall "
          f"({sum(r.seconds for r in rows):.0f} s of compile time); {len(bad)} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**dataclasses.asdict(r), "ok": r.ok} for r in rows], f, indent=1)
    for r in bad:
        print(f"FAILED: {r.kernel} {r.arch} bits {r.bits} {r.dtype} {r.config}: {r.problem()}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
