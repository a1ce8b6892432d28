"""Shared fixtures: seeded randomness and tiny checkpoints saved as *sharded* safetensors, with a tokenizer."""

from __future__ import annotations

import os

# Triton kernels are tested through its interpreter on CPU tensors; it must be chosen before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be or not to be, that is the question. All that glitters is not gold. "
    "Knowledge is power, and practice makes perfect. Every cloud has a silver lining. "
)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield


def make_tokenizer(vocab_size: int = 128):
    """A byte-level BPE tokenizer trained offline on a few sentences (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[:100])
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")


def tiny_config(arch: str = "llama", layers: int = 2, hidden: int = 64, intermediate: int = 128, heads: int = 4,
                kv_heads: int = 2, vocab: int = 128, tie: bool = False, sliding_window: int | None = None):
    """The transformers config of a tiny model of the family ``arch`` (see :func:`save_tiny_model`)."""
    import transformers

    common = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                  tie_word_embeddings=tie, max_position_embeddings=512)
    # Sliding and full layers alternate (sliding first), as Gemma 2 does; Gemma 3 has 5:1 and Qwen a prefix.
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if arch in ("llama", "qwen2", "qwen3"):
        extra = {}
        if arch != "llama" and sliding_window is not None:
            extra = dict(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=0,
                         layer_types=alternating)
        name = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
        return getattr(transformers, f"{name}Config")(**common, **extra)
    if arch == "mistral":  # MistralConfig's own default window (4096) unless one is given
        return transformers.MistralConfig(**common, **({} if sliding_window is None else {"sliding_window": sliding_window}))
    if arch == "phi3":  # Phi3Config's token ids default to a 32k vocabulary
        return transformers.Phi3Config(**common, sliding_window=sliding_window, pad_token_id=0, bos_token_id=1,
                                       eos_token_id=2)
    head_dim = hidden // heads
    gemma = dict(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=sliding_window or 512,
                 layer_types=alternating, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "gemma2":  # soft-capped attention and final logits, as the real Gemma 2
        return transformers.Gemma2Config(**common, **gemma, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if arch == "gemma3":  # two rotary bases: 10k on the sliding layers, 1M on the global ones
        return transformers.Gemma3TextConfig(**common, **gemma, rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}})
    raise ValueError(f"unknown tiny family {arch!r}; choose one of {FAMILIES}")


def save_tiny_model(path: Path, arch: str = "llama", layers: int = 2, hidden: int = 64, intermediate: int = 128,
                    heads: int = 4, kv_heads: int = 2, vocab: int = 128, tie: bool = False, seed: int = 0,
                    sliding_window: int | None = None) -> Path:
    """A random tiny model of the given family (one of ``FAMILIES``), saved sharded (several files + index) with
    a tokenizer. ``sliding_window``: the window of the sliding layers (Mistral and Phi-3: all layers; Qwen and
    Gemma: every other layer, starting with layer 0); None: no window (Gemma: 512, longer than any test)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, layers, hidden, intermediate, heads, kv_heads, vocab, tie, sliding_window)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF's init makes near-identity blocks; larger weights make quantization matter
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and arch.startswith("gemma"):  # Gemma's norms scale by 1 + w, initialised to w = 0
                p.normal_(0, 0.1)
    model.save_pretrained(path, max_shard_size="100KB")
    make_tokenizer(vocab).save_pretrained(path)
    return path


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return save_tiny_model(tmp_path / "tiny-llama")


@pytest.fixture
def calib_file(tmp_path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(CORPUS * 60)
    return p
