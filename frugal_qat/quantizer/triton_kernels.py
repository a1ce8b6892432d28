"""Triton kernels for the packed quantized linear layer: fused dequantize + matmul and its two gradients.

Packed layout (GPTQ-compatible, see ``shared/docs/efficientqat-notes.md`` §4 and ``quantizer/packing.py``):

- ``qweight`` int32 ``[ceil(K*b/32), N]``: each column's K codes form one LSB-first bit stream; code ``k`` occupies
  stream bits ``[k*b, k*b + b)`` and word ``w`` holds stream bits ``[32w, 32w + 32)``. For b in {2, 4, 8} a code never
  crosses a word; for b = 3 (32 codes per 3 words) codes 10 and 21 of every 32 straddle two words, so the kernels
  read both words and shift a 64-bit value.
- ``qzeros`` int32 ``[G, ceil(N*b/32)]``: the zero points z (stored as is, GPTQ "v2") packed the same way along N.
- ``scales`` ``[G, N]`` (fp32 masters during E2E-QP, fp16 in checkpoints; the kernels read either).

With ``g`` the (effective) group size and ``G = K / g``::

    W[k, n]      = (q[k, n] - z[k // g, n]) * s[k // g, n]        dequantized in registers, never stored
    y            = x @ W                  [M, N]                     dequant_matmul
    grad_x       = grad_y @ W^T           [M, K]                     dequant_matmul_grad_input
    grad_s[j, n] = sum_{k in group j} (q[k, n] - z[j, n]) * (x^T @ grad_y)[k, n]
                                          [G, N] fp32                dequant_matmul_grad_scales

Legend: M tokens (batch flattened), K in_features, N out_features, b bits, G groups.

Every load is masked on K, N and M, so ragged shapes and ``group_size = -1`` (one group of K rows) never read out of
bounds. Products accumulate in fp32; ``tl.dot`` takes operands in the input dtype (fp16/bf16 use tensor cores,
fp32 uses IEEE precision so results match torch's fp32 matmul), except that bf16 is upcast to fp32 under
``TRITON_INTERPRET=1``, whose ``tl.dot`` returns garbage for bf16. The scale gradient has one program per
(group, N block): it reduces its whole group itself, so there are no atomics and the result is deterministic.

``TRITON_INTERPRET=1`` (the only mode that runs without a GPU) must be set before ``import triton``: ``@triton.jit``
reads it when it decorates, both triton's own helpers (e.g. the combine function of ``tl.sum``) and the kernels below.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from frugal_qat.quantizer.packed import check_packed_weight

logger = logging.getLogger(__name__)

# Whether the kernels below were built for the CPU interpreter (decided by triton at decoration time).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_MAX_BLOCK_NUMEL = 1 << 20  # triton refuses larger blocks


@dataclass(frozen=True)
class KernelBlocks:
    """Tile sizes of the kernels: ``m`` tokens, ``n`` output features, ``k`` input features per program step.

    Powers of two, at least 16 (``tl.dot``'s minimum). Small blocks keep the interpreter's tests quick; the defaults
    are a reasonable untuned choice for a GPU.
    """

    m: int = 32
    n: int = 64
    k: int = 32

    def __post_init__(self) -> None:
        for name in ("m", "n", "k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelBlocks.{name} = {v}: use a power of two >= 16")
        if max(self.m * self.k, self.k * self.n, self.m * self.n) > _MAX_BLOCK_NUMEL:
            raise ValueError(f"{self} exceeds triton's {_MAX_BLOCK_NUMEL} elements per block: use smaller tiles")


# ---------------------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _extract_codes(base_ptrs, word, shift, word_stride, mask, BITS: tl.constexpr):
    """b-bit codes at ``(word, shift)`` of the bit streams starting at ``base_ptrs``: int32, 0 where masked."""
    w0 = tl.load(base_ptrs + word * word_stride, mask=mask, other=0)
    if BITS == 3:
        # A code starting at bit 30 or 31 continues in the next word: join the two words as one unsigned 64-bit
        # value. The next word exists whenever it is needed, since the code lies inside the stream.
        w1 = tl.load(base_ptrs + (word + 1) * word_stride, mask=mask & (shift > 29), other=0)
        lo = w0.to(tl.uint32, bitcast=True).to(tl.int64)
        hi = w1.to(tl.uint32, bitcast=True).to(tl.int64) << 32
        q = ((lo | hi) >> shift.to(tl.int64)) & 7
    else:
        # b divides 32: the code lies within one word, and the arithmetic shift's sign bits land above the mask.
        q = (w0 >> shift) & ((1 << BITS) - 1)
    return q.to(tl.int32)


@triton.jit
def _codes_minus_zeros(qweight_ptr, qzeros_ptr, offs_k, offs_n, k_end, N, group_size,
                       stride_qw_w, stride_qw_n, stride_qz_g, stride_qz_w, BITS: tl.constexpr):
    """``q[k, n] - z[k // g, n]`` as fp32 ``[BLOCK_K, BLOCK_N]`` for rows < k_end and columns < N, 0 elsewhere."""
    mask = (offs_k[:, None] < k_end) & (offs_n[None, :] < N)
    k_bit = offs_k * BITS
    q = _extract_codes(qweight_ptr + offs_n[None, :] * stride_qw_n, (k_bit // 32)[:, None], (k_bit % 32)[:, None],
                       stride_qw_w, mask, BITS)
    group = offs_k // group_size
    n_bit = offs_n * BITS
    z = _extract_codes(qzeros_ptr + group[:, None] * stride_qz_g, (n_bit // 32)[None, :], (n_bit % 32)[None, :],
                       stride_qz_w, mask, BITS)
    return (q - z).to(tl.float32)


@triton.jit
def _load_scales(scales_ptr, offs_k, offs_n, k_end, N, group_size, stride_s_g, stride_s_n):
    mask = (offs_k[:, None] < k_end) & (offs_n[None, :] < N)
    group = offs_k // group_size
    s = tl.load(scales_ptr + group[:, None] * stride_s_g + offs_n[None, :] * stride_s_n, mask=mask, other=0.0)
    return s.to(tl.float32)


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr):
    """``acc + a @ b`` with operands cast to DOT_DTYPE and fp32 accumulation (IEEE for fp32, as torch does)."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


# ---------------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _matmul_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, y_ptr, M, N, K, group_size,
                   stride_x_m, stride_x_k, stride_qw_w, stride_qw_n, stride_qz_g, stride_qz_w,
                   stride_s_g, stride_s_n, stride_y_m, stride_y_n,
                   BITS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x_m + offs_k[None, :] * stride_x_k,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _codes_minus_zeros(qweight_ptr, qzeros_ptr, offs_k, offs_n, K, N, group_size,
                               stride_qw_w, stride_qw_n, stride_qz_g, stride_qz_w, BITS)
        w = w * _load_scales(scales_ptr, offs_k, offs_n, K, N, group_size, stride_s_g, stride_s_n)
        acc = _dot(x, w, acc, DOT_DTYPE)
    tl.store(y_ptr + offs_m[:, None] * stride_y_m + offs_n[None, :] * stride_y_n, acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _grad_input_kernel(gy_ptr, qweight_ptr, qzeros_ptr, scales_ptr, gx_ptr, M, N, K, group_size,
                       stride_gy_m, stride_gy_n, stride_qw_w, stride_qw_n, stride_qz_g, stride_qz_w,
                       stride_s_g, stride_s_n, stride_gx_m, stride_gx_k,
                       BITS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        gy = tl.load(gy_ptr + offs_m[:, None] * stride_gy_m + offs_n[None, :] * stride_gy_n,
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w = _codes_minus_zeros(qweight_ptr, qzeros_ptr, offs_k, offs_n, K, N, group_size,
                               stride_qw_w, stride_qw_n, stride_qz_g, stride_qz_w, BITS)
        w = w * _load_scales(scales_ptr, offs_k, offs_n, K, N, group_size, stride_s_g, stride_s_n)
        acc = _dot(gy, tl.trans(w), acc, DOT_DTYPE)
    tl.store(gx_ptr + offs_m[:, None] * stride_gx_m + offs_k[None, :] * stride_gx_k, acc.to(gx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit
def _grad_scales_kernel(x_ptr, gy_ptr, qweight_ptr, qzeros_ptr, gs_ptr, M, N, K, group_size,
                        stride_x_m, stride_x_k, stride_gy_m, stride_gy_n, stride_qw_w, stride_qw_n,
                        stride_qz_g, stride_qz_w, stride_gs_g, stride_gs_n,
                        BITS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program owns group `group` x BLOCK_N columns and reduces the whole group, so dL/dW exists only as one
    # [BLOCK_K, BLOCK_N] register tile at a time.
    group = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = group * group_size
    k_end = tl.minimum(k_start + group_size, K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        grad_w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            x_t = tl.load(x_ptr + offs_k[:, None] * stride_x_k + offs_m[None, :] * stride_x_m,
                          mask=(offs_k[:, None] < k_end) & (offs_m[None, :] < M), other=0.0)
            gy = tl.load(gy_ptr + offs_m[:, None] * stride_gy_m + offs_n[None, :] * stride_gy_n,
                         mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
            grad_w = _dot(x_t, gy, grad_w, DOT_DTYPE)
        q_minus_z = _codes_minus_zeros(qweight_ptr, qzeros_ptr, offs_k, offs_n, k_end, N, group_size,
                                       stride_qw_w, stride_qw_n, stride_qz_g, stride_qz_w, BITS)
        acc += tl.sum(q_minus_z * grad_w, axis=0)
    tl.store(gs_ptr + group * stride_gs_g + offs_n * stride_gs_n, acc, mask=offs_n < N)


# ---------------------------------------------------------------------------------------------------------------------
# launchers


def _dot_dtype(dtype: torch.dtype):
    if dtype not in _TL_DTYPES:
        raise ValueError(f"packed matmul input dtype {dtype}: use float16, bfloat16 or float32")
    if dtype == torch.bfloat16 and INTERPRETED:
        return tl.float32  # the interpreter's tl.dot mishandles bf16 operands
    return _TL_DTYPES[dtype]


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                   group_size: int, blocks: KernelBlocks = KernelBlocks()) -> torch.Tensor:
    """``y = x @ W`` for ``x`` [M, K] and the packed ``W`` [K, N]; ``y`` [M, N] in x's dtype (fp32 accumulation).

    ``group_size`` is ``g`` or -1, as everywhere.
    """
    M, K = x.shape
    N = qweight.shape[1]
    g = check_packed_weight(qweight, qzeros, scales, bits, group_size, K)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    grid = (triton.cdiv(M, blocks.m), triton.cdiv(N, blocks.n))
    _matmul_kernel[grid](x, qweight, qzeros, scales, y, M, N, K, g,
                         x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), qzeros.stride(0),
                         qzeros.stride(1), scales.stride(0), scales.stride(1), y.stride(0), y.stride(1),
                         BITS=bits, DOT_DTYPE=_dot_dtype(x.dtype), BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k)
    return y


def dequant_matmul_grad_input(grad_y: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                              scales: torch.Tensor, bits: int, group_size: int, in_features: int,
                              blocks: KernelBlocks = KernelBlocks()) -> torch.Tensor:
    """``grad_x = grad_y @ W^T`` for ``grad_y`` [M, N]; returns [M, in_features] in grad_y's dtype."""
    M, N = grad_y.shape
    g = check_packed_weight(qweight, qzeros, scales, bits, group_size, in_features)
    if N != qweight.shape[1]:
        raise ValueError(f"grad_y has {N} columns but the packed weight has {qweight.shape[1]} outputs")
    grad_x = torch.empty((M, in_features), dtype=grad_y.dtype, device=grad_y.device)
    if M == 0:
        return grad_x
    grid = (triton.cdiv(M, blocks.m), triton.cdiv(in_features, blocks.k))
    _grad_input_kernel[grid](grad_y, qweight, qzeros, scales, grad_x, M, N, in_features, g,
                             grad_y.stride(0), grad_y.stride(1), qweight.stride(0), qweight.stride(1),
                             qzeros.stride(0), qzeros.stride(1), scales.stride(0), scales.stride(1),
                             grad_x.stride(0), grad_x.stride(1),
                             BITS=bits, DOT_DTYPE=_dot_dtype(grad_y.dtype),
                             BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k)
    return grad_x


def dequant_matmul_grad_scales(x: torch.Tensor, grad_y: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                               bits: int, group_size: int, blocks: KernelBlocks = KernelBlocks()) -> torch.Tensor:
    """``grad_s[j, n] = sum_{k in group j} (q - z)[k, n] * (x^T @ grad_y)[k, n]``: fp32 [G, N].

    ``x`` [M, K] and ``grad_y`` [M, N] share a dtype (the matmul operands' dtype).
    """
    M, K = x.shape
    N = qweight.shape[1]
    g = check_packed_weight(qweight, qzeros, None, bits, group_size, K)
    if grad_y.shape != (M, N):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}, expected [{M}, {N}]")
    if grad_y.dtype != x.dtype:
        raise ValueError(f"grad_y dtype {grad_y.dtype} differs from x dtype {x.dtype}: cast one of them")
    grad_s = torch.zeros((K // g, N), dtype=torch.float32, device=x.device)
    if M == 0:
        return grad_s
    grid = (K // g, triton.cdiv(N, blocks.n))
    _grad_scales_kernel[grid](x, grad_y, qweight, qzeros, grad_s, M, N, K, g,
                              x.stride(0), x.stride(1), grad_y.stride(0), grad_y.stride(1),
                              qweight.stride(0), qweight.stride(1), qzeros.stride(0), qzeros.stride(1),
                              grad_s.stride(0), grad_s.stride(1),
                              BITS=bits, DOT_DTYPE=_dot_dtype(x.dtype),
                              BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k)
    return grad_s
