"""compressed-tensors export: the "pack-quantized" checkpoint llm-compressor writes and vLLM / transformers load.

Per linear ``W[out, in]`` (b bits, groups of g input columns, G = in // g; g = -1 is the "channel" strategy, G = 1):

    weight_packed      int32 [out, ceil(in*b/32)]   codes, each row one LSB-first bitstream along in
    weight_zero_point  int32 [ceil(out*b/32), G]    zero points, each column one bitstream along out
    weight_scale       fp16  [out, G]               weight_shape int64 [2] = (out, in)
    W[o, i] = (x_q[o, i] - zp[o, i // g]) * s[o, i // g]

compressed-tensors' integers are signed: ``x_q`` and ``zp`` lie in ``[-2^(b-1), 2^(b-1) - 1]`` and its packer
adds ``2^(b-1)`` before packing. Ours are unsigned (``q, z`` in ``[0, 2^b - 1]``), so we take
``x_q = q - 2^(b-1)`` and ``zp = z - 2^(b-1)``: the difference ``x_q - zp = q - z`` is unchanged (lossless for every
b <= 8), and the packed bits are exactly ``q`` and ``z``. The bitstream is the same as GPTQ's, transposed:
``weight_packed = qweight.T`` and ``weight_zero_point = qzeros.T``.

Bit layout by version: 2, 4 and 8 bits have always been packed this way (32/b whole values per word). For 3 bits,
compressed-tensors packs densely (32 values in 3 words, values straddling words) since its dense-packing change
(vllm-project/compressed-tensors PR #732, in 0.20.0, which we check against); the short-lived releases before it
that accepted 3 bits put 10 values in each word. Those older readers expect another ``weight_packed`` width and
refuse these files rather than misread them. vLLM's kernels for this scheme have historically covered 4 and 8
bits; 2/3-bit files load in compressed-tensors and transformers (see docs/EXPORT.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from frugal_qat.arch import block_prefix
from frugal_qat.errors import CorruptCheckpoint
from frugal_qat.export import linear_keys, write_model_files, write_shards
from frugal_qat.offload.blocks import ModelSource
from frugal_qat.quantizer import pack_rows, unpack_linear

log = logging.getLogger(__name__)

FORMAT = "pack-quantized"


def export_compressed_tensors(src: ModelSource, out: Path) -> dict[str, Any]:
    """Write ``src`` (an opened run) as a compressed-tensors pack-quantized checkpoint into ``out``."""
    bits, group = src.quant["bits"], src.quant["group_size"]
    if bits == 3:
        log.warning("3-bit pack-quantized uses compressed-tensors' dense layout (>= 0.20.0); older readers refuse it")

    def convert(i: int) -> dict[str, torch.Tensor]:
        raw = src.store.block_state(i, dtype=None)
        prefix = block_prefix(i)
        out_t = {}
        linears = [name[len(prefix):] for name in linear_keys(i)]
        for name in linears:
            out_t.update({prefix + name + "." + k: v for k, v in pack_linear_ct(raw, name, bits, group).items()})
        for key, t in raw.items():
            owner, kind = key.rsplit(".", 1)
            if owner not in linears or kind == "bias":  # norms and biases, fp16 as in the run
                out_t[prefix + key] = t.to(torch.float16)
        return out_t

    write_shards(src, out, convert)
    write_model_files(src, out, quantization_config(bits, group))
    return {"compression_format": FORMAT}


def pack_linear_ct(raw: dict[str, torch.Tensor], name: str, bits: int, group: int) -> dict[str, torch.Tensor]:
    """One linear's GPTQ tensors from the run (``raw[name + ".qweight"]`` ...) in pack-quantized form."""
    packed = {k: raw[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
    n_in, n_out = packed["g_idx"].numel(), packed["scales"].shape[1]
    codes, scale, zero = unpack_linear(packed, bits, group, n_in, n_out)  # [out, in] uint8, [out, G] fp32 x2
    if zero.min() < 0 or zero.max() > 2**bits - 1:
        raise CorruptCheckpoint(f"{name}: zero points outside [0, {2**bits - 1}]; the run is damaged")
    return {
        # pack_rows packs each column along dim 0: transpose so each row of [out, in] becomes one bitstream.
        "weight_packed": pack_rows(codes.t(), bits).t().contiguous(),
        "weight_zero_point": pack_rows(zero.to(torch.int64), bits),
        "weight_scale": scale.to(torch.float16),  # exact: the run stores fp16 scales
        "weight_shape": torch.tensor([n_out, n_in], dtype=torch.int64),
    }


def quantization_config(bits: int, group_size: int) -> dict[str, Any]:
    """The ``quantization_config`` of config.json, as llm-compressor writes it for weight-only asymmetric int."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": False,
        "strategy": "channel" if group_size == -1 else "group",
        "group_size": None if group_size == -1 else group_size,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                # Every Linear of the supported families but lm_head is one of the seven quantized linears.
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
