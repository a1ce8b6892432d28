"""ggml grids (frugal_qat.quantizer.kquant): exact against gguf-py's dequantizer, STE gradients, init quality,
the legacy mapping of plain runs, and the two layers (Block-AP, E2E-QP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from frugal_qat.quantizer import dequantize as dequantize_plain
from frugal_qat.quantizer import init_qparams
from frugal_qat.quantizer import kquant as K
from frugal_qat.quantizer import quantize as quantize_plain

gguf = pytest.importorskip("gguf")

ALL = list(K.TYPES)


def _weight(out=8, n_in=512, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * scale
    w[0, :40] = 0.0  # a zero run: sub-blocks with A = 0 or tiny ranges
    w[1, :16] = torch.rand(16, generator=g) * 0.1  # an all-positive sub-block
    w[-1] *= 5  # a row far larger than the others
    return w


def _random_grid(t: K.GGMLType, out: int, n_in: int, seed: int) -> tuple[torch.Tensor, K.Grid]:
    """Arbitrary codes and levels over each type's whole range, with float16 d of both signs (legacy)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(t.cmin, t.cmax + 1, (out, n_in), generator=g).to(torch.int8)
    nb, ns = n_in // t.block, n_in // t.sub
    d = (torch.randn(out, nb, generator=g) * 0.01).half().float()
    grid = K.Grid(d=d if not t.two_level else d.abs())
    if t.two_level:
        grid.k = torch.randint(t.kmin, t.kmax + 1, (out, ns), generator=g).to(torch.int16)
    if t.has_min:
        dmin = (torch.randn(out, nb, generator=g) * 0.01).half().float()
        grid.dmin = dmin.abs() if t.two_level else dmin
        if t.two_level:
            grid.m = torch.randint(0, t.mmax + 1, (out, ns), generator=g).to(torch.int16)
    return codes, grid


def _gguf_dequantize(blocks: torch.Tensor, t: K.GGMLType) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(t.ggml_id)))


# ---- bytes: exact against gguf-py -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("seed", [0, 1])
def test_pack_decodes_in_gguf_py_exactly(name, seed):
    t = K.TYPES[name]
    codes, grid = _random_grid(t, 6, 512, seed)
    blocks = K.pack(codes, grid, t)
    assert blocks.dtype == torch.uint8 and blocks.shape == (6, K.row_bytes(t, 512))
    assert blocks.shape[1] == 512 // gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ggml_id)][0] * t.type_size
    ours = K.dequantize(blocks, t, 512)
    theirs = _gguf_dequantize(blocks, t)
    assert torch.equal(ours, theirs)  # bit for bit, every type, every field of the block
    a, b = K.grid_scales(t, grid)
    assert torch.equal(K.dequantize_codes(codes, a, b, t), theirs)
    codes2, grid2 = K.unpack(blocks, t, 512)
    assert torch.equal(codes2, codes)
    assert torch.equal(grid2.d, grid.d)
    for f in ("k", "dmin", "m"):
        if getattr(grid, f) is not None:
            assert torch.equal(getattr(grid2, f).float(), getattr(grid, f).float())


def test_legacy_packing_matches_gguf_py_quantizer():
    """For q4_0/q5_0/q8_0 gguf-py also quantizes; our packing of its own codes and scales gives its bytes."""
    w = _weight(4, 256)
    for name in ("q4_0", "q5_0", "q8_0", "q4_1"):
        t = K.TYPES[name]
        theirs = torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType(t.ggml_id)))
        codes, grid = K.unpack(theirs, t, 256)
        assert torch.equal(K.pack(codes, grid, t), theirs)


def test_pack_refuses_out_of_range():
    t = K.TYPES["q4_k"]
    codes, grid = _random_grid(t, 2, 256, 0)
    with pytest.raises(ValueError, match="codes range"):
        K.pack(codes.clamp(max=7) + 9, grid, t)
    grid.k[0, 0] = 64
    with pytest.raises(ValueError, match="sub-block k"):
        K.pack(codes, grid, t)
    grid.k[0, 0] = 1
    grid.d = grid.d + 1e-7
    with pytest.raises(ValueError, match="not float16"):
        K.pack(codes, grid, t)


