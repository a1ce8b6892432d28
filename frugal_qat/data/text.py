"""Text sources for calibration and evaluation, and their tokenization into one token stream.

A *source* is a string naming either local text or one of the paper's Hub datasets:

- a ``.jsonl`` file: one document per line, taken from the line's ``"text"`` field;
- any other file (``.txt``, ``.md``, ``.rst.txt`` ...): one document, read as UTF-8;
- a directory: every ``.txt`` / ``.jsonl`` / ``.md`` file below it, recursively, in sorted path order;
- ``wikitext2`` | ``c4`` | ``redpajama``, optionally with a split (``wikitext2:train``), loaded through
  ``datasets`` exactly as the EfficientQAT paper does (see :data:`HUB_DATASETS`).

A local path wins over a dataset name of the same spelling, so a folder called ``c4`` is read from disk. The
built-in ``demo`` / ``demo-heldout`` texts are the exception: those names always mean the built-in text (the demo
writes its runs into a folder called ``demo``, and a word that common must not silently swap the calibration data);
``./demo`` reads a local folder of that name.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from frugal_qat.errors import DataError

logger = logging.getLogger(__name__)

# Suffixes read when a source is a directory (".rst.txt" ends in ".txt").
TEXT_SUFFIXES = (".txt", ".jsonl", ".md")

_LOCAL_HINT = "pass a local .txt/.jsonl file or a directory of them instead (e.g. --calib my_text.jsonl)"


@dataclass(frozen=True)
class HubDataset:
    """How one of the paper's datasets is fetched with ``datasets.load_dataset``."""

    path: str
    name: str | None
    data_files: dict[str, str] | None
    default_split: str
    join: str | None  # None: one document per row; a string: all rows joined into one document


HUB_DATASETS: dict[str, HubDataset] = {
    # Perplexity protocol of GPTQ/EfficientQAT: the raw test split as one text, rows joined with "\n\n".
    "wikitext2": HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", None, "test", "\n\n"),
    # Only the first of the eight validation shards, as in the paper's C4 perplexity.
    "c4": HubDataset(
        "allenai/c4",
        None,
        {"validation": "en/c4-validation.00000-of-00008.json.gz", "train": "en/c4-train.00000-of-01024.json.gz"},
        "validation",
        None,
    ),
    # The calibration set of Block-AP and E2E-QP.
    "redpajama": HubDataset("togethercomputer/RedPajama-Data-1T-Sample", None, None, "train", None),
}


# The built-in demo's offline text (see data/demo.py): calibration, and the held-out text for perplexity.
DEMO_SOURCES = ("demo", "demo-heldout")


def parse_hub_source(source: str) -> tuple[str, str] | None:
    """``"wikitext2:train"`` -> ``("wikitext2", "train")``; ``"c4"`` -> ``("c4", "validation")``; else None."""
    name, _, split = source.partition(":")
    if name not in HUB_DATASETS:
        return None
    return name, split or HUB_DATASETS[name].default_split


