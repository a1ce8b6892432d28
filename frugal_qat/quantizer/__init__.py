"""Weight quantization: primitives (tensor maths), GPTQ-layout packing, the fake-quant layer (Block-AP) and the
packed layer (E2E-QP). The Triton kernels are imported only when a CUDA tensor needs them."""

from frugal_qat.quantizer.linear import QuantLinear
from frugal_qat.quantizer.packed import PackedLinear, packed_linear
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
    "PackedLinear",
    "QuantLinear",
    "packed_linear",
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
