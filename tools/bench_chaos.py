"""Random-kill benchmark: a real Block-AP run on SmolLM2-135M SIGKILLed 50+ times at random moments, restarted with
the same command each time, then compared bit for bit with an uninterrupted run (docs/RELIABILITY.md).

    python tools/make_smollm2_checkpoint.py --out /tmp/demo/smollm2      # once
    python tools/bench_chaos.py --model /tmp/demo/smollm2 --kills 60 --seed 1

The run is SmolLM2's 30 blocks at a small budget (8 + 4 windows x 128 tokens, 1 epoch, checkpoints every 2 steps)
so that 60 kills spread over every stage of many blocks. Kills aim at the stages in turn, then anywhere
(``frugal_qat.checkpoint.chaos``); each is printed with its seed-derived delay and the stage it landed in.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

from frugal_qat.checkpoint.chaos import chaos, env_without_faults, result_files, run_to_completion, stage_of

ARGS = ["--wbits", "2", "--group-size", "64", "--calib", "demo", "--train-size", "8", "--val-size", "4",
        "--seqlen", "128", "--epochs", "1", "--batch-size", "2", "--ckpt-every", "2", "--chunk-mb", "0.5",
        "--weight-lr", "1e-3", "--quant-lr", "1e-3", "--device", "cpu"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="SmolLM2 checkpoint (tools/make_smollm2_checkpoint.py)")
    ap.add_argument("--kills", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-delay", type=float, default=2.0, help="seconds after the aimed-at stage, at most")
    ap.add_argument("--work", type=Path, help="where the runs go (default: a temporary folder)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    env = env_without_faults()

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "frugal_qat", "block-ap", "--model", str(args.model), "--out", str(out), *ARGS]

    t0 = time.time()
    ref, events = run_to_completion(cmd(work / "reference"), env)
    if ref.returncode != 0:
        print(ref.stderr[-3000:])
        return 1
    print(f"uninterrupted run: {time.time() - t0:.0f} s, {len(events)} stage events")
    t0 = time.time()
    report = chaos(cmd(work / "killed"), env, events, kills=args.kills, seed=args.seed, max_delay=args.max_delay)
    print(report.table())
    landed = collections.Counter(stage_of(k.landed) for k in report.kills if k.returncode == -9)
    same = report.completed and result_files(work / "killed") == result_files(work / "reference")
    print(f"\nkills: {sum(landed.values())} (seed {args.seed}), wall {time.time() - t0:.0f} s")
    print("stage          kills")
    for stage, n in sorted(landed.items(), key=lambda kv: -kv[1]):
        print(f"{stage:<14} {n:>5}")
    print(f"completed: {report.completed}; result bit-identical to the uninterrupted run: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
