"""The packed quantized linear layer of E2E-QP: integer weights stay packed, only the scales train (notes §3-4).

A layer holds GPTQ's tensors (layout in ``quantizer/packing.py``) and computes, with ``g`` the group size::

    W[i, o] = (q[i, o] - z[i // g, o]) * s[i // g, o]          q, z integers in [0, 2^b - 1], s the scales
    y       = x @ W + bias

Shapes legend: x ``[..., K]``, y ``[..., N]`` with K = in_features, N = out_features; ``qweight`` int32
``[ceil(K*b/32), N]``, ``qzeros`` int32 ``[G, ceil(N*b/32)]``, ``scales`` ``[G, N]``, G = K / g; M = number of tokens
(x flattened to ``[M, K]``).

Gradients (``packed_linear``'s autograd function) go to x and to the scales only::

    dL/dx        = dL/dy @ W^T
    dL/ds[j, o]  = sum_{i in group j} (q[i, o] - z[j, o]) * dL/dW[i, o],     dL/dW = x^T @ dL/dy

The codes and zero points are frozen integers (no gradient), and so is the bias. Backward saves only x, the packed
buffers and the scales, never a dequantized weight.

Two paths compute the same maths (docs/KERNELS.md):

- **tiled** (``backend="torch"``; the oracle, the CPU path and the many-token CUDA path): W is dequantized to the
  compute dtype one tile at a time and multiplied with ``torch.mm`` (cuBLAS on CUDA, so the tensor cores do the
  work). The forward cuts W along N, so each output tile is one complete matmul and nothing accumulates across
  tiles; the backward cuts W along K: ``dL/dx[:, tile] = dL/dy @ W[tile]^T``, and ``dL/dW[tile] = x[:, tile]^T @
  dL/dy`` is reduced into the tile's groups at once and freed, so no operand is read once per group. A K tile starts
  on a word boundary (a multiple of 32 rows, for every bit width) and holds whole groups or part of one group. On
  CUDA with triton installed, ``backend="auto"`` dequantizes each tile and reduces each dL/dW tile with two small
  Triton kernels (``triton_kernels.dequantize_tile`` / ``reduce_scale_grad``: one pass over memory each, bit-equal
  W) instead of chains of torch ops; ``backend="torch"`` always uses the torch ops.
- **fused** (``backend="triton"``): Triton kernels that decode W in registers inside the matmul. They win when few
  tokens share each decoded weight (generation); see ``FUSED_MAX_TOKENS``.

Tile sizes: ``tile_rows`` (a multiple of 32) caps a tile at ``tile_rows * N`` weights. By default (None) the CPU
keeps ``DEFAULT_TILE_ROWS`` = 512 rows' worth (about ``8 * 512 * N`` bytes of temporaries: int32 codes plus an fp32
tile), and CUDA sizes tiles from ``CUDA_TILE_BYTES``, which holds every Llama-2-70B layer whole in bf16.
``packed_matmul_transients`` gives the bytes for the memory planner.

Dtypes: the scales are fp32 masters (trainable) and are read as such by both paths; fp16 copies are made only when
writing a checkpoint (``to_packed``). The compute dtype is x's dtype on CUDA (the autocast dtype under autocast:
the precision policy, ``frugal_qat/precision.py``, decides it), fp32 on CPU (this machine's 16-bit matmuls are
pathologically slow), and float64 for float64 x (gradient checks). A W tile is ``(q - z) * s`` computed in fp32 (or
float64) and rounded once to the compute dtype; every matmul accumulates in fp32 or better (cuBLAS and ``tl.dot``
accumulate 16-bit products in fp32), and ``dL/ds`` is reduced in fp32. y and dL/dx come back in x's dtype, dL/ds in
the scales' dtype.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frugal_qat.quantizer import kernel_configs as kc
from frugal_qat.quantizer.packing import packed_rows
from frugal_qat.quantizer.primitives import resolve_group_size

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")
DEFAULT_TILE_ROWS = 512  # CPU tiles: rows of W (times N weights) dequantized at a time
CUDA_TILE_BYTES = 512 * 2**20  # CUDA tiles: bytes of tile temporaries (bf16: 268 M weights, any 70B layer whole)

# backend="auto" on CUDA runs the fused kernels up to this many tokens and the tiled path (dequantize + cuBLAS)
# above. From the cost model (kernel_cost.py; tools/bench_kernels.py, table in docs/KERNELS.md): a fused kernel
# decodes every weight once per block of 64 tokens (16 below 17 tokens), about 0.55 warp instructions per weight
# in its compiled main loop, so it is bound by instruction issue; the tiled path pays one dequantization pass (b/8 +
# 2 bytes per weight) plus a read of the bf16 layer, then runs at cuBLAS speed. For every Llama-2-70B layer, on
# both A100 and H100, the fused forward is modelled ahead at 64 tokens (e.g. down_proj 307 vs 500 us on A100) and
# behind at 128 (608 vs 502 us): 64 is one 64-row block, the last token count before the decode work doubles.
# Every training shape (E2E-QP: 16384 tokens) takes cuBLAS.
FUSED_MAX_TOKENS = 64

_TRITON_DTYPES = tuple(getattr(torch, name) for name in kc.DTYPES)  # bf16: what the Triton binaries take


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


def _check_options(tile_rows: int | None, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if tile_rows is not None and (tile_rows <= 0 or tile_rows % 32):
        raise ValueError(f"tile_rows {tile_rows} must be a positive multiple of 32 (a word boundary for all bits)")


def triton_available() -> bool:
    """Whether triton is installed (checked without importing it, which would fix its interpreter mode)."""
    return importlib.util.find_spec("triton") is not None


def fused_supported(dtype: torch.dtype, group_size: int) -> bool:
    """Whether the fused kernels take this input: bf16 x (``kernel_configs.DTYPES``) and a group size that is a
    multiple of 32 (their K step, ``kernel_configs.FUSED_BLOCK_K``, must not cross a group)."""
    return dtype in _TRITON_DTYPES and group_size % kc.FUSED_BLOCK_K == 0


def choose_backend(tokens: int, device_type: str, dtype: torch.dtype, group_size: int,
                   has_triton: bool | None = None) -> str:
    """The path ``backend="auto"`` takes: ``"triton"`` (fused kernels) or ``"torch"`` (tiled).

    Fused only on CUDA with triton installed, for at most ``FUSED_MAX_TOKENS`` tokens and inputs the kernels take
    (``fused_supported``); the tiled path everywhere else, including every CPU call.
    """
    has_triton = triton_available() if has_triton is None else has_triton
    if device_type == "cuda" and has_triton and tokens <= FUSED_MAX_TOKENS and fused_supported(dtype, group_size):
        return "triton"
    return "torch"


@dataclass(frozen=True)
class _Spec:
    bits: int
    group_size: int  # effective: in_features for -1
    tile_rows: int | None
    backend: str  # "torch" or "triton", resolved
    compute: torch.dtype  # tiled path: the matmul dtype (compute_dtypes)
    helpers: bool  # tiled path: dequantize / reduce with the Triton helper kernels (CUDA, backend "auto")


def packed_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    tile_rows: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = x @ W + bias`` for the packed ``W`` [K, N] (module docstring); differentiable in x and scales.

    Args:
        x: ``[..., K]`` float16, bfloat16 or float32; float64 on the tiled path (exact gradient checks).
        qweight, qzeros, scales: the packed layer (scales usually the fp32 trainable masters).
        bits: 2, 3, 4 or 8.   group_size: ``g`` or -1 (one group per output column).
        bias: optional ``[N]``, no gradient.
        tile_rows: tiled path: at most ``tile_rows * N`` weights per tile (a positive multiple of 32); None: the
            device's default (512 rows on CPU, ``CUDA_TILE_BYTES`` on CUDA).
        backend: "auto" (``choose_backend``), "torch" (tiled, torch ops only) or "triton" (fused; on CPU only
            under ``TRITON_INTERPRET=1``, for tests).

    Returns:
        ``[..., N]`` in x's dtype (the autocast dtype under autocast).

    Raises:
        ValueError: bad shapes, dtypes or options (``backend="triton"`` with an input the kernels do not take).
    """
    _check_options(tile_rows, backend)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"x has dtype {x.dtype}; use float16, bfloat16 or float32 (float64: torch path only)")
    in_features = x.shape[-1]
    g = check_packed_weight(qweight, qzeros, scales, bits, group_size, in_features)
    if _autocast_on(x):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    x2 = x.reshape(-1, in_features)
    compute, _ = compute_dtypes(x.dtype, x.device.type)
    helpers = False
    if backend == "auto":
        backend = choose_backend(x2.shape[0], x.device.type, x.dtype, g)
        helpers = backend == "torch" and x.is_cuda and compute in _TRITON_DTYPES and triton_available()
    elif backend == "triton" and not fused_supported(x.dtype, g):
        raise ValueError(f"backend='triton' takes bfloat16 inputs and group sizes that are multiples of "
                         f"{kc.FUSED_BLOCK_K}; got {x.dtype} and group size {g}: use backend='torch' or 'auto'")
    spec = _Spec(bits, g, tile_rows, backend, compute, helpers)
    y = _PackedLinearFunction.apply(x2, qweight, qzeros, scales, spec)
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias.to(y.dtype)


