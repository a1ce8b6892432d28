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


def save_tiny_model(path: Path, arch: str = "llama", layers: int = 2, hidden: int = 64, intermediate: int = 128,
                    heads: int = 4, kv_heads: int = 2, vocab: int = 128, tie: bool = False, seed: int = 0) -> Path:
    """A random tiny model of the given family, saved sharded (several files + index) with a tokenizer."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
           "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    cfg = cls[0](hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                 num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tie, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = cls[1](cfg).eval()
    with torch.no_grad():  # HF's init makes near-identity blocks; larger weights make quantization matter
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
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
