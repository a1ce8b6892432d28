"""One command at a time per run directory: a second writer (or a writer beside a reader) is refused with the other
process's pid and touches nothing; a killed holder releases at once, so a kill never blocks the resume."""

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from frugal_qat.checkpoint.run_dir import clear_dir, hold_run_dir
from frugal_qat.cli.main import main
from frugal_qat.errors import RunInUse
from tests.conftest import CORPUS, save_tiny_model

BASE = ["--wbits", "2", "--group-size", "32", "--train-size", "4", "--val-size", "2", "--seqlen", "16",
        "--epochs", "1", "--device", "cpu"]


class Holder:
    """Another process holding ``path`` as a running command would, until it is killed."""

    def __init__(self, path: Path, exclusive: bool):
        code = ("import sys, time\nfrom frugal_qat.checkpoint.run_dir import hold_run_dir\n"
                f"with hold_run_dir(sys.argv[1], exclusive={exclusive}):\n"
                "    print('held', flush=True)\n    time.sleep(600)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def holders():
    made = []

    def make(path, exclusive=True):
        made.append(Holder(path, exclusive))
        return made[-1]

    yield make
    for h in made:
        h.kill()


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def test_writers_exclude_each_other_and_readers_share(tmp_path, holders):
    run = tmp_path / "run"
    writer = holders(run)
    for exclusive in (True, False):  # another writer, or a reader, while it is written
        with pytest.raises(RunInUse, match=rf"in use by another frugal-qat command \(pid {writer.pid}\)"):
            with hold_run_dir(run, exclusive=exclusive):
                pass
    writer.kill()  # SIGKILL: the kernel drops the lock with the process, the resume starts at once
    t0 = time.monotonic()
    with hold_run_dir(run, exclusive=True):
        assert time.monotonic() - t0 < 1
    reader = holders(run, exclusive=False)
    with hold_run_dir(run, exclusive=False):  # two readers (two exports of one run)
        pass
    with pytest.raises(RunInUse, match=str(reader.pid)):
        with hold_run_dir(run, exclusive=True):
            pass


def test_a_new_folder_left_empty_is_removed_and_clearing_keeps_the_hold(tmp_path, holders):
    new = tmp_path / "new"
    with hold_run_dir(new, exclusive=True):
        assert new.is_dir()
    assert not new.exists()  # a run refused by its checks leaves no folder
    run = tmp_path / "run"
    (run / "work").mkdir(parents=True)
    (run / "work" / "x.bin").write_bytes(b"1")
    (run / "manifest.json").write_text("{}")
    with hold_run_dir(run, exclusive=True):
        clear_dir(run)  # --restart: the folder itself stays, and with it the lock
        assert run.is_dir() and not any(run.iterdir())
        probe = subprocess.run([sys.executable, "-c", "import sys\nfrom frugal_qat.checkpoint.run_dir import "
                                "hold_run_dir\nwith hold_run_dir(sys.argv[1], exclusive=True): pass", str(run)],
                               capture_output=True, text=True)
        assert probe.returncode != 0 and "RunInUse" in probe.stderr
    assert run.is_dir()  # it existed before: kept


@pytest.mark.slow
def test_commands_refuse_a_run_directory_in_use(tmp_path, monkeypatch, capsys, holders):
    monkeypatch.setenv("FRUGAL_QAT_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "model")
    calib = tmp_path / "calib.txt"
    calib.write_text(CORPUS * 20)
    run, e2e = tmp_path / "run", tmp_path / "run-e2e"

    def block_ap(*extra):
        return main(["block-ap", "--model", str(model), "--out", str(run), "--calib", str(calib), *BASE, *extra])

    def e2e_qp():
        return main(["e2e-qp", "--run", str(run), "--out", str(e2e), "--data", str(calib), "--seqlen", "16",
                     "--train-size", "4", "--batch-size", "2", "--grad-accum", "1", "--epochs", "1",
                     "--optimizer", "adamw", "--device", "cpu"])

    def refused(code, pid):
        assert code == 2
        err = capsys.readouterr().err
        assert f"in use by another frugal-qat command (pid {pid})" in err and "Traceback" not in err, err[-1500:]

    # A second block-ap on a run being written: refused before it reads or writes anything in it.
    other = holders(run)
    refused(block_ap(), other.pid)
    assert list(run.iterdir()) == []
    # Started by a launcher without --deepspeed, every process takes itself for rank 0: the launch error, not the
    # hold of a sibling, is what each must see.
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert block_ap() == 2
    assert "not data parallel; pass --deepspeed" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    other.kill()
    assert block_ap() == 0
    done = _tree(run)

    # A finished run being read (an export, an E2E-QP): --restart may not wipe it; E2E-QP may not start from a
    # run another block-ap is writing.
    reader = holders(run, exclusive=False)
    refused(block_ap("--restart"), reader.pid)
    assert _tree(run) == done
    reader.kill()
    writer = holders(run)
    refused(e2e_qp(), writer.pid)
    assert not e2e.exists()
    refused(main(["export", "--run", str(run), "--format", "fp16", "--out", str(tmp_path / "fp16"), "--no-verify"]),
            writer.pid)
    assert not (tmp_path / "fp16").exists() and not (tmp_path / ".fp16.partial").exists()
    writer.kill()

    # Two exports to one place: the second is refused while the first holds its staging folder.
    stager = holders(tmp_path / ".fp16.partial")
    refused(main(["export", "--run", str(run), "--format", "fp16", "--out", str(tmp_path / "fp16"), "--no-verify"]),
            stager.pid)
    stager.kill()
    export = ["export", "--run", str(run), "--format", "fp16", "--out", str(tmp_path / "fp16"), "--no-verify"]
    assert main(export) == 0
    assert not (tmp_path / ".fp16.partial").exists()
    # The same export again is complete: nothing held, nothing made, even while the run is being written.
    listing, writer = sorted(p.name for p in tmp_path.iterdir()), holders(run)
    assert main(export) == 0 and "already complete" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    writer.kill()
    assert e2e_qp() == 0
    assert _tree(run) == done  # nothing the refused commands did reached the run