class _PackedLinearFunction(torch.autograd.Function):
    """Autograd of ``x2 @ W(scales)`` for ``x2`` [M, K]: gradients for x2 and scales only."""

    @staticmethod
    def forward(ctx, x2, qweight, qzeros, scales, spec: _Spec):
        # Only the inputs are saved, never a dequantized weight: backward recomputes W tile by tile.
        ctx.save_for_backward(x2, qweight, qzeros, scales)
        ctx.spec = spec
        # The dtypes are chosen above (x already carries the autocast dtype); autocast must not recast the tiles.
        with _no_autocast(x2):
            if spec.backend == "triton":
                from frugal_qat.quantizer import triton_kernels

                return triton_kernels.dequant_matmul(x2, qweight, qzeros, scales, spec.bits, spec.group_size)
            return _tiled_forward(x2, qweight, qzeros, scales, spec)

    @staticmethod
    def backward(ctx, grad_y):
        x2, qweight, qzeros, scales = ctx.saved_tensors
        spec: _Spec = ctx.spec
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        grad_y = grad_y.to(x2.dtype)
        with _no_autocast(x2):
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
                grad_x, grad_s = _tiled_backward(x2, grad_y, qweight, qzeros, scales, spec, need_x, need_s)
        if grad_s is not None:
            grad_s = grad_s.to(scales.dtype)
        return grad_x, None, None, grad_s, None


