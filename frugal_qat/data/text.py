"""Text sources for calibration and evaluation: documents read whole (evaluation) or streamed in a seeded order
(calibration), and their tokenization.

A *source* is a string naming either local text or one of the paper's Hub datasets:

- a ``.jsonl`` file: one document per line, taken from the line's ``"text"`` field (other fields are ignored);
- a ``.parquet`` file: one document per row of its ``text`` column;
- any other file (``.txt``, ``.md``, ``.rst.txt`` ...): one document, read as UTF-8;
- a directory: every ``.txt`` / ``.jsonl`` / ``.md`` / ``.parquet`` file below it, recursively, in sorted path order;
- ``wikitext2`` | ``c4`` | ``redpajama``, optionally with a split (``wikitext2:train``), loaded through
  ``datasets`` exactly as the EfficientQAT paper does (see :data:`HUB_DATASETS`).

A local path wins over a dataset name of the same spelling, so a folder called ``c4`` is read from disk. The
built-in ``demo`` / ``demo-heldout`` texts are the exception: those names always mean the built-in text (the demo
writes its runs into a folder called ``demo``, and a word that common must not silently swap the calibration data);
``./demo`` reads a local folder of that name.

Two ways to read a source:

- :func:`load_documents` reads every document, in file order (perplexity data: small, and its order matters).
- :func:`iter_documents` streams documents in a seeded order and reads only as far as the caller iterates
  (calibration: the corpus may be far larger than RAM). The order is built in two stages (docs/DATA.md):

  1. *units* in a seeded random order. A local file is cut into units whose boundaries are known from its size
     alone: a ``.jsonl`` file into :data:`STRETCH_BYTES` stretches (a stretch owns the lines that start in it),
     a ``.parquet`` file into its row groups, a text file larger than :data:`PIECE_BYTES` into pieces cut at a
     line end (each piece is one document; smaller text files are one unit, one document). A Hub dataset's
     units are its shards, read :data:`HUB_OPEN_SHARDS` at a time, one document from each in turn.
  2. a seeded *shuffle buffer* over the documents of the units in that order: it holds up to
     :data:`SHUFFLE_BUFFER_CHARS` characters (or :data:`SHUFFLE_BUFFER_DOCS` documents) and, when full, hands
     out one of its documents chosen at random.

  Every random choice is a hash of (seed, purpose, counter) (:func:`seeded_draw`), so the order is the same on
  every machine and Python, numpy or torch version, and a longer read only extends it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from frugal_qat.errors import DataError

logger = logging.getLogger(__name__)

# Suffixes read when a source is a directory (".rst.txt" ends in ".txt").
TEXT_SUFFIXES = (".txt", ".jsonl", ".md", ".parquet")

# Streaming units (see the module docstring). Part of the calibration cache key: changing one changes the draw.
# A .jsonl file is visited in stretches of this many bytes, in a seeded order: small enough that the shuffle buffer
# mixes documents from many places of the file (about 64 stretches), large enough that a seek reads a useful amount.
STRETCH_BYTES = 256 << 10
PIECE_BYTES = 1 << 20  # a text file larger than this is read as one document per piece of about this size
SHUFFLE_BUFFER_CHARS = 16 << 20  # the shuffle buffer's capacity (characters) ...
SHUFFLE_BUFFER_DOCS = 16384  # ... and documents; whichever is reached first
HUB_OPEN_SHARDS = 16  # Hub shards read side by side (each holds a reader and its read-ahead)
# A piece boundary moves forward to the next line end within this many bytes, else to the next character start.
_LINE_SEARCH_BYTES = 64 << 10

_LOCAL_HINT = "pass a local .txt/.jsonl/.parquet file or a directory of them instead (e.g. --calib my_text.jsonl)"


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


# ---- seeded choices -------------------------------------------------------------------------------------------


def seeded_draw(seed: int, purpose: str, counter: int, n: int) -> int:
    """A uniform integer in ``[0, n)``: the first 8 bytes of ``blake2b(f"{purpose}:{seed}:{counter}")`` mod ``n``.

    A pure function of its arguments (no generator state), so a draw never depends on how many draws came before
    it for another purpose, and it is the same under every Python, numpy and torch version. The modulo bias is
    below ``n / 2**64``.
    """
    if n < 1:
        raise ValueError(f"cannot draw from an empty range (n={n})")
    digest = hashlib.blake2b(f"{purpose}:{seed}:{counter}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def seeded_order(n: int, seed: int, purpose: str) -> Iterator[int]:
    """The integers ``0..n-1`` in a seeded random order, produced lazily.

    A Fisher-Yates shuffle run one position at a time: position i swaps with ``i + seeded_draw(seed, purpose, i,
    n - i)``. Only the positions touched so far are stored, so taking k items costs O(k) memory whatever n is.
    """
    moved: dict[int, int] = {}  # position -> value, for positions a swap has changed
    for i in range(n):
        j = i + seeded_draw(seed, purpose, i, n - i)
        value = moved.pop(j, j)
        if j != i:
            moved[j] = moved.pop(i, i)
        yield value


def shuffle_buffer(
    docs: Iterable[str],
    seed: int,
    max_chars: int = SHUFFLE_BUFFER_CHARS,
    max_docs: int = SHUFFLE_BUFFER_DOCS,
) -> Iterator[str]:
    """``docs`` in a seeded, locally shuffled order: a buffer takes documents in until it holds ``max_chars``
    characters or ``max_docs`` documents, then hands out one of its documents chosen by :func:`seeded_draw`
    (the k-th hand-out uses counter k); when ``docs`` ends the rest come out the same way.

    Memory: at most ``max_chars`` characters plus one document. A document can move earlier by up to a buffer's
    worth of documents and later without bound (each hand-out picks uniformly among the buffered documents).
    """
    buf: list[str] = []
    chars = 0
    k = 0
    for doc in docs:
        buf.append(doc)
        chars += len(doc)
        while buf and (chars >= max_chars or len(buf) >= max_docs):
            j = seeded_draw(seed, "buffer", k, len(buf))
            k += 1
            buf[j], buf[-1] = buf[-1], buf[j]
            out = buf.pop()
            chars -= len(out)
            yield out
    while buf:
        j = seeded_draw(seed, "buffer", k, len(buf))
        k += 1
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


# ---- local files ------------------------------------------------------------------------------------------------


def _kind(file: Path) -> str:
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(file.suffix, "text")


def _decode(data: bytes, file: Path, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{file} is not UTF-8 text ({exc.reason} at byte {offset + exc.start}); convert it to UTF-8"
        ) from exc


def _line_number(file: Path, offset: int) -> int:
    """1-based number of the line starting at byte ``offset`` (only called to word an error)."""
    count, done = 0, 0
    with open(file, "rb") as f:
        while done < offset:
            chunk = f.read(min(1 << 24, offset - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count + 1


def _jsonl_text(line: bytes, file: Path, offset: int) -> str | None:
    """The ``"text"`` of one JSON line that starts at byte ``offset``; None for a blank line."""
    if not line.strip():
        return None
    try:
        row = json.loads(_decode(line, file, offset))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{file}:{_line_number(file, offset)}: not valid JSON ({exc.msg}); each line must be one JSON object"
        ) from exc
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise DataError(
            f'{file}:{_line_number(file, offset)}: no "text" string field; each line must look like {{"text": "..."}}'
        )
    return row["text"]


def _line_start(f, x: int, size: int) -> int:
    """The first line start at or after byte ``x`` (``size`` at the end of the file)."""
    if x <= 0:
        return 0
    if x >= size:
        return size
    f.seek(x - 1)
    f.readline()  # reads through the first newline at or after x - 1
    return f.tell()


def _piece_start(f, x: int, size: int) -> int:
    """Where a text piece nominally starting at ``x`` starts: after the first newline in
    ``[x - 1, x - 1 + _LINE_SEARCH_BYTES)``, else at the first UTF-8 character start at or after ``x``."""
    if x <= 0:
        return 0
    if x >= size:
        return size
    f.seek(x - 1)
    chunk = f.read(_LINE_SEARCH_BYTES)
    newline = chunk.find(b"\n")
    if newline >= 0:
        return x + newline
    j = 1
    while j < len(chunk) and chunk[j] & 0xC0 == 0x80:  # continuation bytes 10xxxxxx
        j += 1
    return x - 1 + j


def _jsonl_docs(file: Path, start: int = 0, end: int | None = None) -> Iterator[str]:
    """The texts of the lines of ``file`` that start in bytes ``[start, end)``, ``start`` a line start."""
    with open(file, "rb") as f:
        end = f.seek(0, 2) if end is None else end
        f.seek(start)
        pos = start
        while pos < end:
            line = f.readline()
            if not line:
                break
            text = _jsonl_text(line, file, pos)
            pos += len(line)
            if text is not None:
                yield text


def _parquet_file(file: Path):
    import pyarrow.parquet as pq  # imported here: only parquet sources need it (it comes with `datasets`)

    try:
        pf = pq.ParquetFile(file)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError subclasses for a damaged or foreign file
        raise DataError(f"{file} is not a readable parquet file ({exc}); check the file") from exc
    names = pf.schema_arrow.names
    if "text" not in names:
        raise DataError(f"{file} has no 'text' column (columns: {', '.join(names)}); rename the text column to 'text'")
    return pf


def _parquet_docs(file: Path, row_group: int | None = None) -> Iterator[str]:
    """The ``text`` column of one row group of ``file`` (all row groups when None)."""
    pf = _parquet_file(file)
    groups = range(pf.metadata.num_row_groups) if row_group is None else [row_group]
    for g in groups:
        column = pf.read_row_group(g, columns=["text"]).column("text")
        for value in column.to_pylist():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{file}: the 'text' column holds {type(value).__name__}, not strings")
            if value:
                yield value


def _read_text(file: Path) -> str:
    return _decode(file.read_bytes(), file)


def _file_docs(file: Path) -> Iterator[str]:
    """Every document of one local file, in order (evaluation: a text file is always one document)."""
    kind = _kind(file)
    if kind == "jsonl":
        yield from _jsonl_docs(file)
    elif kind == "parquet":
        yield from _parquet_docs(file)
    else:
        yield _read_text(file)


@dataclass(frozen=True)
class _LocalUnits:
    """The streaming units of a list of local files, numbered 0..total-1 in file order."""

    files: list[Path]
    sizes: list[int]
    ends: list[int]  # ends[i]: units of files[0..i] together

    @classmethod
    def of(cls, files: list[Path]) -> _LocalUnits:
        sizes, ends, total = [], [], 0
        for file in files:
            size = file.stat().st_size
            kind = _kind(file)
            if kind == "parquet":
                count = _parquet_file(file).metadata.num_row_groups
            else:
                count = max(1, -(-size // (STRETCH_BYTES if kind == "jsonl" else PIECE_BYTES)))
            sizes.append(size)
            total += count
            ends.append(total)
        return cls(files, sizes, ends)

    @property
    def total(self) -> int:
        return self.ends[-1] if self.ends else 0

    def docs(self, unit: int) -> Iterator[str]:
        """The documents of one unit, in file order."""
        i = bisect.bisect_right(self.ends, unit)
        file, size = self.files[i], self.sizes[i]
        k = unit - (self.ends[i - 1] if i else 0)
        kind = _kind(file)
        if kind == "parquet":
            yield from _parquet_docs(file, k)
        elif kind == "jsonl":
            with open(file, "rb") as f:
                start = _line_start(f, k * STRETCH_BYTES, size)
                end = _line_start(f, (k + 1) * STRETCH_BYTES, size)
            if start < end:
                yield from _jsonl_docs(file, start, end)
        elif size <= PIECE_BYTES:
            yield _read_text(file)
        else:
            with open(file, "rb") as f:
                start = _piece_start(f, k * PIECE_BYTES, size)
                end = _piece_start(f, (k + 1) * PIECE_BYTES, size)
                f.seek(start)
                data = f.read(end - start)
            yield _decode(data, file, start)


# ---- the two readers --------------------------------------------------------------------------------------------


def _resolve(source: str) -> tuple[str, object]:
    """``("demo", index)``, ``("hub", (name, split))`` or ``("local", path)``."""
    if source in DEMO_SOURCES:
        return "demo", DEMO_SOURCES.index(source)
    path = Path(source).expanduser()
    hub = None if path.exists() else parse_hub_source(source)
    if hub is not None:
        return "hub", hub
    return "local", path


def _demo_docs(index: int) -> list[str]:
    from frugal_qat.data.demo import demo_texts

    return demo_texts()[index]


def load_documents(source: str) -> list[str]:
    """Read every document of ``source`` (see the module docstring), in file order; empty documents are dropped.

    Raises :class:`DataError` for a missing path, a ``.jsonl`` line without a ``"text"`` string (naming the
    file and line), undecodable text, a source with no text at all, or a Hub dataset that cannot be reached.
    """
    kind, where = _resolve(source)
    if kind == "demo":
        docs = _demo_docs(where)
    elif kind == "hub":
        docs = _load_hub(*where)
    else:
        docs = [doc for file in source_files(where) for doc in _file_docs(file)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"text source {source!r} holds no text (every document is empty); give a source with text")
    logger.info("loaded %d documents (%d chars) from %s", len(docs), sum(map(len, docs)), source)
    return docs


def iter_documents(source: str, seed: int) -> Iterator[str]:
    """Stream the non-empty documents of ``source`` in the seeded order of the module docstring.

    Reads only as far as the caller iterates: memory is the shuffle buffer plus one unit's reader, whatever the
    size of the source. The same (source contents, seed) give the same sequence; reading further only extends it.
    Raises :class:`DataError` as :func:`load_documents` does (a source with no text once it has been read to the
    end, a bad line when it is reached).
    """
    kind, where = _resolve(source)
    if kind == "demo":
        docs = _demo_docs(where)
        units: Iterable[str] = (docs[i] for i in seeded_order(len(docs), seed, "units"))
    elif kind == "hub":
        units = _stream_hub(*where, seed)
    else:
        local = _LocalUnits.of(source_files(where))
        units = (doc for u in seeded_order(local.total, seed, "units") for doc in local.docs(u))
    empty = True
    # The buffer's sizes are read here, not bound as defaults, so a caller (a test) can change them.
    for doc in shuffle_buffer((d for d in units if d.strip()), seed, SHUFFLE_BUFFER_CHARS, SHUFFLE_BUFFER_DOCS):
        empty = False
        yield doc
    if empty:
        raise DataError(f"text source {source!r} holds no text (every document is empty); give a source with text")


# ---- Hub datasets -----------------------------------------------------------------------------------------------


def _hub_error(name: str, split: str, exc: Exception) -> DataError:
    spec = HUB_DATASETS[name]
    return DataError(
        f"could not load dataset {name!r} ({spec.path}, split {split!r}) from the Hugging Face Hub: "
        f"{type(exc).__name__}: {exc}. This machine may be offline; {_LOCAL_HINT}"
    )


def _load_hub(name: str, split: str) -> list[str]:
    spec = HUB_DATASETS[name]
    import datasets  # imported here: it is slow to import and only Hub sources need it

    try:
        rows = datasets.load_dataset(spec.path, spec.name, data_files=spec.data_files, split=split)
    except OSError as exc:  # ConnectionError (offline, unreachable hub) and FileNotFoundError derive from OSError
        raise _hub_error(name, split, exc) from exc
    texts = list(rows["text"])
    return [spec.join.join(texts)] if spec.join is not None else texts


def _stream_hub(name: str, split: str, seed: int) -> Iterator[str]:
    """Documents of a Hub dataset through ``datasets`` in streaming mode: its shards in a seeded order,
    :data:`HUB_OPEN_SHARDS` of them read side by side, one document from each in turn (so the first documents
    already mix several shards, e.g. several of RedPajama's sources). A joined dataset (WikiText-2) is one
    document: all its rows joined, as :func:`load_documents` gives it."""
    spec = HUB_DATASETS[name]
    import datasets  # imported here: it is slow to import and only Hub sources need it

    try:
        ds = datasets.load_dataset(spec.path, spec.name, data_files=spec.data_files, split=split, streaming=True)
        if spec.join is not None:
            yield spec.join.join(row["text"] for row in ds)
            return
        n_shards = ds.n_shards
        order = seeded_order(n_shards, seed, "hub-shards")
        readers: deque = deque()
        for shard in order:
            readers.append(iter(ds.shard(num_shards=n_shards, index=shard)))
            if len(readers) == HUB_OPEN_SHARDS:
                break
        while readers:
            reader = readers.popleft()
            row = next(reader, None)
            if row is None:  # this shard is done: open the next one in the seeded order
                shard = next(order, None)
                if shard is not None:
                    readers.append(iter(ds.shard(num_shards=n_shards, index=shard)))
                continue
            readers.append(reader)
            yield row["text"]
    except OSError as exc:  # offline, unreachable, or a file that vanished mid-stream
        raise _hub_error(name, split, exc) from exc


# ---- tokens -----------------------------------------------------------------------------------------------------


def tokenize_documents(tokenizer, docs: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Tokenize ``docs`` into one stream ``[d0 tokens, EOS, d1 tokens, EOS, ..., d_last tokens]``.

    No BOS or other special token is added per document (``add_special_tokens=False``); the EOS between
    documents marks the boundary as in the model's pretraining data. Documents go to the tokenizer
    ``batch_size`` at a time, so a fast (Rust) tokenizer works on several in parallel.

    Returns a 1-D ``torch.int64`` tensor of length T.
    """
    eos = require_eos(tokenizer)
    # One tensor per batch: a Python int list of the whole stream would cost ~36 bytes per token.
    chunks: list[torch.Tensor] = []
    for start in range(0, len(docs), batch_size):
        batch = list(docs[start : start + batch_size])
        flat: list[int] = []
        for doc_ids in tokenize_batch(tokenizer, batch):
            if chunks or flat:
                flat.append(eos)
            flat.extend(doc_ids)
        chunks.append(torch.tensor(flat, dtype=torch.int64))
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int64)


def tokenize_batch(tokenizer, docs: list[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens."""
    # verbose=False: the "longer than model_max_length" warning is moot, windows are cut later.
    return tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]


def require_eos(tokenizer) -> int:
    """The tokenizer's EOS id, which separates documents in a joined stream."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no EOS token to separate documents; "
            "set tokenizer.eos_token"
        )
    return eos


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
    "iter_documents",
    "load_documents",
    "parse_hub_source",
    "require_eos",
    "seeded_draw",
    "seeded_order",
    "shuffle_buffer",
    "source_files",
    "source_fingerprint",
    "tokenize_batch",
    "tokenize_documents",
    "tokenizer_fingerprint",
]
