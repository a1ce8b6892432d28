"""Triton kernels for the packed quantized linear layer (``packed.py``): fused matmuls for few tokens, and two
element-wise helpers of the tiled path on CUDA.

Packed layout (GPTQ-compatible, see ``shared/docs/efficientqat-notes.md`` §4 and ``quantizer/packing.py``):

- ``qweight`` int32 ``[ceil(K*b/32), N]``: each column's K codes form one LSB-first bit stream; code ``k`` occupies
  stream bits ``[k*b, k*b + b)`` and word ``w`` holds stream bits ``[32w, 32w + 32)``. For b in {2, 4, 8} a code never
  crosses a word; for b = 3 (32 codes per 3 words) codes 10 and 21 of every 32 straddle two words, and the kernels
  OR in the high bits from the next word (32-bit shifts only).
- ``qzeros`` int32 ``[G, ceil(N*b/32)]``: the zero points z (stored as is, GPTQ "v2") packed the same way along N.
- ``scales`` ``[G, N]``: read as fp32 (the trainable masters; other dtypes are converted by the launchers).

With ``g`` the (effective) group size, ``G = K / g``, M tokens, b bits::

    W[k, n]      = (q[k, n] - z[k // g, n]) * s[k // g, n]       computed in fp32, never stored by the fused kernels
    y            = x @ W                  [M, N]                    dequant_matmul             (fused)
    grad_x       = grad_y @ W^T           [M, K]                    dequant_matmul_grad_input  (fused)
    grad_s[j, n] = sum_{k in group j} (q[k, n] - z[j, n]) * (x^T @ grad_y)[k, n]
                                          [G, N] fp32               dequant_matmul_grad_scales (fused)
    W[tile]      in the compute dtype                               dequantize_tile            (tiled-path helper)
    grad_s[j]   += sum_{k in j and tile} (q - z)[k] * grad_w[k]     reduce_scale_grad          (tiled-path helper)

Structure (docs/KERNELS.md has the cost model):

- matmul / grad_input: one program per output block (``kernel_configs.FUSED_TABLE``) steps through the reduction
  dimension; a K step of 32 rows lies inside one group, so its zero points and scales are one ``[BLOCK_N]`` vector
  each. When few output blocks exist (generation), the reduction is split across programs (split-K, split-N) that
  write fp32 partial sums, which the launcher adds in a fixed order.
- grad_scales: one program per ``[BLOCK_K, BLOCK_N]`` block of ``x^T @ grad_y``, accumulated over all M (a plain
  matmul main loop: x and grad_y are read once per output block, never once per group), then multiplied by
  ``q - z`` and reduced into the groups it covers. A group cut by a block boundary gets one partial sum from each
  block; the launcher gathers them (fixed order: deterministic, no atomics).

Products accumulate in fp32; ``tl.dot`` takes 16-bit operands in the input dtype (tensor cores) and fp32 operands
at IEEE precision (as torch's fp32 matmul), except that bf16 is upcast to fp32 under ``TRITON_INTERPRET=1``, whose
``tl.dot`` returns garbage for bf16.

Index arithmetic: offsets that scale with the token count (rows of x, grad_y and the partial sums; M * K passes
2^31 at 70B shapes, e.g. 80k tokens x 28672) use a 64-bit base per program or 64-bit pointer increments; offsets
inside a block and into the weights stay 32-bit, and the launchers refuse a weight tensor that 32-bit offsets
cannot span (``_check_offsets``). Launches run on their tensors' device.

``TRITON_INTERPRET=1`` (the only mode that runs without a GPU) must be set before ``import triton``: ``@triton.jit``
reads it when it decorates, both triton's own helpers (e.g. the combine function of ``tl.sum``) and the kernels below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from frugal_qat.quantizer import kernel_configs as kc
from frugal_qat.quantizer.packed import check_packed_weight, fused_supported

logger = logging.getLogger(__name__)


def _interpreter_on() -> bool:
    """Whether ``@triton.jit`` builds interpreted kernels (decided by triton at decoration time)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # what older releases read in triton.jit