# ---- init, fake quant, gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_fake_quant_equals_packed_blocks_decoded_by_gguf_py(name):
    t = K.TYPES[name]
    w = _weight()
    grid = K.init_grid(w, t)
    a, b = K.grid_scales(t, grid)
    w_hat = K.fake_quant(w, a, b, t)
    blocks = K.pack(K.quantize(w, a, b, t), grid, t)
    assert torch.equal(w_hat, _gguf_dequantize(blocks, t))
    # through the trainable parameters too: params_from_grid -> scales_from_params reproduces the grid exactly
    p = K.params_from_grid(t, grid)
    a2, b2 = K.scales_from_params(t, p)
    assert torch.equal(a2, a) and (b is None or torch.equal(b2, b))
    assert torch.equal(K.fake_quant(w, a2, b2, t), w_hat)


def _naive_grid(w: torch.Tensor, t: K.GGMLType) -> K.Grid:
    """The baseline an init must beat: min-max per sub-block (k-quants: levels rounded to the max's grid)."""
    xs = w.reshape(w.shape[0], -1, t.sub)
    if t.has_min:
        lo = xs.amin(-1).clamp(max=0) if t.two_level else xs.amin(-1)
        a, b = (xs.amax(-1) - lo) / t.cmax, -lo
    else:
        e = xs.gather(-1, xs.abs().argmax(-1, keepdim=True)).squeeze(-1)
        a, b = -e / -t.cmin, None
    if not t.two_level:
        return K.Grid(d=a.half().float(), dmin=None if b is None else b.half().float())
    per = t.block // t.sub
    d = (a.abs().reshape(w.shape[0], -1, per).amax(-1) / t.scale_levels).half().float()
    k = torch.round(a / d.repeat_interleave(per, 1)).clamp(t.kmin, t.kmax)
    grid = K.Grid(d=d, k=k)
    if t.has_min:
        grid.dmin = (b.reshape(w.shape[0], -1, per).amax(-1) / t.mmax).half().float()
        grid.m = torch.round(b / grid.dmin.repeat_interleave(per, 1)).clamp(0, t.mmax)
    return grid


# relative RMS error of the init on Gaussian weights: measured 0.070 / 0.144 / 0.264 (q4_k / q3_k / q2_k)
INIT_BOUND = {"q4_0": 0.09, "q4_1": 0.08, "q5_0": 0.045, "q8_0": 0.006, "q4_k": 0.08, "q3_k": 0.16, "q2_k": 0.29}


@pytest.mark.parametrize("name", ALL)
def test_init_beats_min_max_and_meets_its_error_bound(name):
    t = K.TYPES[name]
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(3)) * 0.02

    def rel_err(grid):
        a, b = K.grid_scales(t, grid)
        return float(((K.fake_quant(w, a, b, t) - w).square().mean() / w.square().mean()).sqrt())

    ours, naive = rel_err(K.init_grid(w, t)), rel_err(_naive_grid(w, t))
    assert ours < naive
    assert ours < INIT_BOUND[name]


@pytest.mark.parametrize("name", ["q4_k", "q3_k", "q2_k", "q4_1", "q4_0"])
def test_ste_gradients_follow_the_rule(name):
    t = K.TYPES[name]
    w = _weight(4, 256).requires_grad_(True)
    grid = K.init_grid(w.detach(), t)
    a, b = K.grid_scales(t, grid)
    a = (a * 0.7).requires_grad_(True)  # a tighter grid, so that some weights clip
    b = None if b is None else b.clone().requires_grad_(True)
    g_out = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    K.fake_quant(w, a, b, t).backward(g_out)
    # the rule, computed by hand in float64
    xs = w.detach().double().reshape(4, -1, t.sub)
    x = (xs + (0 if b is None else b.detach().double().unsqueeze(-1))) / a.detach().double().unsqueeze(-1)
    x = torch.nan_to_num(x, nan=0.0, posinf=t.cmax + 1.0, neginf=t.cmin - 1.0)  # A = 0 (an all-zero sub-block)
    r = torch.round(x)
    inside = (r >= t.cmin) & (r <= t.cmax)
    c = r.clamp(t.cmin, t.cmax)
    go = g_out.double().reshape(4, -1, t.sub)
    assert 0 < int(inside.sum()) < inside.numel()  # both cases occur
    assert torch.equal(w.grad, (go * inside).reshape(w.shape).float())  # 1 inside, 0 where clipped
    assert torch.allclose(a.grad.double(), (go * torch.where(inside, c - x, c)).sum(-1), rtol=1e-4, atol=1e-4)
    if b is not None:
        assert torch.allclose(b.grad.double(), -(go * ~inside).sum(-1), atol=1e-6)


