"""GGUF (ggml) weight grids: the tensor maths of training in llama.cpp's own quantization formats.

Every type below stores a row of a linear weight ``W[out, in]`` (a ggml row runs along ``in``) in blocks of
``block`` consecutive weights, each block cut into sub-blocks of ``sub`` weights. Sub-block ``j`` has a scale
``A_j`` and (asymmetric types) a min ``B_j``, and every weight an integer code ``c``::

    Ŵ = A_j * c - B_j                      (symmetric types: Ŵ = A_j * c)

The types differ in the code range and in how ``A`` and ``B`` are stored (ggml's ``ggml-common.h``):

    type   block sub  bytes  bits/w  codes c      A_j               B_j                 bytes of one block
    q4_0     32   32    18    4.5    [-8, 7]      d                 -                   d, qs[16]
    q4_1     32   32    20    5.0    [0, 15]      d                 -m                  d, m, qs[16]
    q5_0     32   32    22    5.5    [-16, 15]    d                 -                   d, qh[4], qs[16]
    q8_0     32   32    34    8.5    [-128, 127]  d                 -                   d, qs[32] (int8)
    q2_k    256   16    84    2.625  [0, 3]       d * k_j, k<=15    dmin * m_j, m<=15   scales[16], qs[64], d, dmin
    q3_k    256   16   110    3.4375 [-4, 3]      d * k_j, k in [-32, 31]   -         hmask[32], qs[64], scales[12], d
    q4_k    256   32   144    4.5    [0, 15]      d * k_j, k<=63    dmin * m_j, m<=63   d, dmin, scales[12], qs[128]

``d``, ``dmin`` (and q4_1's ``m``) are float16; ``k_j``, ``m_j`` are the integer sub-block scales and mins of the
k-quants ("double quantization": 4 bits for q2_k, 6 bits for q3_k and q4_k). Q3_K is symmetric with signed
sub-block scales, so each sub-block picks which side gets the extra level (``c = -4``).

Exactness: with ``d``, ``dmin`` float16 and small integers ``k, m, c``, ``A = d * k``, ``B = dmin * m`` and ``A * c``
are exact in float32; only ``A * c - B`` rounds, once. gguf-py's dequantizer (``gguf.quants``) computes the same
operations in the same order, so :func:`dequantize` and the training forward :func:`fake_quant` equal it bit for
bit in float32 (``tests/quantizer/test_kquant.py``). llama.cpp's kernels compute dot products on these blocks with
8-bit activations, so its logits are close to, not equal to, torch's.

Shapes legend: ``out`` rows, ``in`` columns (a multiple of ``block``); ``nb = in // block`` blocks per row;
``ns = in // sub`` sub-blocks per row; ``codes`` int8 ``[out, in]``; ``A``, ``B`` ``[out, ns]``; packed blocks
uint8 ``[out, nb * bytes]`` (a ggml row; the bytes of a whole tensor are its rows one after another).

Training in the grid (Block-AP and E2E-QP): the trainable continuous parameters (:func:`params_from_grid`), with
``L`` the largest integer sub-block scale magnitude (63, 15, 32 for q4_k, q2_k, q3_k; ``Lm`` = 63, 15 for mins)::

    super_scale  [out, nb]   D, in weight units: d = fp16(D / L)            (k-quants)
    scale        [out, ns]   s: k-quants: k = clamp(round(s / unit), kmin, kmax) with the fixed buffer
                             ``scale_unit`` [out, nb] (d at initialisation); legacy types: d = fp16(s)
    super_min    [out, nb]   Dm: dmin = fp16(Dm / Lm)                       (q4_k, q2_k)
    zero         [out, ns]   z, in code units: B = A z rounded to its grid: m = clamp(round(A z / min_unit), 0,
                             Lm) (q4_k, q2_k, ``min_unit`` the initial dmin); q4_1: B = fp16(A z)

so ``A = d * k`` moves when ``D`` moves (``d`` is a per-super-block gain, whose gradient is ``sum_j k_j dL/dA_j``),
``k`` moves one integer level when ``s`` crosses a rounding boundary, and the min follows the scale (``B = A z``: the
grid scales about ``W = 0``, as ``QuantLinear``'s ``(q - z) s``). ``s`` and ``D`` are in weight units, the
units of ``QuantLinear.scale``, so one quantizer learning rate suits both (Adam's step is about ``lr`` in parameter
units: an integer-unit ``k`` would need a learning rate a hundred times larger). Every rounding is
straight-through; a clamped integer has zero gradient, and :func:`project_params_` puts the parameters back into
their ranges after each optimizer step so none stays stuck outside.

Dtype policy: float32 throughout (the exactness above is a float32 statement). No function keeps state or writes
into its inputs, except ``project_params_`` (in place, by name). Packing assumes a little-endian host (GGUF is
little-endian), which every platform torch supports is.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frugal_qat.quantizer.linear import finish_freeze
from frugal_qat.quantizer.primitives import round_ste

# ggml's type ids (GGMLQuantizationType) and llama.cpp's file types (LlamaFileType, general.file_type).
_F16_TINY = 2.0**-24  # the smallest positive float16 (subnormal): a super-block scale stays at least this


@dataclass(frozen=True)
class GGMLType:
    """One ggml weight type (table in the module docstring)."""

    name: str
    ggml_id: int  # gguf.GGMLQuantizationType
    file_type: int  # gguf.LlamaFileType of a file "mostly" of this type (general.file_type)
    block: int  # weights per block
    sub: int  # weights per sub-block (one A_j, B_j)
    type_size: int  # bytes per block
    cmin: int
    cmax: int
    has_min: bool
    two_level: bool  # A, B are integers times a float16 super-block d / dmin
    kmin: int = 1
    kmax: int = 1
    mmax: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block

    @property
    def scale_levels(self) -> int:
        """``L``: the super-block scale is stored as ``D = L * d``, the largest sub-block scale magnitude."""
        return max(-self.kmin, self.kmax)


TYPES: dict[str, GGMLType] = {
    "q4_0": GGMLType("q4_0", 2, 2, 32, 32, 18, -8, 7, False, False),
    "q4_1": GGMLType("q4_1", 3, 3, 32, 32, 20, 0, 15, True, False),
    "q5_0": GGMLType("q5_0", 6, 8, 32, 32, 22, -16, 15, False, False),
    "q8_0": GGMLType("q8_0", 8, 7, 32, 32, 34, -128, 127, False, False),
    "q2_k": GGMLType("q2_k", 10, 10, 256, 16, 84, 0, 3, True, True, 0, 15, 15),
    "q3_k": GGMLType("q3_k", 11, 11, 256, 16, 110, -4, 3, False, True, -32, 31, 0),
    "q4_k": GGMLType("q4_k", 12, 14, 256, 32, 144, 0, 15, True, True, 0, 63, 63),
}
K_QUANTS = ("q4_k", "q3_k", "q2_k")
LEGACY = ("q4_0", "q4_1", "q5_0", "q8_0")
# Per tensor, a k-quant whose rows are not a multiple of 256 falls back to a legacy type of the same kind
# (llama-quantize falls back too: to Q4_0 for q2_k/q3_k and Q5_0 for q4_k in the llama.cpp of llama-cpp-python 0.3.36).
K_FALLBACK = {"q4_k": "q4_1", "q3_k": "q4_0", "q2_k": "q4_0"}


def ggml_type(name: str) -> GGMLType:
    """The :class:`GGMLType` called ``name`` (``q4_k``, ...); ValueError naming the valid ones otherwise."""
    if name not in TYPES:
        raise ValueError(f"GGUF type {name!r} is not supported; choose one of {', '.join(TYPES)}")
    return TYPES[name]


def layer_type(name: str, in_features: int) -> str:
    """The type a layer of width ``in_features`` trains and is stored in when ``name`` is asked for: ``name`` if a
    row holds whole blocks, else (k-quants) ``K_FALLBACK[name]``.

    Raises:
        ValueError: ``in_features`` is not a multiple of 32 (no ggml block type fits the row).
    """
    t = ggml_type(name)
    if in_features % t.block == 0:
        return name
    if name in K_FALLBACK and in_features % TYPES[K_FALLBACK[name]].block == 0:
        return K_FALLBACK[name]
    raise ValueError(f"in_features {in_features} is not a multiple of 32, the smallest ggml block; "
                     f"no GGUF type holds this layer")


@dataclass
class Grid:
    """The stored quantities of a layer's blocks, as float32 tensors holding exact values.

    ``d`` [out, nb]: float16 values (legacy types: nb = ns, one d per 32-block). ``k`` [out, ns] integer sub-block
    scales (k-quants; None for legacy types, where A = d). ``dmin`` [out, nb]: float16 values (q4_k, q2_k); q4_1:
    ``B`` itself, a float16 value (its block stores ``m = -B``). ``m`` [out, ns] integer sub-block mins (q4_k, q2_k).
    """

    d: torch.Tensor
    k: torch.Tensor | None = None
    dmin: torch.Tensor | None = None
    m: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------------------------
# Scales, codes, fake quantization
# ---------------------------------------------------------------------------------------------------------------


def grid_scales(t: GGMLType, grid: Grid) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(A, B)`` [out, ns] of ``grid``, exact in float32 (B None for symmetric types)."""
    if not t.two_level:
        return grid.d.float(), (grid.dmin.float() if t.has_min else None)
    per = t.block // t.sub
    a = grid.d.float().repeat_interleave(per, dim=1) * grid.k.float()
    b = grid.dmin.float().repeat_interleave(per, dim=1) * grid.m.float() if t.has_min else None
    return a, b


