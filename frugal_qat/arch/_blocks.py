"""A decoder block of a supported family: built from its tensors, and run as the model's own forward runs it.

Every block is transformers' own decoder layer, built on the meta device from the config and filled with one
block's tensors, so the maths is exactly the library's. What the model's forward computes once for all layers
(rotary position embeddings, attention masks) :class:`BlockRunner` computes per layer, from the family's data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from frugal_qat.arch._families import Arch
from frugal_qat.errors import UnsupportedModel


def build_block(cfg: PretrainedConfig, arch: Arch, i: int, state: dict[str, torch.Tensor], dtype=torch.float32) -> nn.Module:
    """One decoder layer built on the meta device and filled from ``state`` (keys without the block prefix)."""
    with torch.device("meta"):
        layer = arch.layer_cls(cfg, layer_idx=i)
    expected = set(layer.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise UnsupportedModel(
            f"block {i} tensors do not match {arch.name}: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )
    layer.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
    # Buffers that are not in the checkpoint (none for these families today) would still be on meta.
    for name, buf in layer.named_buffers():
        if buf.is_meta:
            raise UnsupportedModel(f"block {i} buffer {name} is not in the checkpoint")
    return layer.eval()


def rotary(cfg: PretrainedConfig, arch: Arch) -> nn.Module:
    """The model's rotary-embedding module (Gemma 3's holds both its local and its global base). Its ``inv_freq``
    buffers are computed in fp32 and must stay fp32 (a bf16 ``inv_freq`` moves the angles at position 4000 by
    radians)."""
    return arch.rotary_cls(config=cfg)


def fill_buffers(model: nn.Module, cfg: PretrainedConfig, arch: Arch, device: torch.device | str = "cpu") -> None:
    """Give a causal LM built on the meta device the non-persistent buffers no checkpoint holds, computed anew in
    fp32 on ``device``: a fresh rotary module and, for a scaled embedding, its ``embed_scale`` = sqrt(hidden).
    Also called after DeepSpeed's bf16 mode has cast every floating buffer to bf16."""
    model.model.rotary_emb = rotary(cfg, arch).to(device)
    if arch.scaled_embedding:
        model.model.embed_tokens.embed_scale = torch.tensor(float(cfg.hidden_size) ** 0.5, device=device)


def logit_softcap(cfg: PretrainedConfig) -> float | None:
    """The cap ``c`` of the final logits (Gemma 2: 30), or None: ``logits = c * tanh(logits / c)``."""
    return getattr(cfg, "final_logit_softcapping", None)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` (transformers' order of operations), or ``logits`` when ``cap`` is None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


@dataclass(frozen=True)
class LinearShape:
    """One quantized linear of a block: ``W [out, in]``, grouped along ``in``."""

    name: str  # relative to the block, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int
    bias: bool


def linear_shapes(cfg: PretrainedConfig, arch: Arch, i: int = 0) -> tuple[LinearShape, ...]:
    """The quantized linears of block ``i``, read off the architecture's own layer built on the meta device
    (no memory): names, widths and biases come from transformers, not from a table of ours."""
    with torch.device("meta"):
        layer = arch.layer_cls(cfg, layer_idx=i)
    out = []
    for name in arch.linears:
        lin = layer.get_submodule(name)
        out.append(LinearShape(name, lin.in_features, lin.out_features, lin.bias is not None))
    return tuple(out)


def layer_type(cfg: PretrainedConfig, i: int) -> str:
    """``config.layer_types[i]`` ("sliding_attention" or "full_attention"); "full_attention" without the list."""
    types = getattr(cfg, "layer_types", None)
    return types[i] if types else "full_attention"


def layer_window(cfg: PretrainedConfig, arch: Arch, i: int) -> int | None:
    """The sliding window of layer ``i`` (it attends to the last ``window`` positions, itself included), or None
    for full causal attention, following the family's rule (``Arch.sliding``)."""
    window = getattr(cfg, "sliding_window", None)
    if arch.sliding == "all":
        return window
    if arch.sliding == "layer_types" and layer_type(cfg, i) == "sliding_attention":
        return window
    return None


def attention_mask(L: int, window: int | None, eager: bool, dtype: torch.dtype,
                   device: torch.device | str) -> torch.Tensor | None:
    """The mask of a causal layer over ``L`` positions, ``[1, 1, L, L]``, as the attention implementation takes it.

    Query ``q`` sees key ``k`` iff ``k <= q`` and, with a window ``w``, ``k > q - w`` (transformers' sliding-window
    rule). SDPA: None when that is plain causal (``window`` None or ``L <= window``: SDPA's ``is_causal``, which is
    what every family ran before windows were supported), else a boolean mask (True = attend). Eager attention
    (Gemma 2's soft-capped logits) adds the mask to the scores: 0 where seen, the dtype's lowest value elsewhere.
    """
    plain = window is None or L <= window
    if plain and not eager:
        return None
    q = torch.arange(L, device=device).unsqueeze(1)
    k = torch.arange(L, device=device).unsqueeze(0)
    seen = k <= q
    if not plain:
        seen &= k > q - window
    if not eager:
        return seen.view(1, 1, L, L)
    return torch.zeros(L, L, dtype=dtype, device=device).masked_fill(~seen, torch.finfo(dtype).min).view(1, 1, L, L)


class BlockRunner:
    """Runs decoder layer ``i`` on hidden states ``x [b, L, H]`` as the model's own forward would: with the
    position embeddings and the attention mask of that layer (positions 0..L-1: one window per sample, always
    starting at 0). It is the one way the runs call a block.

    Position embeddings: the family's rotary module (fp32 buffers, held on ``device``), per layer type where the
    family has several bases (Gemma 3: 10k on sliding layers, 1M on global ones). Mask: :func:`attention_mask`
    of the layer's sliding window, so windows longer than the model's sliding window are computed as the model
    computes them.
    """

    def __init__(self, cfg: PretrainedConfig, arch: Arch, device: torch.device | str = "cpu"):
        self.cfg, self.arch = cfg, arch
        self.rotary = rotary(cfg, arch).to(device)
        self.eager = cfg._attn_implementation == "eager"

    def position_embeddings(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of layer ``i`` for the positions of ``x``."""
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        with torch.no_grad():
            if self.arch.rotary_by_layer_type:
                return self.rotary(x, pos, layer_type(self.cfg, i))
            return self.rotary(x, pos)

    def attention_mask(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        return attention_mask(x.shape[1], layer_window(self.cfg, self.arch, i), self.eager, x.dtype, x.device)

    def __call__(self, block: nn.Module, i: int, x: torch.Tensor) -> torch.Tensor:
        out = block(x, attention_mask=self.attention_mask(i, x), position_embeddings=self.position_embeddings(i, x))
        return out[0] if isinstance(out, tuple) else out  # older transformers return a tuple
