"""lm-eval through its Python API on a run directory, offline, with a 4-question local task (include_path)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from frugal_qat.export.hf_model import load_quantized_model
from tests.export import make_run

TASKS = Path(__file__).parent / "lm_eval_tasks"

pytestmark = [
    pytest.mark.slow,  # importing lm-eval and building its task index take ~20 s here
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed"),
]


def _our_accuracy(run):
    """acc by hand: the choice whose tokens have the highest summed log-likelihood after the prompt."""
    model, tok = load_quantized_model(run), AutoTokenizer.from_pretrained(run)
    docs = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines()]
    correct = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = []
        for choice in doc["choices"]:
            ctx_ids, all_ids = tok(context)["input_ids"], tok(context + choice)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([all_ids])).logits[0, :-1].log_softmax(-1)
            cont = range(len(ctx_ids), len(all_ids))
            scores.append(sum(logprobs[t - 1, all_ids[t]].item() for t in cont))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(docs)


def test_lm_eval_on_a_local_task(tmp_path, monkeypatch):
    from frugal_qat.eval.lm_eval import run_lm_eval

    run = make_run(tmp_path, 4, 32, seed=1)  # this random tiny model gets 1 of 4 right: a non-trivial match
    monkeypatch.chdir(TASKS)  # the task's data_files path is relative
    result = run_lm_eval(run, "frugal_tiny_mc", include_path=TASKS)
    acc = result["tasks"]["frugal_tiny_mc"]["acc"]
    assert 0.0 <= acc <= 1.0 and result["mean_acc"] == acc
    ours = _our_accuracy(run)
    assert ours > 0 and acc == ours, "lm-eval scored the model object we built"