def quantize(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, t: GGMLType) -> torch.Tensor:
    """Codes ``c = clamp(round((W + B) / A), cmin, cmax)`` per sub-block, int8 ``[out, in]`` (no gradient).

    A sub-block with ``A = 0`` decodes to ``-B`` whatever its codes: it gets ``cmax`` for ``W + B > 0``, ``cmin``
    for ``W + B < 0`` and 0 otherwise (the limit of the formula for ``A -> +0``), the choice that gives ``A`` a
    gradient out of 0 in :func:`fake_quant`.
    """
    _check_shapes(w, a, b, t)
    x = _ratio(_sub_blocks(w.detach().float(), t.sub), a.detach(), None if b is None else b.detach(), t)
    return torch.clamp(torch.round(x), t.cmin, t.cmax).reshape(w.shape).to(torch.int8)


def dequantize_codes(codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, t: GGMLType) -> torch.Tensor:
    """``Ŵ = A * c - B`` in float32 ``[out, in]`` (gradients flow to A and B if they require them)."""
    c = _sub_blocks(codes.float(), t.sub)
    w = a.float().unsqueeze(-1) * c
    if b is not None:
        w = w - b.float().unsqueeze(-1)
    return w.reshape(codes.shape)


def fake_quant(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, t: GGMLType) -> torch.Tensor:
    """Quantize and dequantize ``W`` in the grid ``(A, B)`` in one differentiable step (the training forward).

    Per sub-block, with ``x = (W + B) / A``, ``c = clamp(round(x), cmin, cmax)`` and ``Ŵ = A * c - B``.
    Gradient rule (straight-through, LSQ for the scale, as ``primitives.fake_quant``):

      - ``dŴ/dW = 1`` where ``round(x)`` lies in ``[cmin, cmax]``, 0 where it is clipped;
      - ``dŴ/dA = c - x`` inside the range, ``c`` where clipped;
      - ``dŴ/dB = 0`` inside the range, ``-1`` where clipped (the min learns from clipped weights only).

    The forward value equals ``dequantize_codes(quantize(W, A, B), A, B)`` bit for bit. Memory: saves only its
    inputs and recomputes ``x`` and the clip mask in backward, like ``primitives._FakeQuant``.

    Args:
        w: ``[out, in]`` weight (computed in float32).   a, b: ``[out, ns]`` (b None for symmetric types).
    Returns:
        ``Ŵ`` ``[out, in]`` in ``w``'s dtype.
    """
    _check_shapes(w, a, b, t)
    return _GridFakeQuant.apply(w, a, b, t)


class _GridFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, a, b, t: GGMLType):
        ctx.save_for_backward(w, a, b)
        ctx.t = t
        a32, b32 = a.detach().float(), None if b is None else b.detach().float()
        c = torch.clamp(torch.round(_ratio(_sub_blocks(w.detach().float(), t.sub), a32, b32, t)), t.cmin, t.cmax)
        out = a32.unsqueeze(-1) * c
        if b32 is not None:
            out = out - b32.unsqueeze(-1)
        return out.reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        w, a, b = ctx.saved_tensors
        t: GGMLType = ctx.t
        a32, b32 = a.float(), None if b is None else b.float()
        go = _sub_blocks(grad_out.float(), t.sub)
        x = _ratio(_sub_blocks(w.float(), t.sub), a32, b32, t)
        r = torch.round(x)
        inside = (r >= t.cmin) & (r <= t.cmax)
        # dŴ/dA: c - x inside, c clipped; computed in place on r (c) and x, one layer's temporaries at a time.
        grad_a = r.clamp_(t.cmin, t.cmax).sub_(x.mul_(inside)).mul_(go).sum(-1)
        del x, r
        grad_w = go * inside
        grad_b = None
        if b is not None and ctx.needs_input_grad[2]:
            grad_b = grad_w.sum(-1) - go.sum(-1)  # -1 where clipped
        return (grad_w.reshape(w.shape).to(w.dtype) if ctx.needs_input_grad[0] else None,
                grad_a.to(a.dtype) if ctx.needs_input_grad[1] else None,
                None if grad_b is None else grad_b.to(b.dtype), None)


def _ratio(wg: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, t: GGMLType) -> torch.Tensor:
    """``x = (W + B) / A`` on ``[out, ns, sub]``; ``A = 0`` gives ``cmax + 1`` / ``cmin - 1`` / 0 by sign of W + B."""
    num = wg if b is None else wg + b.unsqueeze(-1)
    x = num / a.unsqueeze(-1)
    return torch.nan_to_num(x, nan=0.0, posinf=t.cmax + 1.0, neginf=t.cmin - 1.0)


def _sub_blocks(x: torch.Tensor, sub: int) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1] // sub, sub)