def _autocast_on(x: torch.Tensor) -> bool:
    device_type = x.device.type
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _no_autocast(x: torch.Tensor):
    if _autocast_on(x):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------------------
# tiled path (the oracle)


def compute_dtypes(dtype: torch.dtype, device_type: str) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, accumulation dtype) of the tiled path for inputs of ``dtype``; float64 stays float64."""
    if dtype == torch.float64:
        return torch.float64, torch.float64
    return (torch.float32 if device_type == "cpu" else dtype), torch.float32


def _bytes_per_weight(device_type: str, compute_bytes: int, helpers: bool) -> tuple[int, int]:
    """Bytes of tile temporaries per weight of a tile at the forward and at the backward peak (module docstring).

    Helpers: only the W tile (forward) or one of W / dL/dW (backward) exists. Torch ops: int32 codes (4) next to
    the W tile (forward) or next to an fp32 dL/dW (backward: 4 more to upcast a 16-bit one).
    """
    if helpers:
        return compute_bytes, compute_bytes
    upcast = 4 if compute_bytes < 4 else 0
    return 4 + compute_bytes, 4 + max(compute_bytes + upcast, 4)


def _tile_shape(in_features: int, out_features: int, device_type: str, compute_bytes: int, helpers: bool,
                tile_rows: int | None) -> tuple[int, int]:
    """(columns per forward tile, rows per backward tile), both multiples of 32 unless the whole dimension."""
    if tile_rows is None and device_type == "cuda":
        fwd, bwd = _bytes_per_weight(device_type, compute_bytes, helpers)
        cols = CUDA_TILE_BYTES // (fwd * in_features)
        rows = CUDA_TILE_BYTES // (bwd * out_features)
    else:
        rows = DEFAULT_TILE_ROWS if tile_rows is None else tile_rows
        cols = rows * out_features // in_features
    cols = out_features if cols >= out_features else max(32, cols // 32 * 32)
    rows = max(32, rows // 32 * 32)
    return cols, rows


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


_SHIFTS_3BIT = [j * 3 % 32 for j in range(32)]
_WORDS_3BIT = [j * 3 // 32 for j in range(32)]
# Bits of code j inside its first word: 3, except the two codes that straddle a word (j = 10: 2 bits, j = 21: 1).
_LOW_MASK_3BIT = [(1 << min(3, 32 - s)) - 1 for s in _SHIFTS_3BIT]


def unpack_codes(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 codes ``[count, C]`` of the bit streams that run down the columns of ``words`` ``[W, C]``.

    The layout of ``packing.pack_rows`` (its ``unpack_rows`` is the reference). This is the matmul path's unpack:
    one broadcast shift and one mask in int32 (4 bytes per code, a few device kernels), where ``unpack_rows`` loops
    over the 32 slots in int64. For 3 bits (32 codes in 3 words) codes 10 and 21 straddle two words: their low bits
    come from the shift, their high bits are OR-ed in from the next word.
    """
    n_words, cols = words.shape
    dev = words.device
    if bits == 3:
        chunks = -(-count // 32)
        if n_words < 3 * chunks:  # the stream's last, partial chunk
            words = F.pad(words, (0, 0, 0, 3 * chunks - n_words))
        w3 = words.reshape(chunks, 3, cols)
        codes = torch.index_select(w3, 1, torch.tensor(_WORDS_3BIT, device=dev))  # [chunks, 32, C], contiguous
        codes >>= torch.tensor(_SHIFTS_3BIT, dtype=torch.int32, device=dev)[:, None]
        codes &= torch.tensor(_LOW_MASK_3BIT, dtype=torch.int32, device=dev)[:, None]
        codes[:, 10] |= (w3[:, 1] << 2) & 4  # bit 2 of code 10 is bit 0 of word 1
        codes[:, 21] |= (w3[:, 2] << 1) & 6  # bits 1-2 of code 21 are bits 0-1 of word 2
        return codes.view(chunks * 32, cols)[:count]
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=dev)
    # Into a contiguous buffer whatever the strides of words (a column slice, or transposed zero points).
    codes = torch.empty(n_words, per_word, cols, dtype=torch.int32, device=dev)
    torch.bitwise_right_shift(words.unsqueeze(1), shifts[:, None], out=codes)  # arithmetic: sign bits masked next
    codes &= (1 << bits) - 1
    return codes.view(n_words * per_word, cols)[:count]


