"""The supported families as data, and the refusal of everything else.

An :class:`Arch` names transformers' classes for a family and says, as plain fields, what its block needs beyond a
Llama block: which linears are quantized, which layers attend over a sliding window, whether the rotary module
takes the layer's type, whether the embeddings are scaled before block 0, whether its activations overflow fp16.
The block's own tensors (q/k norms, the extra norms of Gemma, biases) are whatever transformers' decoder layer
declares: :func:`frugal_qat.arch.build_block` fills exactly those, so no family needs a table of its tensors.

Checkpoint layout: every supported family is a transformers ``*ForCausalLM`` checkpoint, so its blocks are
``model.layers.{i}.*`` and its other tensors ``model.embed_tokens.weight``, ``model.norm.weight`` and (untied)
``lm_head.weight`` (the constants in ``frugal_qat.arch``). Multimodal checkpoints, whose language model lives
under another prefix, are refused by :func:`arch_for`.
"""

from __future__ import annotations

import importlib
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
# Phi-3 fuses q, k and v into one linear and gate and up into another. Quantizing the fused weight is the same as
# quantizing its parts: groups run along the input columns of each output row, and rows never share a group.
FUSED_LINEAR_NAMES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

SLIDING_KINDS = ("none", "all", "layer_types")


@dataclass(frozen=True)
class Arch:
    """One family: transformers' classes for it and what its blocks need (see the module docstring)."""

    name: str  # the `architectures[0]` of config.json
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # class name prefix: Llama, Mistral, Qwen2, ...
    linears: tuple[str, ...] = LINEAR_NAMES  # the quantized linears of a block (every nn.Linear in it), in order
    bf16_activations: bool = False  # hidden states exceed fp16's range: the streams are stored in bf16
    config_name: str = ""  # the config class when it is not f"{prefix}Config" (Gemma 3: Gemma3TextConfig)
    # Which layers attend over the last `config.sliding_window` positions only: "none"; "all" (every layer when
    # the config sets a window: Mistral, Phi-3); "layer_types" (layers whose `config.layer_types[i]` is
    # "sliding_attention": Qwen2/3, Gemma 2/3).
    sliding: str = "none"
    rotary_by_layer_type: bool = False  # the rotary module takes the layer type (Gemma 3: local and global bases)
    scaled_embedding: bool = False  # block 0's input is embedding * sqrt(hidden_size) (Gemma)

    def __post_init__(self):
        if self.sliding not in SLIDING_KINDS:
            raise ValueError(f"{self.name}: sliding={self.sliding!r}; choose one of {SLIDING_KINDS}")

    def _modeling(self):
        return importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")

    def _cls(self, suffix: str) -> type:
        return getattr(self._modeling(), f"{self.prefix}{suffix}")

    @property
    def config_cls(self) -> type:
        mod = importlib.import_module(f"transformers.models.{self.module}.configuration_{self.module}")
        return getattr(mod, self.config_name or f"{self.prefix}Config")

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
    a.name: a
    for a in (
        Arch("LlamaForCausalLM", "llama", "Llama"),
        Arch("MistralForCausalLM", "mistral", "Mistral", sliding="all"),
        Arch("Qwen2ForCausalLM", "qwen2", "Qwen2", sliding="layer_types"),
        Arch("Qwen3ForCausalLM", "qwen3", "Qwen3", sliding="layer_types"),
        Arch("Phi3ForCausalLM", "phi3", "Phi3", linears=FUSED_LINEAR_NAMES, sliding="all"),
        Arch("Gemma2ForCausalLM", "gemma2", "Gemma2", bf16_activations=True, sliding="layer_types",
             scaled_embedding=True),
        Arch("Gemma3ForCausalLM", "gemma3", "Gemma3", bf16_activations=True, config_name="Gemma3TextConfig",
             sliding="layer_types", rotary_by_layer_type=True, scaled_embedding=True),
    )
}

# Config keys that mark a mixture-of-experts model (Mixtral, Qwen2/3-MoE, DeepSeek, PhiMoE, OLMoE, ...).
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


def arch_for(config: dict[str, Any]) -> Arch:
    """The family of a config.json dict, or :class:`UnsupportedModel` naming it and what frugal-qat lacks for it."""
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHS:
            return ARCHS[name]
    seen = "/".join(names) or f"model_type {config.get('model_type', '?')!r}"
    supported = ", ".join(ARCHS)
    if any(config.get(k) for k in MOE_KEYS) or any(
            isinstance(v, dict) and any(v.get(k) for k in MOE_KEYS) for v in config.values()):
        lacks = ("its blocks are mixture-of-experts (a router picks experts per token), and frugal-qat quantizes "
                 "dense blocks only")
    elif "text_config" in config or "vision_config" in config:
        lacks = ("it is multimodal (its language model sits under another prefix, next to a vision tower); "
                 "save its language model as a text-only *ForCausalLM checkpoint first")
    else:
        lacks = "frugal-qat has no adapter for this family"
    raise UnsupportedModel(f"architecture {seen} is not supported: {lacks}; supported: {supported}")


def hf_config(config: dict[str, Any], seqlen: int | None = None) -> PretrainedConfig:
    """The transformers config for the model, with the attention implementation the block runner drives.

    SDPA (causal without a mask) unless the family soft-caps its attention logits (Gemma 2), which SDPA cannot do:
    then transformers' eager attention, which takes an additive mask. Sliding windows are honoured by the mask
    (:class:`frugal_qat.arch.BlockRunner`), so ``seqlen`` is not limited by them; it is accepted for the callers.
    Refuses, before anything is written, a supported family whose config asks for what we do not build
    (bidirectional attention; a block with linears the family's list does not name).
    """
    del seqlen  # windows longer than the sliding window get their real mask
    arch = arch_for(config)
    clean = {k: v for k, v in config.items() if k != "quantization_config"}
    cfg = arch.config_cls.from_dict(clean)
    cfg._attn_implementation = "eager" if getattr(cfg, "attn_logit_softcapping", None) is not None else "sdpa"
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UnsupportedModel(f"{arch.name} with use_bidirectional_attention is an encoder (e.g. EmbeddingGemma); "
                               f"frugal-qat quantizes causal decoders only")
    with torch.device("meta"):
        layer = arch.layer_cls(cfg, layer_idx=0)
    found = {name for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    if found != set(arch.linears):
        raise UnsupportedModel(f"{arch.name} blocks hold the linears {sorted(found)}, but frugal-qat's adapter "
                               f"quantizes {sorted(arch.linears)}; this transformers version is not supported")
    return cfg
