"""Durable writes: every file that records progress goes through here.

Each write goes to a temporary name in the same directory, is fsync'ed, renamed over the target, and the directory
is fsync'ed, so a kill at any instant leaves either the old file or the new one, never a torn one.
A fault-injection hook (``FRUGAL_QAT_KILL_AT``) lets the resume tests kill the process at named points.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from frugal_qat.errors import CorruptCheckpoint, OutOfSpace

_TMP_SUFFIX = ".tmp-partial"
# safetensors (0.8 here; tests/checkpoint/test_store.py fails if that changes) writes through a temporary file of
# its own beside the target (Rust's tempfile crate: ".tmp" and six random letters or digits) and renames it; a
# SIGKILL between the two leaves that file behind, and our own clean-up never sees it.
_SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def kill_point(name: str) -> None:
    """Kill this process with SIGKILL at a named point when FRUGAL_QAT_KILL_AT names it.

    ``FRUGAL_QAT_KILL_AT=name`` kills at the first visit, ``name@k`` at the k-th visit (1-based). Used by the
    resume tests to hit narrow windows (mid-stream-update, mid-checkpoint...); costs one dict lookup otherwise.
    ``FRUGAL_QAT_KILL_SIGNAL=INT`` sends SIGINT instead (a Ctrl-C at that point), once.
    """
    target = os.environ.get("FRUGAL_QAT_KILL_AT")
    if not target:
        return
    want, _, nth = target.partition("@")
    if want != name:
        return
    count_key = f"_FRUGAL_QAT_KILL_COUNT_{name}"
    seen = int(os.environ.get(count_key, "0")) + 1
    os.environ[count_key] = str(seen)
    if seen == int(nth or 1) or (seen > int(nth or 1) and os.environ.get("FRUGAL_QAT_KILL_SIGNAL") != "INT"):
        sig = signal.SIGINT if os.environ.get("FRUGAL_QAT_KILL_SIGNAL") == "INT" else signal.SIGKILL
        os.kill(os.getpid(), sig)


def stage_log(mark: Callable[[str, object], None]) -> Callable[[str, object], None]:
    """``mark`` (a run's :data:`~frugal_qat.planner.profile.Mark`), also appending where the run is to the file
    named by ``FRUGAL_QAT_STAGE_FILE`` when it is set: one line ``block/stage<TAB>unix time`` per mark (``-`` for
    none), written with one ``write`` to an O_APPEND file so it survives a SIGKILL whole. The random-kill harness
    (``frugal_qat.checkpoint.chaos``) reads it to aim its kills and to report which stages they landed in."""
    path = os.environ.get("FRUGAL_QAT_STAGE_FILE")
    if not path:
        return mark
    where = {"block": "-", "stage": "-"}

    def logged(kind: str, value: object) -> None:
        mark(kind, value)
        if kind in where:
            where[kind] = "-" if value is None else str(value)
            if kind == "block":
                where["stage"] = "-"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{where['block']}/{where['stage']}\t{time.time():.4f}\n".encode())
            finally:
                os.close(fd)

    return logged


def _injected_enospc() -> bool:
    """``FRUGAL_QAT_ENOSPC_AT=k``: the k-th durable write fails as if the disk were full (tests of disk-full)."""
    target = os.environ.get("FRUGAL_QAT_ENOSPC_AT")
    if not target:
        return False
    seen = int(os.environ.get("_FRUGAL_QAT_WRITES", "0")) + 1
    os.environ["_FRUGAL_QAT_WRITES"] = str(seen)
    return seen == int(target)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` creates the file at a temporary name; it is then fsync'ed and renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    try:
        if _injected_enospc():
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        write(tmp)
        kill_point("atomic_write")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:  # any failure (a Ctrl-C too) leaves no partial file behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfSpace(
                f"disk full while writing {path}; free space on {path.parent} and run the same command again to resume"
            ) from None
        raise


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_write(path, write)


def atomic_copy(src: Path, dst: Path) -> None:
    """``src`` copied to ``dst`` durably: the copy is fsync'ed and renamed into place like every other write."""
    _atomic_write(Path(dst), lambda tmp: shutil.copyfile(src, tmp))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{path} is not valid JSON ({e})") from None


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (no pickle, so a checkpoint never runs code when loaded).

    ``save_file`` writes each tensor straight from its memory, so contiguous CPU tensors cost no copy: the
    block's training checkpoint used to be serialised into one bytes blob first, a second copy of the whole
    training state in RAM (19.7 GiB for a Llama-2-70B block). CUDA tensors still need one host copy each.
    """
    host = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(host, tmp, metadata=metadata)
        except Exception as e:  # safetensors reports I/O errors as its own exception, with the OS error in the text
            if "os error 28" in str(e) or "No space left" in str(e):
                raise OSError(errno.ENOSPC, str(e)) from e
            raise

    _atomic_write(path, write)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{path} is missing") from None
    except Exception as e:  # safetensors raises its own SafetensorError for torn/corrupt files
        raise CorruptCheckpoint(f"{path} is damaged ({e}); delete it and resume, or use --restart") from None


def remove_partials(directory: Path) -> None:
    """Temporary files left by a kill mid-write carry no progress; drop them on resume.

    Ours end in ``.tmp-partial``; safetensors' own (see ``_SAFETENSORS_TMP``) can be as large as a block checkpoint.
    Called when a run resumes: a run directory has one writer, so no live write's temporary file is in it.
    """
    for p in Path(directory).rglob("*"):  # one walk of the run directory for both kinds
        if p.is_file() and (p.name.endswith(_TMP_SUFFIX) or _SAFETENSORS_TMP.fullmatch(p.name)):
            p.unlink(missing_ok=True)
