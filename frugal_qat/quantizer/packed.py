"""The packed quantized linear layer of E2E-QP: integer weights stay packed, only the scales train (notes §3-4).

A layer holds GPTQ's tensors (layout in ``quantizer/packing.py``) and computes, with ``g`` the group size::

    W[i, o] = (q[i, o] - z[i // g, o]) * s[i // g, o]          q, z integers in [0, 2^b - 1], s the scales
    y       = x @ W + bias

Shapes legend: x ``[..., K]``, y ``[..., N]`` with K = in_features, N = out_features; ``qweight`` int32
``[ceil(K*b/32), N]``, ``qzeros`` int32 ``[G, ceil(N*b/32)]``, ``scales`` ``[G, N]``, G = K / g; M = number of tokens
(x flattened to ``[M, K]``); T = tile rows.

Gradients (``packed_linear``'s autograd function) go to x and to the scales only::

    dL/dx        = dL/dy @ W^T
    dL/ds[j, o]  = sum_{i in group j} (q[i, o] - z[j, o]) * dL/dW[i, o],     dL/dW = x^T @ dL/dy

The codes and zero points are frozen integers (no gradient), and so is the bias. Memory: backward saves only x, the
packed buffers and the scales. The torch path dequantizes T rows of W at a time and reduces each tile's ``dL/dW``
into its groups at once, so neither W nor dL/dW ever exists for the whole layer: its temporaries are about
``9 * T * N`` bytes (codes, ``q - z`` turned into W in place, one ``dL/dW`` tile), e.g. 50 MB for T = 512 and
N = 11008. A tile starts on a word boundary (a multiple of 32 rows, for every bit width) and holds whole groups or
part of one group, so z and s broadcast without gathered copies. The Triton kernels (``triton_kernels.py``) fuse the
same maths into register tiles.

Dtypes: the scales are fp32 masters (trainable) and are read as such by both paths; fp16 copies are made only when
writing a checkpoint (``to_packed``). The torch path computes in fp32 on CPU (this machine's 16-bit matmuls are
pathologically slow), in x's dtype on other devices, and in float64 for float64 x (gradient checks), always
accumulating over tiles in fp32 or better; y and dL/dx come back in x's dtype, dL/ds in the scales' dtype. Under
autocast x is first cast to the autocast dtype, as ``F.linear``'s input would be.

Backends: ``"auto"`` runs the Triton kernels for CUDA tensors when triton is installed, the torch path otherwise;
``"torch"`` forces the torch path (the oracle); ``"triton"`` forces the kernels (on CPU only under
``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from frugal_qat.quantizer.packing import packed_rows, unpack_rows
from frugal_qat.quantizer.primitives import resolve_group_size

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")
DEFAULT_TILE_ROWS = 512


def check_packed_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor | None, bits: int,
                        group_size: int, in_features: int) -> int:
    """Check that the packed tensors fit a ``[in_features, N]`` layer; return the effective group size ``g``.

    ``scales`` may be None when the caller does not use them (the scale-gradient kernel).

    Raises:
        ValueError: unsupported bits, a group size that does not divide in_features, or mismatched shapes.
    """
    g = resolve_group_size(group_size, in_features, bits)
    n = qweight.shape[-1]
    expected = {
        "qweight": (packed_rows(in_features, bits), n),
        "qzeros": (in_features // g, packed_rows(n, bits)),
        "scales": (in_features // g, n),
    }
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if t is not None and tuple(t.shape) != expected[name]:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {list(expected[name])} for a {bits}-bit layer with "
                f"in_features {in_features}, out_features {n} and group size {g}"
            )
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    return g


def _check_options(tile_rows: int, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if tile_rows <= 0 or tile_rows % 32:
        raise ValueError(f"tile_rows {tile_rows} must be a positive multiple of 32 (a word boundary for all bits)")


@dataclass(frozen=True)
class _Spec:
    bits: int
    group_size: int  # effective: in_features for -1
    tile_rows: int
    backend: str  # "torch" or "triton", resolved


def packed_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    tile_rows: int = DEFAULT_TILE_ROWS,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x @ W + bias`` for the packed ``W`` [K, N] (module docstring); differentiable in x and scales.

    Args:
        x: ``[..., K]`` float16, bfloat16 or float32; float64 on the torch path (exact gradient checks).
        qweight, qzeros, scales: the packed layer (scales usually the fp32 trainable masters).
        bits: 2, 3, 4 or 8.   group_size: ``g`` or -1 (one group per output column).
        bias: optional ``[N]``, no gradient.
        tile_rows: rows of W dequantized at a time on the torch path; a positive multiple of 32.
        backend: "auto", "torch" or "triton".

    Returns:
        ``[..., N]`` in x's dtype (the autocast dtype under autocast).
    """
    _check_options(tile_rows, backend)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"x has dtype {x.dtype}; use float16, bfloat16 or float32 (float64: torch path only)")
    in_features = x.shape[-1]
    g = check_packed_weight(qweight, qzeros, scales, bits, group_size, in_features)
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if backend == "auto":
        use_triton = x.is_cuda and importlib.util.find_spec("triton") is not None
        backend = "triton" if use_triton else "torch"
    spec = _Spec(bits, g, tile_rows, backend)
    y = _PackedLinearFunction.apply(x.reshape(-1, in_features), qweight, qzeros, scales, spec)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias.to(y.dtype)


