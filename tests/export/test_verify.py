"""The verification's verdicts: a loader whose dtype changes the result gets a warning naming the cause and the
fix, one that reproduces frugal-qat's perplexity gets none; and the engine lines say what loads which bit width."""

import logging

import pytest
import torch

from frugal_qat.export import export_run
from frugal_qat.export.engines import CHECKED_VERSIONS, engine_line, engine_support
from frugal_qat.export.loaders import Loader, _dtype, loaders_for
from frugal_qat.export.verify import calibration_windows, check_loaders, judge
from tests.export import make_run

GPTQ_V2 = {"bits": 2, "group_size": 64, "checkpoint_format": "gptq_v2"}


def test_warning_fires_when_a_loaders_dtype_changes_the_result(tmp_path):
    run = make_run(tmp_path, 4, 32)
    out = tmp_path / "dense"
    export_run(run, "fp16", out, dtype="float32", verify=False)  # exact weights: only the compute dtype differs
    loaders = [Loader("transformers", "defaults", (_dtype(torch.bfloat16),), ()),
               Loader("transformers", "recommended", (_dtype(torch.float32),), ())]
    windows = calibration_windows(run, 64)
    # The tiny random model's perplexity moves only ~1e-4 under bf16 (real low-bit models move far more:
    # docs/EXPORT.md), so the tolerance is lowered to what this model can show.
    res = check_loaders(run, out, "fp16", windows, "float32", torch.device("cpu"), tolerance=2e-5, loaders=loaders)
    bf16, fp32 = res["loaders"]
    assert (bf16["compute_dtype"], bf16["status"]) == ("bfloat16", "differs") and abs(bf16["rel_diff"]) > 2e-5
    assert (fp32["compute_dtype"], fp32["status"]) == ("float32", "ok") and abs(fp32["rel_diff"]) < 1e-6
    [warning] = res["warnings"]
    assert "computes in bfloat16 on cpu" in warning and "rounds every fp16 scale" in warning
    assert warning.endswith("load it with AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32)")
    assert res["reproduce"] == ["AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32)"]


def test_judge_names_the_cause_and_the_fix():
    loaders = loaders_for("gptq", GPTQ_V2, "float16", torch.device("cpu"))
    defaults = loaders[0]
    assert (defaults.name, defaults.call) == ("GPTQModel.load (defaults)", "GPTQModel.load(PATH)")
    res = {"status": "ok", "rel_diff": 0.22, "ppl": 260.0, "compute_dtype": "bfloat16", "device": "cpu"}
    warning = judge(res, defaults, loaders, 213.0, 0.005, torch.device("cpu"), "float16")
    assert res["status"] == "differs"
    assert "perplexity 260 is +22.0% against frugal-qat's 213: it computes in bfloat16 on cpu" in warning
    assert warning.endswith("load it with GPTQModel.load(PATH, dtype=torch.float16)")
    close = {"status": "ok", "rel_diff": 0.004, "ppl": 213.9, "compute_dtype": "float16", "device": "cpu"}
    assert judge(close, loaders[1], loaders, 213.0, 0.005, torch.device("cpu"), "float16") is None
    assert close["status"] == "ok"
    # The recommended call itself off: no other call to offer, so it asks for a report.
    off = {"status": "ok", "rel_diff": -0.03, "ppl": 206.6, "compute_dtype": "float16", "device": "cpu"}
    assert "please report it" in judge(off, loaders[1], loaders, 213.0, 0.005, torch.device("cpu"), "float16")
    # A bf16-native model: recommending fp16 could overflow its activations, so the fix says when it is safe.
    bf = loaders_for("gptq", GPTQ_V2, "bfloat16", torch.device("cpu"))
    assert bf[1].call == "GPTQModel.load(PATH, dtype=torch.bfloat16)"
    res = {"status": "ok", "rel_diff": 0.22, "ppl": 260.0, "compute_dtype": "bfloat16", "device": "cpu"}
    assert "bf16-native" in judge(res, bf[1], bf, 213.0, 0.005, torch.device("cpu"), "bfloat16")


def test_loaders_per_format():
    cpu = torch.device("cpu")
    assert [ld.name for ld in loaders_for("gptq", {**GPTQ_V2, "checkpoint_format": "gptq"}, "float16", cpu)] == [
        "transformers (defaults)", "transformers (recommended)"]  # GPTQModel.load refuses our v1 files
    rec = loaders_for("gptq", {"bits": 4, "group_size": -1, "checkpoint_format": "gptq_v2"}, "float16", cpu)[1]
    assert rec.call == "GPTQModel.load(PATH, dtype=torch.float16, backend=BACKEND.TORCH)"
    ct = loaders_for("compressed-tensors", {}, "float16", cpu)
    assert ct[0].known_failure and "dequantize=True" in ct[1].call
    cuda = loaders_for("fp16", None, "bfloat16", torch.device("cuda"))
    assert cuda[1].call == 'AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.bfloat16, device_map="cuda")'


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_engine_lines_tell_what_loads_which_bit_width(bits):
    for fmt, zp in (("gptq", "v2"), ("gptq", "v1"), ("compressed-tensors", "v2"), ("fp16", "v2")):
        support = engine_support(fmt, bits, zp)
        assert any(e.loads and e.basis == "checked" for e in support), (fmt, zp)
        for e in support:
            assert e.basis in ("checked", "not checked")
            if e.basis == "checked":  # a checked claim names the versions it was checked with
                assert any(v in e.engine for v in CHECKED_VERSIONS.values()), e
    vllm_gptq = next(e for e in engine_support("gptq", bits, "v2") if e.engine == "vLLM")
    assert not vllm_gptq.loads and vllm_gptq.basis == "not checked"  # asymmetric GPTQ: no vLLM path
    vllm_ct = next(e for e in engine_support("compressed-tensors", bits) if e.engine == "vLLM")
    assert vllm_ct.loads == (bits in (4, 8)) and vllm_ct.basis == "not checked"
    line = engine_line("compressed-tensors", bits)
    assert line.startswith(f"compressed-tensors (pack-quantized, {bits}-bit asymmetric): loads in transformers")
    assert ("does not load in vLLM" in line) == (bits in (2, 3))


def test_export_logs_and_records_its_engine_line(tmp_path, caplog):
    run = make_run(tmp_path, 3, 32)
    with caplog.at_level(logging.INFO, logger="frugal_qat.export"):
        report = export_run(run, "gptq", tmp_path / "g", verify=False)
    assert report["engine_line"] == engine_line("gptq", 3, "v2")
    assert f"engines: {report['engine_line']}" in caplog.text
    assert "does not load in AutoRound" in report["engine_line"] and "vLLM" in report["engine_line"]
    readme = (tmp_path / "g" / "README.md").read_text()
    assert "vLLM does not load this file" in readme and "Not measured" in readme
