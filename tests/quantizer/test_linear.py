import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frugal_qat.quantizer.linear import QuantLinear
from frugal_qat.quantizer.packing import unpack_linear
from frugal_qat.quantizer.primitives import dequantize, fake_quant, init_qparams

BITS = [2, 3, 4, 8]
GROUPS = [32, 64, 128, -1]
SEEDS = [0, 1, 2]
IN, OUT = 128, 48


def make_linear(seed: int, bias: bool = True, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT, bias=bias).to(dtype)


def make_input(seed: int, rows: int = 10) -> torch.Tensor:
    return torch.randn(rows, IN, generator=torch.Generator().manual_seed(seed + 50))


def train_a_little(layer: QuantLinear, target: nn.Linear, seed: int, steps: int = 5) -> None:
    """A few Block-AP-like steps with two learning rates, so every parameter moves off its init."""
    opt = torch.optim.AdamW(
        [
            {"params": layer.weight_parameters(), "lr": 1e-4},
            {"params": layer.quant_parameters(), "lr": 1e-4},
        ],
        weight_decay=0.0,
    )
    for step in range(steps):
        x = make_input(seed * 100 + step)
        loss = (layer(x) - target(x).detach()).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_parameters_exist_from_construction():
    layer = QuantLinear(IN, OUT, bits=4, group_size=32)
    assert list(layer.state_dict()) == ["weight", "bias", "scale", "zero"]
    assert layer.scale.shape == layer.zero.shape == (OUT, IN // 32)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in layer.parameters())
    no_bias = QuantLinear(IN, OUT, bits=4, group_size=-1, bias=False)
    assert no_bias.bias is None and no_bias.group_size == IN
    assert list(no_bias.state_dict()) == ["weight", "scale", "zero"]


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_from_linear_copies_and_initialises(bits, group_size):
    linear = make_linear(0)
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    layer = QuantLinear.from_linear(linear, bits, group_size, name="layers.0.self_attn.q_proj")
    g = IN if group_size == -1 else group_size
    assert (layer.bits, layer.group_size, layer.in_features, layer.out_features) == (bits, g, IN, OUT)
    assert layer.name == "layers.0.self_attn.q_proj"
    assert torch.equal(layer.weight, linear.weight) and torch.equal(layer.bias, linear.bias)
    assert layer.weight.data_ptr() != linear.weight.data_ptr()  # a copy, not a shared tensor
    scale, zero = init_qparams(linear.weight, bits, group_size)
    assert torch.equal(layer.scale, scale) and torch.equal(layer.zero, zero)
    for k, v in linear.state_dict().items():
        assert torch.equal(v, before[k])


def test_from_linear_upcasts_half_precision_source():
    linear = make_linear(1, dtype=torch.bfloat16)
    layer = QuantLinear.from_linear(linear, 4, 64)
    assert layer.weight.dtype == layer.bias.dtype == layer.scale.dtype == torch.float32
    assert torch.equal(layer.weight, linear.weight.float())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_forward_matches_original_to_quantization_error(bits, group_size, seed):
    linear = make_linear(seed)
    layer = QuantLinear.from_linear(linear, bits, group_size)
    x = make_input(seed)
    y, y_ref = layer(x), linear(x)
    w_hat = fake_quant(layer.weight, layer.scale, layer.zero, bits, group_size)
    assert torch.equal(y, F.linear(x, w_hat, layer.bias))
    # Each weight is within s/2 (min-max init clips nothing), so |dy_o| <= sum_i |x_i| s(o, i) / 2.
    half_step = layer.scale.repeat_interleave(layer.group_size, dim=1) / 2
    bound = x.abs() @ half_step.t()
    assert ((y - y_ref).abs() <= bound * (1 + 1e-4) + 1e-6).all()
    # And the error shrinks with more bits: 8-bit is close, 2-bit is not exact.
    rel = (y - y_ref).norm() / y_ref.norm()
    assert rel < {2: 1.0, 3: 0.5, 4: 0.25, 8: 0.02}[bits]
    assert rel > 0


def test_forward_casts_to_input_dtype():
    layer = QuantLinear.from_linear(make_linear(2), 4, 32)
    x = make_input(2)
    y16 = layer(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert torch.allclose(y16.float(), layer(x), atol=0.05, rtol=0.05)


def test_parameter_groups_are_disjoint_and_complete():
    layer = QuantLinear.from_linear(make_linear(3), 4, 32)
    weights, quant = layer.weight_parameters(), layer.quant_parameters()
    assert weights == [layer.weight, layer.bias] and quant == [layer.scale, layer.zero]
    assert {id(p) for p in weights + quant} == {id(p) for p in layer.parameters()}
    no_bias = QuantLinear.from_linear(make_linear(3, bias=False), 4, 32)
    assert no_bias.weight_parameters() == [no_bias.weight]


def test_training_moves_every_parameter():
    linear = make_linear(4)
    layer = QuantLinear.from_linear(linear, 2, 32)
    start = {k: v.clone() for k, v in layer.state_dict().items()}
    train_a_little(layer, linear, seed=4)
    for k, v in layer.state_dict().items():
        assert not torch.equal(v, start[k]), k


# --- freeze_ and pack ----------------------------------------------------------------------------


def rebuilt_forward(tensors, layer, x):
    """What a model loaded from the packed tensors computes in float32."""
    codes, scale, zero = unpack_linear(tensors, layer.bits, layer.group_size, IN, OUT)
    w = dequantize(codes, scale, zero, layer.group_size)
    bias = tensors["bias"].float() if "bias" in tensors else None
    return F.linear(x, w, bias)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_freeze_then_pack_reproduces_forward_exactly(bits, group_size, seed):
    linear = make_linear(seed, bias=seed != 2)
    layer = QuantLinear.from_linear(linear, bits, group_size)
    train_a_little(layer, linear, seed)
    x = make_input(seed + 1)
    with torch.no_grad():
        y_trained = layer(x)
    assert not torch.equal(layer.scale, layer.scale.half().float())  # training left fp16 precision

    layer.freeze_()
    assert layer.frozen
    assert all(not p.requires_grad and p.grad is None for p in layer.parameters())
    assert torch.equal(layer.scale, layer.scale.half().float())
    assert torch.equal(layer.zero, layer.zero.round().clamp(0, 2**bits - 1))
    y = layer(x)
    assert not y.requires_grad
    # Frozen forward == fake_quant forward (the weight lies on its grid) == the packed model.
    w_hat = fake_quant(layer.weight, layer.scale, layer.zero, bits, group_size)
    assert torch.equal(w_hat, layer.weight)
    assert torch.equal(y, rebuilt_forward(layer.pack(), layer, x))
    # Rounding the scales (and bias) to fp16 only nudges the trained function.
    assert torch.allclose(y, y_trained, rtol=1e-2, atol=1e-2)


def test_freeze_is_idempotent():
    linear = make_linear(5)
    layer = QuantLinear.from_linear(linear, 3, 32)
    train_a_little(layer, linear, seed=5)
    layer.freeze_()
    once = {k: v.clone() for k, v in layer.state_dict().items()}
    packed_once = layer.pack()
    layer.freeze_()
    for k, v in layer.state_dict().items():
        assert torch.equal(v, once[k]), k
    for k, v in layer.pack().items():
        assert torch.equal(v, packed_once[k]), k


def test_pack_requires_freeze_and_an_untouched_weight():
    layer = QuantLinear.from_linear(make_linear(6), 4, 32, name="layers.1.mlp.up_proj")
    with pytest.raises(ValueError, match=r"layers.1.mlp.up_proj: pack\(\) needs a frozen layer"):
        layer.pack()
    layer.freeze_()
    with torch.no_grad():
        layer.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="changed after freeze_"):
        layer.pack()
    layer.freeze_()  # re-freezing puts the weight back on the grid
    assert set(layer.pack()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}


def test_pack_dtypes():
    layer = QuantLinear.from_linear(make_linear(7), 2, 64).freeze_()
    packed = layer.pack()
    assert packed["bias"].dtype == torch.float16 and packed["scales"].dtype == torch.float16
    assert packed["qweight"].shape == (IN * 2 // 32, OUT)
    assert torch.equal(packed["bias"].float(), layer.bias)


def test_freeze_rejects_scales_outside_fp16():
    layer = QuantLinear.from_linear(make_linear(8), 4, 32, name="layers.2.self_attn.o_proj")
    with torch.no_grad():
        layer.scale[0, 0] = 1e6
    with pytest.raises(ValueError, match="layers.2.self_attn.o_proj: scales must be positive and finite"):
        layer.freeze_()
    with torch.no_grad():
        layer.scale[0, 0] = -0.01
    with pytest.raises(ValueError, match="positive"):
        layer.freeze_()
    assert not layer.frozen


def test_group_size_error_names_layer():
    linear = nn.Linear(576, 8)
    with pytest.raises(ValueError) as err:
        QuantLinear.from_linear(linear, 4, 128, name="layers.3.mlp.down_proj")
    assert str(err.value) == (
        "group size 128 does not divide in_features 576 of layers.3.mlp.down_proj; choose a divisor of 576 or -1"
    )
    with pytest.raises(ValueError, match="bits 6 is not supported for layers.3.mlp.down_proj"):
        QuantLinear.from_linear(linear, 6, 64, name="layers.3.mlp.down_proj")
