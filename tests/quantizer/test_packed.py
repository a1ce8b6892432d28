"""The packed linear layer's tiled torch path (the oracle): forward, custom backward, memory, chooser, module API."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from frugal_qat.quantizer import kernel_configs as kc
from frugal_qat.quantizer import packed
from frugal_qat.quantizer.packed import PackedLinear, choose_backend, packed_linear, packed_matmul_transients
from frugal_qat.quantizer.packing import pack_linear, pack_rows, unpack_rows
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


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("count", (32, 100, 7))
def test_unpack_codes_equals_unpack_rows(bits, count):
    """The matmul path's int32 unpack against the reference, on a column slice and on a transposed view."""
    codes = torch.randint(0, 2**bits, (count, 45), dtype=torch.uint8)
    words = pack_rows(codes, bits)
    wide = torch.cat([torch.zeros_like(words), words, torch.zeros_like(words)], 1)[:, 45:90]  # strided columns
    got = packed.unpack_codes(wide, bits, count)
    assert got.dtype == torch.int32 and torch.equal(got, unpack_rows(words, bits, count).to(torch.int32))
    got_t = packed.unpack_codes(words.t().contiguous().t(), bits, count)
    assert torch.equal(got_t, codes.to(torch.int32))


def test_forward_tiles_columns_and_backward_tiles_rows(monkeypatch):
    """Forward: complete matmuls over all K rows into column slices of y; backward: row tiles of W for dL/dx."""
    tensors, codes, scale, zero = make_packed(96, 256, 4, 64)
    calls = []
    real_mm = torch.mm

    def spy(a, b, *, out=None):
        calls.append((tuple(a.shape), tuple(b.shape), out is not None))
        return real_mm(a, b, out=out)

    monkeypatch.setattr(torch, "mm", spy)
    x = torch.randn(5, 256, requires_grad=True)
    scales = tensors["scales"].float().requires_grad_()
    y = packed_linear(x, tensors["qweight"], tensors["qzeros"], scales, 4, 64, tile_rows=64, backend="torch")
    # 64 rows' worth of weights = 64 * 96 / 256 = 24 columns, rounded to 32: three column tiles of all 256 rows.
    assert calls == [((5, 256), (256, 32), True)] * 3
    calls.clear()
    y.backward(torch.ones_like(y))
    assert calls == [((5, 96), (96, 64), True)] * 4  # dL/dx: 4 row tiles of W^T (dL/dW goes through @)
    torch.testing.assert_close(y, x.detach() @ dequantize(codes, scale, zero, 64).t(), rtol=1e-5, atol=1e-5)


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage allocated inside the mode and still alive, and their peak. Allocations inside an op's
    kernel (below the dispatcher) are not seen."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = set()

    def _free(self, ptr, nbytes):
        self.storages.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if nbytes and ptr not in inputs and ptr not in self.storages:  # a new allocation, not a view
                self.storages.add(ptr)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, ptr, nbytes)
        return out


def test_transients_bound_the_measured_cpu_peaks():
    """packed_matmul_transients (CPU, default tiles) against the live bytes of a real forward and backward."""
    K, N, M = 1024, 768, 64
    tensors, *_ = make_packed(N, K, 2, 32)
    x = torch.randn(M, K, requires_grad=True)
    scales = tensors["scales"].float().requires_grad_()
    predicted = packed_matmul_transients(K, N, M, 4, "cpu")
    with LiveBytes() as mem:
        y = packed_linear(x, tensors["qweight"], tensors["qzeros"], scales, 2, 32)
        forward = mem.peak - y.numel() * 4
        grad_y = torch.ones_like(y)
        start = mem.peak = mem.live
        y.backward(grad_y)
        backward = mem.peak - start - (M * K + scales.numel()) * 4  # less dL/dx and dL/ds
    assert 0.9 * predicted["forward"] <= forward <= predicted["forward"], (forward, predicted)
    assert 0.9 * predicted["backward"] <= backward <= predicted["backward"], (backward, predicted)