@pytest.mark.parametrize("name", ["q4_k", "q3_k", "q2_k"])
def test_two_level_parameters_get_gradients_and_move_one_level(name):
    t = K.TYPES[name]
    w = _weight(4, 256)
    p = {k: v.clone().requires_grad_(k not in K.BUFFERS) for k, v in K.params_from_grid(t, K.init_grid(w, t)).items()}
    a, b = K.scales_from_params(t, p)
    (K.fake_quant(w, a, b, t) * torch.randn(w.shape)).sum().backward()
    for key in K.param_shapes(t, 4, 256):
        if key in K.BUFFERS:
            continue
        assert p[key].grad is not None and p[key].grad.abs().sum() > 0, key
    # super-block scale: dA/dD = k / L exactly (d is a gain over its sub-blocks)
    p2 = {k: v.detach().clone().requires_grad_(k == "super_scale") for k, v in p.items()}
    a2, _ = K.scales_from_params(t, p2)
    a2.sum().backward()
    k = K.grid_from_params(t, p2).k.float()
    per = t.block // t.sub
    assert torch.allclose(p2["super_scale"].grad, k.reshape(4, -1, per).sum(-1) / t.scale_levels)
    # a sub-block scale nudged past half a unit moves its integer level by exactly one
    with torch.no_grad():
        p2["scale"][0, 1] += 0.6 * p2["scale_unit"][0, 0]
    k2 = K.grid_from_params(t, p2).k
    assert int(k2[0, 1]) == min(int(k[0, 1]) + 1, t.kmax) and torch.equal(k2[1:], k[1:].to(k2.dtype))


def test_clamped_level_has_zero_gradient_and_projection_brings_it_back():
    t = K.TYPES["q4_k"]
    p = {k: v.clone() for k, v in K.params_from_grid(t, K.init_grid(_weight(2, 256), t)).items()}
    p["scale"][0, 0] = 80 * p["scale_unit"][0, 0]  # beyond k = 63
    p["zero"][0, 1] = -5.0  # below m = 0
    p["super_scale"][1, 0] = -1.0
    q = {k: v.clone().requires_grad_(k not in K.BUFFERS) for k, v in p.items()}
    a, b = K.scales_from_params(t, q)
    (a.sum() + b.sum()).backward()
    assert q["scale"].grad[0, 0] == 0 and q["zero"].grad[0, 1] == 0
    K.project_params_(t, p)
    assert p["scale"][0, 0] == 63 * p["scale_unit"][0, 0] and p["zero"][0, 1] == 0
    assert p["super_scale"][1, 0] > 0


def test_zero_scale_sub_block_decodes_to_minus_b_and_can_grow():
    t = K.TYPES["q4_k"]
    w = _weight(2, 256)
    grid = K.init_grid(w, t)
    grid.k[0, 3] = 0
    a, b = K.grid_scales(t, grid)
    a = a.requires_grad_(True)
    out = K.fake_quant(w, a, b, t)
    assert torch.equal(out[0, 96:128], (-b[0, 3]).expand(32))
    out[0, 96:128].sum().backward()
    assert a.grad[0, 3] != 0


# ---- the legacy mapping of a plain run -------------------------------------------------------------------------


