"""Cut a token stream into fixed-length windows: seeded calibration splits and the paper's perplexity protocols.

Shapes: T = tokens in the stream, L = ``seqlen`` (tokens per window), N = windows.
The stream is viewed as ``floor(T / L)`` disjoint windows ``stream[k*L : (k+1)*L]`` (the tail is dropped);
every function here picks whole windows from that grid, so no two returned windows share a token.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from frugal_qat.data.text import load_documents, source_fingerprint, tokenize_documents, tokenizer_fingerprint
from frugal_qat.errors import DataError

logger = logging.getLogger(__name__)

# Bump when the tokens a source yields change for the same text and tokenizer (e.g. a new separator rule).
_CACHE_FORMAT = "frugal_qat.tokens.v1"


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
    """Load and tokenize ``source`` (see :mod:`frugal_qat.data.text`), through a cache when ``cache_dir`` is set.

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({"tokens": tokens.to(torch.int32)}, tmp, metadata={"source": source, "key": key})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when writing failed
    logger.info("token cache written: %s (%d tokens)", path, tokens.numel())
    return tokens


def build_calibration(
    tokenizer,
    source: str,
    n_train: int,
    n_val: int,
    seqlen: int,
    seed: int,
    cache_dir: Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration windows for Block-AP / E2E-QP: ``(train int64 [n_train, L], val int64 [n_val, L])``.

    One seeded draw of ``n_train + n_val`` disjoint windows (:func:`sample_windows`): the first ``n_train``
    train, the rest validate, so the two sets never share a token.
    """
    if n_train < 1 or n_val < 0:
        raise ValueError(f"need n_train >= 1 and n_val >= 0, got n_train={n_train}, n_val={n_val}")
    tokens = load_token_stream(tokenizer, source, cache_dir)
    windows = sample_windows(tokens, n_train + n_val, seqlen, seed)
    logger.info(
        "calibration: %d train + %d val windows x %d tokens from %s (%d tokens)",
        n_train,
        n_val,
        seqlen,
        source,
        tokens.numel(),
    )
    return windows[:n_train], windows[n_train:]


__all__ = ["build_calibration", "eval_windows", "fingerprint_windows", "load_token_stream", "sample_windows"]
