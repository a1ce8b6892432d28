"""GPTQ export: the checkpoint GPTQModel and transformers (+ optimum + gptqmodel) load (``engines.py`` has the
full list per bit width, with what was checked; vLLM's GPTQ kernels take symmetric 4/8-bit files only).

A run already stores each linear in GPTQ's layout (notes §4, ``frugal_qat.quantizer.packing``):

    qweight  int32 [in*b/32, out]   codes, each column of [in, out] one LSB-first bitstream (b = 3: 32 values in
                                    3 words, GPTQ's 3-bit layout)
    qzeros   int32 [G, out*b/32]    zero points packed along out
    scales   fp16  [G, out]         g_idx int32 [in] = i // g (desc_act false)
    W[i, o] = (q[i, o] - z[i // g, o]) * s[i // g, o]

so the export copies those tensors (after checking them) and writes the metadata loaders read. Zero points:

- ``v2`` (default): z stored as is; ``checkpoint_format``/``format`` ``"gptq_v2"``. Lossless for every z.
- ``v1``: the historical GPTQ convention stores ``z - 1`` (loaders add 1 back); ``"gptq"``. It cannot hold
  z = 0, which asymmetric quantization produces whenever a group is all positive, so a run with any z = 0 is
  refused. GPTQModel's own ``GPTQModel.load`` also refuses asymmetric v1 files not written by GPTQModel >= 0.9
  (it guards against old AutoGPTQ files whose z - 1 wrapped); transformers' GPTQ integration reads them.

Config keys: ``quantization_config`` in config.json and the same in quantize_config.json (GPTQModel reads the
latter). ``meta`` (``{"quantizer": ["frugal_qat:VERSION"]}``) is written for v2 only: for it transformers refuses
to hand a GPTQ config to AutoRound, which would otherwise read v2 zero points as v1 (every weight off by one
step); v1 files omit it so AutoRound's loader accepts them. GPTQModel reads ``meta`` only to recognise files
written by itself.

Shapes: loaders size ``qweight`` as ``in*b/32`` and ``qzeros`` as ``out*b/32`` words, some rounding down; a layer
whose ``in*b`` or ``out*b`` is not a multiple of 32 (3-bit: in or out not a multiple of 32) is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from frugal_qat import __version__
from frugal_qat.arch import block_prefix
from frugal_qat.checkpoint.store import atomic_write_json
from frugal_qat.errors import ConfigError, CorruptCheckpoint
from frugal_qat.export import linear_keys, write_model_files, write_shards
from frugal_qat.offload.blocks import ModelSource
from frugal_qat.quantizer import pack_rows, unpack_rows

log = logging.getLogger(__name__)

CHECKPOINT_FORMATS = {"v2": "gptq_v2", "v1": "gptq"}
# Group sizes GPTQModel's CPU/torch kernels accept (other group sizes are valid GPTQ but fewer kernels run them).
KERNEL_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)


def export_gptq(src: ModelSource, out: Path, *, zero_point: str = "v2", dtype: str = "float16") -> dict[str, Any]:
    """Write ``src`` (an opened run) as a GPTQ checkpoint into ``out``; see the module docstring for the layout.

    Raises:
        ConfigError: an unknown ``zero_point``, ``v1`` with some z = 0, or a layer shape GPTQ cannot pack.
    """
    if zero_point not in CHECKPOINT_FORMATS:
        raise ConfigError(f"GPTQ zero point convention {zero_point!r} is unknown; choose v2 (default) or v1")
    bits, group = src.quant["bits"], src.quant["group_size"]
    fmt = CHECKPOINT_FORMATS[zero_point]
    _preflight(src, bits, zero_point)  # refuse before any file is written
    if group not in KERNEL_GROUP_SIZES:
        log.warning("group size %d is valid GPTQ, but GPTQModel's kernels accept only %s", group, KERNEL_GROUP_SIZES)
    if bits == 4 and group == -1:
        log.warning("gptqmodel 7.7.0's auto-selected CPU int4 kernels compute group size -1 wrongly; load this "
                    "export with backend='torch' (GPTQConfig(bits=4, backend='torch')), see docs/EXPORT.md")

    def convert(i: int) -> dict[str, torch.Tensor]:
        raw = src.store.block_state(i, dtype=None)
        prefix = block_prefix(i)
        out_t = {}
        for key, t in raw.items():
            _check_shape(prefix, key, t, raw, bits)
            if key.endswith(".qzeros") and zero_point == "v1":
                n_out = raw[key[: -len("qzeros")] + "scales"].shape[1]
                zeros = unpack_rows(t.t(), bits, n_out).to(torch.int64)  # [out, G], all >= 1 (preflight)
                t = pack_rows(zeros - 1, bits).t().contiguous()
            elif t.is_floating_point():
                t = t.to(torch.float16)  # norms and biases; already fp16 in a run
            out_t[prefix + key] = t
        return out_t

    write_shards(src, out, convert)
    qc = quantization_config(bits, group, fmt)
    write_model_files(src, out, qc, dtype)
    atomic_write_json(out / "quantize_config.json", qc)
    return {"checkpoint_format": fmt}


def quantization_config(bits: int, group_size: int, checkpoint_format: str) -> dict[str, Any]:
    """What GPTQModel (``quantize_config.json``) and transformers (``config.json``) read.

    GPTQModel reads ``format`` and still accepts ``checkpoint_format``; transformers' GPTQConfig reads either.
    ``meta`` only for gptq_v2 (module docstring).
    """
    qc = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": False,
        "lm_head": False,
        "true_sequential": True,
        "static_groups": False,
        "format": checkpoint_format,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
    }
    if checkpoint_format == "gptq_v2":
        qc["meta"] = {"quantizer": [f"frugal_qat:{__version__}"]}
    return qc


def _preflight(src: ModelSource, bits: int, zero_point: str) -> None:
    """Check every linear's packed shapes (and, for v1, that no z is 0), reading only the small tensors."""
    for i in range(src.n_layers):
        for name in linear_keys(src, i):
            scales = src.store.get(f"{name}.scales")
            g_idx = src.store.get(f"{name}.g_idx").to(torch.int64)
            n_in, n_out = g_idx.numel(), scales.shape[1]
            g = n_in // scales.shape[0]
            if not torch.equal(g_idx, torch.arange(n_in) // g):
                raise CorruptCheckpoint(f"{name}: g_idx is not i // {g}; the run is damaged")
            for label, n in (("in_features", n_in), ("out_features", n_out)):
                if n * bits % 32:
                    raise ConfigError(
                        f"{name}: {label} {n} x {bits} bits is not a whole number of 32-bit words, which GPTQ "
                        f"loaders require; export this run as compressed-tensors or fp16"
                    )
            if zero_point == "v1":
                zeros = unpack_rows(src.store.get(f"{name}.qzeros").t(), bits, n_out)
                n_zero = int((zeros == 0).sum())
                if n_zero:
                    raise ConfigError(
                        f"{name}: {n_zero} groups have zero point 0, which GPTQ v1 (stores z - 1) cannot hold; "
                        f"export with zero_point v2 (checkpoint_format gptq_v2), which GPTQModel loads"
                    )


def _check_shape(prefix: str, key: str, t: torch.Tensor, raw: dict[str, torch.Tensor], bits: int) -> None:
    """qweight is [in*b/32, out] and qzeros [G, out*b/32], as every GPTQ loader sizes them."""
    linear, _, kind = key.rpartition(".")
    if kind not in ("qweight", "qzeros"):
        return
    scales, n_in = raw[f"{linear}.scales"], raw[f"{linear}.g_idx"].numel()
    n_groups, n_out = scales.shape
    expected = (n_in * bits // 32, n_out) if kind == "qweight" else (n_groups, n_out * bits // 32)
    if tuple(t.shape) != expected:
        raise CorruptCheckpoint(
            f"{prefix}{key} has shape {tuple(t.shape)}, expected {list(expected)}; the run is damaged"
        )

