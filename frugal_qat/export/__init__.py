"""Export a frugal-qat run directory to checkpoints that inference engines and other tools load.

    export_run(run_dir, fmt, out_dir)     the one entry point (``frugal-qat export``); fmt is a name in FORMATS

    gptq                 GPTQ, zero points "v2" (as stored) or "v1" (z - 1, only where lossless)
    compressed-tensors   llm-compressor's "pack-quantized" layout
    fp16                 dequantized dense checkpoint (float16, bfloat16 or float32)
    gguf                 one GGUF file for llama.cpp and Ollama (``gguf.py``, docs/GGUF.md): a run trained in a GGUF
                         grid bit-exactly in its types; a plain run in the legacy type that holds its grid, or refused

Which engines load which bit width is not the same for every format: ``engines.py`` says it per format, bits and
zero-point convention, with what was checked and what was not; ``export_run`` logs that line, and
docs/EXPORT.md has the table with measurements.

dtype: the config's ``dtype``/``torch_dtype`` (what loaders compute in by default) follows the source model:
bfloat16 for a bf16-native model (fp16 could overflow its activations), else float16; ``dtype=`` overrides it.
Tensors keep the run's precision where the format allows (scales, norms, embeddings are fp16 in a run and stay
fp16, so a loader that computes in fp32 gets frugal-qat's exact numbers); the dense format stores its weights in
``dtype``.

Streaming: block i is read from the run (memory-mapped), converted and written as shard i before block i+1 is
read, so memory stays at about one block plus the embeddings. The run directory is only read, and ``out_dir``
may not lie inside it. A mapping the target format cannot express exactly is refused (``ConfigError``) before
anything is written.

Kill safety: everything, the verification results, README.md and the report included, is written into a hidden
staging folder ``.<out>.partial`` next to ``out_dir``, the report last; renaming it to ``out_dir`` is the commit.
A kill at any moment leaves either no ``out_dir`` or a complete one. The same command run again on a complete
export logs that it is complete and returns its report without touching it; a staging folder whose report is
complete (a kill between the last write and the rename) is renamed; any other staging folder is redone from the
start. Every file but ``frugal_qat_export.json`` (times, paths) and ``README.md`` (verification figures, which
can differ in the last digits between machines) is a deterministic function of the run and the options.

GGUF is one file, so ``--format gguf`` takes ``--out FILE.gguf``, a file path: llama.cpp and Ollama are given the
file itself. Its report sits next to it as ``FILE.frugal_qat_export.json`` (no README: a GGUF is not a Hugging Face
folder). The staging folder is ``.FILE.gguf.partial`` as above (the file is written and verified there under its
final name); the commit copies its report to the side file,
then renames the staged GGUF to ``FILE.gguf`` (the commit point: the file appears whole or not at all), then
removes the staging folder. An export is complete when ``FILE.gguf`` exists and the side report names the same
request; a ``FILE.gguf`` without a matching report is another file and is refused, never overwritten.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from frugal_qat import __version__
from frugal_qat.arch import EMBED_KEY, LM_HEAD_KEY, NORM_KEY
from frugal_qat.checkpoint.run_dir import INDEX_FILE, TOKENIZER_FILES, clear_dir, hold_run_dir, hold_run_dirs
from frugal_qat.checkpoint.store import (
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    kill_point,
    read_json,
)
from frugal_qat.errors import ConfigError, CorruptCheckpoint, RunInUse
from frugal_qat.offload.blocks import ModelSource

log = logging.getLogger(__name__)

FORMATS = ("gptq", "compressed-tensors", "fp16", "gguf")
DTYPES = ("auto", "float16", "bfloat16", "float32")
REPORT_FILE = "frugal_qat_export.json"
README_FILE = "README.md"


def export_run(
    run_dir: str | Path,
    fmt: str,
    out_dir: str | Path,
    *,
    verify: bool = True,
    zero_point: str = "v2",
    dtype: str = "auto",
    verify_tokens: int | None = None,
    verify_windows: torch.Tensor | None = None,
    mark: Callable[[str, object], None] = lambda kind, value: None,
) -> dict[str, Any]:
    """Write the run in ``fmt`` to ``out_dir`` and (``verify``) check it the ways users will load it.

    Args:
        run_dir: a finished frugal-qat run directory.
        fmt: one of ``FORMATS``.
        out_dir: a new (or empty) directory, not inside ``run_dir``; or the folder of a complete export made by
            the same call, which is then left as it is. gguf: the path of the file, ``FILE.gguf`` (new, or the file
            of a complete export made by the same call).
        verify: decode every tensor with an independent reader of the format and compare with the run's weights
            (must be exact for gptq and compressed-tensors), then load the export through each loader of its
            format (library defaults on the device at hand, and the recommended settings) where the library is
            installed, and compare perplexities with frugal-qat's forward (``verify.py``).
        zero_point: gptq only: ``"v2"`` (``checkpoint_format: gptq_v2``, z as is) or ``"v1"`` (z - 1).
        dtype: ``"auto"`` (the source model's: bfloat16 if it is bf16-native, else float16), ``"float16"``,
            ``"bfloat16"``, or (fp16 format only) ``"float32"``.
        verify_tokens: how many of the run's calibration tokens the loaders are scored on (default
            ``verify.TOKENS``).
        verify_windows: ``[n, L]`` token ids to score on instead (the benchmark's held-out text).
        mark: told the stage (``"stage", "write" | "verify" | "commit"``), as the run loops tell theirs
            (``frugal_qat.planner.profile.Mark``; the random-kill harness logs them).

    Returns:
        The report, also saved as ``out_dir/frugal_qat_export.json``: the request, format, files, bytes, seconds,
        the engines that load it and, with ``verify``, each loader's perplexity against frugal-qat's and the
        warnings. When ``out_dir`` already held this export, the saved report plus ``"already_complete": True``.

    Raises:
        ConfigError: an unknown format or option, an unusable ``out_dir`` (one holding another export included),
            or a run the format cannot express.
        CorruptCheckpoint: an unfinished or damaged run directory.
    """
    from frugal_qat.export import gguf
    from frugal_qat.export.compressed_tensors import export_compressed_tensors
    from frugal_qat.export.engines import engine_line, engine_table
    from frugal_qat.export.fp16 import export_fp16
    from frugal_qat.export.gptq import export_gptq
    from frugal_qat.export.verify import TOKENS, calibration_windows, verify_export

    writers: dict[str, Callable[[ModelSource, Path, str], dict[str, Any]]] = {
        "gptq": lambda src, stage, dt: export_gptq(src, stage, zero_point=zero_point, dtype=dt),
        "compressed-tensors": lambda src, stage, dt: export_compressed_tensors(src, stage, dtype=dt),
        "fp16": lambda src, stage, dt: export_fp16(src, stage, dtype=dt),
        "gguf": lambda src, stage, dt: gguf.write_gguf(src, stage / out.name),
    }
    if fmt not in writers:
        raise ConfigError(f"export format {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
    if zero_point != "v2" and fmt != "gptq":
        raise ConfigError(f"zero_point {zero_point!r} applies to the gptq format only, not {fmt}; drop it")
    t0 = time.time()
    src = open_run(run_dir)
    out_dtype = resolve_dtype(src, fmt, dtype)
    single = fmt == "gguf"  # one file, not a folder (module docstring)
    out = check_out_file(run_dir, out_dir) if single else check_out_dir(run_dir, out_dir)
    windows = None
    if verify:
        windows = verify_windows
        if windows is None:
            windows = calibration_windows(run_dir, verify_tokens or TOKENS)
    request = {
        "format": fmt,
        "zero_point": zero_point if fmt == "gptq" else None,
        "dtype": out_dtype,
        "run": run_fingerprint(src),
        "verify_windows_sha256": hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()
        if verify else None,
    }
    stage = out.parent / f".{out.name}.partial"
    def committed() -> dict | None:
        return completed_file(out, request) if single else completed_report(out, request)

    done = committed()
    if done is not None:  # committed by a rename, so complete whoever else is running: nothing is held or written
        log.info("export already complete in %s (made by the same command); nothing to do", out)
        if single and stage.exists():  # a kill after the GGUF's rename, before its staging folder went
            with contextlib.suppress(RunInUse), hold_run_dir(stage, exclusive=True):
                shutil.rmtree(stage)
        return {**done, "already_complete": True}

    # Held while it is written, verified and committed: a second export to the same place is refused. (The commit
    # renames the held folder to ``out``; the hold then ends with the process's use of it.)
    with hold_run_dirs(read=(run_dir,), write=(stage,)):
        done = committed()
        if done is not None:  # the same export, run beside this one, committed between the check above and the hold
            return {**done, "already_complete": True}
        staged = completed_report(stage, request, strict=False)
        if staged is not None and single and not (stage / out.name).is_file():
            staged = None  # its file was committed and then removed by hand: make it again
        if staged is not None:
            log.info("found the finished export staged in %s; committing it", stage)
            report = staged
        else:
            clear_dir(stage)  # left by an interrupted export; never holds anything else
            try:
                bits = src.quant["bits"]
                mark("stage", "write")
                details = writers[fmt](src, stage, out_dtype)
                line = gguf.engine_line(details["gguf_types"]) if single else engine_line(fmt, bits, zero_point,
                                                                                             out_dtype)
                log.info("engines: %s", line)
                report = {
                    "format": fmt,
                    "request": request,
                    "run_dir": str(Path(run_dir).resolve()),
                    "out_dir": str(out),
                    "bits": bits,
                    "group_size": src.quant["group_size"],
                    "dtype": out_dtype,
                    **details,
                    "engines": [asdict(e) for e in gguf.engine_support()] if single else engine_table(fmt, bits,
                                                                                                        zero_point),
                    "engine_line": line,
                    "frugal_qat_version": __version__,
                }
                log.info("exported %s into %s", fmt, stage)
                if verify:
                    mark("stage", "verify")
                    report["verify"] = (gguf.verify_gguf(run_dir, stage / out.name, windows=windows) if single
                                        else verify_export(run_dir, stage, fmt, export_dtype=out_dtype, windows=windows))
                if single:
                    report["files"] = [out.name, side_report(out).name]
                    report["bytes"] = (stage / out.name).stat().st_size
                else:
                    from frugal_qat.export.card import model_card

                    atomic_write_bytes(stage / README_FILE, model_card(report).encode())
                    files = sorted(p.name for p in stage.iterdir())
                    report["files"] = sorted([*files, REPORT_FILE])
                    report["bytes"] = sum((stage / f).stat().st_size for f in files)
                report["export_seconds"] = round(time.time() - t0, 3)
                atomic_write_json(stage / REPORT_FILE, report)  # last: its presence marks the staged export complete
            except BaseException:  # a refusal or a failure leaves no staging folder behind (a kill does: redone)
                shutil.rmtree(stage, ignore_errors=True)
                raise
        mark("stage", "commit")
        kill_point("export_commit")
        if single:
            atomic_write_json(side_report(out), report)  # first: a GGUF without its report would be refused
            kill_point("export_rename")
            os.replace(stage / out.name, out)  # the commit
            fsync_dir(out.parent)
            kill_point("export_cleanup")
            shutil.rmtree(stage)
            log.info("exported gguf to %s (%.1f MB; report %s)", out, report["bytes"] / 1e6, side_report(out).name)
            return report
        if out.exists():
            out.rmdir()  # checked empty above; rename() will not replace a directory on every platform
        kill_point("export_rename")
        os.replace(stage, out)  # the commit
        fsync_dir(out.parent)
        log.info("exported %s to %s (%d files, %.1f MB)", fmt, out, len(report["files"]), report["bytes"] / 1e6)
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


def resolve_dtype(src: ModelSource, fmt: str, dtype: str) -> str:
    """The export's dtype: ``dtype``, or for ``"auto"`` the source model's (bfloat16 if bf16-native, else float16).

    The run's config.json is the source model's, so its ``dtype`` (transformers 5) or ``torch_dtype`` says what the
    model was trained in. float32 sources export as float16 (the 16-bit kernels' dtype), unless asked for.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    if fmt == "gguf" and dtype != "auto":
        raise ConfigError(f"dtype {dtype!r} does not apply to gguf: its linears are ggml blocks and its embeddings "
                          f"keep the run's 16-bit dtype (llama.cpp picks its compute type); drop --dtype")
    if dtype == "float32" and fmt != "fp16":
        raise ConfigError(f"dtype float32 applies to the dense fp16 format only: {fmt} kernels compute in float16 or "
                          f"bfloat16; choose auto, float16 or bfloat16 (a loader can still compute in float32)")
    if dtype != "auto":
        return dtype
    source = src.config.get("dtype") or src.config.get("torch_dtype")
    return "bfloat16" if source == "bfloat16" else "float16"


def run_fingerprint(src: ModelSource) -> str:
    """sha256 of the run's shard headers and sizes and of its manifest (which records every block's losses), so a
    retrained run into the same folder is told from the one an export was made of, without reading the weights."""
    h = hashlib.sha256(repr(sorted(src.store.fingerprint().items())).encode())
    manifest = src.dir / "manifest.json"
    if manifest.is_file():
        h.update(manifest.read_bytes())
    return h.hexdigest()


def check_out_dir(run_dir: str | Path, out_dir: str | Path) -> Path:
    """``out_dir`` resolved, after refusing the run directory itself or a folder inside it."""
    run, out = Path(run_dir).resolve(), Path(out_dir).resolve()
    if out == run or run in out.parents:
        raise ConfigError(f"export directory {out} lies inside the run directory {run}; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export path {out} exists and is not a directory; choose a new folder")
    return out


def check_out_file(run_dir: str | Path, out: str | Path) -> Path:
    """``out`` resolved for a one-file format (gguf): a path ending in ``.gguf``, outside the run directory, whose
    folder exists or can be made."""
    run, path = Path(run_dir).resolve(), Path(out).resolve()
    if path.suffix != ".gguf":
        raise ConfigError(f"--format gguf writes one file: pass --out FILE.gguf (got {out})")
    if path.is_dir():
        raise ConfigError(f"export path {path} is a directory; --format gguf writes one file: pass --out FILE.gguf")
    if run in path.parents:
        raise ConfigError(f"export file {path} lies inside the run directory {run}; choose a path outside it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def side_report(path: Path) -> Path:
    """The report of a one-file export: ``FILE.frugal_qat_export.json`` next to ``FILE.gguf``."""
    return path.with_name(f"{path.stem}.{REPORT_FILE}")


def completed_file(path: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The report of the complete one-file export of ``request`` at ``path``, or ``None`` when there is none. A file
    at ``path`` that is not that export (no side report, or one of another request) is refused, never
    overwritten."""
    report_path = side_report(path)
    report = read_json(report_path) if report_path.is_file() else None
    if not path.exists():
        return None  # a side report alone: a kill just before the commit's rename; the staged export decides
    if isinstance(report, dict) and report.get("request") == request:
        return report
    if report is None:
        raise ConfigError(f"{path} already exists and is not a frugal-qat export (no {report_path.name} next to "
                          f"it); choose a new path or delete it")
    raise ConfigError(f"{path} holds another export ({request_changes(report, request)}); choose a new path or "
                      f"delete it and {report_path.name}")


def completed_report(folder: Path, request: dict[str, Any], strict: bool = True) -> dict[str, Any] | None:
    """The report of the complete export of ``request`` in ``folder``, or ``None`` when there is none.

    ``strict`` (the final folder): a non-empty folder that holds no such export is refused, never overwritten.
    Otherwise (the staging folder) anything else just means "redo".
    """
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    report_path = folder / REPORT_FILE
    report = read_json(report_path) if report_path.is_file() else None
    if isinstance(report, dict) and report.get("request") == request:
        return report
    if not strict:
        return None
    if report is None:
        raise ConfigError(f"export directory {folder} already exists and is not empty; choose a new folder or "
                          f"delete it")
    raise ConfigError(f"export directory {folder} holds another export ({request_changes(report, request)}); "
                      f"choose a new folder or delete it")


def request_changes(report: dict[str, Any], request: dict[str, Any]) -> str:
    """What differs between the export ``report`` was made for and ``request``: "dtype: 'float16' -> 'bfloat16'"."""
    old = report.get("request") or {}
    return "; ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in request.items() if old.get(k) != v)


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

    Only one block's tensors exist at a time. ``lm_head.weight`` is always written, for tied models too (a copy of
    the embeddings): loaders that do not tie weights themselves otherwise leave it uninitialised (reported as zero
    in issue 17 for older GPTQ stacks), while transformers ties it anyway and vLLM skips the tensor of a tied
    model. It costs ``vocab * hidden * 2`` bytes. A config that says untied but a run without lm_head (ModelSource
    then uses the embeddings) gets the same copy, so every loader computes the same thing.
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
    embed = src.embed_weight().to(extra_dtype)
    extra = {EMBED_KEY: embed, NORM_KEY: src.store.get(NORM_KEY).to(extra_dtype)}
    extra[LM_HEAD_KEY] = embed.clone() if src.tied else src.lm_head_weight().to(extra_dtype)
    save(n, extra)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_json(out / INDEX_FILE, index)


def write_model_files(src: ModelSource, out: Path, quantization_config: dict[str, Any] | None,
                      dtype: str) -> None:
    """config.json (the run's, with ``quantization_config`` replaced, the dtype set and the RoPE base also in the
    pre-transformers-5 keys) and the tokenizer files."""
    cfg = {k: v for k, v in src.config.items() if k != "quantization_config"}
    # Both spellings: transformers 5 reads "dtype", older readers and other tools "torch_dtype". This is the dtype
    # loaders compute in by default; scales stay fp16 in the files (see the module docstring).
    cfg["dtype"] = cfg["torch_dtype"] = dtype
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        # transformers < 5 (and GPTQ stacks built on it) read rope_theta / rope_scaling and would otherwise fall
        # back to a default base of 10000; transformers 5 reads rope_parameters and ignores these.
        cfg.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            cfg.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
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


__all__ = ["DTYPES", "FORMATS", "README_FILE", "REPORT_FILE", "export_run", "side_report"]