class _PackedLinearFunction(torch.autograd.Function):
    """Autograd of ``x2 @ W(scales)`` for ``x2`` [M, K]: gradients for x2 and scales only."""

    @staticmethod
    def forward(ctx, x2, qweight, qzeros, scales, spec: _Spec):
        # Only the inputs are saved, never a dequantized weight: backward recomputes W tile by tile.
        ctx.save_for_backward(x2, qweight, qzeros, scales)
        ctx.spec = spec
        if spec.backend == "triton":
            from frugal_qat.quantizer import triton_kernels

            return triton_kernels.dequant_matmul(x2, qweight, qzeros, scales, spec.bits, spec.group_size)
        return _torch_matmul(x2, qweight, qzeros, scales, spec)

    @staticmethod
    def backward(ctx, grad_y):
        x2, qweight, qzeros, scales = ctx.saved_tensors
        spec: _Spec = ctx.spec
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        grad_y = grad_y.to(x2.dtype)
        if spec.backend == "triton":
            from frugal_qat.quantizer import triton_kernels

            grad_x = grad_s = None
            if need_x:
                grad_x = triton_kernels.dequant_matmul_grad_input(
                    grad_y, qweight, qzeros, scales, spec.bits, spec.group_size, x2.shape[1])
            if need_s:
                grad_s = triton_kernels.dequant_matmul_grad_scales(
                    x2, grad_y, qweight, qzeros, spec.bits, spec.group_size)
        else:
            grad_x, grad_s = _torch_backward(x2, grad_y, qweight, qzeros, scales, spec, need_x, need_s)
        if grad_s is not None:
            grad_s = grad_s.to(scales.dtype)
        return grad_x, None, None, grad_s, None


# ---------------------------------------------------------------------------------------------------------------------
# torch path (the oracle)