def _check_shapes(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, t: GGMLType) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if w.shape[1] % t.block:
        raise ValueError(f"{t.name}: in_features {w.shape[1]} is not a multiple of its block of {t.block}")
    expected = (w.shape[0], w.shape[1] // t.sub)
    for label, v in (("A", a), ("B", b)):
        if v is not None and tuple(v.shape) != expected:
            raise ValueError(f"{t.name}: {label} has shape {tuple(v.shape)}, expected [out, ns] = {list(expected)}")
    if (b is None) == t.has_min:
        raise ValueError(f"{t.name}: {'a min B is required' if t.has_min else 'takes no min B'}")


# ---------------------------------------------------------------------------------------------------------------
# Trainable parameters <-> grid
# ---------------------------------------------------------------------------------------------------------------


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value (kept as float32) with a straight-through gradient."""
    return x + (x.detach().half().float() - x.detach())


def param_shapes(t: GGMLType, out_features: int, in_features: int) -> dict[str, tuple[int, int]]:
    """Names and shapes of the trainable parameters (``scale_unit``/``min_unit`` are buffers) of a layer."""
    nb, ns = in_features // t.block, in_features // t.sub
    if not t.two_level:
        return {"scale": (out_features, ns), **({"zero": (out_features, ns)} if t.has_min else {})}
    shapes = {"super_scale": (out_features, nb), "scale": (out_features, ns), "scale_unit": (out_features, nb)}
    if t.has_min:
        shapes.update({"super_min": (out_features, nb), "zero": (out_features, ns), "min_unit": (out_features, nb)})
    return shapes


BUFFERS = ("scale_unit", "min_unit")


def _anchor(t: GGMLType, a: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the zero point multiplies: ``A``, or where ``A = 0`` the fixed unit d (k-quants) or 1 (q4_1), so that a
    sub-block with ``A = 0`` and ``B != 0`` still has a min."""
    if t.two_level:
        fallback = p["scale_unit"].repeat_interleave(t.block // t.sub, 1)
    else:
        fallback = torch.ones_like(a)
    return torch.where(a != 0, a, fallback)


def params_from_grid(t: GGMLType, grid: Grid) -> dict[str, torch.Tensor]:
    """Float32 parameters whose forward (:func:`scales_from_params`) reproduces ``grid`` exactly.

    ``D = L * d`` (exact: 11 x 6 significant bits), unit = d (or 2^-24 where d = 0, so it stays a divisor),
    ``s = unit * k`` (exact, and ``s / unit`` gives ``k`` back exactly); ``z = B / anchor``, whose product with the
    anchor is B within an ulp, which rounds back to B's level.
    """
    if not t.two_level:
        out = {"scale": grid.d.float().clone()}
        if t.has_min:
            out["zero"] = grid.dmin.float() / _anchor(t, grid.d.float().half().float(), out)
        return out
    per = t.block // t.sub
    unit = torch.where(grid.d > 0, grid.d.float(), torch.full_like(grid.d.float(), _F16_TINY))
    out = {"super_scale": grid.d.float() * t.scale_levels, "scale_unit": unit,
           "scale": unit.repeat_interleave(per, 1) * grid.k.float()}
    if t.has_min:
        unit_m = torch.where(grid.dmin > 0, grid.dmin.float(), torch.full_like(grid.dmin.float(), _F16_TINY))
        a, b = grid_scales(t, grid)
        out.update({"super_min": grid.dmin.float() * t.mmax, "min_unit": unit_m, "zero": b / _anchor(t, a, out)})
    return out


def scales_from_params(t: GGMLType, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(A, B)`` [out, ns] from the trainable parameters, differentiable (straight-through roundings).

    Scale: legacy ``A = fp16(s)``; k-quants ``d = fp16(D / L)``, ``k = clamp(round(s / unit), kmin, kmax)``,
    ``A = d * k`` (d repeated over its super-block). Min, anchored at the zero point as ``QuantLinear``'s
    ``(q - z) s``: ``B = A z`` rounded to its grid: q4_1 ``B = fp16(A z)``; k-quants ``dmin = fp16(Dm / Lm)``,
    ``m = clamp(round(A z / unit_m), 0, Lm)``, ``B = dmin * m``. So a step on the scale scales the grid about
    ``W = 0`` (``B`` follows ``A``), not about its lowest level: with ``B`` held fixed every level but the lowest
    would move the same way, a systematic shift of the layer's output that the straight-through scale gradient
    does not see (measured: loss rises along it). Gradients: ``dA/ds = 1`` (legacy) or ``d / unit`` where ``k`` is
    not clamped (1 at initialisation), 0 where it is; ``dA/dD = k / L``; ``dB/dz = A``, ``dB/dA = z``,
    ``dB/dDm = m / Lm``. The forward value equals ``grid_scales(grid_from_params(p))``.
    """
    if not t.two_level:
        a = fp16_ste(p["scale"])
        return a, (fp16_ste(_anchor(t, a, p) * p["zero"]) if t.has_min else None)
    per = t.block // t.sub
    d = fp16_ste(p["super_scale"] / t.scale_levels).repeat_interleave(per, 1)
    k = torch.clamp(round_ste(p["scale"] / p["scale_unit"].repeat_interleave(per, 1)), t.kmin, t.kmax)
    a = d * k
    if not t.has_min:
        return a, None
    dmin = fp16_ste(p["super_min"] / t.mmax).repeat_interleave(per, 1)
    m = torch.clamp(round_ste(_anchor(t, a, p) * p["zero"] / p["min_unit"].repeat_interleave(per, 1)), 0, t.mmax)
    return a, dmin * m


@torch.no_grad()
def grid_from_params(t: GGMLType, p: dict[str, torch.Tensor]) -> Grid:
    """The exact grid the forward of ``p`` uses (what packing stores)."""
    p = {k: v.detach().float() for k, v in p.items()}
    a, b = scales_from_params(t, p)
    if not t.two_level:
        return Grid(d=a, dmin=b)
    per = t.block // t.sub
    d = (p["super_scale"] / t.scale_levels).half().float()
    k = torch.clamp(torch.round(p["scale"] / p["scale_unit"].repeat_interleave(per, 1)), t.kmin, t.kmax)
    grid = Grid(d=d, k=k.to(torch.int16))
    if t.has_min:
        grid.dmin = (p["super_min"] / t.mmax).half().float()
        m = torch.clamp(torch.round(_anchor(t, a, p) * p["zero"] / p["min_unit"].repeat_interleave(per, 1)),
                        0, t.mmax)
        grid.m = m.to(torch.int16)
    return grid


@torch.no_grad()
def project_params_(t: GGMLType, p: dict[str, torch.Tensor]) -> None:
    """Put the parameters back into their ranges in place (call after each optimizer step).

    k-quants: ``D >= L * 2^-24`` (so d stays a positive float16), ``s`` in ``[kmin, kmax] * unit``, ``Dm`` likewise,
    and the zero point in ``[0, Lm * unit_m / anchor]`` (so ``m`` in ``[0, Lm]``). A parameter left outside would
    get zero gradient from the clamp and never come back. Legacy types are left alone: their d may have either
    sign, as ggml's own quantizer makes it, and q4_1's min any value.
    """
    if not t.two_level:
        return
    per = t.block // t.sub
    p["super_scale"].clamp_(min=t.scale_levels * _F16_TINY)
    unit = p["scale_unit"].repeat_interleave(per, 1)
    p["scale"].copy_(torch.minimum(torch.maximum(p["scale"], unit * t.kmin), unit * t.kmax))
    if t.has_min:
        p["super_min"].clamp_(min=t.mmax * _F16_TINY)
        a, _ = scales_from_params(t, {k: v.float() for k, v in p.items()})
        top = p["min_unit"].repeat_interleave(per, 1) * t.mmax / _anchor(t, a, p)
        p["zero"].copy_(torch.minimum(p["zero"].clamp(min=0.0), top))


# ---------------------------------------------------------------------------------------------------------------
# Initialisation: a grid fitted to a weight
# ---------------------------------------------------------------------------------------------------------------


def init_grid(w: torch.Tensor, t: GGMLType, importance: torch.Tensor | None = None, chunk_rows: int = 256) -> Grid:
    """A good grid for ``W`` before training: per sub-block (weighted) least-squares fit, then (k-quants) the
    sub-block scales and mins quantized to their super-block grid with a local search. ``W`` ``[out, in]`` (float32
    maths).

    ``importance`` ``[in]`` (optional): how much an error in each input column costs, ``h_j = E[x_j^2]`` over the
    layer's inputs ``x`` (the diagonal of ``E[x x^T]``, llama.cpp's "importance matrix"). The output error of a
    weight error ``ΔW`` is ``E||ΔW x||^2 = Σ_o ΔW_o E[x x^T] ΔW_o^T``, which the diagonal approximates by
    ``Σ_{o,j} h_j ΔW_{oj}^2``: every squared error below is weighted by ``h_j`` (plus 1e-3 of its mean, so a dead
    column still counts a little). ``None``: unit weights.

    1. Each sub-block gets a continuous ``(A, B)``. Asymmetric types: candidate steps ``(hi - lo) / (cmax + δ)``
       with ``lo = min(W)`` (k-quants: ``min(W, 0)``, because their ``B = dmin * m >= 0``), ``hi = max(W)`` and
       ``δ`` in -1, -0.9, ..., 1; for each, codes by rounding and the weighted least-squares ``(A, B)`` for those
       codes (B held at 0 when it would turn negative, k-quants); the lowest weighted squared error wins, min-max
       included. Symmetric types: candidate steps that map the largest-magnitude weight ``e`` to ``cmin``
       (``-e / (-cmin + δ)``) or to ``cmax`` (``e / (cmax + δ)``), refitted by weighted least squares
       (``A = Σ h W c / Σ h c²``). This is the search of llama.cpp's reference quantizers (``make_qkx2_quants``,
       ``make_qx_quants``; with an importance matrix ``make_qkx3_quants``, whose weights are
       ``h_j * sqrt(σ² + W²)``: we weight by ``h_j`` alone, the diagonal approximation above).
    2. Legacy types: ``d = fp16(A)`` (q4_1: ``B`` in float16 too).
       k-quants: ``d = fp16(max_j A_j / kmax)`` (q3_k: ``max(A / 31, -A / 32)``, so the largest sub-block scale
       uses the extra negative level), ``k = clamp(round(A / d))``, and likewise ``dmin``, ``m``; then each
       sub-block tries ``k ± 1`` (and ``m ± 1``) and keeps the pair with the lowest weighted squared error.

    ``chunk_rows`` rows are fitted at a time, bounding the temporaries to about 40 bytes per weight of a chunk.
    """
    if w.dim() != 2 or w.shape[1] % t.block:
        raise ValueError(f"{t.name}: expected [out, in] with in a multiple of {t.block}, got {tuple(w.shape)}")
    h = None
    if importance is not None:
        if tuple(importance.shape) != (w.shape[1],):
            raise ValueError(f"{t.name}: importance has shape {tuple(importance.shape)}, expected [{w.shape[1]}]")
        h = importance.detach().float().to(w.device).clamp(min=0)
        mean = h.mean()
        h = h + 1e-3 * mean if mean > 0 else torch.ones_like(h)
        h = _sub_blocks(h.unsqueeze(0), t.sub)  # [1, ns, sub], broadcast over rows
    parts = [_init_rows(w[r0:r0 + chunk_rows].detach().float(), t, h) for r0 in range(0, w.shape[0], chunk_rows)]
    return Grid(*(None if parts[0][f] is None else torch.cat([p[f] for p in parts]) for f in range(4)))


def _init_rows(w: torch.Tensor, t: GGMLType, h: torch.Tensor | None) -> tuple:
    xs = _sub_blocks(w, t.sub)  # [R, ns, sub]
    hs = torch.ones_like(xs) if h is None else h.expand_as(xs)
    if t.has_min:
        a, b = _fit_asym(xs, hs, t.cmax, nonneg_min=t.two_level)
    else:
        a, b = _fit_sym(xs, hs, t.cmin, t.cmax), None
    if not t.two_level:
        return a.half().float(), None, (None if b is None else b.half().float()), None
    per = t.block // t.sub
    r, ns = a.shape
    a_sb = a.reshape(r, ns // per, per)
    if t.kmin < 0:
        d = torch.maximum(a_sb / t.kmax, a_sb / t.kmin).amax(-1)
    else:
        d = a_sb.clamp(min=0).amax(-1) / t.kmax
    d = d.half().float()
    k = _levels(a, d, per, t.kmin, t.kmax)
    dmin = m = None
    if t.has_min:
        dmin = (b.reshape(r, ns // per, per).clamp(min=0).amax(-1) / t.mmax).half().float()
        m = _levels(b, dmin, per, 0, t.mmax)
    k, m = _refine_levels(xs, hs, d, k, dmin, m, t)
    return d, k.to(torch.int16), dmin, (None if m is None else m.to(torch.int16))


def _levels(v: torch.Tensor, unit: torch.Tensor, per: int, lo: int, hi: int) -> torch.Tensor:
    u = unit.repeat_interleave(per, 1)
    q = torch.where(u > 0, torch.round(v / torch.where(u > 0, u, torch.ones_like(u))), torch.zeros_like(v))
    return q.clamp(lo, hi)


def _sq_error(xs: torch.Tensor, hs: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None,
              t: GGMLType) -> torch.Tensor:
    """Weighted squared error per sub-block [R, ns] of the best codes in the grid (A, B)."""
    c = torch.clamp(torch.round(_ratio(xs, a, b, t)), t.cmin, t.cmax)
    w_hat = a.unsqueeze(-1) * c - (0 if b is None else b.unsqueeze(-1))
    return ((w_hat - xs).square() * hs).sum(-1)


def _refine_levels(xs, hs, d, k, dmin, m, t: GGMLType):
    """Try k ± 1 (and m ± 1) per sub-block, keep the lowest weighted error (one pass)."""
    per = t.block // t.sub
    dd = d.repeat_interleave(per, 1)
    dm = None if dmin is None else dmin.repeat_interleave(per, 1)
    best_err = best_k = best_m = None
    steps_m = (-1, 0, 1) if m is not None else (0,)
    for sk in (-1, 0, 1):
        kk = (k + sk).clamp(t.kmin, t.kmax)
        for sm in steps_m:
            mm = None if m is None else (m + sm).clamp(0, t.mmax)
            err = _sq_error(xs, hs, dd * kk, None if mm is None else dm * mm, t)
            if best_err is None:
                best_err, best_k, best_m = err, kk, mm
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_k = torch.where(better, kk, best_k)
            if mm is not None:
                best_m = torch.where(better, mm, best_m)
    return best_k, best_m


def _fit_asym(xs: torch.Tensor, hs: torch.Tensor, cmax: int, nonneg_min: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block ``(A, B)`` with ``W ≈ A c - B``, c in [0, cmax], weights ``hs`` (step 1 of ``init_grid``)."""
    lo, hi = xs.amin(-1), xs.amax(-1)
    if nonneg_min:
        lo = lo.clamp(max=0.0)
    span = hi - lo
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    best_a = torch.where(span > 0, span / cmax, torch.zeros_like(span))  # min-max, the first candidate
    best_b = -lo
    best_err = _asym_err(xs, hs, best_a, best_b, cmax)
    sw, swx = hs.sum(-1), (hs * xs).sum(-1)
    for i in range(21):
        delta = -1.0 + 0.1 * i
        step = safe_span / (cmax + delta)
        c = torch.clamp(torch.round((xs - lo.unsqueeze(-1)) / step.unsqueeze(-1)), 0, cmax)
        hc = hs * c
        sc, scc, sxc = hc.sum(-1), (hc * c).sum(-1), (hc * xs).sum(-1)
        det = sw * scc - sc * sc
        ok = (det > 0) & (span > 0)
        safe_det = torch.where(ok, det, torch.ones_like(det))
        a = (sw * sxc - sc * swx) / safe_det
        off = (swx - a * sc) / sw  # W ≈ A c + off, B = -off
        if nonneg_min:
            clip = off > 0
            a = torch.where(clip, sxc / torch.where(scc > 0, scc, torch.ones_like(scc)), a)
            off = torch.where(clip, torch.zeros_like(off), off)
        ok = ok & (a > 0)
        err = ((a.unsqueeze(-1) * c + off.unsqueeze(-1) - xs).square() * hs).sum(-1)
        better = ok & (err < best_err)
        best_a = torch.where(better, a, best_a)
        best_b = torch.where(better, -off, best_b)
        best_err = torch.where(better, err, best_err)
    return best_a, best_b


def _asym_err(xs, hs, a, b, cmax):
    safe = torch.where(a > 0, a, torch.ones_like(a))
    c = torch.clamp(torch.round((xs + b.unsqueeze(-1)) / safe.unsqueeze(-1)), 0, cmax)
    c = torch.where(a.unsqueeze(-1) > 0, c, torch.zeros_like(c))
    return ((a.unsqueeze(-1) * c - b.unsqueeze(-1) - xs).square() * hs).sum(-1)


def _fit_sym(xs: torch.Tensor, hs: torch.Tensor, cmin: int, cmax: int) -> torch.Tensor:
    """Per sub-block signed ``A`` with ``W ≈ A c``, c in [cmin, cmax], weights ``hs`` (step 1 of ``init_grid``)."""
    idx = xs.abs().argmax(-1, keepdim=True)
    e = xs.gather(-1, idx).squeeze(-1)  # the signed extreme
    best_a = -e / (-cmin)  # ggml's own choice: the extreme lands on cmin
    best_err = _sym_err(xs, hs, best_a, cmin, cmax)
    for base, sign in ((-cmin, -1.0), (cmax, 1.0)):
        for i in range(11):
            delta = -0.5 + 0.1 * i
            a0 = sign * e / (base + delta)
            safe = torch.where(a0 != 0, a0, torch.ones_like(a0))
            c = torch.clamp(torch.round(xs / safe.unsqueeze(-1)), cmin, cmax)
            hc = hs * c
            scc = (hc * c).sum(-1)
            a = torch.where(scc > 0, (hc * xs).sum(-1) / torch.where(scc > 0, scc, torch.ones_like(scc)), a0)
            err = _sym_err(xs, hs, a, cmin, cmax)
            better = (a0 != 0) & (err < best_err)
            best_a = torch.where(better, a, best_a)
            best_err = torch.where(better, err, best_err)
    return best_a


def _sym_err(xs, hs, a, cmin, cmax):
    safe = torch.where(a != 0, a, torch.ones_like(a))
    c = torch.clamp(torch.round(xs / safe.unsqueeze(-1)), cmin, cmax)
    c = torch.where(a.unsqueeze(-1) != 0, c, torch.zeros_like(c))
    return ((a.unsqueeze(-1) * c - xs).square() * hs).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# ggml block bytes
# ---------------------------------------------------------------------------------------------------------------


def row_bytes(t: GGMLType, in_features: int) -> int:
    """Bytes of one row of ``in_features`` weights."""
    return in_features // t.block * t.type_size


def pack(codes: torch.Tensor, grid: Grid, t: GGMLType) -> torch.Tensor:
    """The exact ggml blocks of a layer: uint8 ``[out, nb * bytes]`` (layouts in ``ggml-common.h``).

    ``codes`` int8 ``[out, in]`` in ``[cmin, cmax]``; ``grid`` as :class:`Grid` (d, dmin float16-exact; k, m in
    their integer ranges). Weight ``i`` of a block is stored (``q = c - cmin``, the unsigned code):

    - q4_0, q4_1: ``qs[i % 16]``, low nibble for ``i < 16``, high nibble for ``i >= 16``;
    - q5_0: the low 4 bits as q4_0, bit 4 in bit ``i`` of the little-endian uint32 ``qh``;
    - q8_0: ``qs[i] = c`` as int8;
    - q2_k, q3_k: the 2 low bits in ``qs[32 * (i // 128) + i % 32]`` at bit ``2 * ((i % 128) // 32)``; q3_k's bit 2
      in ``hmask[i % 32]`` at bit ``i // 32``;
    - q4_k: ``qs[32 * (i // 64) + i % 32]``, low nibble for ``(i % 64) < 32``, high nibble otherwise.

    Sub-block scales: q2_k ``scales[j] = k_j | m_j << 4``; q3_k 6-bit ``u_j = k_j + 32``, low 4 bits in
    ``scales[j % 8]`` (low nibble for j < 8, high for j >= 8), high 2 bits in ``scales[8 + j % 4]`` at bit
    ``2 * (j // 4)``; q4_k 6-bit ``k_j``, ``m_j``: for j < 4 in the low 6 bits of ``scales[j]`` and ``scales[j + 4]``;
    for j >= 4 the low 4 bits of both in ``scales[j + 4]`` (k low nibble, m high nibble) and the high 2 bits in the
    top bits of ``scales[j - 4]`` (k) and ``scales[j]`` (m).

    Raises:
        ValueError: codes or levels out of range, or d/dmin not float16 values.
    """
    _check_little_endian()
    out, n_in = codes.shape
    if n_in % t.block:
        raise ValueError(f"{t.name}: in_features {n_in} is not a multiple of its block of {t.block}")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < t.cmin or hi > t.cmax:
        raise ValueError(f"{t.name}: codes range [{lo}, {hi}] is outside [{t.cmin}, {t.cmax}]")
    nb = n_in // t.block
    q = (codes.to(torch.int16) - t.cmin).to(torch.uint8).reshape(out, nb, t.block)
    d = _f16_bytes(grid.d, "d").reshape(out, nb, 2)
    if t.name in ("q4_0", "q4_1"):
        parts = [d] + ([_f16_bytes(-grid.dmin, "m").reshape(out, nb, 2)] if t.has_min else [])
        parts.append(q[..., :16] | (q[..., 16:] << 4))
    elif t.name == "q5_0":
        bits = ((q >> 4) & 1).reshape(out, nb, 4, 8)
        qh = (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
        parts = [d, qh, (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)]
    elif t.name == "q8_0":
        parts = [d, codes.reshape(out, nb, 32).contiguous().view(torch.uint8)]
    else:
        k = grid.k.to(torch.int16).reshape(out, nb, -1)
        _check_levels(k, t.kmin, t.kmax, "k")
        if t.has_min:
            m = grid.m.to(torch.int16).reshape(out, nb, -1)
            _check_levels(m, 0, t.mmax, "m")
        if t.name == "q2_k":
            scales = (k | (m << 4)).to(torch.uint8)
            parts = [scales, _pack_2bit(q), d, _f16_bytes(grid.dmin, "dmin").reshape(out, nb, 2)]
        elif t.name == "q3_k":
            hb = (q >> 2).reshape(out, nb, 8, 32)
            hmask = (hb << torch.arange(8, dtype=torch.uint8).view(8, 1)).sum(-2, dtype=torch.uint8)
            parts = [hmask, _pack_2bit(q & 3), _pack_q3k_scales(k + 32), d]
        else:  # q4_k
            q4 = q.reshape(out, nb, 4, 2, 32)
            qs = (q4[..., 0, :] | (q4[..., 1, :] << 4)).reshape(out, nb, 128)
            parts = [d, _f16_bytes(grid.dmin, "dmin").reshape(out, nb, 2), _pack_q4k_scales(k, m), qs]
    blocks = torch.cat([p.to(torch.uint8) for p in parts], dim=-1)
    if blocks.shape[-1] != t.type_size:
        raise AssertionError(f"{t.name}: packed {blocks.shape[-1]} bytes per block, expected {t.type_size}")
    return blocks.reshape(out, nb * t.type_size)


def unpack(blocks: torch.Tensor, t: GGMLType, in_features: int) -> tuple[torch.Tensor, Grid]:
    """Inverse of :func:`pack`: uint8 ``[out, nb * bytes]`` -> ``(codes int8 [out, in], Grid)``.

    Raises:
        ValueError: a tensor that is not uint8 or not ``row_bytes(t, in_features)`` wide.
    """
    _check_little_endian()
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row_bytes(t, in_features):
        raise ValueError(f"{t.name}: expected uint8 [out, {row_bytes(t, in_features)}] blocks for in_features "
                         f"{in_features}, got {blocks.dtype} {tuple(blocks.shape)}")
    out, nb = blocks.shape[0], in_features // t.block
    x = blocks.reshape(out, nb, t.type_size)
    grid = Grid(d=torch.empty(0))
    if t.name in ("q4_0", "q4_1"):
        grid.d = _f16_values(x[..., 0:2])
        if t.has_min:
            grid.dmin = -_f16_values(x[..., 2:4])
        qs = x[..., -16:]
        q = torch.cat([qs & 15, qs >> 4], dim=-1)
    elif t.name == "q5_0":
        grid.d = _f16_values(x[..., 0:2])
        hbits = ((x[..., 2:6].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(out, nb, 32)
        qs = x[..., 6:22]
        q = torch.cat([qs & 15, qs >> 4], dim=-1) | (hbits << 4)
    elif t.name == "q8_0":
        grid.d = _f16_values(x[..., 0:2])
        q = (x[..., 2:34].contiguous().view(torch.int8).to(torch.int16) - t.cmin).to(torch.uint8)
    elif t.name == "q2_k":
        scales = x[..., 0:16]
        q = _unpack_2bit(x[..., 16:80])
        grid.d, grid.dmin = _f16_values(x[..., 80:82]), _f16_values(x[..., 82:84])
        grid.k, grid.m = (scales & 15).to(torch.int16), (scales >> 4).to(torch.int16)
    elif t.name == "q3_k":
        hmask = x[..., 0:32]
        hb = ((hmask.unsqueeze(-2) >> torch.arange(8, dtype=torch.uint8).view(8, 1)) & 1).reshape(out, nb, 256)
        q = _unpack_2bit(x[..., 32:96]) | (hb << 2)
        grid.k = _unpack_q3k_scales(x[..., 96:108]) - 32
        grid.d = _f16_values(x[..., 108:110])
    else:  # q4_k
        grid.d, grid.dmin = _f16_values(x[..., 0:2]), _f16_values(x[..., 2:4])
        grid.k, grid.m = _unpack_q4k_scales(x[..., 4:16])
        qs = x[..., 16:144].reshape(out, nb, 4, 32)
        q = torch.stack([qs & 15, qs >> 4], dim=-2).reshape(out, nb, 256)
    codes = (q.to(torch.int16) + t.cmin).to(torch.int8).reshape(out, in_features)
    grid.d = grid.d.reshape(out, nb)
    if grid.dmin is not None:
        grid.dmin = grid.dmin.reshape(out, nb)
    if grid.k is not None:
        grid.k = grid.k.reshape(out, -1)
    if grid.m is not None:
        grid.m = grid.m.reshape(out, -1)
    return codes, grid


def dequantize(blocks: torch.Tensor, t: GGMLType, in_features: int) -> torch.Tensor:
    """``W`` float32 ``[out, in]`` decoded from ggml blocks; equals gguf-py's ``dequantize`` bit for bit."""
    codes, grid = unpack(blocks, t, in_features)
    a, b = grid_scales(t, grid)
    return dequantize_codes(codes, a, b, t)


def _pack_2bit(q: torch.Tensor) -> torch.Tensor:
    """[out, nb, 256] 2-bit values -> [out, nb, 64]: byte 32h + l holds weights 128h + 32s + l at bits 2s."""
    out, nb = q.shape[:2]
    q = q.reshape(out, nb, 2, 4, 32).to(torch.uint8)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
    return (q << shifts).sum(-2, dtype=torch.uint8).reshape(out, nb, 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    out, nb = qs.shape[:2]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
    return ((qs.reshape(out, nb, 2, 1, 32) >> shifts) & 3).reshape(out, nb, 256)


def _pack_q3k_scales(u: torch.Tensor) -> torch.Tensor:
    """16 6-bit values [out, nb, 16] (k + 32) -> 12 bytes (layout in :func:`pack`)."""
    u = u.to(torch.int16)
    low = (u[..., :8] & 15) | ((u[..., 8:] & 15) << 4)
    high = (u >> 4) & 3  # [.., 16], value j goes to byte 8 + j % 4 at bit 2 * (j // 4)
    hb = (high.reshape(*u.shape[:-1], 4, 4) << (2 * torch.arange(4, dtype=torch.int16)).view(4, 1)).sum(-2)
    return torch.cat([low, hb], dim=-1).to(torch.uint8)


def _unpack_q3k_scales(s: torch.Tensor) -> torch.Tensor:
    s = s.to(torch.int16)
    low = torch.cat([s[..., :8] & 15, s[..., :8] >> 4], dim=-1)
    hb = s[..., 8:12]  # [.., 4]
    high = (hb.unsqueeze(-2) >> (2 * torch.arange(4, dtype=torch.int16)).view(4, 1)) & 3  # [.., 4 (j//4), 4 (j%4)]
    return low | (high.reshape(*s.shape[:-1], 16) << 4)


def _pack_q4k_scales(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """8 6-bit scales and mins [out, nb, 8] -> 12 bytes (layout in :func:`pack`)."""
    k, m = k.to(torch.int16), m.to(torch.int16)
    b0 = k[..., :4] | ((k[..., 4:] >> 4) << 6)
    b1 = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    b2 = (k[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    return torch.cat([b0, b1, b2], dim=-1).to(torch.uint8)


def _unpack_q4k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = s.to(torch.int16)
    b0, b1, b2 = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    k = torch.cat([b0 & 63, (b2 & 15) | ((b0 >> 6) << 4)], dim=-1)
    m = torch.cat([b1 & 63, (b2 >> 4) | ((b1 >> 6) << 4)], dim=-1)
    return k, m


def _f16_bytes(x: torch.Tensor, label: str) -> torch.Tensor:
    """float16-valued float32 [...] -> uint8 [..., 2] (little-endian)."""
    h = x.detach().float().half()
    if not torch.equal(h.float(), x.detach().float()):
        raise ValueError(f"{label} holds values that are not float16; round them first (grid_from_params)")
    return h.unsqueeze(-1).contiguous().view(torch.uint8)


def _f16_values(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _check_levels(v: torch.Tensor, lo: int, hi: int, label: str) -> None:
    if v.numel() and (int(v.min()) < lo or int(v.max()) > hi):
        raise ValueError(f"sub-block {label} range [{int(v.min())}, {int(v.max())}] is outside [{lo}, {hi}]")


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("GGUF blocks are little-endian; packing on a big-endian host is not supported")


# ---------------------------------------------------------------------------------------------------------------
# A plain frugal-qat run (uniform asymmetric grid, GPTQ layout) in the legacy type that holds it exactly
# ---------------------------------------------------------------------------------------------------------------


class GridRefused(ValueError):
    """No GGUF type holds this layer's grid exactly; the message says why and what to do."""


def legacy_type_for(bits: int, group_size: int, in_features: int) -> str:
    """The legacy ggml type that holds a plain run's ``(q - z) * s`` exactly, ``s`` float16, z integer.

    ``q - z`` lies in ``[-(2^b - 1), 2^b - 1]`` and ``s`` is one float16 per group: a block type ``d * c`` with
    ``d = s`` and ``c = q - z`` holds it when every 32-weight block lies inside one group (g a multiple of 32) and
    ``c`` fits the type's code range:

    - 2 and 3 bits: ``|c| <= 7``: **q4_0** (``c`` in [-8, 7]), 4.5 bits per weight;
    - 4 bits: ``|c| <= 15``: **q5_0** (``c`` in [-16, 15]), 5.5 bits per weight. (q4_1, ``d * q + m`` with
      ``m = -s z``, costs 5.0 bits but rounds ``m`` to float16 and then ``d q + m`` to float32, so it is not exact);
    - 8 bits: **q8_0** (``c`` in [-128, 127]) holds the groups whose ``q - z`` stays in that range, which depends
      on the data (:func:`legacy_from_gptq` checks it): an 8-bit run's codes span [-z, 255 - z].

    Raises:
        GridRefused: the group size is not a multiple of 32 (ggml's legacy block), or the row is not.
    """
    g = in_features if group_size == -1 else group_size
    if g % 32 or in_features % 32:
        raise GridRefused(
            f"group size {g} (in_features {in_features}) is not a multiple of 32, the block of ggml's legacy types, "
            f"so no GGUF type holds this run exactly; quantize with a group size that is a multiple of 32, or train "
            f"in a GGUF grid (block-ap --gguf q4_k|q3_k|q2_k|q4_0|q4_1|q5_0|q8_0)")
    return {2: "q4_0", 3: "q4_0", 4: "q5_0", 8: "q8_0"}[bits]


def legacy_from_gptq(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                     group_size: int, name: str = "weight") -> tuple[str, torch.Tensor, Grid]:
    """A plain layer (uint8 codes ``q`` [out, in], float16-valued ``s`` and integer ``z`` [out, G]) as
    ``(type name, codes c = q - z, Grid)`` of the exact legacy type (:func:`legacy_type_for`).

    Raises:
        GridRefused: see ``legacy_type_for``; or (8 bits) some ``q - z`` outside [-128, 127], counted.
    """
    out, n_in = codes.shape
    name_t = legacy_type_for(bits, group_size, n_in)
    t = TYPES[name_t]
    g = n_in if group_size == -1 else group_size
    c = codes.to(torch.int16).reshape(out, n_in // g, g) - zero.to(torch.int16).unsqueeze(-1)
    bad = int(((c < t.cmin) | (c > t.cmax)).sum())
    if bad:
        raise GridRefused(
            f"{name}: {bad} weights have q - z outside [{t.cmin}, {t.cmax}], which {name_t} cannot hold (an 8-bit "
            f"group's codes span [-z, 255 - z]); export this run as gptq or fp16, or train in the q8_0 grid "
            f"(block-ap --gguf q8_0)")
    d = scale.float().repeat_interleave(g // 32, dim=1)
    if not torch.equal(d.half().float(), d):
        raise GridRefused(f"{name}: scales are not float16 values; the run directory is damaged")
    return name_t, c.reshape(out, n_in).to(torch.int8), Grid(d=d)


# ---------------------------------------------------------------------------------------------------------------
# Layers: the fake-quantized layer of Block-AP and the packed layer of E2E-QP, trained in a ggml grid
# ---------------------------------------------------------------------------------------------------------------


class GGUFQuantLinear(nn.Module):
    """``QuantLinear``'s interface, with ``W`` fake-quantized in a ggml type's grid (Block-AP).

    The layer's type is ``layer_type(gguf_type, in_features)``: the type asked for, or its legacy fallback for a
    k-quant whose rows are not a multiple of 256 (``self.gguf_type`` says which). Parameters (float32, created in
    ``__init__``): ``weight``, ``bias`` and the quantizer's (``param_shapes``: ``super_scale``, ``scale``,
    ``super_min``, ``zero``), plus the buffers ``scale_unit``/``min_unit``. Forward:
    ``y = x @ fake_quant(W, scales_from_params(...)).T + bias``.

    Life cycle: ``from_linear`` (``init_grid``) -> train ``weight_parameters()`` and ``quant_parameters()``, calling
    ``project_()`` after each step -> ``freeze_()`` -> ``pack()`` (the exact ggml bytes).
    """

    def __init__(self, in_features: int, out_features: int, gguf_type: str, bias: bool = True, name: str = "",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.requested_type = ggml_type(gguf_type).name
        self.gguf_type = layer_type(gguf_type, in_features)
        self.in_features, self.out_features, self.name, self.frozen = in_features, out_features, name, False
        f32 = {"dtype": torch.float32, "device": device}
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, **f32))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **f32))
        else:
            self.register_parameter("bias", None)
        self.quant_names = []
        for key, shape in param_shapes(self.spec, out_features, in_features).items():
            if key in BUFFERS:
                self.register_buffer(key, torch.ones(shape, **f32))
            else:
                setattr(self, key, nn.Parameter(torch.ones(shape, **f32)))
                self.quant_names.append(key)

    @property
    def spec(self) -> GGMLType:
        return TYPES[self.gguf_type]

    @classmethod
    def from_linear(cls, linear: nn.Linear, gguf_type: str, name: str = "",
                    importance: torch.Tensor | None = None) -> GGUFQuantLinear:
        """Copy ``linear``'s weight and bias (float32) and fit the grid with ``init_grid`` (weighted by
        ``importance`` [in], the mean squared input of each column, when given)."""
        layer = cls(linear.in_features, linear.out_features, gguf_type, bias=linear.bias is not None, name=name,
                    device=linear.weight.device)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            layer._load_grid(init_grid(layer.weight, layer.spec, importance))
        return layer

    def qparams(self) -> dict[str, torch.Tensor]:
        """The quantizer's parameters and buffers by name (what ``scales_from_params`` reads)."""
        return {k: getattr(self, k) for k in param_shapes(self.spec, self.out_features, self.in_features)}

    def _load_grid(self, grid: Grid) -> None:
        for key, value in params_from_grid(self.spec, grid).items():
            getattr(self, key).data.copy_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:  # on the grid already: fake_quant would be the identity
            w = self.weight
        else:
            w = fake_quant(self.weight, *scales_from_params(self.spec, self.qparams()), self.spec)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    def weight_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def quant_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, k) for k in self.quant_names]

    def project_(self) -> None:
        """Back into the parameters' ranges after an optimizer step (:func:`project_params_`)."""
        project_params_(self.spec, self.qparams())

    def grid(self) -> Grid:
        return grid_from_params(self.spec, self.qparams())

    @torch.no_grad()
    def freeze_(self) -> GGUFQuantLinear:
        """Round in place to exactly what ``pack()`` stores and stop gradients: the grid to its stored values, the
        weight to ``A c - B`` with the codes the training forward used, the bias to float16. Idempotent.

        Raises:
            ValueError: a super-block scale or a legacy d that is not finite in float16.
        """
        grid = self.grid()
        for label, v in (("d", grid.d), ("dmin", grid.dmin)):
            if v is not None and not torch.isfinite(v).all():
                raise ValueError(f"{self.name or 'GGUFQuantLinear'}: {label} is not finite in float16; lower "
                                 f"quant_lr or check the training for divergence")
        a, b = grid_scales(self.spec, grid)
        codes = quantize(self.weight, a, b, self.spec)
        self.weight.copy_(dequantize_codes(codes, a, b, self.spec))
        self._load_grid(grid)
        finish_freeze(self)
        return self

    @torch.no_grad()
    def pack(self) -> dict[str, torch.Tensor]:
        """``{"ggml": uint8 [out, row bytes]}`` (the exact ggml blocks), plus ``"bias"`` as float16.

        Raises:
            ValueError: the layer is not frozen, or its weight left the grid after ``freeze_()``.
        """
        label = self.name or "GGUFQuantLinear"
        if not self.frozen:
            raise ValueError(f"{label}: pack() needs a frozen layer; call freeze_() first")
        grid = self.grid()
        a, b = grid_scales(self.spec, grid)
        codes = quantize(self.weight, a, b, self.spec)
        if not torch.equal(dequantize_codes(codes, a, b, self.spec), self.weight):
            raise ValueError(f"{label}: the weight was changed after freeze_(); call freeze_() again before pack()")
        out = {"ggml": pack(codes, grid, self.spec)}
        if self.bias is not None:
            out["bias"] = self.bias.half()
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, gguf_type={self.gguf_type}, "
                f"bias={self.bias is not None}, frozen={self.frozen}")


class GGUFPackedLinear(nn.Module):
    """E2E-QP's layer over ggml blocks: the codes stay frozen in the ``ggml`` buffer (uint8 [out, row bytes]),
    and the grid's scales train (``super_scale``, ``scale`` and, q4_k/q2_k, ``super_min``; legacy types ``scale``),
    rounded in every forward to the type's grid as in Block-AP; the zero points stay frozen, as E2E-QP freezes
    ``QuantLinear``'s (``B = A z`` follows the scale, re-rounded to its grid). The trained
    layer is written back as exact ggml blocks by ``to_blocks()``.

    Forward ``y = x @ W.T + bias`` with ``W = A c - B`` dequantized ``tile_rows`` output rows at a time; backward
    recomputes the tiles (saves only x): ``dL/dA_j = sum_i c_i dL/dW_i``, ``dL/dB_j = -sum_i dL/dW_i`` over the
    sub-block, ``dL/dW = dL/dy^T x``. Matmuls in float32 on CPU, in x's dtype elsewhere.
    """

    def __init__(self, in_features: int, out_features: int, gguf_type: str, bias: bool = False, *,
                 bias_dtype: torch.dtype = torch.float16, tile_rows: int = 1024,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        t = ggml_type(gguf_type)
        if in_features % t.block:
            raise ValueError(f"{t.name}: in_features {in_features} is not a multiple of its block of {t.block}")
        self.gguf_type, self.in_features, self.out_features, self.tile_rows = t.name, in_features, out_features, tile_rows
        self.register_buffer("ggml", torch.zeros(out_features, row_bytes(t, in_features), dtype=torch.uint8,
                                                 device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.quant_names = []
        for key, shape in param_shapes(t, out_features, in_features).items():
            if key in BUFFERS or key == "zero":
                self.register_buffer(key, torch.ones(shape, dtype=torch.float32, device=device))
            else:
                setattr(self, key, nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device)))
                self.quant_names.append(key)

    @property
    def spec(self) -> GGMLType:
        return TYPES[self.gguf_type]

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, gguf_type: str, in_features: int, out_features: int,
                    bias: torch.Tensor | None = None, **kwargs) -> GGUFPackedLinear:
        """Wrap a layer's ggml blocks (not copied); its grid becomes the float32 parameters exactly."""
        layer = cls(in_features, out_features, gguf_type, bias is not None, device="meta",
                    **({} if bias is None else {"bias_dtype": bias.dtype}), **kwargs)
        if tuple(blocks.shape) != (out_features, row_bytes(layer.spec, in_features)):
            raise ValueError(f"{gguf_type}: blocks have shape {tuple(blocks.shape)}, expected "
                             f"[{out_features}, {row_bytes(layer.spec, in_features)}]")
        _, grid = unpack(blocks, layer.spec, in_features)
        layer.ggml, layer.bias = blocks, bias
        for key, value in params_from_grid(layer.spec, grid).items():
            if key in BUFFERS or key == "zero":
                setattr(layer, key, value.to(blocks.device))
            else:
                setattr(layer, key, nn.Parameter(value.to(blocks.device)))
        return layer

    def qparams(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in param_shapes(self.spec, self.out_features, self.in_features)}

    def quant_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, k) for k in self.quant_names]

    def project_(self) -> None:
        project_params_(self.spec, self.qparams())

    @torch.no_grad()
    def to_blocks(self) -> torch.Tensor:
        """The trained layer as exact ggml blocks: the frozen codes with the grid the forward uses."""
        codes, _ = unpack(self.ggml, self.spec, self.in_features)
        return pack(codes, grid_from_params(self.spec, self.qparams()), self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        a, b = scales_from_params(self.spec, self.qparams())
        x2 = x.reshape(-1, self.in_features)
        y = _GGUFPackedFunction.apply(x2, self.ggml, a, b, self.spec, self.tile_rows)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, gguf_type={self.gguf_type}, "
                f"bias={self.bias is not None}")


class _GGUFPackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, blocks, a, b, t: GGMLType, tile_rows: int):
        ctx.save_for_backward(x2, blocks, a, b)
        ctx.t, ctx.tile_rows = t, tile_rows
        cd = _matmul_dtype(x2)
        y = torch.empty(x2.shape[0], blocks.shape[0], dtype=x2.dtype, device=x2.device)
        for r0, w, _ in _weight_tiles(blocks, a, b, t, tile_rows, x2.shape[1]):
            y[:, r0:r0 + w.shape[0]] = (x2.to(cd) @ w.to(cd).t()).to(x2.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x2, blocks, a, b = ctx.saved_tensors
        t, cd = ctx.t, _matmul_dtype(x2)
        need_x, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need_b = b is not None and ctx.needs_input_grad[3]
        grad_x = torch.zeros(x2.shape, dtype=torch.float32, device=x2.device) if need_x else None
        grad_a = torch.zeros(a.shape, dtype=torch.float32, device=a.device) if need_a else None
        grad_b = torch.zeros(b.shape, dtype=torch.float32, device=a.device) if need_b else None
        for r0, w, codes in _weight_tiles(blocks, a.detach(), None if b is None else b.detach(), t, ctx.tile_rows,
                                          x2.shape[1]):
            r1 = r0 + w.shape[0]
            go = grad_y[:, r0:r1].to(cd)
            if need_x:
                grad_x += (go @ w.to(cd)).float()
            if need_a or need_b:
                gw = _sub_blocks((go.t() @ x2.to(cd)).float(), t.sub)  # dL/dW of this tile, [rows, ns, sub]
                if need_a:
                    grad_a[r0:r1] = (gw * _sub_blocks(codes.float(), t.sub)).sum(-1)
                if need_b:
                    grad_b[r0:r1] = -gw.sum(-1)
        return (None if grad_x is None else grad_x.to(x2.dtype), None,
                None if grad_a is None else grad_a.to(a.dtype), None if grad_b is None else grad_b.to(b.dtype),
                None, None)


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "cpu" or x.dtype == torch.float32 else x.dtype


def _weight_tiles(blocks, a, b, t: GGMLType, tile_rows: int, in_features: int):
    """``(first row, W tile float32 [rows, in], codes tile)`` over the layer, ``tile_rows`` rows at a time."""
    for r0 in range(0, blocks.shape[0], tile_rows):
        r1 = min(r0 + tile_rows, blocks.shape[0])
        codes, _ = unpack(blocks[r0:r1], t, in_features)
        yield r0, dequantize_codes(codes, a[r0:r1], None if b is None else b[r0:r1], t), codes