def source_files(path: Path) -> list[Path]:
    """The files that :func:`load_documents` reads for a local ``path``, in reading order."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(
                f"directory {path} holds no {'/'.join(TEXT_SUFFIXES)} files; put text files there or point to one file"
            )
        return files
    raise DataError(
        f"text source {path} does not exist; give an existing file or directory, or one of {sorted(HUB_DATASETS)}"
    )


def load_documents(source: str) -> list[str]:
    """Read the documents of ``source`` (see the module docstring); empty documents are dropped.

    Raises :class:`DataError` for a missing path, a ``.jsonl`` line without a ``"text"`` string (naming the
    file and line), undecodable text, a source with no text at all, or a Hub dataset that cannot be reached.
    """
    path = Path(source).expanduser()
    hub = None if path.exists() else parse_hub_source(source)
    if source in DEMO_SOURCES:
        from frugal_qat.data.demo import demo_texts

        docs = demo_texts()[DEMO_SOURCES.index(source)]
    elif hub is not None:
        docs = _load_hub(*hub)
    else:
        docs = []
        for file in source_files(path):
            docs.extend(_read_jsonl(file) if file.suffix == ".jsonl" else [_read_text(file)])
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"text source {source!r} holds no text (every document is empty); give a source with text")
    logger.info("loaded %d documents (%d chars) from %s", len(docs), sum(map(len, docs)), source)
    return docs


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from exc


def _read_jsonl(file: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from exc
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f'{file}:{lineno}: no "text" string field; each line must look like {{"text": "..."}}')
        docs.append(row["text"])
    return docs


def _load_hub(name: str, split: str) -> list[str]:
    spec = HUB_DATASETS[name]
    import datasets  # imported here: it is slow to import and only Hub sources need it

    try:
        rows = datasets.load_dataset(spec.path, spec.name, data_files=spec.data_files, split=split)
    except OSError as exc:  # ConnectionError (offline, unreachable hub) and FileNotFoundError derive from OSError
        raise DataError(
            f"could not load dataset {name!r} ({spec.path}, split {split!r}) from the Hugging Face Hub: "
            f"{type(exc).__name__}: {exc}. This machine may be offline; {_LOCAL_HINT}"
        ) from exc
    texts = list(rows["text"])
    return [spec.join.join(texts)] if spec.join is not None else texts


def tokenize_documents(tokenizer, docs: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Tokenize ``docs`` into one stream ``[d0 tokens, EOS, d1 tokens, EOS, ..., d_last tokens]``.

    No BOS or other special token is added per document (``add_special_tokens=False``); the EOS between
    documents marks the boundary as in the model's pretraining data. Documents go to the tokenizer
    ``batch_size`` at a time, so a fast (Rust) tokenizer works on several in parallel.

    Returns a 1-D ``torch.int64`` tensor of length T.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no EOS token to separate documents; "
            "set tokenizer.eos_token"
        )
    # One tensor per batch: a Python int list of the whole stream would cost ~36 bytes per token.
    chunks: list[torch.Tensor] = []
    for start in range(0, len(docs), batch_size):
        batch = list(docs[start : start + batch_size])
        flat: list[int] = []
        # verbose=False: the "longer than model_max_length" warning is moot, windows are cut later.
        for doc_ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            if chunks or flat:
                flat.append(eos)
            flat.extend(doc_ids)
        chunks.append(torch.tensor(flat, dtype=torch.int64))
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64)


def tokenizer_fingerprint(tokenizer) -> str:
    """A string that changes when the tokenizer would tokenize differently (class, vocabulary, rules, EOS)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(body.encode()).hexdigest()
    return f"{type(tokenizer).__name__}:{len(tokenizer)}:{tokenizer.eos_token_id}:{digest}"


def source_fingerprint(source: str) -> str:
    """A string that changes when the text of ``source`` may have changed: for local text the path and each
    file's relative name, size and mtime; for a Hub dataset its name and split."""
    path = Path(source).expanduser()
    if source in DEMO_SOURCES:
        from frugal_qat.data.demo import demo_source_dir

        path = demo_source_dir()  # the demo's text is whichever local corpus demo_texts() reads
    if not path.exists() and (hub := parse_hub_source(source)) is not None:
        return f"hub:{hub[0]}:{hub[1]}"
    # The source name leads: "demo" and "demo-heldout" read one directory but are different texts.
    parts = [f"source:{source}", f"local:{path.resolve()}"]
    for file in source_files(path):
        st = file.stat()
        rel = file.relative_to(path) if path.is_dir() else file.name
        parts.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


__all__ = [
    "HUB_DATASETS",
    "TEXT_SUFFIXES",
    "load_documents",
    "parse_hub_source",
    "source_files",
    "source_fingerprint",
    "tokenize_documents",
    "tokenizer_fingerprint",
]