INTERPRETED: bool = _interpreter_on()

_TL_DTYPES = {getattr(torch, name): getattr(tl, name) for name in kc.DTYPES}
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _extract(w0, w1, shift, bits, BITS3: tl.constexpr):
    """``bits``-bit codes starting at bit ``shift`` (0..31) of the int32 words ``w0``; for 3 bits (``BITS3``) a
    code starting at bit 30 or 31 continues in ``w1`` (which the caller loads as 0 where no code straddles)."""
    if BITS3:
        lo = w0.to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)
        # (32 - shift) & 31 keeps the shift below 32 (a 32-bit shift by 32 is undefined); w1 is 0 for shift 0.
        hi = w1.to(tl.uint32, bitcast=True) << ((32 - shift) & 31).to(tl.uint32)
        q = ((lo | hi) & 7).to(tl.int32, bitcast=True)
    else:
        # bits divides 32: the code lies within one word; the arithmetic shift's sign bits land above the mask.
        q = (w0 >> shift) & ((1 << bits) - 1)
    return q


@triton.jit
def _load_codes(qweight_ptr, offs_k, offs_n, mask, stride_qw, bits, BITS3: tl.constexpr):
    """Codes ``q[offs_k, offs_n]`` (int32 ``[BLOCK_K, BLOCK_N]``, 0 where masked)."""
    bit = offs_k * bits
    shift = (bit % 32)[:, None]
    ptrs = qweight_ptr + (bit // 32)[:, None] * stride_qw + offs_n[None, :]
    w0 = tl.load(ptrs, mask=mask, other=0)
    if BITS3:
        w1 = tl.load(ptrs + stride_qw, mask=mask & (shift > 29), other=0)
    else:
        w1 = w0
    return _extract(w0, w1, shift, bits, BITS3)


@triton.jit
def _load_zero_row(qzeros_ptr, group, offs_n, mask_n, stride_qz, bits, BITS3: tl.constexpr):
    """Zero points ``z[group, offs_n]`` of one group (int32 ``[BLOCK_N]``)."""
    bit = offs_n * bits
    shift = bit % 32
    ptrs = qzeros_ptr + group * stride_qz + bit // 32
    w0 = tl.load(ptrs, mask=mask_n, other=0)
    if BITS3:
        w1 = tl.load(ptrs + 1, mask=mask_n & (shift > 29), other=0)
    else:
        w1 = w0
    return _extract(w0, w1, shift, bits, BITS3)


@triton.jit
def _load_zeros(qzeros_ptr, groups, offs_n, mask, stride_qz, bits, BITS3: tl.constexpr):
    """Zero points ``z[groups[:, None], offs_n[None, :]]`` (int32 ``[BLOCK_K, BLOCK_N]``): a group per row."""
    bit = offs_n * bits
    shift = (bit % 32)[None, :]
    ptrs = qzeros_ptr + groups[:, None] * stride_qz + (bit // 32)[None, :]
    w0 = tl.load(ptrs, mask=mask, other=0)
    if BITS3:
        w1 = tl.load(ptrs + 1, mask=mask & (shift > 29), other=0)
    else:
        w1 = w0
    return _extract(w0, w1, shift, bits, BITS3)


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr):
    """``acc + a @ b`` with operands cast to DOT_DTYPE and fp32 accumulation (IEEE for fp32, as torch does)."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


# ---------------------------------------------------------------------------------------------------------------------
# fused kernels
#
# M and the split lengths are not specialized: M = 1 (generation) would otherwise compile its own binary, which the
# ahead-of-time check (kernel_compile.py) would have to cover too.


@triton.jit(do_not_specialize=["M", "k_chunk"])
def _matmul_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, part_ptr, M, N, K, group_size, k_chunk,
                   stride_xm, stride_qw, stride_qz, stride_s,
                   bits, BITS3: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[split, m-block, n-block] = x[m-block, K range] @ W[K range, n-block]; the K range is this split's."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = pid_m * BLOCK_M + offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_lo = pid_s * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    # 64-bit base of this program's rows of x; offsets inside the block stay 32-bit.
    x_ptrs = (x_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_xm
              + offs_m[:, None] * stride_xm + (k_lo + tl.arange(0, BLOCK_K))[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)  # K is a multiple of BLOCK_K: no K mask
        q = _load_codes(qweight_ptr, k0 + tl.arange(0, BLOCK_K), offs_n, n_mask[None, :], stride_qw, bits, BITS3)
        group = k0 // group_size  # BLOCK_K divides g: the whole step lies in one group
        z = _load_zero_row(qzeros_ptr, group, offs_n, n_mask, stride_qz, bits, BITS3)
        s = tl.load(scales_ptr + group * stride_s + offs_n, mask=n_mask, other=0.0)
        w = (q - z[None, :]).to(tl.float32) * s[None, :]
        acc = _dot(x, w, acc, DOT_DTYPE)
        x_ptrs += BLOCK_K
    out = (part_ptr + (pid_s * M + pid_m * BLOCK_M).to(tl.int64) * N
           + offs_m[:, None] * N + offs_n[None, :])
    tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["M", "n_chunk"])
def _grad_input_kernel(gy_ptr, qweight_ptr, qzeros_ptr, scales_ptr, part_ptr, M, N, K, group_size, n_chunk,
                       stride_gym, stride_qw, stride_qz, stride_s,
                       bits, BITS3: tl.constexpr, DOT_DTYPE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[split, m-block, k-block] = grad_y[m-block, N range] @ W[k-block, N range]^T."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = pid_m * BLOCK_M + offs_m < M
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # K is a multiple of BLOCK_K
    group = pid_k * BLOCK_K // group_size  # BLOCK_K divides g: the block lies in one group
    n_lo = pid_s * n_chunk
    n_hi = tl.minimum(n_lo + n_chunk, N)
    gy_ptrs = (gy_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_gym
               + offs_m[:, None] * stride_gym + (n_lo + tl.arange(0, BLOCK_N))[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        gy = tl.load(gy_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        q = _load_codes(qweight_ptr, offs_k, offs_n, n_mask[None, :], stride_qw, bits, BITS3)
        z = _load_zero_row(qzeros_ptr, group, offs_n, n_mask, stride_qz, bits, BITS3)
        s = tl.load(scales_ptr + group * stride_s + offs_n, mask=n_mask, other=0.0)
        w = (q - z[None, :]).to(tl.float32) * s[None, :]
        acc = _dot(gy, tl.trans(w), acc, DOT_DTYPE)
        gy_ptrs += BLOCK_N
    out = (part_ptr + (pid_s * M + pid_m * BLOCK_M).to(tl.int64) * K
           + offs_m[:, None] * K + offs_k[None, :])
    tl.store(out, acc, mask=m_mask[:, None])


@triton.jit(do_not_specialize=["M"])
def _grad_scales_kernel(x_ptr, gy_ptr, qweight_ptr, qzeros_ptr, part_ptr, M, N, K, group_size, slots,
                        stride_xm, stride_gym, stride_qw, stride_qz,
                        bits, BITS3: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """For each group j touching rows k-block: part[k-block * slots + j - first group, n-block] =
    sum over the block's rows of group j of (q - z) * (x^T @ grad_y)[k, n]."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    # Pointer increments (64-bit) walk the tokens, so M * K never meets a 32-bit product.
    xt_ptrs = x_ptr + offs_k[:, None] + offs_m[None, :] * stride_xm  # x^T block [BLOCK_K, BLOCK_M]
    gy_ptrs = gy_ptr + offs_m[:, None] * stride_gym + offs_n[None, :]
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m_mask = m0 + offs_m < M
        xt = tl.load(xt_ptrs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        gy = tl.load(gy_ptrs, mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _dot(xt, gy, acc, DOT_DTYPE)
        xt_ptrs += BLOCK_M * stride_xm
        gy_ptrs += BLOCK_M * stride_gym
    # Epilogue, once per output block: (q - z) * dL/dW, reduced into the groups the block covers.
    mask = k_mask[:, None] & n_mask[None, :]
    groups = offs_k // group_size
    q = _load_codes(qweight_ptr, offs_k, offs_n, mask, stride_qw, bits, BITS3)
    z = _load_zeros(qzeros_ptr, groups, offs_n, mask, stride_qz, bits, BITS3)
    t = (q - z).to(tl.float32) * acc
    first = pid_k * BLOCK_K // group_size
    last = (tl.minimum(pid_k * BLOCK_K + BLOCK_K, K) - 1) // group_size
    for j in range(first, last + 1):
        part = tl.sum(tl.where((groups == j)[:, None], t, 0.0), axis=0)
        slot = pid_k * slots + j - first
        tl.store(part_ptr + slot.to(tl.int64) * N + offs_n, part, mask=n_mask)


# ---------------------------------------------------------------------------------------------------------------------
# tiled-path helpers (element-wise, memory-bound)


@triton.jit
def _dequant_kernel(qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, rows, cols, k0, n0, group_size,
                    stride_qw, stride_qz, stride_s, stride_out,
                    bits, BITS3: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[r, c] = W[k0 + r, n0 + c] = ((q - z) * s in fp32) rounded once to out's dtype."""
    r = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    offs_k = k0 + r
    offs_n = n0 + c
    groups = offs_k // group_size
    q = _load_codes(qweight_ptr, offs_k, offs_n, mask, stride_qw, bits, BITS3)
    z = _load_zeros(qzeros_ptr, groups, offs_n, mask, stride_qz, bits, BITS3)
    s = tl.load(scales_ptr + groups[:, None] * stride_s + offs_n[None, :], mask=mask, other=0.0)
    w = (q - z).to(tl.float32) * s
    tl.store(out_ptr + r[:, None] * stride_out + c[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_reduce_kernel(gw_ptr, qweight_ptr, qzeros_ptr, gs_ptr, rows, N, k0, group_size,
                         stride_gw, stride_qw, stride_qz, stride_gs,
                         bits, BITS3: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """gs[j, n] += sum over the tile rows of group j of (q - z)[k, n] * gw[k - k0, n] (fp32); one program per
    (group of the tile, column block), so each output element has one owner."""
    group = k0 // group_size + tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    r_lo = tl.maximum(group * group_size, k0) - k0
    r_hi = tl.minimum(group * group_size + group_size, k0 + rows) - k0
    z = _load_zero_row(qzeros_ptr, group, offs_n, n_mask, stride_qz, bits, BITS3)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        mask = (r < r_hi)[:, None] & n_mask[None, :]
        gw = tl.load(gw_ptr + r[:, None] * stride_gw + offs_n[None, :], mask=mask, other=0.0)
        q = _load_codes(qweight_ptr, k0 + r, offs_n, mask, stride_qw, bits, BITS3)
        acc += (q - z[None, :]).to(tl.float32) * gw.to(tl.float32)
    ptrs = gs_ptr + group * stride_gs + offs_n
    tl.store(ptrs, tl.load(ptrs, mask=n_mask, other=0.0) + tl.sum(acc, axis=0), mask=n_mask)


KERNEL_FUNCTIONS = {
    "matmul": _matmul_kernel,
    "grad_input": _grad_input_kernel,
    "grad_scales": _grad_scales_kernel,
    "dequant": _dequant_kernel,
    "group_reduce": _group_reduce_kernel,
}


# ---------------------------------------------------------------------------------------------------------------------
# launches


@dataclass(frozen=True)
class Launch:
    """One kernel launch: what ``kernel_compile.py`` compiles ahead of time is built by the same code."""

    kernel: str
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict
    config: kc.KernelConfig

    @property
    def fn(self):
        return KERNEL_FUNCTIONS[self.kernel]

    def __call__(self, device_of: torch.Tensor) -> None:
        if 0 in self.grid:
            return
        with _on_device(device_of):
            self.fn[self.grid](*self.args, **self.constexprs, num_warps=self.config.num_warps,
                               num_stages=self.config.num_stages)


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s device (triton launches on the current CUDA device and its stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dot_dtype(dtype: torch.dtype):
    if dtype not in _TL_DTYPES:
        raise ValueError(f"the Triton kernels take {', '.join(kc.DTYPES)} inputs, got {dtype}: use the torch path "
                         f"(backend='torch') for other dtypes")
    if dtype == torch.bfloat16 and INTERPRETED:
        return tl.float32  # the interpreter's tl.dot mishandles bf16 operands
    return _TL_DTYPES[dtype]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit column stride (the kernels take row strides only)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _fp32_scales(scales: torch.Tensor) -> torch.Tensor:
    return _rows(scales.to(torch.float32))


def _check_offsets(block_rows: int, tokens: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """Refuse what 32-bit offsets cannot index: a weight-side tensor whose extent passes 2^31 elements, or a row
    stride so large that one block of ``block_rows`` token rows does (token tensors use 64-bit bases otherwise).

    Works on meta tensors (shapes and strides only).
    """
    for name, t in weights.items():
        extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
        if extent > _INT32_MAX:
            raise ValueError(f"{name} of shape {tuple(t.shape)} spans {extent} elements, past the 2^31 that the "
                             f"Triton kernels' 32-bit weight offsets reach: use backend='torch' for this layer")
    for name, t in tokens.items():
        if block_rows * t.stride(0) + t.shape[1] > _INT32_MAX:
            raise ValueError(f"{name} has a row stride of {t.stride(0)} elements: one block of {block_rows} rows "
                             f"passes 2^31; make it contiguous or use backend='torch'")


def _check_fused(x: torch.Tensor, g: int) -> None:
    if not fused_supported(x.dtype, g):
        raise ValueError(f"the fused kernels take {', '.join(kc.DTYPES)} inputs and group sizes that are "
                         f"multiples of {kc.FUSED_BLOCK_K}; got {x.dtype} and group size {g}: use backend='torch'")


def _forced(plan: kc.LaunchPlan, config: kc.KernelConfig | None) -> kc.LaunchPlan:
    """The plan with another configuration from the table (the ahead-of-time check compiles each of them)."""
    return plan if config is None else dataclasses.replace(plan, config=config)


def matmul_launch(x, qweight, qzeros, scales, part, bits, g, plan: kc.LaunchPlan) -> Launch:
    M, K = x.shape
    N = qweight.shape[1]
    cfg = plan.config
    return Launch("matmul", plan.grid,
                  (x, qweight, qzeros, scales, part, M, N, K, g, plan.chunk,
                   x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), bits),
                  dict(BITS3=bits == 3, DOT_DTYPE=_dot_dtype(x.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                       BLOCK_K=cfg.block_k), cfg)


def grad_input_launch(grad_y, qweight, qzeros, scales, part, bits, g, in_features, plan: kc.LaunchPlan) -> Launch:
    M, N = grad_y.shape
    cfg = plan.config
    return Launch("grad_input", plan.grid,
                  (grad_y, qweight, qzeros, scales, part, M, N, in_features, g, plan.chunk,
                   grad_y.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), bits),
                  dict(BITS3=bits == 3, DOT_DTYPE=_dot_dtype(grad_y.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                       BLOCK_K=cfg.block_k), cfg)


def grad_scales_launch(x, grad_y, qweight, qzeros, part, bits, g, plan: kc.LaunchPlan) -> Launch:
    M, K = x.shape
    N = qweight.shape[1]
    cfg = plan.config
    return Launch("grad_scales", plan.grid,
                  (x, grad_y, qweight, qzeros, part, M, N, K, g, plan.slots,
                   x.stride(0), grad_y.stride(0), qweight.stride(0), qzeros.stride(0), bits),
                  dict(BITS3=bits == 3, DOT_DTYPE=_dot_dtype(x.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                       BLOCK_K=cfg.block_k), cfg)


def dequant_launch(qweight, qzeros, scales, out, bits, g, k0, n0) -> Launch:
    rows, cols = out.shape
    cfg = kc.HELPER_TABLE["dequant"]
    grid = (kc.cdiv(rows, cfg.block_k), kc.cdiv(cols, cfg.block_n))
    return Launch("dequant", grid,
                  (qweight, qzeros, scales, out, rows, cols, k0, n0, g,
                   qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0), bits),
                  dict(BITS3=bits == 3, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k), cfg)


def group_reduce_launch(grad_s, grad_w, qweight, qzeros, bits, g, k0) -> Launch:
    rows, N = grad_w.shape
    cfg = kc.HELPER_TABLE["group_reduce"]
    grid = ((k0 + rows - 1) // g - k0 // g + 1, kc.cdiv(N, cfg.block_n))
    return Launch("group_reduce", grid,
                  (grad_w, qweight, qzeros, grad_s, rows, N, k0, g,
                   grad_w.stride(0), qweight.stride(0), qzeros.stride(0), grad_s.stride(0), bits),
                  dict(BITS3=bits == 3, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k), cfg)


# ---------------------------------------------------------------------------------------------------------------------
# launchers


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int,
                   group_size: int, *, config: kc.KernelConfig | None = None) -> torch.Tensor:
    """``y = x @ W`` for ``x`` [M, K] and the packed ``W`` [K, N]; ``y`` [M, N] in x's dtype (fp32 accumulation).

    ``group_size`` is ``g`` or -1, as everywhere. ``config`` overrides the table's choice (tests).

    Raises:
        ValueError: shapes that do not fit, an input the fused kernels do not take, or offsets past 2^31.
    """
    M, K = x.shape
    N = qweight.shape[1]
    g = check_packed_weight(qweight, qzeros, scales, bits, group_size, K)
    _check_fused(x, g)
    x, qweight, qzeros, scales = _rows(x), _rows(qweight), _rows(qzeros), _fp32_scales(scales)
    plan = _forced(kc.plan_matmul(M, N, K), config)
    _check_offsets(plan.config.block_m, {"x": x}, {"qweight": qweight, "qzeros": qzeros, "scales": scales})
    part = torch.empty(plan.partial_shape(M, N, K), dtype=torch.float32, device=x.device)
    matmul_launch(x, qweight, qzeros, scales, part, bits, g, plan)(x)
    return (part[0] if plan.split == 1 else part.sum(0)).to(x.dtype)


def dequant_matmul_grad_input(grad_y: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                              scales: torch.Tensor, bits: int, group_size: int, in_features: int, *,
                              config: kc.KernelConfig | None = None) -> torch.Tensor:
    """``grad_x = grad_y @ W^T`` for ``grad_y`` [M, N]; returns [M, in_features] in grad_y's dtype."""
    M, N = grad_y.shape
    g = check_packed_weight(qweight, qzeros, scales, bits, group_size, in_features)
    if N != qweight.shape[1]:
        raise ValueError(f"grad_y has {N} columns but the packed weight has {qweight.shape[1]} outputs")
    _check_fused(grad_y, g)
    grad_y, qweight, qzeros, scales = _rows(grad_y), _rows(qweight), _rows(qzeros), _fp32_scales(scales)
    plan = _forced(kc.plan_grad_input(M, N, in_features), config)
    _check_offsets(plan.config.block_m, {"grad_y": grad_y}, {"qweight": qweight, "qzeros": qzeros, "scales": scales})
    part = torch.empty(plan.partial_shape(M, N, in_features), dtype=torch.float32, device=grad_y.device)
    grad_input_launch(grad_y, qweight, qzeros, scales, part, bits, g, in_features, plan)(grad_y)
    return (part[0] if plan.split == 1 else part.sum(0)).to(grad_y.dtype)


def scale_grad_gather_index(K: int, g: int, plan: kc.LaunchPlan) -> torch.Tensor:
    """int64 ``[G, contributions]``: the rows of grad_scales' partial-sum buffer that belong to each group, in block
    order; missing contributions point at the buffer's last row, which holds zeros."""
    block_k, slots = plan.config.block_k, plan.slots
    j = torch.arange(K // g)[:, None]
    first = (j * g) // block_k
    last = (torch.clamp((j + 1) * g, max=K) - 1) // block_k
    t = first + torch.arange(plan.contributions)[None, :]
    rows = t * slots + j - (t * block_k) // g
    return torch.where(t <= last, rows, plan.grid[0] * slots)


def dequant_matmul_grad_scales(x: torch.Tensor, grad_y: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                               bits: int, group_size: int, *,
                               config: kc.KernelConfig | None = None) -> torch.Tensor:
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
    _dot_dtype(x.dtype)  # any group size: the epilogue reduces whatever groups a block covers
    x, grad_y, qweight, qzeros = _rows(x), _rows(grad_y), _rows(qweight), _rows(qzeros)
    plan = _forced(kc.plan_grad_scales(M, N, K, g), config)
    _check_offsets(plan.config.block_m, {"x": x, "grad_y": grad_y}, {"qweight": qweight, "qzeros": qzeros})
    if M == 0:
        return torch.zeros((K // g, N), dtype=torch.float32, device=x.device)
    part = torch.empty(plan.partial_shape(M, N, K), dtype=torch.float32, device=x.device)
    part[-1].zero_()  # the target of missing contributions
    grad_scales_launch(x, grad_y, qweight, qzeros, part, bits, g, plan)(x)
    return part[scale_grad_gather_index(K, g, plan).to(x.device)].sum(1)


def dequantize_tile(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                    k0: int, k1: int, n0: int, n1: int, dtype: torch.dtype) -> torch.Tensor:
    """``W[k0:k1, n0:n1]`` as a new ``dtype`` tensor: ``(q - z) * s`` in fp32, rounded once (bit-equal to the
    torch ops of ``packed._dequantize``). One pass: b/8 bytes read and 2 (16-bit) written per weight.

    ``group_size`` is the effective one (in_features for a per-row layer); k0 is a multiple of 32.
    """
    g = check_packed_weight(qweight, qzeros, scales, bits, group_size, _in_features(qzeros, group_size))
    _dot_dtype(dtype)
    qweight, qzeros, scales = _rows(qweight), _rows(qzeros), _fp32_scales(scales)
    out = torch.empty((k1 - k0, n1 - n0), dtype=dtype, device=qweight.device)
    _check_offsets(1, {}, {"qweight": qweight, "qzeros": qzeros, "scales": scales, "tile": out})
    dequant_launch(qweight, qzeros, scales, out, bits, g, k0, n0)(qweight)
    return out


def reduce_scale_grad(grad_s: torch.Tensor, grad_w: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                      bits: int, group_size: int, k0: int, k1: int) -> None:
    """``grad_s[j] += sum over rows k in [k0, k1) of group j of (q - z)[k] * grad_w[k - k0]`` in place (fp32)."""
    if grad_s.dtype != torch.float32 or grad_s.stride(-1) != 1:
        raise ValueError(f"grad_s must be a row-major fp32 tensor, got {grad_s.dtype} with strides {grad_s.stride()}")
    g = check_packed_weight(qweight, qzeros, grad_s, bits, group_size, _in_features(qzeros, group_size))
    _dot_dtype(grad_w.dtype)
    grad_w, qweight, qzeros = _rows(grad_w), _rows(qweight), _rows(qzeros)
    if grad_w.shape != (k1 - k0, qweight.shape[1]):
        raise ValueError(f"grad_w has shape {tuple(grad_w.shape)}, expected [{k1 - k0}, {qweight.shape[1]}]")
    _check_offsets(1, {}, {"qweight": qweight, "qzeros": qzeros, "grad_s": grad_s, "grad_w": grad_w})
    group_reduce_launch(grad_s, grad_w, qweight, qzeros, bits, g, k0)(grad_s)


def _in_features(qzeros: torch.Tensor, group_size: int) -> int:
    """in_features ``G * g`` of a layer; the tile helpers take the effective group size (never -1)."""
    if group_size <= 0:
        raise ValueError(f"group size {group_size}: the tile helpers take the effective group size (in_features "
                         f"for -1)")
    return qzeros.shape[0] * group_size
