"""Helpers shared by the export tests: tiny finished run directories and plain-Python readers of the formats."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from tests.conftest import save_tiny_model


def make_run(root: Path, bits: int, group: int, **model_kwargs) -> Path:
    """A finished Block-AP run (RTN: 0 epochs) of a tiny 2-layer Llama, in ``root/run``."""
    from frugal_qat.block_ap.run import run_block_ap
    from frugal_qat.config import resolve

    model = save_tiny_model(root / "model", **model_kwargs)
    cfg = resolve(None, {"quant.wbits": bits, "quant.group_size": group, "data.train_size": 4, "data.val_size": 0,
                         "data.seqlen": 16, "block_ap.epochs": 0, "offload.device": "cpu"})
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    run_block_ap(model, root / "run", cfg, windows=windows, show_progress=False)
    return root / "run"


class RunCache:
    """Runs made once per test module, keyed by (bits, group, model kwargs)."""

    def __init__(self, root: Path):
        self.root, self.runs = root, {}

    def __call__(self, bits: int, group: int, **model_kwargs) -> Path:
        key = (bits, group, tuple(sorted(model_kwargs.items())))
        if key not in self.runs:
            name = f"w{bits}g{group}" + "".join(f"-{k}{v}" for k, v in key[2])
            self.runs[key] = make_run(self.root / name, bits, group, **model_kwargs)
        return self.runs[key]


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (and so of its names): equal digests mean nothing was written there."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def bit_value(words: list[list[int]], col: int, j: int, bits: int) -> int:
    """Value j of column ``col`` of a GPTQ-style bitstream, one bit at a time, as the format describes it:
    stream bit t is bit t % 32 of word t // 32, values are b consecutive stream bits, least significant first."""
    value = 0
    for k in range(bits):
        t = j * bits + k
        word = words[t // 32][col] & 0xFFFFFFFF  # int32 read as unsigned
        value |= ((word >> (t % 32)) & 1) << k
    return value
