"""Dense export: the dequantized model as a plain Hugging Face checkpoint (sharded safetensors) any tool loads.

Each linear becomes ``weight = (q - z) * s`` computed in fp32 (exactly what frugal-qat's forward uses) and then
stored in ``dtype``. In float16 or bfloat16 that store rounds: ``(q - z) * s`` needs up to b + 11 significant bits,
so a weight may move by half a unit in the last place (relative 2^-11 in fp16, 2^-8 in bf16); the report gives
the largest such change. ``dtype="float32"`` is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from frugal_qat.arch import block_prefix
from frugal_qat.errors import ConfigError
from frugal_qat.export import write_model_files, write_shards
from frugal_qat.offload.blocks import ModelSource

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def export_fp16(src: ModelSource, out: Path, *, dtype: str = "float16") -> dict[str, Any]:
    """Write ``src`` dequantized into ``out`` in ``dtype``; returns the largest weight rounding it introduced.

    Raises:
        ConfigError: an unknown ``dtype``.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported for the dense export; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    max_rounding = 0.0

    def convert(i: int) -> dict[str, torch.Tensor]:
        nonlocal max_rounding
        out_t = {}
        for key, w in src.block_state(i).items():  # fp32, packed linears dequantized
            stored = w.to(torch_dtype)
            max_rounding = max(max_rounding, float((stored.float() - w).abs().max()))
            out_t[block_prefix(i) + key] = stored
        return out_t

    # Embeddings, norm and lm_head are 16-bit in the run; float32 keeps them exactly as well.
    write_shards(src, out, convert, extra_dtype=torch.float32 if dtype == "float32" else torch_dtype)
    write_model_files(src, out, quantization_config=None, dtype=dtype)
    return {"dtype": dtype, "max_weight_rounding": max_rounding}
