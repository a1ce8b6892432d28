"""Profile the memory of a block-ap, resume or e2e-qp run: JSON + PNG timeline beside the planner's prediction.

    python tools/profile_memory.py block-ap --model /tmp/demo/smollm2 --out /tmp/prof/run --recipe recipes/demo.yaml \
        --device cpu --profile docs/img/profile_smollm2_block_ap
    python tools/profile_memory.py e2e-qp --run /tmp/prof/run --out /tmp/prof/run-e2e --data demo --seqlen 256 \
        --train-size 8 --batch-size 2 --grad-accum 1 --device cpu --profile docs/img/profile_smollm2_e2e_qp

The same as ``frugal-qat <command> ... --profile PREFIX`` (the flag does the work: frugal_qat/cli/main.py and
frugal_qat/planner/profile.py); this tool only insists on ``--profile`` and on a command that has it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from frugal_qat.cli.main import main  # noqa: E402

PROFILED = ("block-ap", "resume", "e2e-qp")

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] not in PROFILED or "--profile" not in argv:
        sys.exit(f"usage: python tools/profile_memory.py {{{','.join(PROFILED)}}} ... --profile PREFIX")
    sys.exit(main(argv))