def test_transients_of_the_70b_layers_on_cuda():
    """E2E-QP's micro-batch (16384 tokens, bf16): each layer is dequantized whole, once (one bf16 tile at a time);
    generation-sized calls only hold the fused kernels' fp32 partial sums."""
    for K, N in ((8192, 8192), (8192, 1024), (8192, 28672), (28672, 8192)):
        assert packed_matmul_transients(K, N, 16384, 2, "cuda") == {"forward": 2 * K * N, "backward": 2 * K * N}
    small = packed_matmul_transients(28672, 8192, 16, 2, "cuda")
    split = kc.plan_matmul(16, 8192, 28672).split
    assert small["forward"] == 4 * (split + 1) * 16 * 8192 and small["backward"] < 28672 * 8192 // 2
    # The CPU path keeps 512-row tiles, as the planner's CPU terms assume (8 bytes per tile weight, plus zeros).
    cpu = packed_matmul_transients(28672, 8192, 16384, 4, "cpu")
    assert 8 * 512 * 8192 <= cpu["backward"] <= 9 * 512 * 8192 + 16384 * 512 * 4


def test_chooser_picks_by_shape():
    bf16 = torch.bfloat16
    assert choose_backend(1, "cuda", bf16, 64, has_triton=True) == "triton"
    assert choose_backend(packed.FUSED_MAX_TOKENS, "cuda", bf16, 128, has_triton=True) == "triton"
    assert choose_backend(packed.FUSED_MAX_TOKENS + 1, "cuda", bf16, 64, has_triton=True) == "torch"
    assert choose_backend(16384, "cuda", bf16, 64, has_triton=True) == "torch"
    assert choose_backend(1, "cpu", bf16, 64, has_triton=True) == "torch"
    assert choose_backend(1, "cuda", bf16, 64, has_triton=False) == "torch"
    assert choose_backend(1, "cuda", torch.float16, 64, has_triton=True) == "torch"  # binaries are bf16 only
    assert choose_backend(1, "cuda", torch.float32, 64, has_triton=True) == "torch"
    assert choose_backend(1, "cuda", bf16, 20, has_triton=True) == "torch"  # the fused K step is 32 rows


def test_tiled_path_runs_at_70b_token_counts_on_meta():
    """x of 80000 x 28672 (more than 2^31 elements): the tiled path's index arithmetic is Python / torch (64-bit),
    so the forward and backward run on meta tensors with the right shapes."""
    K, N, bits, g = 28672, 8192, 2, 64
    meta = dict(device="meta")
    qweight = torch.empty(K * bits // 32, N, dtype=torch.int32, **meta)
    qzeros = torch.empty(K // g, N * bits // 32, dtype=torch.int32, **meta)
    scales = torch.empty(K // g, N, **meta, requires_grad=True)
    x = torch.empty(80000, K, dtype=torch.bfloat16, **meta, requires_grad=True)
    assert x.numel() > 2**31
    y = packed_linear(x, qweight, qzeros, scales, bits, g, tile_rows=8192)
    assert y.shape == (80000, N) and y.dtype == torch.bfloat16
    gx, gs = torch.autograd.grad(y.sum(), (x, scales))
    assert gx.shape == x.shape and gs.shape == scales.shape and gs.dtype == torch.float32


def test_rejects_triton_backend_for_inputs_the_kernels_do_not_take():
    tensors, *_ = make_packed(16, 64, 4, 32)
    with pytest.raises(ValueError, match="bfloat16"):
        packed_linear(torch.randn(2, 64), tensors["qweight"], tensors["qzeros"], tensors["scales"], 4, 32,
                      backend="triton")
    tensors, *_ = make_packed(16, 80, 4, 20)
    with pytest.raises(ValueError, match="multiples of 32"):
        packed_linear(torch.randn(2, 80).bfloat16(), tensors["qweight"], tensors["qzeros"], tensors["scales"], 4,
                      20, backend="triton")
