"""Uniform asymmetric per-group weight quantization: the tensor maths, nothing else.

One representation throughout (EfficientQAT, notes §1): a linear weight ``W[out, in]`` is cut into
``G = in // g`` groups of ``g`` consecutive input columns per output row (``g = -1``: one group per row).
Each group has a float scale ``s`` and a zero point ``z`` on the integer grid ``[0, qmax]``,
``qmax = 2^b - 1``::

    q = clamp(round(W / s) + z, 0, qmax)          codes, integers in [0, qmax]
    Ŵ = (q - z) * s                               the dequantized weight

Shapes legend (used by every docstring below):
    out: output features (rows of ``W``)     in: input features (columns of ``W``)
    g:   group size, a divisor of ``in``     G:  groups per row, ``in // g``
    scale, zero: ``[out, G]``                codes: ``[out, in]``, torch.uint8

Dtype policy: all maths runs in float32, where the bit-for-bit agreement of ``fake_quant``,
``quantize``/``dequantize`` and the packed model holds; inputs of another float dtype are upcast,
and ``fake_quant`` casts its result back to ``W``'s dtype.
No function keeps state, moves tensors between devices or writes into its inputs.
"""

import torch

SUPPORTED_BITS = (2, 3, 4, 8)

# Bounds of an initial scale, as in the reference: keep W / s finite for constant or zero groups.
SCALE_MIN = 1e-4
SCALE_MAX = 1e4


def resolve_group_size(group_size: int, in_features: int, bits: int, name: str = "weight") -> int:
    """Check ``bits`` and ``group_size`` for a layer and return the effective group size ``g``.

    ``group_size = -1`` means one group per row and returns ``in_features``. Otherwise ``group_size``
    must be a positive divisor of ``in_features``. ``name`` (e.g. ``layers.3.mlp.down_proj``) only
    makes the error message point at the layer.

    Raises:
        ValueError: bits not in {2, 3, 4, 8}, or a group size that does not divide ``in_features``,
            e.g. "group size 128 does not divide in_features 576 of layers.3.mlp.down_proj;
            choose a divisor of 576 or -1".
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"bits {bits} is not supported for {name}; choose one of {', '.join(map(str, SUPPORTED_BITS))}"
        )
    return _effective_group_size(group_size, in_features, name)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer (ties to even) with a straight-through gradient.

    ``round_ste(x) = x + (round(x) - x).detach()``: the forward value is ``round(x)`` (bit for bit:
    ``round(x) - x`` is exact in float for ``|x| < 2^24``, so adding ``x`` back lands exactly on the
    integer), and ``d round_ste(x) / dx = 1`` everywhere.
    """
    return x + (torch.round(x) - x).detach()


