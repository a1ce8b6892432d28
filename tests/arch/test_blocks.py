"""A block built from the shards computes exactly what the same layer of transformers' full model computes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from frugal_qat.arch import arch_for
from frugal_qat.errors import UnsupportedModel
from frugal_qat.offload.blocks import ModelSource
from tests.conftest import save_tiny_model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_streamed_block_matches_full_model(tmp_path, arch):
    path = save_tiny_model(tmp_path / arch, arch=arch, layers=3)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        hs = full(ids, output_hidden_states=True).hidden_states
    src = ModelSource(path)
    runner = src.runner()
    for i in range(2):  # the last hidden state has the final norm applied, so compare the inner layers
        block = src.block(i)
        with torch.no_grad():
            out = runner(block, i, hs[i])
        torch.testing.assert_close(out, hs[i + 1], rtol=1e-5, atol=1e-5)


def test_qwen2_has_qkv_bias(tmp_path):
    src = ModelSource(save_tiny_model(tmp_path / "q", arch="qwen2"))
    assert "self_attn.q_proj.bias" in src.block_state(0)


def test_causality(tmp_path):
    """Changing a later token never changes an earlier position's output (SDPA without a mask is causal)."""
    src = ModelSource(save_tiny_model(tmp_path / "m"))
    block, runner = src.block(0), src.runner()
    x = torch.randn(1, 16, 64)
    y = x.clone()
    y[:, 10:] += 1
    with torch.no_grad():
        a = runner(block, 0, x)
        b = runner(block, 0, y)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedModel, match="LlamaForCausalLM"):
        arch_for({"architectures": ["GPT2LMHeadModel"]})


def test_sliding_window_shorter_than_seqlen_is_refused(tmp_path):
    path = save_tiny_model(tmp_path / "m", arch="mistral")
    cfg = json.loads((path / "config.json").read_text())
    cfg["sliding_window"] = 16
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModel, match="sliding window"):
        ModelSource(path, seqlen=32)
