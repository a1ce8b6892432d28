"""Fixed-length token windows: calibration and pretraining windows streamed from a text source, and the paper's
perplexity protocols over a token stream.

Shapes: T = tokens (of a document or a stream), L = ``seqlen`` (tokens per window), N = windows.

Calibration (:func:`draw_windows`, :func:`sample_text_windows`, :func:`build_calibration`) streams documents in
the seeded order of :func:`frugal_qat.data.text.iter_documents` and tokenizes them only until the windows asked
for exist; two samplings (``data.sampling``, ``--sampling``):

- ``"documents"`` (default, the reference's): every window lies inside one document of at least L tokens, at a
  seeded uniform offset ``o`` in ``[0, T - L]``; one window per document, documents in stream order. Only when
  the whole source has fewer such documents than windows asked for do documents give more: their further windows
  lie on the grid ``o + m*L`` (disjoint from the first), taken pass by pass (every document's second window, then
  every third, ...).
- ``"joined"``: the documents in stream order are joined into one stream with EOS between them, and the windows
  are its consecutive slices ``stream[k*L : (k+1)*L]``; they cross document boundaries (what E2E-QP's
  pretraining packs, and what this project did before the streaming calibration).

The drawn windows form one sequence fixed by (source contents, tokenizer, seed, L, sampling); a request for N
windows gets its first N, so a larger request only appends windows. No two windows share a token position.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from frugal_qat.config import SAMPLINGS
from frugal_qat.data import text
from frugal_qat.data.text import (
    iter_documents,
    load_documents,
    require_eos,
    seeded_draw,
    source_fingerprint,
    tokenize_batch,
    tokenize_documents,
    tokenizer_fingerprint,
)
from frugal_qat.errors import DataError

logger = logging.getLogger(__name__)

# Bump when the tokens a source yields change for the same text and tokenizer (e.g. a new separator rule).
_CACHE_FORMAT = "frugal_qat.tokens.v1"
# Bump when the windows drawn for the same arguments change (the reading order, the sampling rules).
_WINDOWS_FORMAT = "frugal_qat.windows.v1"
# Documents handed to the tokenizer at once: up to this many, or this many characters (a 1 MiB document already
# makes ~40 MB of Python ints; the batch lets a fast tokenizer work on several documents in parallel).
_BATCH_DOCS = 64
_BATCH_CHARS = 1 << 21


# ---- drawing windows from a source ------------------------------------------------------------------------------


@dataclass
class WindowDraw:
    """The result of :func:`draw_windows`: ``windows`` int32 [N, L] and what was read to cut them."""

    windows: torch.Tensor
    documents: int  # documents tokenized
    tokens: int  # tokens they hold
    chars: int  # characters they hold


def _writer_alive(name: str) -> bool:
    """Whether the process that named a ``.writing-HOST-PID`` folder may still be writing in it. Another host's
    (a cache on a shared file system) always counts as alive: its pids mean nothing here."""
    host, _, pid = name.removeprefix(".writing-").rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def save_cache_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a file of the cache folder, which any number of processes share: each writes in a folder of its own
    (``.writing-HOST-PID``, where safetensors also puts the temporary file it writes through) and renames the
    finished file into place, so a reader sees a whole file or none. A kill mid-write leaves that folder, which
    could hold a large partial file; the next writer on this host removes the folders of processes that are gone.
    """
    cache = Path(path).parent
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(".writing-*"):
        if not _writer_alive(old.name):
            logger.info("removing %s, left by a process killed while it wrote the cache", old)
            shutil.rmtree(old, ignore_errors=True)
    own = cache / f".writing-{socket.gethostname()}-{os.getpid()}"
    own.mkdir(exist_ok=True)
    try:
        save_file(tensors, own / Path(path).name, metadata=metadata)
        os.replace(own / Path(path).name, path)
    finally:
        shutil.rmtree(own, ignore_errors=True)


