"""Architecture adapters: how a decoder block of a supported model is built, fed and named.

Supported: Llama 2/3, Mistral, Qwen2, Qwen3 (dense), Phi-3/Phi-4 (fused qkv_proj and gate_up_proj), Gemma 2 and
Gemma 3 (text: sliding-window and global layers, the scaled embedding, four norms and q/k norms per block). A
family is data (:class:`Arch`, ``_families.py``); blocks are transformers' own decoder layers run per layer with
their position embeddings and attention mask (:class:`BlockRunner`, ``_blocks.py``). Anything else is refused by
:func:`arch_for` naming what it lacks (mixture-of-experts blocks, multimodal checkpoints, unknown families).
"""

from __future__ import annotations

from frugal_qat.arch._blocks import (
    BlockRunner,
    LinearShape,
    attention_mask,
    build_block,
    fill_buffers,
    layer_type,
    layer_window,
    linear_shapes,
    logit_softcap,
    rotary,
    softcap,
)
from frugal_qat.arch._families import ARCHS, FUSED_LINEAR_NAMES, LINEAR_NAMES, MOE_KEYS, Arch, arch_for, hf_config

# Where the tensors live in every supported family's checkpoint (see _families.py).
EMBED_KEY = "model.embed_tokens.weight"
NORM_KEY = "model.norm.weight"
LM_HEAD_KEY = "lm_head.weight"


def block_prefix(i: int) -> str:
    return f"model.layers.{i}."


__all__ = [
    "ARCHS",
    "EMBED_KEY",
    "FUSED_LINEAR_NAMES",
    "LINEAR_NAMES",
    "LM_HEAD_KEY",
    "MOE_KEYS",
    "NORM_KEY",
    "Arch",
    "BlockRunner",
    "LinearShape",
    "arch_for",
    "attention_mask",
    "block_prefix",
    "build_block",
    "fill_buffers",
    "hf_config",
    "layer_type",
    "layer_window",
    "linear_shapes",
    "logit_softcap",
    "rotary",
    "softcap",
]
