"""The run directory's file layout: one place that knows where everything lives.

    RUN/
      manifest.json                  settings, fingerprints, progress (see state.py)
      config.json                    the model config + "quantization_config" (quant_method "frugal_qat")
      tokenizer files                copied from the source
      blocks/block_00000.safetensors packed block 0: model.layers.0.<linear>.{qweight,qzeros,scales,g_idx[,bias]}
                                     (a run in a GGUF grid: <linear>.ggml[,bias], docs/GGUF.md), norms (fp16);
                                     written as soon as the block is trained
      model-extra.safetensors        embeddings, final norm, lm_head (16-bit; lm_head absent when tied)
      model.safetensors.index.json   key -> file map over the above, so the run reads like any checkpoint
      calib.safetensors              the calibration token windows (resume refuses other data)
      metrics.jsonl, summary.json    machine-readable metrics
      work/                          activation streams, journal and in-block checkpoints (deleted at the end)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from frugal_qat.arch import EMBED_KEY, LM_HEAD_KEY, NORM_KEY, block_prefix
from frugal_qat.checkpoint.store import atomic_copy, atomic_save_tensors, atomic_write_json
from frugal_qat.distributed import on_rank0
from frugal_qat.errors import RunInUse

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)
EXTRA_FILE = "model-extra.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def block_file(run_dir: Path, i: int) -> Path:
    return Path(run_dir) / "blocks" / f"block_{i:05d}.safetensors"


def quantization_config(wbits: int, group_size: int, linears: tuple[str, ...],
                        gguf_types: dict[str, str] | None = None, gguf: str | None = None) -> dict[str, Any]:
    """The run's ``quantization_config``. A run trained in a GGUF grid (``gguf``, docs/GGUF.md) stores each linear
    as ``<linear>.ggml``, uint8 [out, row bytes], the exact ggml blocks of its type (``gguf_types``: per linear,
    relative to the block, the type asked for or its legacy fallback); ``bits`` is then the type's nominal width and
    ``group_size`` its sub-block size, for reports."""
    out = {
        "quant_method": "frugal_qat",
        "bits": wbits,
        "group_size": group_size,
        "sym": False,
        "desc_act": False,
        "zero_point": "v2",  # stored as is (GPTQ v2 convention)
        "pack_layout": "gptq_bitstream_lsb_first",  # GPTQ's layout for 2/4/8 bits and its 3-bit layout
        "modules": [name.rsplit(".", 1)[-1] for name in linears],
    }
    if gguf is not None:
        out.update({"pack_layout": "ggml", "gguf": gguf, "gguf_types": dict(gguf_types or {})})
        del out["zero_point"]
    return out


def save_block(run_dir: Path, i: int, tensors: dict[str, torch.Tensor]) -> None:
    """Packed tensors of block i, keys relative to the block; written atomically under their full names."""
    path = block_file(run_dir, i)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = block_prefix(i)
    atomic_save_tensors(path, {prefix + k: v for k, v in tensors.items()}, metadata={"format": "pt"})


def write_model_files(run_dir: Path, source_dir: Path, config: dict[str, Any], extra: dict[str, torch.Tensor],
                      n_layers: int, wbits: int, group_size: int, linears: tuple[str, ...],
                      gguf_types: dict[str, str] | None = None, gguf: str | None = None) -> None:
    """Everything but the blocks: config with its quantization section, 16-bit extra tensors, tokenizer, index."""
    run_dir = Path(run_dir)
    atomic_save_tensors(run_dir / EXTRA_FILE, extra, metadata={"format": "pt"})
    cfg = dict(config)
    cfg["quantization_config"] = quantization_config(wbits, group_size, linears, gguf_types, gguf)
    atomic_write_json(run_dir / "config.json", cfg)
    for name in TOKENIZER_FILES:
        src = Path(source_dir) / name
        if src.is_file():
            atomic_copy(src, run_dir / name)
    weight_map = {k: EXTRA_FILE for k in extra}
    from safetensors import safe_open

    for i in range(n_layers):
        with safe_open(str(block_file(run_dir, i)), framework="pt") as f:
            rel = str(block_file(run_dir, i).relative_to(run_dir))
            weight_map.update({k: rel for k in f.keys()})
    atomic_write_json(run_dir / INDEX_FILE, {"metadata": {"format": "frugal_qat"}, "weight_map": weight_map})


def extra_tensors(get, has, tie: bool) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and (untied) lm_head, kept in 16-bit as in the paper."""
    out = {EMBED_KEY: get(EMBED_KEY).half(), NORM_KEY: get(NORM_KEY).half()}
    if not tie and has(LM_HEAD_KEY):
        out[LM_HEAD_KEY] = get(LM_HEAD_KEY).half()
    return out


