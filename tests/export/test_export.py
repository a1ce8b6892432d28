"""export_run: the dense fp16 format, streaming layout, the report, and the refusals common to every format."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from frugal_qat.errors import ConfigError, CorruptCheckpoint
from frugal_qat.export import FORMATS, REPORT_FILE, export_run
from frugal_qat.export.hf_model import load_quantized_model
from frugal_qat.export.verify import check_weights
from tests.conftest import save_tiny_model
from tests.export import RunCache, tree_digest


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return RunCache(tmp_path_factory.mktemp("export-runs"))


def _logits(model, windows):
    with torch.no_grad():
        return model(windows).logits


def test_fp16_export_loads_in_plain_transformers(runs, tmp_path):
    run = runs(3, 32)
    before = tree_digest(run)
    report = export_run(run, "fp16", tmp_path / "fp16")
    assert tree_digest(run) == before, "the export wrote into the run directory"

    # Saved report = returned report, with both checks.
    assert json.loads((tmp_path / "fp16" / REPORT_FILE).read_text()) == report
    weights, logits = report["verify"]["weights"], report["verify"]["logits"]
    assert 0 < weights["max_abs_weight_diff"] <= report["max_weight_rounding"]  # fp16 rounds (q - z) * s
    assert logits["loader"].startswith("transformers") and logits["max_abs_logit_diff"] < 0.01

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp16")
    assert model.dtype == torch.float16 and "quantization_config" not in model.config.to_dict()
    windows = torch.randint(0, 128, (2, 24))
    theirs = _logits(model.float(), windows)
    ours = _logits(load_quantized_model(run), windows)
    assert (theirs - ours).abs().max() < 0.01


def test_fp32_dense_export_is_exact(runs, tmp_path):
    run = runs(2, -1)
    export_run(run, "fp16", tmp_path / "fp32", dtype="float32", verify=False)
    assert check_weights(run, tmp_path / "fp32", "fp16")["max_abs_weight_diff"] == 0.0
    windows = torch.randint(0, 128, (2, 24))
    theirs = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32), windows)
    assert torch.allclose(theirs, _logits(load_quantized_model(run), windows), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_streams_one_shard_per_block(runs, tmp_path, fmt):
    export_run(runs(4, 32), fmt, tmp_path / "out", verify=False)
    weight_map = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert shards == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    for key, shard in weight_map.items():
        expected = shards[int(key.split(".")[2])] if key.startswith("model.layers.") else shards[-1]
        assert shard == expected, key
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(weight_map)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "float16" and cfg.get("quantization_config", {}).get("quant_method") != "frugal_qat"


def test_tied_embeddings_export_without_lm_head(runs, tmp_path):
    run = runs(4, 32, tie=True)
    report = export_run(run, "compressed-tensors", tmp_path / "ct", verify=False)
    index = json.loads((tmp_path / "ct" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]
    assert report["bits"] == 4
    export_run(run, "fp16", tmp_path / "fp16", verify=False)
    windows = torch.randint(0, 128, (2, 16))
    theirs = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "fp16", dtype=torch.float32), windows)
    assert (theirs - _logits(load_quantized_model(run), windows)).abs().max() < 0.01


def test_refusals(runs, tmp_path):
    run = runs(4, 32)
    before = tree_digest(run)
    with pytest.raises(ConfigError, match="unknown; choose one of gptq, compressed-tensors, fp16"):
        export_run(run, "awq", tmp_path / "x")
    with pytest.raises(ConfigError, match="inside the run directory"):
        export_run(run, "fp16", run / "export")
    with pytest.raises(ConfigError, match="inside the run directory"):
        export_run(run, "fp16", run)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        export_run(run, "gptq", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="dtype 'int8' is not supported"):
        export_run(run, "fp16", tmp_path / "d", dtype="int8")
    assert not (tmp_path / "d").exists()
    assert tree_digest(run) == before

    dense = save_tiny_model(tmp_path / "dense")
    with pytest.raises(ConfigError, match="not a frugal-qat run directory"):
        export_run(dense, "gptq", tmp_path / "g")


def test_refuses_an_unfinished_run(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs(4, 32), run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["progress"] = {"block": 1, "stage": "train"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpoint, match="not finished.*resume it"):
        export_run(run, "gptq", tmp_path / "g")
    assert not (tmp_path / "g").exists()
