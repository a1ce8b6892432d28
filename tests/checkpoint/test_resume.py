"""Kill a real Block-AP process, anywhere, again and again; every resume ends bit-identical to an uninterrupted run,
and a finished run started again is a no-op."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from frugal_qat.checkpoint.chaos import chaos, env_without_faults, result_files, run_to_completion, snapshot
from tests.conftest import CORPUS, save_tiny_model

ARGS = ["--wbits", "2", "--group-size", "32", "--train-size", "8", "--val-size", "4", "--seqlen", "32",
        "--epochs", "2", "--batch-size", "2", "--chunk-mb", "0.01", "--ckpt-every", "3", "--device", "cpu",
        "--quant-lr", "5e-3", "--weight-lr", "1e-3"]

# Named kill points in narrow windows that random kills rarely hit, one per restart of the same run (a process
# counts its own visits from 1), in the order the run reaches them. The write path's own windows (mid-write,
# synced but not recorded, mid-record, writes queued) are killed in tests/offload/test_activations.py.
SEQUENCE = [
    "stream_write@3",  # embedding the windows into the streams: a torn chunk
    "after_fp_update@1",  # block 0's fp update complete, the manifest not yet advanced
    "train_checkpoint@1",  # writing a mid-epoch training checkpoint
    "stream_sync@5",  # the quant update: a chunk durable, not yet recorded done
    "save_block@1",  # packing and saving block 0
    "manifest@3",  # a manifest write
    "after_done@1",  # finished, the work folder not yet removed
]


def _env(cache: Path, **extra) -> dict:
    env = env_without_faults()
    env.update({"FRUGAL_QAT_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def _cmd(model, out, calib) -> list[str]:
    return [sys.executable, "-m", "frugal_qat", "block-ap", "--model", str(model), "--out", str(out), "--calib",
            str(calib), *ARGS]


def _run(model, out, calib, cache, **env):
    return subprocess.run(_cmd(model, out, calib), env=_env(cache, **env), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny_model(root / "model")
    calib = root / "calib.txt"
    calib.write_text(CORPUS * 60)
    cache = root / "cache"
    ref, events = run_to_completion(_cmd(model, root / "reference", calib), _env(cache))
    assert ref.returncode == 0, ref.stderr[-2000:]
    return root, model, calib, cache, result_files(root / "reference"), events


@pytest.mark.slow
def test_kills_at_every_narrow_window_in_sequence_resume_bit_identical(setup):
    root, model, calib, cache, reference, _ = setup
    out = root / "run-sequence"
    for point in SEQUENCE:
        killed = _run(model, out, calib, cache, FRUGAL_QAT_KILL_AT=point)
        assert killed.returncode == -signal.SIGKILL, f"not killed at {point}: {killed.stderr[-1500:]}"
    resumed = _run(model, out, calib, cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert result_files(out) == reference
    assert not (out / "work").exists(), "the work folder a kill left after 'done' is removed by the next start"


@pytest.mark.slow
def test_random_kills_hit_every_stage_and_resume_bit_identical(setup):
    """The chaos harness: seeded random SIGKILLs aimed at every stage of the run, then the same command until it
    completes; the result equals the uninterrupted run's bit for bit."""
    root, model, calib, cache, reference, events = setup
    out = root / "run-chaos"
    # 14 kills for 6 stages: a kill that overshoots a short stage (the CI machine is loaded) is followed by one
    # aimed at the same stage with no delay, so the coverage assertion is about the code, not the machine's load
    report = chaos(_cmd(model, out, calib), _env(cache), events, kills=14, seed=11, max_delay=0.3)
    print(report.table())
    assert report.completed, report.final.stderr[-2000:]
    assert report.stages_hit >= {"embed", "fp update", "train", "quant update", "save", "finalize"}, report.table()
    assert result_files(out) == reference


@pytest.mark.slow
def test_a_finished_run_started_again_is_a_no_op(setup):
    root, model, calib, cache, reference, _ = setup
    out = root / "reference"
    before = snapshot(out)
    again = _run(model, out, calib, cache)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already complete" in again.stdout + again.stderr and str(out) in again.stdout
    resumed = subprocess.run([sys.executable, "-m", "frugal_qat", "resume", str(out)], env=_env(cache),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "already complete" in resumed.stdout + resumed.stderr, resumed.stderr[-2000:]
    assert snapshot(out) == before, "a finished run was touched"


@pytest.mark.slow
def test_ctrl_c_stops_at_a_safe_point_and_resumes(setup):
    root, model, calib, cache, reference, _ = setup
    out = root / "run-sigint"
    stopped = _run(model, out, calib, cache, FRUGAL_QAT_KILL_AT="stream_update@3", FRUGAL_QAT_KILL_SIGNAL="INT")
    assert stopped.returncode == 2
    assert "frugal-qat resume" in stopped.stderr
    resumed = subprocess.run([sys.executable, "-m", "frugal_qat", "resume", str(out)], env=_env(cache),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert result_files(out) == reference


@pytest.mark.slow
def test_a_damaged_stream_is_named_and_other_settings_are_refused(setup):
    root, model, calib, cache, _, _ = setup
    out = root / "run-damaged"
    killed = _run(model, out, calib, cache, FRUGAL_QAT_KILL_AT="after_fp_update@1")
    assert killed.returncode == -signal.SIGKILL
    stream = out / "work" / "quant_stream.bin"
    os.truncate(stream, stream.stat().st_size // 2)
    r = _run(model, out, calib, cache)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(stream) in r.stderr and "truncated" in r.stderr and "--restart" in r.stderr

    args = [a if a != "2" or i != 1 else "3" for i, a in enumerate(ARGS)]  # --wbits 3
    cmd = [sys.executable, "-m", "frugal_qat", "block-ap", "--model", str(model), "--out", str(out), "--calib", str(calib)]
    r = subprocess.run(cmd + args, env=_env(cache), capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    assert "quant.wbits: run has 2, now 3" in r.stderr and "--restart" in r.stderr
    assert "Traceback" not in r.stderr


# A run in a GGUF grid (docs/GGUF.md): down_proj in q2_k (intermediate 256), the other linears in its q4_0 fallback.
GRID_ARGS = [*ARGS, "--gguf", "q2_k"]
GRID_SEQUENCE = [
    "train_checkpoint@1",  # the first mid-epoch checkpoint torn: the restart reads the saved importance, trains again
    "stream_sync@5",  # the quant update half done: the init could not be recomputed from the stream now
    "save_block@1",  # packing block 0's ggml bytes
]


@pytest.mark.slow
def test_grid_run_killed_in_sequence_resumes_bit_identical(tmp_path):
    model = save_tiny_model(tmp_path / "model", hidden=64, intermediate=256)
    calib = tmp_path / "calib.txt"
    calib.write_text(CORPUS * 60)

    def cmd(out):
        return [sys.executable, "-m", "frugal_qat", "block-ap", "--model", str(model), "--out", str(out), "--calib",
                str(calib), *GRID_ARGS]

    env = _env(tmp_path / "cache")
    ref = subprocess.run(cmd(tmp_path / "reference"), env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "run"
    for point in GRID_SEQUENCE:
        killed = subprocess.run(cmd(out), env={**env, "FRUGAL_QAT_KILL_AT": point}, capture_output=True, text=True,
                                timeout=600)
        assert killed.returncode == -signal.SIGKILL, f"not killed at {point}: {killed.stderr[-1500:]}"
    resumed = subprocess.run(cmd(out), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = result_files(tmp_path / "reference")
    assert any(k.endswith("mlp.down_proj.ggml") for k in reference)
    assert result_files(out) == reference