def _zeros_tile(qzeros: torch.Tensor, bits: int, j0: int, j1: int, n0: int, n1: int) -> torch.Tensor:
    """Zero points of groups ``[j0, j1)`` and columns ``[n0, n1)`` (n0 % 32 == 0) as int32 ``[j1 - j0, n1 - n0]``."""
    words = qzeros[j0:j1, n0 * bits // 32 : packed_rows(n1, bits)]
    return unpack_codes(words.t(), bits, n1 - n0).t()


def _q_minus_z(qweight, qzeros, spec: _Spec, k0: int, k1: int, n0: int, n1: int) -> torch.Tensor:
    """``q - z`` of rows ``[k0, k1)``, columns ``[n0, n1)`` as int32 ``[n, r, cols]`` (n groups of r rows)."""
    g, bits = spec.group_size, spec.bits
    codes = unpack_codes(qweight[k0 * bits // 32 : packed_rows(k1, bits), n0:n1], bits, k1 - k0)
    codes = codes.view(-1, min(g, k1 - k0), n1 - n0)
    codes -= _zeros_tile(qzeros, bits, k0 // g, k0 // g + codes.shape[0], n0, n1)[:, None]
    return codes


def _dequantize(qweight, qzeros, scales, spec: _Spec, k0: int, k1: int, n0: int, n1: int,
                dtype: torch.dtype) -> torch.Tensor:
    """``W[k0:k1, n0:n1]`` in ``dtype``: ``(q - z) * s`` in fp32 (float64 for float64), rounded once."""
    if spec.helpers:
        from frugal_qat.quantizer import triton_kernels

        return triton_kernels.dequantize_tile(qweight, qzeros, scales, spec.bits, spec.group_size, k0, k1, n0, n1,
                                              dtype)
    q_minus_z = _q_minus_z(qweight, qzeros, spec, k0, k1, n0, n1)
    g0 = k0 // spec.group_size
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = scales[g0 : g0 + q_minus_z.shape[0], n0:n1].to(acc)[:, None]
    w = torch.empty(q_minus_z.shape, dtype=dtype, device=q_minus_z.device)
    torch.mul(q_minus_z, s, out=w)  # computed in acc (int32 * fp32), rounded once into w's dtype
    return w.view(k1 - k0, n1 - n0)


def _reduce_scale_grad_(grad_s: torch.Tensor, grad_w: torch.Tensor, qweight, qzeros, spec: _Spec, k0: int,
                        k1: int) -> None:
    """``grad_s[groups of rows k0..k1] += sum over each group's rows of (q - z) * grad_w`` (fp32 or float64).

    ``grad_w`` ``[k1 - k0, N]`` is consumed (modified in place when it is already in grad_s's dtype).
    """
    if spec.helpers:
        from frugal_qat.quantizer import triton_kernels

        triton_kernels.reduce_scale_grad(grad_s, grad_w, qweight, qzeros, spec.bits, spec.group_size, k0, k1)
        return
    q_minus_z = _q_minus_z(qweight, qzeros, spec, k0, k1, 0, qweight.shape[1])
    prod = grad_w.to(grad_s.dtype).view(q_minus_z.shape)
    del grad_w  # a 16-bit grad_w is freed once upcast
    prod.mul_(q_minus_z)
    g0 = k0 // spec.group_size
    grad_s[g0 : g0 + q_minus_z.shape[0]] += prod.sum(1)


def _tiled_forward(x2, qweight, qzeros, scales, spec: _Spec) -> torch.Tensor:
    """``y = x2 @ W``, W cut along N: each column tile is one complete ``torch.mm`` into its slice of y."""
    cd = spec.compute
    K, N = x2.shape[1], qweight.shape[1]
    cols, _ = _tile_shape(K, N, x2.device.type, cd.itemsize, spec.helpers, spec.tile_rows)
    xc = x2.to(cd)
    y = torch.empty(x2.shape[0], N, dtype=cd, device=x2.device)
    for n0 in range(0, N, cols):
        n1 = min(n0 + cols, N)
        w = _dequantize(qweight, qzeros, scales, spec, 0, K, n0, n1, cd)
        torch.mm(xc, w, out=y[:, n0:n1])
        del w  # before the next tile is dequantized: one tile at a time
    return y.to(x2.dtype)


def _tiled_backward(x2, grad_y, qweight, qzeros, scales, spec: _Spec, need_x: bool, need_s: bool):
    """dL/dx and dL/ds, W cut along K (tiles of whole groups or of part of one group)."""
    cd, acc = spec.compute, (torch.float64 if spec.compute == torch.float64 else torch.float32)
    K, N = x2.shape[1], qweight.shape[1]
    _, rows = _tile_shape(K, N, x2.device.type, cd.itemsize, spec.helpers, spec.tile_rows)
    xc, gy = x2.to(cd), grad_y.to(cd)
    grad_x = torch.empty(x2.shape, dtype=cd, device=x2.device) if need_x else None
    grad_s = torch.zeros(scales.shape, dtype=acc, device=scales.device) if need_s else None
    for k0, k1 in _tile_bounds(K, spec.group_size, rows):
        if need_x:
            w = _dequantize(qweight, qzeros, scales, spec, k0, k1, 0, N, cd)
            torch.mm(gy, w.t(), out=grad_x[:, k0:k1])
            del w  # freed before dL/dW of the tile exists: one tile-sized temporary at a time
        if need_s:
            _reduce_scale_grad_(grad_s, xc[:, k0:k1].t() @ gy, qweight, qzeros, spec, k0, k1)
    return (None if grad_x is None else grad_x.to(x2.dtype)), grad_s


# ---------------------------------------------------------------------------------------------------------------------
# memory of one call, for the planner


def packed_matmul_transients(in_features: int, out_features: int, tokens: int, compute_bytes: int,
                             device_type: str) -> dict[str, int]:
    """Bytes of the temporaries alive at the forward peak and at the backward peak of one ``packed_linear`` call.

    For the path ``backend="auto"`` takes on ``device_type`` ("cuda": triton installed, and ``compute_bytes`` 2
    meaning bf16; anything else: the CPU tiled path) with default tiles, x already in the compute dtype of
    ``compute_bytes`` bytes (the caller's precision policy), and both gradients wanted. Not counted: the inputs, y, dL/dx and dL/ds themselves, and
    cuBLAS's workspace. Zero points and per-group partial sums are counted for group size 32 (smaller groups
    need more; the fused grad-scales buffers shrink as the group grows).

    - tiled (CPU; CUDA above ``FUSED_MAX_TOKENS`` tokens): the largest tile times ``_bytes_per_weight``, plus the
      tile's int32 zero points on CPU;
    - fused (CUDA, at most ``FUSED_MAX_TOKENS`` tokens): the fp32 split-K / split-N partial sums and the
      grad-scales partial sums (``kernel_configs``), which the host sums in a fixed order.

    Returns:
        ``{"forward": bytes, "backward": bytes}``.
    """
    K, N, M, c = in_features, out_features, tokens, compute_bytes
    # On CUDA, 2 bytes is bf16 (the precision policy's dtype), which the Triton kernels take; fp32 takes torch ops.
    triton_dtype = device_type == "cuda" and compute_bytes == 2
    if triton_dtype and M <= FUSED_MAX_TOKENS:
        return kc.fused_transients(M, K, N, group_size=32)
    helpers = triton_dtype  # auto dequantizes the tiles with the Triton helper kernels
    cols, rows = _tile_shape(K, N, device_type, c, helpers, None)
    fwd, bwd = _bytes_per_weight(device_type, c, helpers)
    rows = min(rows, K)
    # Torch ops also hold a tile's int32 zero points and, in the backward, its fp32 per-group sums: 4 bytes per
    # group-row each, counted for g = 32. A matmul into a column slice of y (dL/dx) may go through an [M, tile]
    # temporary; none when the tile is the whole layer.
    per_group_row = 0 if helpers else 4
    return {
        "forward": fwd * K * cols + per_group_row * (K // 32) * cols + (M * cols * c if cols < N else 0),
        "backward": (bwd * rows * N + 2 * per_group_row * max(rows // 32, 1) * N
                     + (M * rows * c if rows < K else 0)),
    }


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
                 bias_dtype: torch.dtype = torch.float16, tile_rows: int | None = None,
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
