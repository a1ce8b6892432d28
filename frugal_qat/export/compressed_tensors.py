"""compressed-tensors export: the "pack-quantized" checkpoint llm-compressor writes and transformers loads.

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
refuse these files rather than misread them. vLLM's WNA16 scheme takes 4 and 8 bits only, so 2/3-bit files have
no vLLM path; all load in compressed-tensors and transformers with ``CompressedTensorsConfig(dequantize=True)``
(``engines.py``, docs/EXPORT.md).
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
from frugal_qat.quantizer import packed_rows

log = logging.getLogger(__name__)

FORMAT = "pack-quantized"


def export_compressed_tensors(src: ModelSource, out: Path, *, dtype: str = "float16") -> dict[str, Any]:
    """Write ``src`` (an opened run) as a compressed-tensors pack-quantized checkpoint into ``out``."""
    bits, group = src.quant["bits"], src.quant["group_size"]
    if bits == 3:
        log.warning("3-bit pack-quantized uses compressed-tensors' dense layout (>= 0.20.0); older readers refuse it")

    def convert(i: int) -> dict[str, torch.Tensor]:
        raw = src.store.block_state(i, dtype=None)
        prefix = block_prefix(i)
        out_t = {}
        linears = [name[len(prefix):] for name in linear_keys(src, i)]
        for name in linears:
            out_t.update({prefix + name + "." + k: v for k, v in pack_linear_ct(raw, name, bits).items()})
        for key, t in raw.items():
            owner, kind = key.rsplit(".", 1)
            if owner not in linears or kind == "bias":  # norms and biases, fp16 as in the run
                out_t[prefix + key] = t.to(torch.float16)
        return out_t

    write_shards(src, out, convert)
    write_model_files(src, out, quantization_config(bits, group), dtype)
    return {"compression_format": FORMAT}


def pack_linear_ct(raw: dict[str, torch.Tensor], name: str, bits: int) -> dict[str, torch.Tensor]:
    """One linear's GPTQ tensors from the run (``raw[name + ".qweight"]`` ...) in pack-quantized form.

    Both formats hold the same LSB-first bitstreams of the unsigned codes and zero points (module docstring), so
    the conversion is a transpose: no value is unpacked or rounded.
    """
    qweight, qzeros, scales = (raw[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales"))
    n_in, (n_groups, n_out) = raw[f"{name}.g_idx"].numel(), scales.shape
    if not torch.equal(raw[f"{name}.g_idx"].long(), torch.arange(n_in) // (n_in // n_groups)):
        raise CorruptCheckpoint(f"{name}: g_idx is not i // g; only desc_act=false runs can be exported")
    if qweight.shape != (packed_rows(n_in, bits), n_out) or qzeros.shape != (n_groups, packed_rows(n_out, bits)):
        raise CorruptCheckpoint(f"{name}: packed shapes {tuple(qweight.shape)}, {tuple(qzeros.shape)} do not match "
                                f"a {bits}-bit [{n_out}, {n_in}] layer; the run is damaged")
    return {
        "weight_packed": qweight.t().contiguous(),  # [out, ceil(in*b/32)]: row o is column o of qweight
        "weight_zero_point": qzeros.t().contiguous(),  # [ceil(out*b/32), G]
        "weight_scale": scales.t().contiguous(),  # fp16 [out, G], as stored in the run
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