@pytest.mark.parametrize("bits,expected", [(2, "q4_0"), (3, "q4_0"), (4, "q5_0"), (8, "q8_0")])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_plain_run_maps_to_exact_legacy_type(bits, expected, group_size):
    w = _weight(8, 256) if bits != 8 else _weight(8, 256).clamp(-0.02, 0.02)
    scale, zero = init_qparams(w, bits, group_size)
    scale = scale.half().float()
    if bits == 8:  # an 8-bit grid fits q8_0 when q - z stays in [-128, 127]: centre the zero points
        zero = torch.full_like(zero, 128.0)
    codes = quantize_plain(w, scale, zero, bits, group_size)
    assert K.legacy_type_for(bits, group_size, 256) == expected
    name, c, grid = K.legacy_from_gptq(codes, scale, zero, bits, group_size)
    t = K.TYPES[name]
    blocks = K.pack(c, grid, t)
    assert torch.equal(_gguf_dequantize(blocks, t), dequantize_plain(codes, scale, zero, group_size))


def test_plain_run_refusals_name_the_reason():
    with pytest.raises(K.GridRefused, match="group size 48 .* not a multiple of 32"):
        K.legacy_type_for(4, 48, 96)
    with pytest.raises(K.GridRefused, match="group size 80 .*in_features 80"):
        K.legacy_type_for(4, -1, 80)
    w = _weight(4, 64)
    scale, zero = init_qparams(w, 8, 32)
    codes = quantize_plain(w, scale.half().float(), zero, 8, 32)
    with pytest.raises(K.GridRefused, match=r"q - z outside \[-128, 127\].*--gguf q8_0"):
        K.legacy_from_gptq(codes, scale.half().float(), zero, 8, 32, name="layers.0.mlp.up_proj")


def test_layer_type_falls_back_per_tensor():
    assert K.layer_type("q4_k", 512) == "q4_k"
    assert K.layer_type("q4_k", 576) == "q4_1"  # SmolLM2's hidden size: not a multiple of 256
    assert K.layer_type("q2_k", 576) == "q4_0" and K.layer_type("q3_k", 576) == "q4_0"
    assert K.layer_type("q4_0", 576) == "q4_0"
    with pytest.raises(ValueError, match="not a multiple of 32"):
        K.layer_type("q4_k", 100)
    with pytest.raises(ValueError, match="choose one of"):
        K.ggml_type("q6_k")


# ---- the layers ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q4_k", "q3_k", "q2_k", "q4_1", "q8_0"])
def test_quant_linear_trains_freezes_and_packs_exactly(name):
    lin = nn.Linear(256, 16, bias=True)
    layer = K.GGUFQuantLinear.from_linear(lin, name, name="layers.0.mlp.up_proj")
    assert layer.gguf_type == name
    names = {id(p) for p in layer.parameters()}
    assert names == {id(p) for p in layer.weight_parameters() + layer.quant_parameters()}
    before = {k: v.detach().clone() for k, v in layer.named_parameters()}
    opt = torch.optim.AdamW([{"params": layer.weight_parameters(), "lr": 1e-3},
                             {"params": layer.quant_parameters(), "lr": 1e-3}], weight_decay=0.0)
    x = torch.randn(32, 256)
    for _ in range(3):
        opt.zero_grad()
        (layer(x) - lin(x).detach()).square().mean().backward()
        opt.step()
        layer.project_()
    for k, v in layer.named_parameters():
        assert not torch.equal(v, before[k]), f"{k} did not move"
    y_before = layer(x).detach()
    layer.freeze_()
    y_frozen = layer(x)
    assert torch.allclose(y_frozen, y_before, atol=1e-3)
    packed = layer.pack()
    t = K.TYPES[name]
    w = _gguf_dequantize(packed["ggml"], t)
    assert torch.equal(w, layer.weight)  # the file holds exactly the frozen layer
    assert torch.equal(torch.nn.functional.linear(x, w, packed["bias"].float()), y_frozen)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.freeze_()  # idempotent
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())


def test_quant_linear_pack_guards():
    layer = K.GGUFQuantLinear.from_linear(nn.Linear(256, 4), "q4_k")
    with pytest.raises(ValueError, match="frozen"):
        layer.pack()
    layer.freeze_()
    with torch.no_grad():
        layer.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="changed after freeze_"):
        layer.pack()


