"""A run directory (or any supported checkpoint) as a transformers model object: ``generate()``, lm-eval, save.

``load_quantized_model`` builds the model class of the checkpoint's architecture on the meta device (no memory),
then fills it block by block with the dequantized weights that :class:`ModelSource` reads, so what runs is exactly
frugal-qat's forward (``Ŵ = (q - z) * s`` in fp32, notes §4) inside transformers' own modules.

Memory: the result is a dense model, about ``4 * n_params`` bytes in fp32 (``2 * n_params`` in fp16), plus one
block while it is being filled. That is fine for small models and for evaluation on a machine that holds the
dense model; for larger ones use the exports (``frugal_qat.export``) with an engine that keeps weights packed, or the
streamed perplexity of ``frugal_qat.eval.ppl``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel

from frugal_qat.arch import EMBED_KEY, LM_HEAD_KEY, NORM_KEY, block_prefix
from frugal_qat.errors import UnsupportedModel
from frugal_qat.offload.blocks import ModelSource

log = logging.getLogger(__name__)


def load_quantized_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model of ``model_dir`` (a frugal-qat run directory or a dense checkpoint) as a transformers model.

    Packed linears are dequantized in fp32 and then cast to ``dtype``; on CPU keep fp32 (bf16 matmuls are very
    slow there, and fp16 adds a rounding the run does not have). Attention uses SDPA. The model is in eval mode and
    carries the checkpoint's ``generation_config.json`` when there is one.

    Raises:
        UnsupportedModel: an architecture frugal_qat.arch does not support, or a tensor the model class does not expect.
        CorruptCheckpoint: missing or damaged files.
    """
    src = ModelSource(model_dir)
    with torch.device("meta"):
        model = src.arch.causal_lm_cls(src.hf)

    for i in range(src.n_layers):
        # One dequantized block at a time: assign() moves its tensors into the model, nothing else is kept.
        block = {block_prefix(i) + k: v.to(dtype) for k, v in src.block_state(i).items()}
        _assign(model, block, f"block {i}")
        del block
    extra = {EMBED_KEY: src.embed_weight().to(dtype), NORM_KEY: src.store.get(NORM_KEY).to(dtype)}
    _assign(model, extra, "embeddings")
    if src.hf.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        # A run of a tied model written without lm_head still has tie_word_embeddings false in some configs:
        # ModelSource then serves the embeddings, which is what the model computed.
        _assign(model, {LM_HEAD_KEY: src.lm_head_weight().to(dtype)}, "lm_head")

    # Non-persistent buffers (rotary inv_freq, Gemma's embed_scale) were created on meta; compute them on the CPU.
    src.fill_buffers(model)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise UnsupportedModel(f"{model_dir}: tensors {leftover[:4]} were not filled from the checkpoint")

    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    return model.eval()


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise UnsupportedModel(
            f"{what}: tensors {result.unexpected_keys[:4]} do not belong to {type(model).__name__}"
        )
