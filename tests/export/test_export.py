"""export_run: the dense fp16 format, streaming layout, the report, and the refusals common to every format."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import frugal_qat.export
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

    # Saved report = returned report, with both checks: the weights, and both loaders (defaults: the config's
    # float16; recommended on CPU: float32) reproducing frugal-qat's perplexity.
    assert json.loads((tmp_path / "fp16" / REPORT_FILE).read_text()) == report
    weights, verify = report["verify"]["weights"], report["verify"]
    assert 0 < weights["max_abs_weight_diff"] <= report["max_weight_rounding"]  # fp16 rounds (q - z) * s
    assert [(r["settings"], r["compute_dtype"], r["status"]) for r in verify["loaders"]] == [
        ("defaults", "float16", "ok"), ("recommended", "float32", "ok")]
    assert verify["warnings"] == [] and len(verify["reproduce"]) == 2
    assert all(r["max_abs_logit_diff"] < 0.01 for r in verify["loaders"])
    assert verify["windows"] == [4, 16]  # the run's own calibration windows (all 64 of its tokens)

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


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "gguf"])  # gguf is one file (tests/export/test_gguf.py)
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


def test_tied_embeddings_export_with_lm_head(runs, tmp_path):
    run = runs(4, 32, tie=True)
    report = export_run(run, "compressed-tensors", tmp_path / "ct", verify=False)
    index = json.loads((tmp_path / "ct" / "model.safetensors.index.json").read_text())
    # Written for tied models too, so loaders that do not tie weights themselves get the embeddings.
    shard = tmp_path / "ct" / index["weight_map"]["lm_head.weight"]
    with safe_open(str(shard), "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))
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
    with pytest.raises(ConfigError, match="float32 applies to the dense fp16 format only"):
        export_run(run, "gptq", tmp_path / "d", dtype="float32")
    assert not (tmp_path / "d").exists()
    assert tree_digest(run) == before

    dense = save_tiny_model(tmp_path / "dense")
    with pytest.raises(ConfigError, match="not a frugal-qat run directory"):
        export_run(dense, "gptq", tmp_path / "g")


def test_refuses_an_unfinished_run(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs(4, 32), run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["progress"] = {"block": 1, "stage": "train"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptCheckpoint, match="not finished.*resume it"):
        export_run(run, "gptq", tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_config_keys_loaders_read(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs(4, 32), run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["dtype"] = "bfloat16"  # a bf16-native source model
    cfg["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (run / "config.json").write_text(json.dumps(cfg))
    export_run(run, "gptq", tmp_path / "auto", verify=False)
    out = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert out["dtype"] == out["torch_dtype"] == "bfloat16"  # follows the source model
    # transformers < 5 reads rope_theta / rope_scaling, transformers 5 rope_parameters: both written.
    assert out["rope_parameters"] == cfg["rope_parameters"] and out["rope_theta"] == 500000.0
    assert out["rope_scaling"] == {k: v for k, v in cfg["rope_parameters"].items() if k != "rope_theta"}
    export_run(run, "gptq", tmp_path / "fp16", dtype="float16", verify=False)  # or chosen by the user
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"


def test_rerun_is_a_no_op_and_a_kill_before_the_rename_resumes(runs, tmp_path, monkeypatch):
    run = runs(2, 32)
    first = export_run(run, "gptq", tmp_path / "a", verify=False)
    before = tree_digest(tmp_path / "a")
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    again = export_run(run, "gptq", tmp_path / "a", verify=False)
    assert again == {**first, "already_complete": True}
    assert tree_digest(tmp_path / "a") == before and mtimes == {p: p.stat().st_mtime_ns for p in mtimes}
    with pytest.raises(ConfigError, match=r"holds another export \(zero_point: 'v2' -> 'v1'\)"):
        export_run(run, "gptq", tmp_path / "a", zero_point="v1", verify=False)

    # Killed between the staged report and the rename: nothing at the destination, then the same command commits.
    def kill(name):
        if name == "export_rename":
            raise KeyboardInterrupt(name)

    monkeypatch.setattr(frugal_qat.export, "kill_point", kill)
    (tmp_path / "b").mkdir()  # an empty destination is allowed, and is removed just before the rename
    with pytest.raises(KeyboardInterrupt):
        export_run(run, "gptq", tmp_path / "b", verify=False)
    assert not (tmp_path / "b").exists() and (tmp_path / ".b.partial" / REPORT_FILE).is_file()
    monkeypatch.undo()
    export_run(run, "gptq", tmp_path / "b", verify=False)
    assert not (tmp_path / ".b.partial").exists()
    # Every file but the report (times, paths) and README is the same bit for bit as the uninterrupted export's.
    same = {k: v for k, v in tree_digest(tmp_path / "b").items() if k not in (REPORT_FILE, "README.md")}
    assert same == {k: v for k, v in before.items() if k not in (REPORT_FILE, "README.md")}

    # A staging folder left mid-write (no report) is redone from the start.
    (tmp_path / ".c.partial").mkdir()
    (tmp_path / ".c.partial" / "model-00001-of-00003.safetensors").write_bytes(b"torn")
    export_run(run, "gptq", tmp_path / "c", verify=False)
    assert {k: v for k, v in tree_digest(tmp_path / "c").items() if k not in (REPORT_FILE, "README.md")} == same


def test_cli_rerun_of_a_complete_export_exits_0_untouched(runs, tmp_path, capsys):
    from frugal_qat.cli.main import main

    argv = ["export", "--run", str(runs(3, 32)), "--format", "compressed-tensors", "--out", str(tmp_path / "ct"),
            "--no-verify"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "engines: compressed-tensors (pack-quantized, 3-bit asymmetric): loads in transformers" in first
    before = tree_digest(tmp_path / "ct")
    assert main(argv) == 0
    assert f"{tmp_path / 'ct'}: this compressed-tensors export is already complete" in capsys.readouterr().out
    assert tree_digest(tmp_path / "ct") == before
    assert main([*argv[:-1], "--dtype", "bfloat16", "--no-verify"]) == 2  # another export into the same folder
    assert "holds another export (dtype: 'float16' -> 'bfloat16')" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_random_kills_of_an_export_resume_bit_identical(runs, tmp_path, fmt):
    """The random-kill harness on `frugal-qat export`: killed while writing, verifying and committing, started
    again each time; the result equals an uninterrupted export's (every tensor and model JSON; gguf: the file's
    bytes), and a re-run of the finished export is a no-op."""
    import subprocess
    import sys

    from frugal_qat.checkpoint.chaos import chaos, env_without_faults, result_files, run_to_completion, snapshot

    run = runs(3, 32)
    cmd = [sys.executable, "-m", "frugal_qat", "export", "--run", str(run), "--format", fmt, "--verify-tokens", "128"]
    # gguf: --out is the file (its report beside it, times and paths: left out of the comparison)
    target, skip = ("model.gguf", ("model.frugal_qat_export.json",)) if fmt == "gguf" else ("", ("README.md",))
    env = env_without_faults()
    ref, events = run_to_completion(cmd + ["--out", str(tmp_path / "ref" / target)], env)
    assert ref.returncode == 0, ref.stderr[-2000:]
    report = chaos(cmd + ["--out", str(tmp_path / "out" / target)], env, events, kills=3, seed=7, max_delay=0.2)
    print(report.table())
    assert report.completed, report.final.stderr[-2000:]
    assert report.stages_hit == {"write", "verify", "commit"}, report.table()
    assert result_files(tmp_path / "out", skip=skip) == result_files(tmp_path / "ref", skip=skip)
    before = snapshot(tmp_path / "out")
    again = subprocess.run(cmd + ["--out", str(tmp_path / "out" / target)], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "already complete" in again.stdout and snapshot(tmp_path / "out") == before