def clamp_ste(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clamp to ``[lo, hi]`` with a straight-through gradient (1 everywhere, also outside the range).

    ``clamp_ste(x, lo, hi) = x + (clamp(x, lo, hi) - x).detach()``. The forward value equals
    ``clamp(x, lo, hi)`` exactly when ``x`` is integer-valued with ``|x| < 2^24`` (how it is used here).
    """
    return x + (torch.clamp(x, lo, hi) - x).detach()


def round_zero(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer zero point actually used: ``clamp(round(zero), 0, 2^b - 1)``, as float32.

    This is the one definition of zero rounding: ``fake_quant`` (forward value), ``quantize``,
    ``QuantLinear.freeze_`` and packing all agree with it. No gradient (see ``fake_quant`` for the
    straight-through version). Shape of ``zero``.
    """
    return torch.clamp(torch.round(zero.detach().float()), 0, 2**bits - 1)


def init_qparams(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max initial scale and zero point per group.

    With ``lo = min(min(W_grp), 0)`` and ``hi = max(max(W_grp), 0)`` over each group::

        s = clamp((hi - lo) / (2^b - 1), 1e-4, 1e4)
        z = clamp(round(-lo / s), 0, 2^b - 1)

    Departure from the paper / reference (``lo = min``, ``hi = max``, z unclamped): the range is
    widened to contain 0. For groups that contain both signs (nearly all LLM groups) this is the same
    formula. For a one-signed group the reference's ``z = round(-min / s)`` falls outside
    ``[0, qmax]``; once clamped (training and packing must clamp it) the grid would no longer cover the
    group: an all-positive group in ``[1, 2]`` at 4 bits would get the grid ``[0, 1]`` and clip every
    value to 1. With 0 included, an all-positive group gets ``z = 0`` and an all-negative one
    ``z = qmax``, and every value stays on the grid. The clamp of ``z`` then only matters when ``s``
    hits its bounds.

    Worked example (b = 2, qmax = 3, one group ``[-0.3, 0.0, 0.25, 0.6]``)::

        s = (0.6 - (-0.3)) / 3 = 0.3,   z = round(0.3 / 0.3) = 1
        q = clamp(round([-1, 0, 0.833, 2]) + 1, 0, 3) = [0, 1, 2, 3]
        Ŵ = (q - 1) * 0.3 = [-0.3, 0.0, 0.3, 0.6]        (error 0.05 <= s/2 on 0.25)

    Args:
        w: ``[out, in]`` weight, any float dtype; computed in float32.
        bits: 2, 3, 4 or 8.
        group_size: ``g`` (a divisor of ``in``) or -1.

    Returns:
        ``(scale, zero)``, each float32 ``[out, G]``, new tensors without gradient history;
        ``zero`` holds integers.
    """
    _check_weight(w)
    g = resolve_group_size(group_size, w.shape[1], bits)
    qmax = 2**bits - 1
    grouped = _grouped(w.detach().float(), g)
    lo = grouped.amin(dim=-1).clamp(max=0.0)
    hi = grouped.amax(dim=-1).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(SCALE_MIN, SCALE_MAX)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zero


def fake_quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Quantize and dequantize ``W`` in one differentiable step (the Block-AP training forward).

    Per group, with ``z_int = clamp_ste(round_ste(z), 0, qmax)`` and ``qmax = 2^b - 1``::

        q = clamp(round_ste(W / s) + z_int, 0, qmax)
        Ŵ = (q - z_int) * s

    Gradient rule (straight-through estimator, LSQ for the scale):
      - ``dŴ/dW = 1`` where ``round(W/s) + z_int`` lies in ``[0, qmax]``, and 0 where it is clipped;
      - ``dŴ/ds = (q - z_int) - W/s`` inside the range, ``q - z_int`` where clipped (LSQ);
      - ``dŴ/dz = 0`` inside the range and ``-s`` where clipped: the zero point only learns from
        clipped weights, as in the reference.
    ``s`` must be positive; it is not clamped here (``init_qparams`` bounds its initial value).

    The forward value equals ``dequantize(quantize(W, s, z, b, g), s, round_zero(z, b), g)`` bit for
    bit for float32 inputs (same operations in the same order).

    Memory: one autograd function that saves only its inputs (``W`` is the trained parameter, ``s`` and ``z``
    are small) and recomputes ``W/s``, the clip mask and ``q - z_int`` in backward, one layer at a time.
    Written as a chain of torch ops (``round_ste``/``clamp_ste``), autograd kept ``q - z_int`` and the clamp's
    input for every linear of the block until its backward: 8 bytes per weight, 6.8 GiB of a Llama-2-70B block's
    training peak. Same gradients (see the rule above; ``tests/quantizer/test_primitives.py``).

    Args:
        w: ``[out, in]`` weight, any float dtype (computed in float32).
        scale, zero: ``[out, G]`` float tensors (zero is a float, rounded straight-through).
        bits: 2, 3, 4 or 8.   group_size: ``g`` or -1.

    Returns:
        ``Ŵ``, ``[out, in]``, dtype of ``w``.
    """
    _check_weight(w)
    g = resolve_group_size(group_size, w.shape[1], bits)
    _check_qparams(w.shape, scale, zero, g)
    return _FakeQuant.apply(w, scale, zero, bits, g)


class _FakeQuant(torch.autograd.Function):
    """``fake_quant`` with a hand-written backward that recomputes instead of saving (see its docstring)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, g: int) -> torch.Tensor:
        ctx.save_for_backward(w, scale, zero)
        ctx.bits, ctx.g = bits, g
        s = scale.float().unsqueeze(-1)
        z_int = round_zero(zero, bits).unsqueeze(-1)
        q = torch.clamp(torch.round(_grouped(w.float(), g) / s) + z_int, 0, 2**bits - 1)
        return ((q - z_int) * s).reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w, scale, zero = ctx.saved_tensors
        qmax, g = 2**ctx.bits - 1, ctx.g
        s = scale.float().unsqueeze(-1)
        z_int = round_zero(zero, ctx.bits).unsqueeze(-1)
        go = _grouped(grad_out.float(), g)
        x = _grouped(w.float(), g) / s  # W/s
        qz = torch.round(x) + z_int  # round(W/s) + z_int, before the clamp
        inside = (qz >= 0) & (qz <= qmax)
        qz.clamp_(0, qmax).sub_(z_int)  # q - z_int
        # dŴ/ds summed over the group: (q - z_int) - W/s inside, (q - z_int) where clipped. In place, so that
        # only x, qz and the mask of the layer exist at once (planner: "fake-quant backward, largest linear").
        grad_s = qz.sub_(x.mul_(inside)).mul_(go).sum(-1)
        del x, qz
        grad_w = go * inside  # dŴ/dW: 1 inside, 0 where clipped
        # dŴ/dz summed over the group: -s where clipped, i.e. -s * (sum(go) - sum(go inside)).
        grad_z = (grad_w.sum(-1) - go.sum(-1)) * s.squeeze(-1)
        return (grad_w.reshape(w.shape).to(w.dtype) if ctx.needs_input_grad[0] else None,
                grad_s.to(scale.dtype) if ctx.needs_input_grad[1] else None,
                grad_z.to(zero.dtype) if ctx.needs_input_grad[2] else None, None, None)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes of ``W``: ``q = clamp(round(W / s) + round_zero(z), 0, 2^b - 1)``.

    No gradient. ``w`` ``[out, in]`` (any float dtype, computed in float32), ``scale``/``zero``
    ``[out, G]``. Returns torch.uint8 codes ``[out, in]`` in ``[0, 2^b - 1]``.
    """
    _check_weight(w)
    g = resolve_group_size(group_size, w.shape[1], bits)
    _check_qparams(w.shape, scale, zero, g)
    qmax = 2**bits - 1
    s = scale.detach().float().unsqueeze(-1)
    z_int = round_zero(zero, bits).unsqueeze(-1)
    q = torch.clamp(torch.round(_grouped(w.detach().float(), g) / s) + z_int, 0, qmax)
    return q.reshape(w.shape).to(torch.uint8)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``Ŵ = (q - z) * s`` per group, computed in float32 and returned as ``dtype``.

    ``zero`` is used as given: pass the integer zero point (``round_zero(zero, bits)``, or the values
    read back from a packed checkpoint). ``scale`` may be float16 (as stored in checkpoints); it is
    upcast exactly. No gradient flows to ``codes``; gradients do flow to ``scale`` if it requires them.

    Args:
        codes: ``[out, in]`` integer tensor (uint8 or wider).
        scale, zero: ``[out, G]``.   group_size: ``g`` or -1.

    Returns:
        ``[out, in]`` tensor of ``dtype``.
    """
    _check_weight(codes)
    g = _effective_group_size(group_size, codes.shape[1], "weight")
    _check_qparams(codes.shape, scale, zero, g)
    s = scale.float().unsqueeze(-1)
    z = zero.detach().float().unsqueeze(-1)
    w_hat = (_grouped(codes.float(), g) - z) * s
    return w_hat.reshape(codes.shape).to(dtype)


def _effective_group_size(group_size: int, in_features: int, name: str) -> int:
    if in_features <= 0:
        raise ValueError(f"in_features {in_features} of {name} must be positive")
    if group_size == -1:
        return in_features
    if group_size <= 0 or in_features % group_size != 0:
        raise ValueError(
            f"group size {group_size} does not divide in_features {in_features} of {name}; "
            f"choose a divisor of {in_features} or -1"
        )
    return group_size


def _grouped(x: torch.Tensor, g: int) -> torch.Tensor:
    """View ``[out, in]`` as ``[out, G, g]`` (consecutive input columns form a group)."""
    return x.reshape(x.shape[0], x.shape[1] // g, g)


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")


def _check_qparams(shape: torch.Size, scale: torch.Tensor, zero: torch.Tensor, g: int) -> None:
    expected = (shape[0], shape[1] // g)
    for label, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != expected:
            raise ValueError(
                f"{label} has shape {tuple(t.shape)}, expected [out, G] = {list(expected)} "
                f"for a [{shape[0]}, {shape[1]}] weight with group size {g}"
            )