def test_quant_linear_falls_back_on_narrow_rows():
    layer = K.GGUFQuantLinear.from_linear(nn.Linear(96, 8), "q4_k")
    assert layer.gguf_type == "q4_1" and layer.requested_type == "q4_k"
    assert layer.freeze_().pack()["ggml"].shape == (8, 3 * 20)


@pytest.mark.parametrize("name", ["q4_k", "q3_k", "q2_k", "q4_1", "q5_0"])
def test_packed_linear_equals_frozen_layer_and_its_scale_gradients(name):
    lin = nn.Linear(512, 24, bias=False)
    frozen = K.GGUFQuantLinear.from_linear(lin, name).freeze_()
    blocks = frozen.pack()["ggml"]
    packed = K.GGUFPackedLinear.from_blocks(blocks, name, 512, 24, tile_rows=16)  # two tiles
    x = torch.randn(3, 5, 512, dtype=torch.float64).float()
    y = packed(x)
    assert torch.allclose(y, frozen(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(packed.to_blocks(), blocks)  # untrained: the same bytes back
    # gradients against autograd through the dense dequantized weight
    g = torch.randn(y.shape)
    y.backward(g)
    codes, _ = K.unpack(blocks, packed.spec, 512)
    ref = {k: v.detach().clone().requires_grad_(k not in K.BUFFERS) for k, v in packed.qparams().items()}
    a, b = K.scales_from_params(packed.spec, ref)
    xr = x.clone().requires_grad_(True)
    (xr @ K.dequantize_codes(codes, a, b, packed.spec).t() * g).sum().backward()
    for key in packed.quant_names:
        assert torch.allclose(getattr(packed, key).grad, ref[key].grad, rtol=1e-4, atol=1e-5), key


def test_packed_linear_trains_and_writes_exact_blocks():
    name = "q4_k"
    lin = nn.Linear(256, 8, bias=True)
    frozen = K.GGUFQuantLinear.from_linear(lin, name).freeze_()
    tensors = frozen.pack()
    packed = K.GGUFPackedLinear.from_blocks(tensors["ggml"], name, 256, 8, bias=tensors["bias"])
    opt = torch.optim.AdamW(packed.quant_parameters(), lr=1e-3)
    x = torch.randn(16, 256)
    for _ in range(5):
        opt.zero_grad()
        (packed(x) - lin(x).detach()).square().mean().backward()
        opt.step()
        packed.project_()
    new = packed.to_blocks()
    assert not torch.equal(new, tensors["ggml"])
    codes_old, _ = K.unpack(tensors["ggml"], packed.spec, 256)
    codes_new, _ = K.unpack(new, packed.spec, 256)
    assert torch.equal(codes_old, codes_new)  # E2E-QP never touches the codes
    w = _gguf_dequantize(new, packed.spec)
    with torch.no_grad():
        assert torch.equal(packed(x), torch.nn.functional.linear(x, w, tensors["bias"].float()))


def test_gguf_py_reference_sizes_match_our_table():
    for t in K.TYPES.values():
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ggml_id)]
        assert (block, size) == (t.block, t.type_size), t.name
    assert np.isclose(K.TYPES["q4_k"].bits_per_weight, 4.5) and np.isclose(K.TYPES["q2_k"].bits_per_weight, 2.625)


@pytest.mark.parametrize("name", ["q4_k", "q3_k", "q2_k", "q4_0"])
def test_importance_weighted_init_lowers_the_output_error(name):
    """With inputs whose columns differ in scale (as a layer's do), weighting the fit by each column's mean squared
    input (llama.cpp's importance matrix) lowers the error of the layer's output ``E||(W - Ŵ) x||^2``."""
    t = K.TYPES[name]
    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 256, generator=g) * 0.02
    x = torch.randn(512, 256, generator=g) * torch.exp(1.5 * torch.randn(256, generator=g))
    h = x.square().mean(0)

    def out_err(grid):
        a, b = K.grid_scales(t, grid)
        w_hat = K.dequantize_codes(K.quantize(w, a, b, t), a, b, t)
        return float(((w_hat - w) @ x.T).square().mean())

    plain, weighted = out_err(K.init_grid(w, t)), out_err(K.init_grid(w, t, importance=h))
    assert weighted < 0.9 * plain, (weighted, plain)
