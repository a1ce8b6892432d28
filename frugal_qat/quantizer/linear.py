"""``QuantLinear``: the fake-quantized linear layer that Block-AP trains, freezes and packs."""

import torch
import torch.nn.functional as F
from torch import nn

from frugal_qat.quantizer.packing import pack_linear
from frugal_qat.quantizer.primitives import (
    dequantize,
    fake_quant,
    init_qparams,
    quantize,
    resolve_group_size,
    round_zero,
)


def finish_freeze(layer: nn.Module) -> None:
    """The end of every ``freeze_()``: the bias rounded to the float16 the run stores, nothing left trainable, no
    stale gradient, the layer marked frozen (``pack()`` requires it)."""
    if layer.bias is not None:
        layer.bias.copy_(layer.bias.half().float())
    for p in layer.parameters():
        p.requires_grad_(False)
        p.grad = None
    layer.frozen = True


class QuantLinear(nn.Module):
    """A linear layer whose weight goes through ``fake_quant`` in every forward.

    Parameters (all float32, all created in ``__init__`` so ``state_dict()`` and optimizers see them
    from step 0): ``weight`` ``[out, in]``, ``bias`` ``[out]`` (or None), ``scale`` and ``zero``
    ``[out, G]`` with ``G = in // group_size``.

    Life cycle in Block-AP: ``from_linear`` (min-max init) -> train ``weight_parameters()`` and
    ``quant_parameters()`` with two learning rates -> ``freeze_()`` (round everything to what the
    packed checkpoint stores) -> ``pack()``. ``frozen`` is a plain attribute: it is not part of the
    state dict, and a frozen layer computes the same output whether or not it is set (see ``freeze_``).

    Forward: ``y = x @ fake_quant(W, s, z).T + bias``, the weight and bias cast to ``x.dtype``
    (keep ``x`` float32 on CPU: low-precision matmuls are very slow there).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = True,
        name: str = "",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.group_size = resolve_group_size(group_size, in_features, bits, name or "QuantLinear")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.name = name
        self.frozen = False
        n_groups = in_features // self.group_size
        f32 = {"dtype": torch.float32, "device": device}
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, **f32))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **f32))
        else:
            self.register_parameter("bias", None)
        self.scale = nn.Parameter(torch.ones(out_features, n_groups, **f32))
        self.zero = nn.Parameter(torch.zeros(out_features, n_groups, **f32))

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, name: str = "") -> "QuantLinear":
        """Copy ``linear``'s weight and bias (as float32) and set ``scale``/``zero`` by ``init_qparams``.

        ``linear`` is left untouched; the new layer lives on its device. ``name`` (e.g.
        ``layers.3.mlp.down_proj``) appears in error messages.
        """
        layer = cls(
            linear.in_features,
            linear.out_features,
            bits,
            group_size,
            bias=linear.bias is not None,
            name=name,
            device=linear.weight.device,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            scale, zero = init_qparams(layer.weight, bits, layer.group_size)
            layer.scale.copy_(scale)
            layer.zero.copy_(zero)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A frozen weight already lies on its grid, where fake_quant is the identity (bit for bit),
        # so skipping it only saves time.
        if self.frozen:
            w = self.weight
        else:
            w = fake_quant(self.weight, self.scale, self.zero, self.bits, self.group_size)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    def weight_parameters(self) -> list[nn.Parameter]:
        """``[weight, bias]`` (bias only if present): the group trained at ``weight_lr``."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def quant_parameters(self) -> list[nn.Parameter]:
        """``[scale, zero]``: the group trained at ``quant_lr``."""
        return [self.scale, self.zero]

    @torch.no_grad()
    def freeze_(self) -> "QuantLinear":
        """Round the layer in place to exactly what ``pack()`` stores, and stop its gradients.

        - ``scale <- scale.half().float()`` (checkpoints store fp16 scales);
        - ``zero <- round_zero(zero, bits)``;
        - ``weight <- dequantize(quantize(W, s, z), s16, z_int)``: the codes are those the training
          forward used (fp32 scale), placed on the fp16-scale grid;
        - ``bias <- bias.half().float()`` (``pack()`` stores it as fp16; rounding it here keeps the
          packed model exactly equal to this one);
        - ``requires_grad = False`` and ``grad = None`` on every parameter (frees gradient memory).

        Afterwards ``forward(x) == F.linear(x, dequantize(codes, s16, z_int), bias)`` bit for bit, which
        is what a model rebuilt from ``pack()`` computes in float32. Idempotent: a second call changes
        nothing, because ``W / s`` of a weight on the grid rounds back to its own code.

        Raises:
            ValueError: a scale that is not positive and finite in float16.
        """
        scale16 = self.scale.half().float()
        if not (torch.isfinite(scale16).all() and (scale16 > 0).all()):
            raise ValueError(
                f"{self.name or 'QuantLinear'}: scales must be positive and finite in float16, got "
                f"range [{self.scale.min().item():.3g}, {self.scale.max().item():.3g}]; "
                f"lower quant_lr or check the training for divergence"
            )
        zero_int = round_zero(self.zero, self.bits)
        codes = quantize(self.weight, self.scale, zero_int, self.bits, self.group_size)
        self.weight.copy_(dequantize(codes, scale16, zero_int, self.group_size))
        self.scale.copy_(scale16)
        self.zero.copy_(zero_int)
        finish_freeze(self)
        return self

    @torch.no_grad()
    def pack(self) -> dict[str, torch.Tensor]:
        """GPTQ tensors of the frozen layer (``pack_linear``), plus ``bias`` as float16 if present.

        Raises:
            ValueError: the layer is not frozen, or its weight left the grid after ``freeze_()``.
        """
        label = self.name or "QuantLinear"
        if not self.frozen:
            raise ValueError(f"{label}: pack() needs a frozen layer; call freeze_() first")
        codes = quantize(self.weight, self.scale, self.zero, self.bits, self.group_size)
        if not torch.equal(dequantize(codes, self.scale, self.zero, self.group_size), self.weight):
            raise ValueError(
                f"{label}: the weight was changed after freeze_() and no longer lies on the "
                f"quantization grid; call freeze_() again before pack()"
            )
        tensors = pack_linear(codes, self.scale, self.zero, self.bits, self.group_size)
        if self.bias is not None:
            tensors["bias"] = self.bias.half()
        return tensors

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, frozen={self.frozen}"
        )
