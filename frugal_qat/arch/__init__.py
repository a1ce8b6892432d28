"""Architecture adapters: how a decoder block of a supported model is built, fed and named.

Every supported family (Llama 2/3, Mistral, Qwen2) uses transformers' own decoder layer, built on the meta device
from the config and filled with one block's tensors, so the maths is exactly the library's. What differs between
families is only which classes to use; the key names (``model.layers.{i}.…``) are shared.

We compute the rotary ``position_embeddings`` ourselves and run attention through SDPA with no mask, which is
causal (the reference breaks on recent transformers, which require both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from frugal_qat.errors import UnsupportedModel

LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
EMBED_KEY = "model.embed_tokens.weight"
NORM_KEY = "model.norm.weight"
LM_HEAD_KEY = "lm_head.weight"


def block_prefix(i: int) -> str:
    return f"model.layers.{i}."


@dataclass(frozen=True)
class Arch:
    name: str  # the `architectures[0]` of config.json
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # class name prefix: Llama, Mistral, Qwen2
    linears: tuple[str, ...] = LINEAR_NAMES  # the quantized linears of a block, in a fixed order
    bf16_activations: bool = False  # hidden states exceed fp16's range: the streams are stored in bf16

    def _cls(self, suffix: str) -> type:
        import importlib

        mod = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        return getattr(mod, f"{self.prefix}{suffix}")

    @property
    def config_cls(self) -> type:
        import importlib

        mod = importlib.import_module(f"transformers.models.{self.module}.configuration_{self.module}")
        return getattr(mod, f"{self.prefix}Config")

    @property
    def layer_cls(self) -> type:
        return self._cls("DecoderLayer")

    @property
    def rotary_cls(self) -> type:
        return self._cls("RotaryEmbedding")

    @property
    def norm_cls(self) -> type:
        return self._cls("RMSNorm")

    @property
    def causal_lm_cls(self) -> type:
        return self._cls("ForCausalLM")


ARCHS = {
    "LlamaForCausalLM": Arch("LlamaForCausalLM", "llama", "Llama"),
    "MistralForCausalLM": Arch("MistralForCausalLM", "mistral", "Mistral"),
    "Qwen2ForCausalLM": Arch("Qwen2ForCausalLM", "qwen2", "Qwen2"),
}


def arch_for(config: dict[str, Any]) -> Arch:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHS:
            return ARCHS[name]
    raise UnsupportedModel(
        f"architecture {names or config.get('model_type', '?')} is not supported; supported: {', '.join(ARCHS)}"
    )


def hf_config(config: dict[str, Any], seqlen: int | None = None) -> PretrainedConfig:
    """The transformers config for the model, with SDPA attention (causal without a mask)."""
    arch = arch_for(config)
    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    cfg = arch.config_cls.from_dict(clean)
    cfg._attn_implementation = "sdpa"
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if seqlen is not None and window is not None and seqlen > window:
        raise UnsupportedModel(
            f"seqlen {seqlen} exceeds the model's sliding window {window}; use --seqlen {window} or less"
        )
    return cfg


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
    """The model's rotary-embedding module. Its ``inv_freq`` buffers are computed in fp32 and must stay fp32
    (a bf16 ``inv_freq`` moves the angles at position 4000 by radians)."""
    return arch.rotary_cls(config=cfg)


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


class BlockRunner:
    """Runs decoder layer ``i`` on hidden states ``x [b, L, H]`` as the model's own forward would: with the
    position embeddings (positions 0..L-1: one window per sample, always starting at 0) it gives that layer.

    Attention runs through SDPA with no mask, which is causal. The runner holds the rotary module (fp32 buffers)
    on ``device``; it is the one way the runs call a block.
    """

    def __init__(self, cfg: PretrainedConfig, arch: Arch, device: torch.device | str = "cpu"):
        self.cfg, self.arch = cfg, arch
        self.rotary = rotary(cfg, arch).to(device)

    def position_embeddings(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of layer ``i`` for the positions of ``x``."""
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        with torch.no_grad():
            cos, sin = self.rotary(x, pos)
        return cos, sin

    def __call__(self, block: nn.Module, i: int, x: torch.Tensor) -> torch.Tensor:
        out = block(x, attention_mask=None, position_embeddings=self.position_embeddings(i, x))
        return out[0] if isinstance(out, tuple) else out  # older transformers return a tuple
