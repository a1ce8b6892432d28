"""Kill a real Block-AP process at many points, resume it, and require bit-identical results."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CORPUS, save_tiny_model

ARGS = ["--wbits", "2", "--group-size", "32", "--train-size", "8", "--val-size", "4", "--seqlen", "32",
        "--epochs", "2", "--batch-size", "2", "--chunk-mb", "0.01", "--ckpt-every", "3", "--device", "cpu",
        "--quant-lr", "5e-3", "--weight-lr", "1e-3"]

# (kill point, visit): every stage of a run, several of them in narrow windows.
KILLS = [
    ("read_weights", 3),  # while reading block 0's tensors
    ("stream_write", 2),  # while embedding into the streams
    ("stream_update", 2),  # fp stream update of block 0, after journaling chunk 1
    ("stream_write", 9),  # a torn chunk in the middle of an in-place update
    ("after_fp_update", 1),  # fp stream done, manifest not yet updated
    ("train_checkpoint", 1),  # while writing a mid-epoch checkpoint
    ("atomic_write", 8),  # a checkpoint or manifest half written (temporary file)
    ("train_checkpoint", 3),  # at an epoch end
    ("stream_update", 11),  # quant stream update of block 0
    ("after_q_update", 1),
    ("save_block", 1),  # packing and saving block 0
    ("read_weights", 14),  # while block 1 is read in the background (block 0 has 9 tensors)
    ("save_block", 2),  # packing and saving the last block
    ("manifest", 8),  # while writing the manifest of the last block's commit
]


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRUGAL_QAT_KILL")}
    env.update({"FRUGAL_QAT_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def _run(model, out, calib, cache, **env):
    cmd = [sys.executable, "-m", "frugal_qat", "block-ap", "--model", str(model), "--out", str(out), "--calib", str(calib)]
    return subprocess.run(cmd + ARGS, env=_env(cache, **env), capture_output=True, text=True, timeout=600)


def _result(run: Path) -> dict[str, bytes]:
    files = sorted(run.glob("blocks/*.safetensors")) + [run / "model-extra.safetensors"]
    return {f.name: f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny_model(root / "model")
    calib = root / "calib.txt"
    calib.write_text(CORPUS * 60)
    cache = root / "cache"
    ref = _run(model, root / "reference", calib, cache)
    assert ref.returncode == 0, ref.stderr[-2000:]
    return root, model, calib, cache, _result(root / "reference")


@pytest.mark.slow
@pytest.mark.parametrize("point,visit", KILLS, ids=[f"{p}@{v}" for p, v in KILLS])
def test_kill_and_resume_is_bit_identical(setup, point, visit):
    root, model, calib, cache, reference = setup
    out = root / f"run-{point}-{visit}"
    killed = _run(model, out, calib, cache, FRUGAL_QAT_KILL_AT=f"{point}@{visit}")
    assert killed.returncode == -signal.SIGKILL, f"the run was not killed at {point}@{visit}: {killed.stderr[-1500:]}"
    resumed = _run(model, out, calib, cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _result(out) == reference


@pytest.mark.slow
def test_ctrl_c_stops_at_a_safe_point_and_resumes(setup):
    root, model, calib, cache, reference = setup
    out = root / "run-sigint"
    stopped = _run(model, out, calib, cache, FRUGAL_QAT_KILL_AT="stream_update@3", FRUGAL_QAT_KILL_SIGNAL="INT")
    assert stopped.returncode == 2
    assert "frugal-qat resume" in stopped.stderr
    resumed = subprocess.run([sys.executable, "-m", "frugal_qat", "resume", str(out)], env=_env(cache),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _result(out) == reference


@pytest.mark.slow
def test_other_settings_on_an_existing_run_are_refused(setup):
    root, model, calib, cache, _ = setup
    out = root / "reference"
    cmd = [sys.executable, "-m", "frugal_qat", "block-ap", "--model", str(model), "--out", str(out), "--calib", str(calib)]
    args = [a if a != "2" or i != 1 else "3" for i, a in enumerate(ARGS)]  # --wbits 3
    r = subprocess.run(cmd + args, env=_env(cache), capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    assert "quant.wbits: run has 2, now 3" in r.stderr and "--restart" in r.stderr
    assert "Traceback" not in r.stderr