def _compute_dtypes(x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, accumulation dtype) of the torch path; float64 stays float64 (for gradcheck)."""
    if x.dtype == torch.float64:
        return torch.float64, torch.float64
    return (torch.float32 if x.device.type == "cpu" else x.dtype), torch.float32


def _unpack_zeros(qzeros: torch.Tensor, bits: int, out_features: int, dtype: torch.dtype) -> torch.Tensor:
    """``[G, N]`` zero points as ``dtype`` (small: 1/g of the weight)."""
    return unpack_rows(qzeros.t(), bits, out_features).t().to(dtype)


def _tile_bounds(in_features: int, g: int, tile_rows: int):
    """Row ranges ``[k0, k1)`` that start on a word boundary (k0 % 32 == 0) and are either whole groups or part of
    a single group, so that z and s broadcast over a ``[n, r, N]`` view of the tile (no gathered copies).

    Whole groups when ``lcm(32, g) <= tile_rows`` (or when a group cannot be split on a word boundary, in which case
    a tile grows to ``lcm(32, g)`` rows); otherwise each group is cut into tiles of ``tile_rows``.
    """
    whole = math.lcm(32, g)
    if whole > tile_rows and (g % 32 == 0 or g == in_features):
        for j0 in range(0, in_features, g):
            for k0 in range(j0, j0 + g, tile_rows):
                yield k0, min(k0 + tile_rows, j0 + g)
    else:
        step = max(tile_rows // whole, 1) * whole
        for k0 in range(0, in_features, step):
            yield k0, min(k0 + step, in_features)


def _q_minus_z(qweight: torch.Tensor, zeros: torch.Tensor, spec: _Spec, k0: int, k1: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, slice]:
    """``q - z`` of rows ``[k0, k1)`` as a ``[n, r, N]`` tensor (n groups of r rows) in ``dtype``, and the slice of
    those n groups."""
    g, bits = spec.group_size, spec.bits
    w0 = k0 * bits // 32  # exact: k0 is a multiple of 32
    codes = unpack_rows(qweight[w0 : w0 + packed_rows(k1 - k0, bits)], bits, k1 - k0)
    q_minus_z = codes.to(dtype).view(-1, min(g, k1 - k0), codes.shape[1])
    groups = slice(k0 // g, k0 // g + q_minus_z.shape[0])
    q_minus_z -= zeros[groups, None]
    return q_minus_z, groups


def _scale_(q_minus_z: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``W = (q - z) * s`` in place on ``q_minus_z`` [n, r, N] (scales [n, N]), returned as ``[n*r, N]``."""
    return q_minus_z.mul_(scales[:, None].to(q_minus_z.dtype)).view(-1, q_minus_z.shape[-1])


def _torch_matmul(x2, qweight, qzeros, scales, spec: _Spec) -> torch.Tensor:
    cd, acc = _compute_dtypes(x2)
    zeros = _unpack_zeros(qzeros, spec.bits, qweight.shape[1], acc)
    y = torch.zeros(x2.shape[0], qweight.shape[1], dtype=acc, device=x2.device)
    for k0, k1 in _tile_bounds(x2.shape[1], spec.group_size, spec.tile_rows):
        q_minus_z, groups = _q_minus_z(qweight, zeros, spec, k0, k1, acc)
        w = _scale_(q_minus_z, scales[groups]).to(cd)
        if cd == acc:
            y.addmm_(x2[:, k0:k1].to(cd), w)
        else:
            y += x2[:, k0:k1] @ w
        del q_minus_z, w  # before the next tile is unpacked: at most one tile exists at a time
    return y.to(x2.dtype)


def _torch_backward(x2, grad_y, qweight, qzeros, scales, spec: _Spec, need_x: bool, need_s: bool):
    cd, acc = _compute_dtypes(x2)
    zeros = _unpack_zeros(qzeros, spec.bits, qweight.shape[1], acc)
    grad_y = grad_y.to(cd)
    grad_x = torch.empty_like(x2) if need_x else None
    grad_s = torch.zeros(scales.shape, dtype=acc, device=scales.device) if need_s else None
    for k0, k1 in _tile_bounds(x2.shape[1], spec.group_size, spec.tile_rows):
        q_minus_z, groups = _q_minus_z(qweight, zeros, spec, k0, k1, acc)
        if need_s:
            # dL/dW of this tile only, reduced into its groups at once and freed.
            grad_w = (x2[:, k0:k1].to(cd).t() @ grad_y).to(acc).view(q_minus_z.shape)
            grad_s[groups] += grad_w.mul_(q_minus_z).sum(1)
            del grad_w
        if need_x:
            grad_x[:, k0:k1] = grad_y @ _scale_(q_minus_z, scales[groups]).to(cd).t()  # q_minus_z is W now
        del q_minus_z  # before the next tile is unpacked: at most one tile exists at a time
    return grad_x, grad_s


# ---------------------------------------------------------------------------------------------------------------------
# module


