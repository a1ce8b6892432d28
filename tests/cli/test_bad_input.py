"""Each bad input: one line naming the problem and the fix, exit status 2, no traceback, the source untouched."""

import hashlib
import json
import subprocess
import sys

import pytest

from frugal_qat.cli.main import main
from tests.conftest import CORPUS, save_tiny_model

BASE = ["--wbits", "2", "--group-size", "32", "--train-size", "4", "--val-size", "2", "--seqlen", "16",
        "--epochs", "1", "--device", "cpu"]


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("FRUGAL_QAT_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "model")
    calib = tmp_path / "calib.txt"
    calib.write_text(CORPUS * 20)
    return tmp_path, model, calib


def _block_ap(model, out, calib, *extra):
    return main(["block-ap", "--model", str(model), "--out", str(out), "--calib", str(calib), *BASE, *extra])


def _expect_error(capsys, code, *fragments):
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = [x[x.index("frugal-qat: error:"):] for x in err.splitlines() if "frugal-qat: error:" in x]
    assert line, err[-1500:]
    for f in fragments:
        assert f in line[-1], line[-1]


def test_unsupported_architecture(env, capsys):
    tmp, model, calib = env
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(cfg))
    _expect_error(capsys, _block_ap(model, tmp / "out", calib), "not supported", "LlamaForCausalLM")


@pytest.mark.parametrize("flags,fragments", [
    (["--wbits", "5"], ["wbits=5", "[2, 3, 4, 8]"]),
    (["--group-size", "48"], ["group size 48 does not divide", "-1"]),
    (["--train-size", "5", "--batch-size", "2"], ["not divisible", "multiple of 2"]),
    (["--wbitz", "2"], []),  # argparse's own error
])
def test_bad_settings(env, capsys, flags, fragments):
    tmp, model, calib = env
    before = _digest(model)
    if flags[0] == "--wbitz":
        with pytest.raises(SystemExit) as e:
            _block_ap(model, tmp / "out", calib, *flags)
        assert e.value.code == 2
        return
    _expect_error(capsys, _block_ap(model, tmp / "out", calib, *flags), *fragments)
    assert not (tmp / "out").exists(), "nothing is written for invalid settings"
    assert _digest(model) == before


def test_unknown_recipe_key_suggests_the_right_one(env, capsys):
    tmp, model, calib = env
    recipe = tmp / "r.yaml"
    recipe.write_text("block_ap:\n  epoch: 2\n")
    _expect_error(capsys, _block_ap(model, tmp / "out", calib, "--recipe", str(recipe)), "did you mean 'epochs'")


def test_too_little_calibration_text(env, capsys):
    tmp, model, _ = env
    short = tmp / "short.txt"
    short.write_text("just a few words")
    _expect_error(capsys, _block_ap(model, tmp / "out", short), "tokens", "--calib")


def test_empty_calibration_file(env, capsys):
    tmp, model, _ = env
    empty = tmp / "empty.txt"
    empty.write_text("")
    _expect_error(capsys, _block_ap(model, tmp / "out", empty), str(empty.name))


def test_out_equal_to_model_dir(env, capsys):
    tmp, model, calib = env
    before = _digest(model)
    _expect_error(capsys, _block_ap(model, model, calib), "overlaps the source model")
    assert _digest(model) == before


def test_non_empty_foreign_out_dir(env, capsys):
    tmp, model, calib = env
    (tmp / "stuff").mkdir()
    (tmp / "stuff" / "precious.txt").write_text("keep me")
    _expect_error(capsys, _block_ap(model, tmp / "stuff", calib), "not a frugal-qat run")
    assert (tmp / "stuff" / "precious.txt").read_text() == "keep me"


def test_missing_shard(env, capsys):
    tmp, model, calib = env
    sorted(model.glob("*.safetensors"))[-1].unlink()
    _expect_error(capsys, _block_ap(model, tmp / "out", calib), "missing")


def test_corrupt_safetensors(env, capsys):
    tmp, model, calib = env
    shard = sorted(model.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:200])
    _expect_error(capsys, _block_ap(model, tmp / "out", calib), "truncated")


@pytest.mark.parametrize("content", [None, "{"])
def test_missing_or_malformed_config(env, capsys, content):
    tmp, model, calib = env
    if content is None:
        (model / "config.json").unlink()
    else:
        (model / "config.json").write_text(content)
    _expect_error(capsys, _block_ap(model, tmp / "out", calib), "config.json")


def test_nan_in_source_weights(env, capsys):
    """Weights are checked as each block streams in (a separate full pass would double a 70B's reads), so the
    run stops at the damaged block with the tensor named."""
    from safetensors.torch import load_file, save_file

    tmp, model, calib = env
    key = "model.layers.1.self_attn.o_proj.weight"
    shard = model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][key]
    t = load_file(shard)
    t[key][3, 3] = float("inf")
    save_file(t, shard, metadata={"format": "pt"})
    _expect_error(capsys, _block_ap(model, tmp / "out", calib), "NaN or Inf", key)


def test_run_dir_of_an_incompatible_version(env, capsys):
    tmp, model, calib = env
    assert _block_ap(model, tmp / "out", calib) == 0
    capsys.readouterr()
    m = json.loads((tmp / "out" / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp / "out" / "manifest.json").write_text(json.dumps(m))
    _expect_error(capsys, _block_ap(model, tmp / "out", calib), "format 99", "--restart")


def test_not_enough_disk(env, capsys, tmp_path):
    """The work directory on a 1 MiB tmpfs: refused before anything runs."""
    tmp, model, calib = env
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.fail("this test needs root to mount a tmpfs (CI and the dev machines run as root)")
    big = tmp / "big.txt"
    big.write_text(CORPUS * 400)
    try:
        code = _block_ap(model, tmp / "out", big, "--train-size", "64", "--seqlen", "256", "--work-dir", str(mnt))
        _expect_error(capsys, code, "GiB", "free space")
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.mark.slow
def test_disk_full_mid_run_then_resume(env, tmp_path):
    """A write that fails with ENOSPC mid-run: a clear error; once space is back the same command resumes to the
    same result as an uninterrupted run."""
    tmp, model, calib = env
    args = [sys.executable, "-m", "frugal_qat", "block-ap", "--model", str(model), "--calib", str(calib), *BASE,
            "--epochs", "2", "--chunk-mb", "0.005"]
    import os

    env_ = dict(os.environ)
    ref = subprocess.run(args + ["--out", str(tmp / "ref")], env=env_, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-1500:]
    full = subprocess.run(args + ["--out", str(tmp / "run")], env={**env_, "FRUGAL_QAT_ENOSPC_AT": "12"},
                          capture_output=True, text=True)
    assert full.returncode == 2
    assert "disk full" in full.stderr and "resume" in full.stderr and "Traceback" not in full.stderr
    again = subprocess.run(args + ["--out", str(tmp / "run")], env=env_, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-1500:]
    for f in sorted((tmp / "ref" / "blocks").iterdir()):
        assert f.read_bytes() == (tmp / "run" / "blocks" / f.name).read_bytes()
