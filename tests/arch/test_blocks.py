"""A block built from the shards computes exactly what the same layer of transformers' full model computes, for
every family, on sequences shorter and longer than the sliding window; and what is not supported is refused."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from frugal_qat.arch import ARCHS, arch_for, hf_config, layer_window
from frugal_qat.cli.main import main
from frugal_qat.errors import UnsupportedModel
from frugal_qat.offload.blocks import ModelSource
from tests.conftest import CORPUS, FAMILIES, save_tiny_model

WINDOW = 8


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    """A 3-layer tiny model of the family (sliding window 8 where the family has one) and its full forward."""
    fam = request.param
    path = save_tiny_model(tmp_path_factory.mktemp(fam), arch=fam, layers=3,
                           sliding_window=None if fam == "llama" else WINDOW)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return fam, path, full


@pytest.mark.parametrize("L", [6, 24], ids=["within-window", "longer-than-window"])
def test_streamed_block_matches_full_model(family_model, L):
    fam, path, full = family_model
    ids = torch.randint(0, 128, (2, L))
    with torch.no_grad():
        out = full(ids, output_hidden_states=True)
    hs = out.hidden_states
    src = ModelSource(path, seqlen=L)
    runner = src.runner()
    if fam != "llama":  # layer 0 slides over the last 8 positions (Qwen and Gemma alternate from there)
        assert layer_window(src.hf, src.arch, 0) == WINDOW
    with torch.no_grad():
        torch.testing.assert_close(src.embed(ids).float(), hs[0], rtol=0, atol=0)  # Gemma: scaled by sqrt(H)
        for i in range(2):  # the last hidden state has the final norm applied, so compare the inner layers
            torch.testing.assert_close(runner(src.block(i), i, hs[i]), hs[i + 1], rtol=1e-5, atol=1e-5)
        # The last layer, final norm and lm_head (Gemma 2 caps the logits): the model's logits.
        last = runner(src.block(2), 2, hs[2])
        logits = src.logits(src.final_norm()(last), src.lm_head_weight().float())
    torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)


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


def test_sliding_window_hides_what_left_it(tmp_path):
    """A sliding layer's position q depends on positions q-7..q only: changing position 0 leaves 8 onward as is."""
    src = ModelSource(save_tiny_model(tmp_path / "m", arch="mistral", sliding_window=WINDOW))
    block, runner = src.block(0), src.runner()
    x = torch.randn(1, 20, 64)
    y = x.clone()
    y[:, 0] += 1
    with torch.no_grad():
        a, b = runner(block, 0, x), runner(block, 0, y)
    assert not torch.allclose(a[:, :WINDOW], b[:, :WINDOW])
    assert torch.equal(a[:, WINDOW:], b[:, WINDOW:])


def test_every_supported_family_builds_its_config():
    for name, arch in ARCHS.items():
        cfg = arch.config_cls().to_dict()
        cfg["architectures"] = [name]
        assert arch_for(cfg) is arch
        hf_config(cfg)  # its layer holds exactly the linears the family quantizes


@pytest.mark.parametrize("config,fragment", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "no adapter"),
    ({"architectures": ["MixtralForCausalLM"], "num_local_experts": 8}, "mixture-of-experts"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128}, "mixture-of-experts"),
    ({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": {}, "vision_config": {}}, "multimodal"),
])
def test_unsupported_architectures_name_what_they_lack(config, fragment):
    with pytest.raises(UnsupportedModel, match=fragment) as e:
        arch_for(config)
    msg = str(e.value)
    assert "\n" not in msg and config["architectures"][0] in msg and "LlamaForCausalLM" in msg


def test_mixture_of_experts_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from transformers import MixtralConfig, MixtralForCausalLM

    monkeypatch.setenv("FRUGAL_QAT_CACHE", str(tmp_path / "cache"))
    cfg = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=2, vocab_size=128)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    (tmp_path / "calib.txt").write_text(CORPUS)
    code = main(["block-ap", "--model", str(tmp_path / "moe"), "--out", str(tmp_path / "out"), "--calib",
                 str(tmp_path / "calib.txt"), "--wbits", "2", "--seqlen", "16", "--device", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(err) == 1
    assert "MixtralForCausalLM" in err[0] and "mixture-of-experts" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists(), "nothing is written"


def test_gemma_bidirectional_is_refused(tmp_path):
    path = save_tiny_model(tmp_path / "m", arch="gemma3")
    cfg = json.loads((path / "config.json").read_text())
    cfg["use_bidirectional_attention"] = True
    with pytest.raises(UnsupportedModel, match="encoder"):
        hf_config(cfg)
