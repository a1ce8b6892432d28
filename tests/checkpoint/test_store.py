"""Durable tensor files: written straight from the tensors' memory, atomically, and a full disk is a clear error."""

import pytest
import torch
from safetensors.torch import load_file

from frugal_qat.checkpoint import store
from frugal_qat.checkpoint.store import atomic_save_tensors
from frugal_qat.errors import OutOfSpace


def test_tensors_round_trip_with_metadata(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(7, 5, generator=g), "codes": torch.randint(0, 15, (3, 4), dtype=torch.int32),
               "bf": torch.randn(4, generator=g).bfloat16(), "t": torch.randn(6, 4, generator=g).t()}  # not contiguous
    atomic_save_tensors(tmp_path / "x.safetensors", tensors, metadata={"step": "3"})
    back = load_file(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary left


def test_cpu_tensors_are_written_without_a_serialised_copy(tmp_path, monkeypatch):
    # The whole file is never built in memory: save_file gets the caller's own contiguous CPU tensors.
    seen = {}

    def spy(tensors, filename, metadata=None):
        seen.update(tensors)
        real(tensors, filename, metadata=metadata)

    real = store.save_file
    monkeypatch.setattr(store, "save_file", spy)
    w = torch.randn(64, 64)
    atomic_save_tensors(tmp_path / "x.safetensors", {"w": w})
    assert seen["w"].data_ptr() == w.data_ptr()


def test_disk_full_inside_safetensors_is_out_of_space_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.safetensors"
    atomic_save_tensors(target, {"w": torch.zeros(3)})

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(store, "save_file", full)
    with pytest.raises(OutOfSpace, match="free space on"):
        atomic_save_tensors(target, {"w": torch.ones(3)})
    assert torch.equal(load_file(target)["w"], torch.zeros(3))  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


def test_other_safetensors_errors_pass_through_and_leave_no_partial(tmp_path, monkeypatch):
    def broken(tensors, filename, metadata=None):
        open(filename, "wb").close()
        raise RuntimeError("some other failure")

    monkeypatch.setattr(store, "save_file", broken)
    with pytest.raises(RuntimeError, match="some other failure"):
        atomic_save_tensors(tmp_path / "x.safetensors", {"w": torch.ones(3)})
    assert list(tmp_path.iterdir()) == []


def test_a_kill_inside_safetensors_leaves_its_temporary_file_and_resume_drops_it(tmp_path):
    # safetensors writes through a temporary file of its own beside the target; a SIGKILL while it writes leaves
    # that file behind (a CI chaos run found one in a finished run directory). The kill here is real, so a change
    # of safetensors' naming makes this test fail rather than leave big files in run directories.
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, torch; from frugal_qat.checkpoint.store import atomic_save_tensors\n"
            "atomic_save_tensors(sys.argv[1], {'w': torch.zeros(1 << 29, dtype=torch.uint8)})\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.tmp.json").write_text("{}")  # not a temporary file of either kind
    (run / "work").mkdir()
    (run / "work" / "manifest.json.tmp-partial").write_text("{")  # ours, from a kill inside _atomic_write
    proc = subprocess.Popen([sys.executable, "-c", code, str(run / "block.safetensors")])
    deadline = time.monotonic() + 120
    try:
        while not [p for p in run.iterdir() if p.name.startswith(".tmp")]:
            assert proc.poll() is None and time.monotonic() < deadline, "safetensors wrote no temporary file"
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = sorted(p.name for p in run.iterdir())
    assert any(store._SAFETENSORS_TMP.fullmatch(n) for n in left), left
    store.remove_partials(run)
    assert sorted(p.name for p in run.rglob("*")) == ["keep.tmp.json", "work"]