def _group_index(in_features: int, g: int) -> torch.Tensor:
    """GPTQ's ``g_idx``: int32 ``[in]``, ``i // g``."""
    return torch.arange(in_features, dtype=torch.int32) // g


class PackedLinear(nn.Module):
    """A linear layer over packed integer weights whose fp32 scales are the only trainable tensor (E2E-QP).

    Buffers ``qweight``, ``qzeros``, ``g_idx`` (int32) and optional ``bias`` (16-bit) keep GPTQ's names, so the
    state dict reads like a GPTQ checkpoint except that ``scales`` is an fp32 ``nn.Parameter`` ``[G, out]``.
    ``__init__`` allocates every tensor with its final shape (``device="meta"`` allocates nothing), so a model can
    be built first and filled later. ``group_size`` is stored as the effective value (in_features for -1).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False, *,
                 bias_dtype: torch.dtype = torch.float16, tile_rows: int = DEFAULT_TILE_ROWS,
                 backend: str = "auto", device: torch.device | str | None = None) -> None:
        super().__init__()
        g = resolve_group_size(group_size, in_features, bits)
        _check_options(tile_rows, backend)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, g
        self.tile_rows, self.backend = tile_rows, backend
        n_groups = in_features // g
        int32 = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(packed_rows(in_features, bits), out_features, **int32))
        self.register_buffer("qzeros", torch.zeros(n_groups, packed_rows(out_features, bits), **int32))
        # Computed on the CPU and moved: arithmetic on the meta device imports torch's Python decompositions
        # (about 150 MB of RSS and 1.5 s, once per process).
        self.register_buffer("g_idx", _group_index(in_features, g).to(device))
        self.scales = nn.Parameter(torch.ones(n_groups, out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_packed(cls, tensors: dict[str, torch.Tensor], bits: int, group_size: int, in_features: int,
                    out_features: int, **kwargs) -> PackedLinear:
        """Wrap packed tensors (``pack_linear``'s dict, plus an optional ``"bias"``) without copying the integers.

        ``kwargs`` go to ``__init__`` (``tile_rows``, ``backend``). The scales become an fp32 copy.

        Raises:
            ValueError: a missing tensor, a shape that does not fit the layer, or a reordered ``g_idx``.
        """
        bias = tensors.get("bias")
        bias_kwargs = {} if bias is None else {"bias_dtype": bias.dtype}
        layer = cls(in_features, out_features, bits, group_size, bias is not None, device="meta",
                    **bias_kwargs, **kwargs)
        for name in ("qweight", "qzeros", "scales"):
            if name not in tensors:
                raise ValueError(f"packed layer is missing {name!r}; found keys {sorted(tensors)}")
        check_packed_weight(tensors["qweight"], tensors["qzeros"], tensors["scales"], bits, layer.group_size,
                            in_features)
        if tensors["qweight"].shape[1] != out_features:
            raise ValueError(f"qweight has {tensors['qweight'].shape[1]} columns, expected out_features "
                             f"{out_features}")
        g_idx = _group_index(in_features, layer.group_size).to(tensors["qweight"].device)
        if "g_idx" in tensors and not torch.equal(tensors["g_idx"].to(g_idx), g_idx):
            raise ValueError(f"g_idx is not i // {layer.group_size} (activation reordering / desc_act); only "
                             f"desc_act=false checkpoints are supported")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected [{out_features}]")
        layer.qweight, layer.qzeros, layer.g_idx, layer.bias = tensors["qweight"], tensors["qzeros"], g_idx, bias
        layer.scales = nn.Parameter(tensors["scales"].detach().to(torch.float32, copy=True))
        return layer

    def to_packed(self) -> dict[str, torch.Tensor]:
        """GPTQ's tensors (scales as fp16), plus ``"bias"`` when the layer has one."""
        out = {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales.detach().to(torch.float16),
               "g_idx": self.g_idx}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.qweight, self.qzeros, self.scales, self.bits, self.group_size, self.bias,
                             tile_rows=self.tile_rows, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")
