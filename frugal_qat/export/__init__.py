"""Export a frugal-qat run directory to checkpoints that inference engines and other tools load.

    export_run(run_dir, fmt, out_dir)     the one entry point (``frugal-qat export``); fmt is a name in FORMATS

    gptq                 GPTQ, zero points "v2" (as stored) or "v1" (z - 1, only where lossless): GPTQModel,
                         transformers + optimum, vLLM
    compressed-tensors   llm-compressor's "pack-quantized" layout: compressed-tensors, transformers, vLLM
    fp16                 dequantized dense checkpoint: any tool

docs/EXPORT.md has the table of loaders (versions checked) and the measured agreement with frugal-qat's forward.

Streaming: block i is read from the run (memory-mapped), converted and written as shard i before block i+1 is
read, so memory stays at about one block plus the embeddings. Everything is written into a hidden staging folder
next to ``out_dir`` and renamed into place at the end: ``out_dir`` is either absent or a whole checkpoint. The run
directory is only read, and ``out_dir`` may not lie inside it. A mapping the target format cannot express exactly
is refused (``ConfigError``) before anything is written.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from frugal_qat import __version__
from frugal_qat.arch import EMBED_KEY, LM_HEAD_KEY, NORM_KEY
from frugal_qat.checkpoint.run_dir import INDEX_FILE, TOKENIZER_FILES
from frugal_qat.checkpoint.store import atomic_save_tensors, atomic_write_json, read_json
from frugal_qat.errors import ConfigError, CorruptCheckpoint
from frugal_qat.offload.blocks import ModelSource

log = logging.getLogger(__name__)

FORMATS = ("gptq", "compressed-tensors", "fp16")
REPORT_FILE = "frugal_qat_export.json"


def export_run(
    run_dir: str | Path,
    fmt: str,
    out_dir: str | Path,
    *,
    verify: bool = True,
    zero_point: str = "v2",
    dtype: str = "float16",
) -> dict[str, Any]:
    """Write the run in ``fmt`` to ``out_dir``, then (``verify``) reload it and compare with frugal-qat's forward.

    Args:
        run_dir: a finished frugal-qat run directory.
        fmt: one of ``FORMATS``.
        out_dir: a new (or empty) directory, not inside ``run_dir``.
        verify: decode every tensor with an independent reader of the format and compare with the run's weights
            (must be exact for gptq and compressed-tensors), then reload through the format's own library where
            it is installed and compare logits and perplexity on a few token windows with frugal-qat's forward.
        zero_point: gptq only: ``"v2"`` (``checkpoint_format: gptq_v2``, z as is) or ``"v1"`` (z - 1).
        dtype: fp16 only: ``"float16"``, ``"bfloat16"`` or ``"float32"`` for the dense weights.

    Returns:
        The report, also saved as ``out_dir/frugal_qat_export.json``: format, files, bytes, seconds and, with
        ``verify``, the agreement (``max_abs_logit_diff``, perplexities) and what loaded the export.

    Raises:
        ConfigError: an unknown format or option, an unusable ``out_dir``, or a run the format cannot express.
        CorruptCheckpoint: an unfinished or damaged run directory.
    """
    from frugal_qat.export.compressed_tensors import export_compressed_tensors
    from frugal_qat.export.fp16 import export_fp16
    from frugal_qat.export.gptq import export_gptq

    writers: dict[str, Callable[[ModelSource, Path], dict[str, Any]]] = {
        "gptq": lambda src, stage: export_gptq(src, stage, zero_point=zero_point),
        "compressed-tensors": export_compressed_tensors,
        "fp16": lambda src, stage: export_fp16(src, stage, dtype=dtype),
    }
    if fmt not in writers:
        raise ConfigError(f"export format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if zero_point != "v2" and fmt != "gptq":
        raise ConfigError(f"zero_point {zero_point!r} applies to the gptq format only, not {fmt}; drop it")
    if dtype != "float16" and fmt != "fp16":
        raise ConfigError(f"dtype {dtype!r} applies to the fp16 format only ({fmt} keeps fp16 scales); drop it")
    t0 = time.time()
    src = open_run(run_dir)
    out = check_out_dir(run_dir, out_dir)
    stage = out.parent / f".{out.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)  # left by an interrupted export; never holds anything else
    stage.mkdir(parents=True)
    try:
        details = writers[fmt](src, stage)
        if out.exists():
            out.rmdir()  # checked empty above; rename() will not replace a directory on every platform
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    files = sorted(p.name for p in out.iterdir())
    report: dict[str, Any] = {
        "format": fmt,
        "run_dir": str(Path(run_dir).resolve()),
        "out_dir": str(out),
        "bits": src.quant["bits"],
        "group_size": src.quant["group_size"],
        **details,
        "files": files,
        "bytes": sum((out / f).stat().st_size for f in files),
        "export_seconds": round(time.time() - t0, 3),
        "frugal_qat_version": __version__,
    }
    log.info("exported %s to %s (%d files, %.1f MB)", fmt, out, len(files), report["bytes"] / 1e6)
    if verify:
        from frugal_qat.export.verify import verify_export

        report["verify"] = verify_export(run_dir, out, fmt)
    atomic_write_json(out / REPORT_FILE, report)
    return report


# ---------------------------------------------------------------------------------------------------------------
# Pieces every format uses
# ---------------------------------------------------------------------------------------------------------------


def open_run(run_dir: str | Path) -> ModelSource:
    """The run as a lazy :class:`ModelSource`, after checking it is a finished frugal-qat run of our 7 linears."""
    run_dir = Path(run_dir)
    src = ModelSource(run_dir)
    if src.quant is None:
        raise ConfigError(
            f"{run_dir} is not a frugal-qat run directory (config.json has no quantization_config with "
            f"quant_method 'frugal_qat'); pass the --out directory of a finished block-ap run"
        )
    manifest = run_dir / "manifest.json"
    if manifest.is_file():
        stage = read_json(manifest).get("progress", {}).get("stage")
        if stage != "done":
            raise CorruptCheckpoint(
                f"run {run_dir} is not finished (progress stage {stage!r}); resume it with the same command first"
            )
    if not (run_dir / INDEX_FILE).is_file():
        raise CorruptCheckpoint(f"{run_dir / INDEX_FILE} is missing; the run did not finish, resume it first")
    modules = set(src.quant.get("modules", []))
    expected = {name.rsplit(".", 1)[1] for name in src.arch.linears}
    if modules != expected:
        # Formats below name "every Linear but lm_head" as quantized; a run of another set would be mislabelled.
        raise ConfigError(
            f"run {run_dir} quantized modules {sorted(modules)}; export supports exactly {sorted(expected)}"
        )
    return src


def check_out_dir(run_dir: str | Path, out_dir: str | Path) -> Path:
    """``out_dir`` resolved, after refusing the run directory itself, a folder inside it, or a non-empty folder."""
    run, out = Path(run_dir).resolve(), Path(out_dir).resolve()
    if out == run or run in out.parents:
        raise ConfigError(f"export directory {out} lies inside the run directory {run}; choose a folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export directory {out} already exists and is not empty; choose a new folder or delete it")
    return out


def shard_name(k: int, n: int) -> str:
    """Hugging Face's shard file name: model-00001-of-00003.safetensors (k counts from 1)."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def write_shards(
    src: ModelSource,
    out: Path,
    convert_block: Callable[[int], dict[str, torch.Tensor]],
    extra_dtype: torch.dtype = torch.float16,
) -> None:
    """One shard per decoder block (``convert_block(i)`` gives its tensors, full names) and a last one with the
    embeddings, final norm and lm_head, plus ``model.safetensors.index.json``.

    Only one block's tensors exist at a time. A config that says untied but a run without lm_head (ModelSource
    then uses the embeddings) gets the embeddings written as lm_head, so every loader computes the same thing.
    """
    n = src.n_layers + 1
    weight_map: dict[str, str] = {}
    total = 0

    def save(k: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = shard_name(k, n)
        atomic_save_tensors(out / name, tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    for i in range(src.n_layers):
        save(i + 1, convert_block(i))  # the block's tensors are dropped when save() returns
    extra = {EMBED_KEY: src.embed_weight().to(extra_dtype), NORM_KEY: src.store.get(NORM_KEY).to(extra_dtype)}
    if not src.hf.tie_word_embeddings:
        extra[LM_HEAD_KEY] = src.lm_head_weight().to(extra_dtype)
    save(n, extra)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_json(out / INDEX_FILE, index)


def write_model_files(src: ModelSource, out: Path, quantization_config: dict[str, Any] | None,
                      dtype: str = "float16") -> None:
    """config.json (the run's, with ``quantization_config`` replaced and the dtype set) and the tokenizer files."""
    cfg = {k: v for k, v in src.config.items() if k != "quantization_config"}
    # Scales are fp16; a bf16 default dtype would make loaders round them (vLLM casts scales to the model dtype).
    cfg["dtype"] = cfg["torch_dtype"] = dtype
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    atomic_write_json(out / "config.json", cfg)
    for name in TOKENIZER_FILES:
        path = src.dir / name
        if path.is_file():
            shutil.copyfile(path, out / name)


def linear_keys(src: ModelSource, i: int) -> list[str]:
    """Full names (without the tensor suffix) of block i's quantized linears."""
    return [f"model.layers.{i}.{name}" for name in src.arch.linears]


__all__ = ["FORMATS", "REPORT_FILE", "export_run"]
