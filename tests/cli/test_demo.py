"""The README's first command: `frugal-qat demo` end to end (fp16, RTN, Block-AP, + E2E-QP), on a tiny model
standing in for SmolLM2 so that it runs in a minute."""

import json
import math
import shutil

import pytest

from frugal_qat.cli.main import main
from tests.conftest import save_tiny_model

RECIPE = """
quant: {wbits: 3, group_size: 32}
data: {calib: demo, train_size: 4, val_size: 2, seqlen: 32}
block_ap: {epochs: 1, batch_size: 2, weight_lr: 1.0e-3, quant_lr: 1.0e-3}
e2e_qp: {data: demo, seqlen: 32, train_size: 4, batch_size: 2, grad_accum: 1, epochs: 1, lr: 1.0e-3,
         logits_chunk: 32}
"""


@pytest.mark.slow
def test_demo_runs_every_step_and_prints_the_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FRUGAL_QAT_CACHE", str(tmp_path / "cache"))
    tiny = save_tiny_model(tmp_path / "tiny")

    def fake_checkpoint(out):  # the real one converts SmolLM2's GGUF (tests/data/test_demo.py)
        shutil.copytree(tiny, out, dirs_exist_ok=True)
        return out

    monkeypatch.setattr("frugal_qat.data.demo.make_smollm2_checkpoint", fake_checkpoint)
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(RECIPE)
    assert main(["demo", "--dir", str(tmp_path / "demo"), "--recipe", str(recipe), "--group-size", "32",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    methods = [r["method"] for r in results["rows"]]
    assert methods == ["fp16", "RTN w3g32", "Block-AP w3g32", "+ E2E-QP w3g32"]
    for r in results["rows"]:
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        assert r["method"] in out  # the table and the generations name every method
    # wall time and peak RSS are the training run's own (they once showed the perplexity evaluation's seconds, and
    # the demo process's peak inherited through execve)
    runs = ["run-w3g32-rtn", "run-w3g32-block-ap", "run-w3g32-e2e-qp"]
    for r, run in zip(results["rows"][1:], runs):
        summary = json.loads((tmp_path / "demo" / run / "summary.json").read_text())
        assert r["seconds"] == summary["seconds"] and r["peak_rss_bytes"] == summary["peak_rss_bytes"] > 0
    assert (tmp_path / "demo" / "run-w3g32-e2e-qp" / "summary.json").is_file()
    # Size on disk counts the same files in every quantized row (packed blocks, embeddings, norms, lm_head): an
    # E2E-QP run holds exactly the tensors of its Block-AP run, with other scale values.
    sizes = {r["method"]: r["bytes"] for r in results["rows"]}
    assert sizes["+ E2E-QP w3g32"] == sizes["Block-AP w3g32"] == sizes["RTN w3g32"]