def model_bytes(run_dir: Path) -> int:
    """Bytes of the model a run directory holds: the files its index names (packed blocks, embeddings, norms,
    lm_head), not checkpoints, streams or calibration windows; the same figure for Block-AP and E2E-QP runs."""
    index = json.loads((Path(run_dir) / INDEX_FILE).read_text())["weight_map"]
    return sum((Path(run_dir) / f).stat().st_size for f in set(index.values()))


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def read_quant_config(model_dir: Path) -> dict[str, Any] | None:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    q = cfg.get("quantization_config")
    return q if q and q.get("quant_method") == "frugal_qat" else None


def _lock_holders(path: Path) -> list[int]:
    """Pids holding a flock on ``path``, from Linux's /proc/locks (device:inode); [] where unknown. Some file
    systems (btrfs subvolumes) list another device number than stat gives: then the inode alone decides."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        rows = [f for f in map(str.split, Path("/proc/locks").read_text().splitlines())
                if len(f) >= 6 and f[1] == "FLOCK" and f[4].isdigit()]
    except OSError:
        return []
    exact = [int(f[4]) for f in rows if f[5] == key]
    return sorted(set(exact or [int(f[4]) for f in rows if f[5].rsplit(":", 1)[-1] == str(st.st_ino)]))


@contextlib.contextmanager
def hold_run_dir(path: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold ``path`` against other frugal-qat commands for the body: exclusive to write it (Block-AP into its
    run, E2E-QP into its output, an export into its staging folder), shared to read it (E2E-QP and export read a
    finished run). Two writers, or a writer and a reader, refuse with :class:`RunInUse` naming the other process;
    the second command never touches the files (two runs in one directory would corrupt each other's streams and
    checkpoints).

    An exclusive hold creates ``path`` if needed and removes it again if the body left it empty (a run refused
    by its checks leaves no folder behind). The lock is ``flock`` on the directory itself: the kernel drops it
    when the process dies, so a killed run never leaves a stale lock and resumes at once. The directory is
    therefore cleared, never deleted, while held (:func:`clear_dir`): a new directory would carry no lock.
    """
    path = Path(path)
    created = False
    for _ in range(10):
        if exclusive and not path.exists():
            path.mkdir(parents=True, exist_ok=True)
            created = True
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pids = [p for p in _lock_holders(path) if p != os.getpid()]
            who = f" (pid {', '.join(map(str, pids))})" if pids else ""
            raise RunInUse(
                f"{path} is in use by another frugal-qat command{who}; wait for it to finish or stop it (Ctrl-C, or "
                f"kill: the run resumes where it stopped), then run this command again"
            ) from None
        try:  # the holder before us may have removed the folder it made (see below) between our open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise RunInUse(f"{path} keeps being removed and made again by another process; run this command again")
    try:
        yield
    finally:
        try:
            if created and path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        finally:
            os.close(fd)


@contextlib.contextmanager
def hold_run_dirs(*, read: tuple[Path, ...] = (), write: tuple[Path, ...] = ()) -> Iterator[None]:
    """What a command holds for its body (:func:`hold_run_dir`): ``read`` shared, ``write`` exclusive. Rank 0
    alone writes a run, so it alone holds them; a refusal reaches every rank (``on_rank0``), so none is left
    waiting at a barrier for a rank 0 that stopped."""
    with contextlib.ExitStack() as held:

        def take() -> None:
            for path in read:
                held.enter_context(hold_run_dir(path, exclusive=False))
            for path in write:
                held.enter_context(hold_run_dir(path, exclusive=True))

        on_rank0(take)
        yield


def clear_dir(path: Path) -> None:
    """Delete everything inside ``path`` but the directory itself, which may be held (:func:`hold_run_dir`)."""
    for child in Path(path).iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
