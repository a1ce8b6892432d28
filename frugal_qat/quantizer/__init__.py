"""Weight quantization: primitives (tensor maths), GPTQ-layout packing and the fake-quant layer."""

from frugal_qat.quantizer.linear import QuantLinear
from frugal_qat.quantizer.packing import (
    pack_linear,
    pack_rows,
    packed_rows,
    unpack_linear,
    unpack_rows,
)
from frugal_qat.quantizer.primitives import (
    SUPPORTED_BITS,
    clamp_ste,
    dequantize,
    fake_quant,
    init_qparams,
    quantize,
    resolve_group_size,
    round_ste,
    round_zero,
)

__all__ = [
    "SUPPORTED_BITS",
    "QuantLinear",
    "clamp_ste",
    "dequantize",
    "fake_quant",
    "init_qparams",
    "pack_linear",
    "pack_rows",
    "packed_rows",
    "quantize",
    "resolve_group_size",
    "round_ste",
    "round_zero",
    "unpack_linear",
    "unpack_rows",
]
