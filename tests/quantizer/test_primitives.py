import math

import pytest
import torch

from frugal_qat.quantizer.primitives import (
    clamp_ste,
    dequantize,
    fake_quant,
    init_qparams,
    quantize,
    resolve_group_size,
    round_ste,
    round_zero,
)

BITS = [2, 3, 4, 8]
GROUPS = [32, 64, 128, -1]
SEEDS = [0, 1, 2]
OUT, IN = 12, 256


def make_weight(seed: int, out: int = OUT, inp: int = IN) -> torch.Tensor:
    """Gaussian weight with a few outliers, as in LLM linears."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen) * 0.02
    outliers = torch.rand(out, inp, generator=gen) < 0.01
    return torch.where(outliers, w * 8, w)


def trained_qparams(w, bits, group_size, seed):
    """Min-max qparams moved as training would: scales shrunk or grown, zeros off the integers.

    Shrinking scales makes some weights clip, so both sides of the STE are exercised.
    """
    scale, zero = init_qparams(w, bits, group_size)
    gen = torch.Generator().manual_seed(seed + 100)
    scale = scale * (0.6 + 0.6 * torch.rand(scale.shape, generator=gen))
    zero = zero + torch.rand(zero.shape, generator=gen) * 2 - 1
    return scale, zero


def group_of(i: int, group_size: int) -> int:
    return 0 if group_size == -1 else i // group_size


def loop_fake_quant(w, scale, zero, bits, group_size):
    """Obviously-correct float64 reference: one element at a time."""
    qmax = 2**bits - 1
    out = torch.empty(w.shape, dtype=torch.float64)
    for o in range(w.shape[0]):
        for i in range(w.shape[1]):
            s = float(scale[o, group_of(i, group_size)])
            z = min(max(round(float(zero[o, group_of(i, group_size)])), 0), qmax)
            q = min(max(round(float(w[o, i]) / s) + z, 0), qmax)
            out[o, i] = (q - z) * s
    return out


# --- resolve_group_size -------------------------------------------------------------------------


def test_resolve_group_size_values():
    assert resolve_group_size(-1, 576, 4) == 576
    assert resolve_group_size(64, 576, 2) == 64
    assert resolve_group_size(576, 576, 8) == 576


def test_resolve_group_size_names_layer_and_numbers():
    with pytest.raises(ValueError) as err:
        resolve_group_size(128, 576, 4, "layers.3.mlp.down_proj")
    assert str(err.value) == (
        "group size 128 does not divide in_features 576 of layers.3.mlp.down_proj; choose a divisor of 576 or -1"
    )


@pytest.mark.parametrize("group_size", [0, -2, 1000, 100])
def test_resolve_group_size_rejects_non_divisors(group_size):
    with pytest.raises(ValueError, match=f"group size {group_size} does not divide in_features 576"):
        resolve_group_size(group_size, 576, 4, "q_proj")


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_resolve_group_size_rejects_bits(bits):
    with pytest.raises(ValueError, match=f"bits {bits} is not supported for q_proj; choose one of 2, 3, 4, 8"):
        resolve_group_size(64, 576, bits, "q_proj")


# --- straight-through helpers -------------------------------------------------------------------


def test_round_ste_forward_exact_and_gradient_one():
    x = torch.tensor([-2.5, -0.7, -0.5, 0.49, 0.5, 1.5, 3.2, 1e7 + 0.5, 2.0**24], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_clamp_ste_forward_exact_and_gradient_one():
    x = torch.tensor([-300.0, -1.0, 0.0, 7.0, 15.0, 16.0, 1e6], requires_grad=True)
    y = clamp_ste(x, 0, 15)
    assert torch.equal(y.detach(), torch.clamp(x.detach(), 0, 15))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_round_zero():
    z = torch.tensor([-3.2, -0.4, 0.5, 1.5, 2.6, 14.4, 15.6, 99.0])
    assert torch.equal(round_zero(z, 4), torch.tensor([0.0, 0.0, 0.0, 2.0, 3.0, 14.0, 15.0, 15.0]))
    assert round_zero(z, 4).dtype == torch.float32


# --- init_qparams -------------------------------------------------------------------------------


def test_init_docstring_example():
    w = torch.tensor([[-0.3, 0.0, 0.25, 0.6]])
    scale, zero = init_qparams(w, bits=2, group_size=-1)
    assert scale.item() == pytest.approx(0.3, rel=1e-6)
    assert zero.item() == 1.0
    assert quantize(w, scale, zero, 2, -1).tolist() == [[0, 1, 2, 3]]
    w_hat = fake_quant(w, scale, zero, 2, -1)
    assert torch.allclose(w_hat, torch.tensor([[-0.3, 0.0, 0.3, 0.6]]), atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_init_qparams_matches_loop(bits, group_size, seed):
    w = make_weight(seed)
    scale, zero = init_qparams(w, bits, group_size)
    g = IN if group_size == -1 else group_size
    qmax = 2**bits - 1
    assert scale.shape == zero.shape == (OUT, IN // g)
    assert scale.dtype == zero.dtype == torch.float32
    for o in range(OUT):
        for grp in range(IN // g):
            vals = w[o, grp * g : (grp + 1) * g].double().tolist()
            lo, hi = min(min(vals), 0.0), max(max(vals), 0.0)
            s = min(max((hi - lo) / qmax, 1e-4), 1e4)
            z = min(max(round(-lo / s), 0), qmax)
            assert scale[o, grp].item() == pytest.approx(s, rel=1e-6)
            assert zero[o, grp].item() == z


def test_init_qparams_does_not_track_gradients_or_modify_input():
    w = make_weight(0).requires_grad_()
    before = w.detach().clone()
    scale, zero = init_qparams(w, 4, 64)
    assert not scale.requires_grad and not zero.requires_grad
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("bits", BITS)
def test_one_signed_groups_zero_clamped_and_no_clipping_at_init(bits):
    qmax = 2**bits - 1
    w = torch.stack(
        [
            torch.linspace(1.0, 2.0, 64),  # all positive, far from 0
            torch.linspace(-3.0, -0.5, 64),  # all negative
            torch.full((64,), 0.7),  # constant positive
            torch.zeros(64),  # all zero
        ]
    )
    scale, zero = init_qparams(w, bits, 32)
    assert zero[0].tolist() == [0.0, 0.0]
    assert zero[1].tolist() == [qmax, qmax]
    assert ((zero >= 0) & (zero <= qmax)).all()
    w_hat = fake_quant(w, scale, zero, bits, 32)
    half_step = scale.repeat_interleave(32, dim=1) / 2
    assert ((w - w_hat).abs() <= half_step * (1 + 1e-5)).all()


# --- fake_quant ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_fake_quant_matches_float64_loop(bits, group_size, seed):
    w = make_weight(seed)
    scale, zero = trained_qparams(w, bits, group_size, seed)
    got = fake_quant(w, scale, zero, bits, group_size).double()
    ref = loop_fake_quant(w, scale, zero, bits, group_size)
    # w / s computed in fp32 may round the other way than in fp64 at an exact .5 tie: skip those.
    ratio = w.double() / scale.double().repeat_interleave(IN if group_size == -1 else group_size, dim=1)
    tie = (ratio - ratio.floor() - 0.5).abs() < 1e-4
    assert tie.float().mean() < 0.01
    close = (got - ref).abs() <= 1e-6 * ref.abs() + 1e-12
    assert (close | tie).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_codes_in_range_and_error_within_half_step(bits, group_size, seed):
    qmax = 2**bits - 1
    g = IN if group_size == -1 else group_size
    w = make_weight(seed)
    scale, zero = trained_qparams(w, bits, group_size, seed)
    codes = quantize(w, scale, zero, bits, group_size)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert int(codes.max()) <= qmax
    w_hat = fake_quant(w, scale, zero, bits, group_size)
    s = scale.repeat_interleave(g, dim=1)
    z = round_zero(zero, bits).repeat_interleave(g, dim=1)
    # Clipping range: the grid [(0 - z) s, (qmax - z) s] widened by half a step on each side.
    inside = (w >= (-z - 0.5) * s) & (w <= (qmax - z + 0.5) * s)
    assert inside.any() and (~inside).any()  # trained_qparams makes both cases occur
    err = (w - w_hat).abs()
    assert (err[inside] <= s[inside] / 2 * (1 + 1e-5)).all()
    # Clipped weights land on the end of the grid.
    assert torch.equal(w_hat[~inside], torch.where(w > 0, (qmax - z) * s, -z * s)[~inside])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_fake_quant_equals_dequantize_quantize_bit_for_bit(bits, group_size, seed):
    w = make_weight(seed)
    for scale, zero in (init_qparams(w, bits, group_size), trained_qparams(w, bits, group_size, seed)):
        codes = quantize(w, scale, zero, bits, group_size)
        w_hat = dequantize(codes, scale, round_zero(zero, bits), group_size)
        assert torch.equal(fake_quant(w, scale, zero, bits, group_size), w_hat)


def test_fake_quant_clamps_zero_like_round_zero():
    w = make_weight(3)
    scale, _ = init_qparams(w, 4, 64)
    for offset in (-7.3, 40.6):
        zero = torch.full(scale.shape, offset)
        clamped = round_zero(zero, 4)
        assert torch.equal(fake_quant(w, scale, zero, 4, 64), fake_quant(w, scale, clamped, 4, 64))
        assert torch.equal(quantize(w, scale, zero, 4, 64), quantize(w, scale, clamped, 4, 64))


def test_fake_quant_keeps_dtype_and_does_not_modify_inputs():
    w = make_weight(4)
    scale, zero = trained_qparams(w, 3, 32, 4)
    copies = [t.clone() for t in (w, scale, zero)]
    w16 = w.to(torch.bfloat16)
    out = fake_quant(w16, scale, zero, 3, 32)
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    assert torch.equal(out, fake_quant(w16.float(), scale, zero, 3, 32).to(torch.bfloat16))
    fake_quant(w, scale, zero, 3, 32)
    quantize(w, scale, zero, 3, 32)
    for t, c in zip((w, scale, zero), copies):
        assert torch.equal(t, c)


def test_shape_errors():
    w = make_weight(0)
    scale, zero = init_qparams(w, 4, 64)
    with pytest.raises(ValueError, match=r"scale has shape \(12, 2\), expected \[out, G\] = \[12, 4\]"):
        fake_quant(w, scale[:, :2], zero, 4, 64)
    with pytest.raises(ValueError, match="expected a 2-D"):
        fake_quant(w.flatten(), scale, zero, 4, 64)
    with pytest.raises(ValueError, match="does not divide in_features 256"):
        dequantize(quantize(w, scale, zero, 4, 64), scale, zero, 100)


# --- gradients ----------------------------------------------------------------------------------


def assert_group_sums_close(grad, terms, g, magnitude):
    """grad [out, G] == per-group sums of terms [out, in], up to fp32 rounding.

    ``magnitude`` [out, in] bounds the size of the fp32 quantities each term is computed from
    (the LSQ term (q - z) - W/s cancels two numbers up to qmax).
    """
    grouped = terms.double().reshape(grad.shape[0], -1, g).sum(-1)
    tol = 1e-6 * magnitude.double().abs().reshape(grad.shape[0], -1, g).sum(-1) + 1e-12
    assert ((grad.double() - grouped).abs() <= tol).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_ste_gradients(bits, group_size, seed):
    qmax = 2**bits - 1
    g = IN if group_size == -1 else group_size
    w0 = make_weight(seed)
    s0, z0 = trained_qparams(w0, bits, group_size, seed)
    w, scale, zero = (t.clone().requires_grad_() for t in (w0, s0, z0))
    upstream = torch.randn(w0.shape, generator=torch.Generator().manual_seed(seed + 7))
    (fake_quant(w, scale, zero, bits, group_size) * upstream).sum().backward()

    s = s0.repeat_interleave(g, dim=1)
    z = round_zero(z0, bits).repeat_interleave(g, dim=1)
    pre = torch.round(w0 / s) + z
    inside = (pre >= 0) & (pre <= qmax)
    assert inside.any() and (~inside).any()
    # d/dW: identity inside the range, zero where clipped.
    assert torch.allclose(w.grad[inside], upstream[inside], rtol=1e-5, atol=0)
    assert torch.equal(w.grad[~inside], torch.zeros_like(w.grad[~inside]))
    # d/ds (LSQ): (q - z) - W/s inside, (q - z) where clipped; summed over the group.
    q = pre.clamp(0, qmax)
    ds = torch.where(inside, (q - z) - w0 / s, q - z) * upstream
    assert_group_sums_close(scale.grad, ds, g, magnitude=((q - z).abs() + (w0 / s).abs()) * upstream)
    # d/dz (straight-through): 0 inside, -s where clipped.
    dz = torch.where(inside, torch.zeros_like(s), -s) * upstream
    assert_group_sums_close(zero.grad, dz, g, magnitude=s * upstream)
    assert scale.grad.abs().sum() > 0 and zero.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", BITS)
def test_optimizer_step_changes_scale_and_zero(bits):
    w = make_weight(5)
    s0, z0 = trained_qparams(w, bits, 64, 5)
    scale, zero = s0.clone().requires_grad_(), z0.clone().requires_grad_()
    opt = torch.optim.Adam([scale, zero], lr=1e-3)
    loss = (fake_quant(w, scale, zero, bits, 64) - w).pow(2).mean()
    loss.backward()
    assert scale.grad.abs().max() > 0 and zero.grad.abs().max() > 0
    opt.step()
    assert not torch.equal(scale.detach(), s0)
    assert not torch.equal(zero.detach(), z0)
    # A few more steps lower the reconstruction error: the gradients point the right way.
    for _ in range(20):
        opt.zero_grad()
        (fake_quant(w, scale, zero, bits, 64) - w).pow(2).mean().backward()
        opt.step()
    assert (fake_quant(w, scale, zero, bits, 64) - w).pow(2).mean() < loss
    assert math.isfinite(loss.item())


def test_fake_quant_saves_only_its_inputs_for_backward():
    # Autograd keeps nothing of the size of W beyond W itself: the backward recomputes W/s, the mask and q - z.
    # (A chain of torch ops kept 8 bytes per weight until the block's backward.)
    w0 = make_weight(0, out=64)
    s0, z0 = trained_qparams(w0, 3, 64, 0)
    w, scale, zero = (t.clone().requires_grad_() for t in (w0, s0, z0))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fake_quant(w, scale, zero, 3, 64)
    inputs = {t.data_ptr() for t in (w, scale, zero)}
    assert saved and all(t.data_ptr() in inputs for t in saved)
    out.sum().backward()
    assert w.grad is not None and scale.grad is not None and zero.grad is not None


def test_fake_quant_backward_skips_gradients_nobody_needs():
    w0 = make_weight(1)
    s0, z0 = trained_qparams(w0, 4, 64, 1)
    scale = s0.clone().requires_grad_()
    fake_quant(w0, scale, z0, 4, 64).sum().backward()  # W and z frozen: only the scale learns
    assert scale.grad is not None and scale.grad.abs().sum() > 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_fake_quant_backward_equals_autograd_through_the_ste_chain(bits, group_size, seed):
    # The docstring's formula written with round_ste/clamp_ste and differentiated by autograd is the reference
    # for the hand-written backward.
    w0 = make_weight(seed)
    s0, z0 = trained_qparams(w0, bits, group_size, seed)
    g = IN if group_size == -1 else group_size
    qmax = 2**bits - 1
    upstream = torch.randn(w0.shape, generator=torch.Generator().manual_seed(seed + 3))

    def chain(w, scale, zero):
        s = scale.unsqueeze(-1)
        z_int = clamp_ste(round_ste(zero), 0, qmax).unsqueeze(-1)
        q = torch.clamp(round_ste(w.reshape(OUT, -1, g) / s) + z_int, 0, qmax)
        return ((q - z_int) * s).reshape(w.shape)

    grads = []
    for f in (chain, lambda w, s, z: fake_quant(w, s, z, bits, group_size)):
        w, scale, zero = (t.clone().requires_grad_() for t in (w0, s0, z0))
        out = f(w, scale, zero)
        (out * upstream).sum().backward()
        grads.append((out.detach(), w.grad, scale.grad, zero.grad))
    (o1, gw1, gs1, gz1), (o2, gw2, gs2, gz2) = grads
    assert torch.equal(o1, o2)
    assert torch.equal(gw1 == 0, gw2 == 0)  # the same weights are clipped
    assert torch.allclose(gw1, gw2, rtol=1e-6, atol=0)  # the chain computes upstream / s * s, one rounding off
    # scale/zero gradients are group sums whose terms cancel (LSQ: (q - z) - W/s): compare against their size
    s = s0.repeat_interleave(g, dim=1)
    size_s = (upstream.abs() * (qmax + (w0 / s).abs())).reshape(OUT, -1, g).sum(-1)
    size_z = (upstream.abs() * s).reshape(OUT, -1, g).sum(-1)
    assert ((gs1 - gs2).abs() <= 1e-6 * size_s).all()
    assert ((gz1 - gz2).abs() <= 1e-6 * size_z).all()
