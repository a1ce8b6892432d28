"""The packed linear layer's torch path (the oracle): forward, custom backward, memory structure, module API."""

import pytest
import torch

from frugal_qat.quantizer.packed import PackedLinear, packed_linear
from frugal_qat.quantizer.packing import pack_linear
from frugal_qat.quantizer.primitives import dequantize

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, -1)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def make_packed(out_features, in_features, bits, group_size, seed=0):
    """Random codes / fp16-exact scales / integer zeros, packed; also returns them unpacked ([out, in], [out, G])."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == -1 else in_features // group_size
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(out_features, n_groups, generator=gen) * 0.05 + 0.005).half().float()
    zero = torch.randint(0, 2**bits, (out_features, n_groups), generator=gen).float()
    return pack_linear(codes, scale, zero, bits, group_size), codes, scale, zero


def dense_from(codes, zero, scales, group_size):
    """Differentiable ``W(s)[in, out] = (q - z) * s`` in scales' dtype, from ``codes``/``zero`` [out, in]/[out, G]."""
    g = codes.shape[1] if group_size == -1 else group_size
    q_minus_z = codes.t().to(scales.dtype) - zero.t().to(scales.dtype).repeat_interleave(g, 0)
    return q_minus_z * scales.repeat_interleave(g, 0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_forward_matches_dense_dequantize(bits, group_size):
    # in_features 192 with tiles of 128 rows: a full tile, then a ragged one of 64.
    tensors, codes, scale, zero = make_packed(40, 192, bits, group_size)
    x = torch.randn(2, 5, 192)
    y = packed_linear(x, tensors["qweight"], tensors["qzeros"], tensors["scales"].float(), bits, group_size,
                      tile_rows=128, backend="torch")
    expected = x @ dequantize(codes, scale, zero, group_size).t()
    assert y.shape == (2, 5, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", (32, 64, 128, -1, 20))
def test_backward_matches_autograd_through_dense_weight(bits, group_size):
    # Tiles of 64 rows: several groups per tile (32), one (64), a group cut into tiles (128; -1 over 160 rows, the
    # last tile ragged), and a group size that forces a larger word-aligned tile (20 -> lcm(20, 32) = 160).
    in_features = 256 if group_size in (64, 128) else 160
    tensors, codes, _, zero = make_packed(24, in_features, bits, group_size, seed=bits)
    scales = tensors["scales"].double().requires_grad_()
    x = torch.randn(7, in_features, dtype=torch.float64, requires_grad=True)
    target = torch.randn(7, 24, dtype=torch.float64)

    loss = ((packed_linear(x, tensors["qweight"], tensors["qzeros"], scales, bits, group_size, tile_rows=64,
                           backend="torch") - target) ** 2).sum()
    gx, gs = torch.autograd.grad(loss, (x, scales))

    ref_loss = ((x @ dense_from(codes, zero, scales, group_size) - target) ** 2).sum()
    ref_gx, ref_gs = torch.autograd.grad(ref_loss, (x, scales))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gs, ref_gs, rtol=1e-10, atol=1e-12)
    assert gs.abs().min() > 0  # every group of every column receives a gradient


@pytest.mark.parametrize("bits", (3, 4))
def test_gradcheck_x_and_scales(bits):
    tensors, *_ = make_packed(8, 96, bits, 32, seed=1)
    x = torch.randn(2, 96, dtype=torch.float64, requires_grad=True)
    scales = tensors["scales"].double().requires_grad_()

    def f(x, scales):
        return packed_linear(x, tensors["qweight"], tensors["qzeros"], scales, bits, 32, tile_rows=64,
                             backend="torch")

    assert torch.autograd.gradcheck(f, (x, scales), fast_mode=True)


def test_only_requested_gradients_are_computed():
    tensors, codes, _, zero = make_packed(16, 64, 2, 32)
    scales = tensors["scales"].float().requires_grad_()
    x = torch.randn(4, 64, requires_grad=True)
    args = (tensors["qweight"], tensors["qzeros"])
    (gs,) = torch.autograd.grad(packed_linear(x.detach(), *args, scales, 2, 32).sum(), (scales,))
    (gx,) = torch.autograd.grad(packed_linear(x, *args, scales.detach(), 2, 32).sum(), (x,))
    w = dense_from(codes, zero, scales.detach(), 32)
    torch.testing.assert_close(gx, torch.ones(4, 16) @ w.t())
    assert gs.shape == scales.shape and gs.dtype == torch.float32 and gs.abs().sum() > 0


def test_backward_saves_no_dense_weight():
    """Structural memory check: backward keeps x, the packed integers and the scales, nothing of size [in, out]."""
    in_features, out_features = 256, 96
    tensors, *_ = make_packed(out_features, in_features, 2, 64)
    scales = tensors["scales"].float().requires_grad_()
    x = torch.randn(3, in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = packed_linear(x, tensors["qweight"], tensors["qzeros"], scales, 2, 64, backend="torch")
    allowed = {x.data_ptr(), tensors["qweight"].data_ptr(), tensors["qzeros"].data_ptr(), scales.data_ptr()}
    assert saved and {t.data_ptr() for t in saved} <= allowed
    assert sum(t.numel() * t.element_size() for t in saved) < in_features * out_features  # < 1 byte per weight
    y.sum().backward()
    assert x.grad is not None and scales.grad is not None


def test_bias_is_added_and_gets_no_gradient():
    tensors, codes, scale, zero = make_packed(16, 64, 4, -1)
    bias = torch.randn(16).half()
    layer = PackedLinear.from_packed({**tensors, "bias": bias}, 4, -1, 64, 16, backend="torch")
    x = torch.randn(5, 64)
    expected = x @ dequantize(codes, scale, zero, -1).t() + bias.float()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert [name for name, p in layer.named_parameters()] == ["scales"]
    assert not layer.bias.requires_grad and layer.bias.dtype == torch.float16


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_16bit_inputs_compute_in_fp32_on_cpu(dtype):
    tensors, codes, scale, zero = make_packed(24, 128, 3, 64)
    x = torch.randn(6, 128).to(dtype)
    y = packed_linear(x, tensors["qweight"], tensors["qzeros"], tensors["scales"].float(), 3, 64)
    assert y.dtype == dtype
    expected = (x.float() @ dequantize(codes, scale, zero, 64).t()).to(dtype)
    torch.testing.assert_close(y, expected)  # fp32 maths, one rounding at the end (dtype's default tolerance)


def test_autocast_casts_input_like_linear():
    tensors, codes, scale, zero = make_packed(16, 64, 4, 32)
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = packed_linear(x, tensors["qweight"], tensors["qzeros"], tensors["scales"].float(), 4, 32)
    assert y.dtype == torch.bfloat16
    expected = x.bfloat16().float() @ dequantize(codes, scale, zero, 32).t()
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)


def test_optimizer_step_on_scales_lowers_regression_loss():
    tensors, codes, scale, zero = make_packed(32, 128, 2, 32)
    x = torch.randn(64, 128)
    target = x @ dequantize(codes, scale, zero, 32).t()
    start = {**tensors, "scales": (tensors["scales"].float() * (1 + 0.3 * torch.rand(4, 32))).half()}
    layer = PackedLinear.from_packed(start, 2, 32, 128, 32, tile_rows=64)
    qweight_before = layer.qweight.clone()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert torch.equal(layer.qweight, qweight_before)
    assert layer.scales.dtype == torch.float32


def test_from_packed_to_packed_round_trip_and_meta_construction():
    tensors, *_ = make_packed(40, 96, 3, 32)
    layer = PackedLinear.from_packed(tensors, 3, 32, 96, 40)
    out = layer.to_packed()
    assert set(out) == {"qweight", "qzeros", "scales", "g_idx"}
    for key in out:
        assert out[key].dtype == tensors[key].dtype and torch.equal(out[key], tensors[key]), key
    assert out["qweight"].data_ptr() == tensors["qweight"].data_ptr()  # integers are wrapped, not copied

    empty = PackedLinear(96, 40, 3, 32, device="meta")
    assert {k: tuple(v.shape) for k, v in empty.state_dict().items()} == {
        k: tuple(v.shape) for k, v in layer.state_dict().items()
    }
    per_row = PackedLinear(96, 40, 3, -1)
    assert per_row.group_size == 96 and per_row.scales.shape == (1, 40)


def test_from_packed_rejects_bad_tensors():
    tensors, *_ = make_packed(16, 64, 4, 32)
    with pytest.raises(ValueError, match="g_idx"):
        PackedLinear.from_packed({**tensors, "g_idx": tensors["g_idx"].flip(0)}, 4, 32, 64, 16)
    with pytest.raises(ValueError, match="qzeros has shape"):
        PackedLinear.from_packed(tensors, 4, 16, 64, 16)
    with pytest.raises(ValueError, match="missing 'qzeros'"):
        PackedLinear.from_packed({"qweight": tensors["qweight"], "scales": tensors["scales"]}, 4, 32, 64, 16)
    with pytest.raises(ValueError, match="does not divide"):
        PackedLinear(100, 16, 4, 32)
    with pytest.raises(ValueError, match="tile_rows"):
        PackedLinear(64, 16, 4, 32, tile_rows=48)
    with pytest.raises(ValueError, match="backend"):
        packed_linear(torch.randn(2, 64), tensors["qweight"], tensors["qzeros"], tensors["scales"], 4, 32,
                      backend="cuda")
