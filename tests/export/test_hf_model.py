"""A run directory as a transformers model object: frugal-qat's forward, generate(), tied embeddings."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from frugal_qat.eval.ppl import perplexity
from frugal_qat.export.hf_model import load_quantized_model
from tests.conftest import save_tiny_model
from tests.export import make_run


def test_run_as_model_matches_streamed_forward_and_generates(tmp_path):
    run = make_run(tmp_path, 3, 32)
    model = load_quantized_model(run)
    assert not any(p.is_meta for p in model.parameters()) and model.dtype == torch.float32
    windows = torch.randint(0, 128, (3, 32))
    with torch.no_grad():
        loss = model(windows, labels=windows).loss.item()
    # The streamed evaluator (one block in memory, ModelSource) computes the same model.
    assert math.exp(loss) == pytest.approx(perplexity(run, windows, show_progress=False)["ppl"], rel=1e-5)
    # ... and it is the quantized model, not the source: the dense source gives other logits.
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)(windows).logits
        assert (model(windows).logits - dense).abs().max() > 1e-3

    tok = AutoTokenizer.from_pretrained(run)
    prompt = tok("The quick brown fox", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 6)
    assert torch.equal(out, model.generate(**prompt, max_new_tokens=6, do_sample=False)), "greedy is deterministic"


def test_dense_checkpoint_and_tied_embeddings(tmp_path):
    src = save_tiny_model(tmp_path / "tied", tie=True)
    model = load_quantized_model(src)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    windows = torch.randint(0, 128, (2, 16))
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(windows).logits, ref(windows).logits)
