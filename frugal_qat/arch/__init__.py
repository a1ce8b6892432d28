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
    return arch.rotary_cls(config=cfg)


def position_embeddings(rot: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for positions 0..L-1 of x [b, L, H]; one window per sample, always starting at 0."""
    pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rot(x, pos)
    return cos, sin


def block_forward(block: nn.Module, x: torch.Tensor, pos_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Run one decoder layer. Older transformers return a tuple (the reference reads ``[0]`` always)."""
    out = block(x, attention_mask=None, position_embeddings=pos_emb)
    return out[0] if isinstance(out, tuple) else out