def _batches(docs, max_docs: int = _BATCH_DOCS, max_chars: int = _BATCH_CHARS):
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class _DocumentWindows:
    """Windows inside documents, kept pass by pass (pass p: every document's p-th window, in document order) and
    only those that can still be among the first N of the sequence pass 0, pass 1, ...: a window is not kept when
    its position is already N or more, and a pass is dropped once the passes before it hold N windows. So a kept
    pass holds at most N windows and the passes before the last fewer than N together: under 2N in all."""

    def __init__(self, n: int, seqlen: int, seed: int):
        self.n, self.L, self.seed = n, seqlen, seed
        self.passes: list[list[np.ndarray]] = []
        self.eligible = 0  # documents of at least L tokens seen

    def first_pass(self) -> int:
        """Windows of the first pass (one per document of at least L tokens) held so far."""
        return len(self.passes[0]) if self.passes else 0

    def slots(self, doc: int, length: int) -> list[int]:
        """Start offsets of document ``doc``'s windows, in the order its passes take them."""
        L = self.L
        first = seeded_draw(self.seed, "offset", doc, length - L + 1)  # uniform in [0, T - L]
        rest = [first + m * L for m in range(-(first // L), (length - L - first) // L + 1) if m]
        for i in range(len(rest) - 1):  # seeded Fisher-Yates: which further window each later pass takes
            j = i + seeded_draw(self.seed, f"slots:{doc}", i, len(rest) - i)
            rest[i], rest[j] = rest[j], rest[i]
        return [first, *rest]

    def add(self, doc: int, ids: list[int]) -> None:
        """Take document ``doc``'s windows for every pass that can still use one."""
        if len(ids) < self.L:
            return
        self.eligible += 1
        tokens = np.asarray(ids, dtype=np.int32)
        held = 0  # windows in the passes before p
        for p, start in enumerate(self.slots(doc, len(ids))):
            if p == len(self.passes):
                self.passes.append([])
            # The window would sit at position held + len(pass p) of the sequence; later documents only move it
            # back, so one at position n or beyond is never used.
            if held + len(self.passes[p]) >= self.n:
                break
            self.passes[p].append(tokens[start : start + self.L].copy())
            held += len(self.passes[p])
        held = 0
        for p, windows in enumerate(self.passes):  # drop the passes no request for N windows can reach
            if held >= self.n:
                del self.passes[p:]
                break
            held += len(windows)

    def windows(self) -> list[np.ndarray]:
        return [w for windows in self.passes for w in windows][: self.n]

    def count(self) -> int:
        return sum(map(len, self.passes))


def draw_windows(
    tokenizer,
    source: str,
    n: int,
    seqlen: int,
    seed: int,
    sampling: str = "documents",
    show_progress: bool = True,
) -> WindowDraw:
    """Stream ``source`` and cut ``n`` windows of ``seqlen`` tokens by ``sampling`` (see the module docstring).

    Documents come from :func:`frugal_qat.data.text.iter_documents` (seeded order) and are tokenized without
    special tokens, a batch at a time, until the windows exist. Memory: the reader's buffer, one batch of
    documents and their ids, and the windows (int32; documents sampling keeps at most 2N while it reads, see
    :class:`_DocumentWindows`), independent of the source's size. Raises :class:`DataError` when the whole source
    holds fewer windows than ``n``, naming the counts and the fix.
    """
    if n < 0:
        raise ValueError(f"number of windows must be >= 0, got {n}")
    if seqlen < 1:
        raise ValueError(f"seqlen must be >= 1, got {seqlen}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; use one of {', '.join(SAMPLINGS)}")
    L = seqlen
    eos = require_eos(tokenizer) if sampling == "joined" else None
    docs_read = tokens_read = chars_read = 0
    by_doc = _DocumentWindows(n, L, seed)
    joined: list[np.ndarray] = []
    carry: list[int] = []  # joined: the stream's tokens after the last whole window
    bar = tqdm(total=n, desc=f"calibration windows ({sampling})", unit="window", disable=not show_progress or None)

    def done() -> bool:
        return (len(joined) if sampling == "joined" else by_doc.first_pass()) >= n

    docs = iter_documents(source, seed)
    try:
        for batch in _batches(docs) if n > 0 else ():
            for ids, doc in zip(tokenize_batch(tokenizer, batch), batch):
                if sampling == "joined":
                    if docs_read:
                        carry.append(eos)
                    carry.extend(ids)
                    whole = min(len(carry) // L, n - len(joined))
                    if whole:
                        block = np.asarray(carry[: whole * L], dtype=np.int32).reshape(whole, L)
                        joined.extend(block)
                        del carry[: whole * L]
                        bar.update(whole)
                else:
                    before = by_doc.first_pass()
                    by_doc.add(docs_read, ids)
                    bar.update(by_doc.first_pass() - before)
                docs_read += 1
                tokens_read += len(ids)
                chars_read += len(doc)
                if done():
                    break
            if done():
                break
    finally:
        docs.close()  # closes the file being read when we stop early
    bar.close()

    if sampling == "joined":
        got = joined
        if len(got) < n:
            raise DataError(
                f"calibration text has {tokens_read + max(docs_read - 1, 0):,} tokens; {n} windows x {L} need "
                f"{n * L:,}; give more text (--calib) or lower --train-size/--seqlen"
            )
    else:
        got = by_doc.windows()
        if len(got) < n:
            raise DataError(
                f"calibration text has {tokens_read:,} tokens in {docs_read:,} documents, of which "
                f"{by_doc.eligible:,} hold at least {L} tokens and fit {by_doc.count():,} disjoint windows; "
                f"{n} windows x {L} need more: give more text (--calib), lower --train-size/--seqlen, "
                "or pass --sampling joined (windows may then cross documents)"
            )
    windows = torch.from_numpy(np.stack(got)) if got else torch.zeros(0, L, dtype=torch.int32)
    logger.info("%d windows x %d (%s sampling, seed %d) from %s: read %d documents, %d characters, %d tokens",
                n, L, sampling, seed, source, docs_read, chars_read, tokens_read)
    return WindowDraw(windows, docs_read, tokens_read, chars_read)


def _windows_cache_key(tokenizer, source: str, n: int, seqlen: int, seed: int, sampling: str) -> str:
    reader = (text.STRETCH_BYTES, text.PIECE_BYTES, text.SHUFFLE_BUFFER_CHARS, text.SHUFFLE_BUFFER_DOCS,
              text.HUB_OPEN_SHARDS)
    key_text = "\n".join([_WINDOWS_FORMAT, tokenizer_fingerprint(tokenizer), source_fingerprint(source),
                          f"n={n} seqlen={seqlen} seed={seed} sampling={sampling} reader={reader}"])
    return hashlib.sha256(key_text.encode()).hexdigest()


def sample_text_windows(
    tokenizer,
    source: str,
    n: int,
    seqlen: int,
    seed: int,
    sampling: str = "documents",
    cache_dir: Path | None = None,
) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens streamed from ``source`` (:func:`draw_windows`): ``int64 [n, L]``.

    With ``cache_dir`` the windows are kept in ``cache_dir/windows-<key>.safetensors`` (int32), ``key`` = sha256
    of every argument that decides them (the source fingerprint: file names, sizes, mtimes or the dataset name;
    the tokenizer fingerprint; n, L, seed, sampling; the reader's constants), written to a temporary file then
    renamed, so a crash never leaves a partial file under the final name.
    """
    if cache_dir is None:
        return draw_windows(tokenizer, source, n, seqlen, seed, sampling).windows.to(torch.int64)
    key = _windows_cache_key(tokenizer, source, n, seqlen, seed, sampling)
    path = Path(cache_dir) / f"windows-{key[:32]}.safetensors"
    if path.exists():
        try:
            windows = load_file(path)["windows"]
            if tuple(windows.shape) == (n, seqlen):
                logger.info("calibration windows from the cache: %s", path)
                return windows.to(torch.int64)
            logger.warning("windows cache %s has shape %s, not %s; drawing again", path, tuple(windows.shape),
                           (n, seqlen))
        except (SafetensorError, OSError, KeyError) as exc:
            logger.warning("windows cache %s is unreadable (%s); drawing again", path, exc)
    draw = draw_windows(tokenizer, source, n, seqlen, seed, sampling)
    meta = {"source": source, "key": key, "sampling": sampling, "seed": str(seed), "documents": str(draw.documents)}
    save_cache_file(path, {"windows": draw.windows.contiguous()}, meta)
    return draw.windows.to(torch.int64)


def build_calibration(
    tokenizer,
    source: str,
    n_train: int,
    n_val: int,
    seqlen: int,
    seed: int,
    cache_dir: Path | None = None,
    sampling: str = "documents",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration windows for Block-AP: ``(train int64 [n_train, L], val int64 [n_val, L])``.

    One draw of ``n_val + n_train`` windows (:func:`sample_text_windows`): the first ``n_val`` validate, the rest
    train. So the two sets never share a token; the validation set does not change with ``n_train``, and a larger
    ``n_train`` keeps the smaller one's training windows as its first ones (changing ``n_val`` changes both).
    """
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need n_train >= 1 and n_val >= 0, got n_train={n_train}, n_val={n_val}")
    windows = sample_text_windows(tokenizer, source, n_val + n_train, seqlen, seed, sampling, cache_dir)
    logger.info("calibration: %d train + %d val windows x %d tokens from %s (%s sampling, seed %d)",
                n_train, n_val, seqlen, source, sampling, seed)
    return windows[n_val:], windows[:n_val]


# ---- windows of an in-memory token stream (perplexity) ----------------------------------------------------------


def _grid(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """``tokens[T]`` -> ``[floor(T/L), L]`` view of the disjoint windows."""
    if tokens.dim() != 1 or tokens.dtype.is_floating_point:
        raise ValueError(
            f"expected a 1-D integer token stream, got dtype {tokens.dtype} and shape {tuple(tokens.shape)}"
        )
    if seqlen < 1:
        raise ValueError(f"seqlen must be >= 1, got {seqlen}")
    count = tokens.numel() // seqlen
    return tokens[: count * seqlen].view(count, seqlen)


def sample_windows(tokens: torch.Tensor, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """Pick ``n`` of the ``floor(T/L)`` disjoint windows of ``tokens``, in the order of a seeded permutation.

    ``torch.randperm(floor(T/L), generator=Generator().manual_seed(seed))[:n]`` gives the window indices, so
    the choice is a pure function of (stream, L, seed), and the first k of n windows are the same windows
    whatever n is. Returns ``int64 [n, L]`` (a copy). Raises :class:`DataError` when ``n * L > T``:
    windows are never repeated to make up the count.
    """
    if n < 0:
        raise ValueError(f"number of windows must be >= 0, got {n}")
    grid = _grid(tokens, seqlen)
    if n > grid.shape[0]:
        raise DataError(
            f"calibration text has {tokens.numel():,} tokens; {n} windows x {seqlen} need {n * seqlen:,}; "
            "give more text (--calib) or lower --train-size/--seqlen"
        )
    order = torch.randperm(grid.shape[0], generator=torch.Generator().manual_seed(seed))
    return grid[order[:n]].to(torch.int64)


def eval_windows(
    tokens: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    protocol: str = "sequential",
    seed: int = 0,
) -> torch.Tensor:
    """Windows for perplexity, following the paper's two protocols. Returns ``int64 [N, L]``.

    - ``"sequential"`` (WikiText-2): the disjoint windows in stream order, the first ``max_windows`` of them
      (all if None); ``N = min(max_windows, floor(T/L))``.
    - ``"random"`` (C4: 256 windows, seed 0): ``max_windows`` windows picked as :func:`sample_windows` does.
      The paper's C4 code draws random offsets inside random documents; we draw from the disjoint grid so
      no token is counted twice. ``max_windows`` is required here.

    Perplexity over the result is ``exp(mean token cross-entropy)``.
    """
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None (all windows), got {max_windows}")
    grid = _grid(tokens, seqlen)
    if grid.shape[0] == 0:
        raise DataError(
            f"evaluation text has {tokens.numel():,} tokens, fewer than one window of {seqlen}; "
            "give more text or lower --seqlen"
        )
    if protocol == "sequential":
        return grid[:max_windows].to(torch.int64).clone()
    if protocol == "random":
        if max_windows is None:
            raise ValueError('protocol "random" needs max_windows (the paper uses 256 for C4)')
        if max_windows > grid.shape[0]:
            raise DataError(
                f"evaluation text has {tokens.numel():,} tokens; {max_windows} windows x {seqlen} need "
                f"{max_windows * seqlen:,}; give more text or lower the number of windows"
            )
        return sample_windows(tokens, max_windows, seqlen, seed)
    raise ValueError(f'unknown perplexity protocol {protocol!r}; use "sequential" or "random"')


def fingerprint_windows(t: torch.Tensor) -> str:
    """sha256 hex digest of the windows' dtype, shape and bytes (resume uses it to notice changed data)."""
    digest = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    digest.update(t.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def load_token_stream(tokenizer, source: str, cache_dir: Path | None = None) -> torch.Tensor:
    """Load every document of ``source`` (:func:`frugal_qat.data.text.load_documents`) and tokenize it into one
    EOS-joined stream, through a cache when ``cache_dir`` is set. For evaluation text, which is small; calibration
    streams instead (:func:`sample_text_windows`).

    The cache file is ``cache_dir/tokens-<key>.safetensors``, ``key`` = sha256 of the source fingerprint
    (file names, sizes, mtimes, or the dataset name) and the tokenizer fingerprint, so an edited file or
    another tokenizer misses. Tokens are stored as int32 (every vocabulary is < 2^31) and written to a
    temporary file then renamed, so a crash never leaves a partial cache file under the final name.
    """
    if cache_dir is None:
        return tokenize_documents(tokenizer, load_documents(source))
    key_text = f"{_CACHE_FORMAT}\n{tokenizer_fingerprint(tokenizer)}\n{source_fingerprint(source)}"
    key = hashlib.sha256(key_text.encode()).hexdigest()
    path = Path(cache_dir) / f"tokens-{key[:32]}.safetensors"
    if path.exists():
        try:
            tokens = load_file(path)["tokens"].to(torch.int64)
            logger.info("token cache hit: %s (%d tokens)", path, tokens.numel())
            return tokens
        except (SafetensorError, OSError, KeyError) as exc:
            logger.warning("token cache %s is unreadable (%s); tokenizing again", path, exc)
    tokens = tokenize_documents(tokenizer, load_documents(source))
    save_cache_file(path, {"tokens": tokens.to(torch.int32)}, {"source": source, "key": key})
    logger.info("token cache written: %s (%d tokens)", path, tokens.numel())
    return tokens


__all__ = [
    "SAMPLINGS",
    "WindowDraw",
    "build_calibration",
    "draw_windows",
    "eval_windows",
    "fingerprint_windows",
    "load_token_stream",
    "sample_text_windows",
    "sample_windows",
]
