"""Instruction data for E2E-QP (the paper's Alpaca recipe): examples -> ``(input_ids, labels)``.

Each example is a mapping with ``instruction``, an optional ``input`` and ``output`` strings (the Stanford
Alpaca format; a ``.json`` list of them or a ``.jsonl`` file of one per line). The prompt is the Alpaca prompt the
reference builds (EfficientQAT's E2E-QP data code, after QLoRA): the preamble, then ``### Instruction:``, the
``### Input:`` block only when the input is not empty, and ``### Response: `` (ending in one space, as the
reference's template does). A sequence is

    [BOS as the tokenizer adds it] prompt tokens | response tokens EOS | padding

with labels -100 on the prompt and the padding, so the loss is on the response (and its EOS) only.

Departures from the reference (docs/DATA.md):
- BOS is the prefix the model's own tokenizer puts before a text (``<s>`` for Llama, nothing for Qwen2 or
  SmolLM2); the reference writes the string ``f"{tokenizer.bos_token}"`` in front of the prompt, which is the
  text "None" for a tokenizer without a BOS token.
- A prompt longer than ``source_len`` loses tokens from its left (after the BOS), so ``### Response:`` stays next
  to the response; the reference truncates on the right and cuts the response cue off.
- Sequences are padded to ``source_len + target_len`` (the reference pads each batch to its longest); the padding
  comes after the response and carries no loss, so a causal model computes the same loss.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from frugal_qat.data.text import seeded_order
from frugal_qat.errors import DataError

logger = logging.getLogger(__name__)

ALPACA_PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)
IGNORE_INDEX = -100  # labels that carry no loss (torch cross_entropy's ignore_index)


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt for one example (without BOS): with the ``### Input:`` block when ``input`` is not empty."""
    if input:
        return f"{ALPACA_PREAMBLE_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: "
    return f"{ALPACA_PREAMBLE_NO_INPUT}### Instruction:\n{instruction}\n\n### Response: "


def bos_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text when it adds special tokens (``[bos]`` for Llama, ``[]`` for
    tokenizers that add nothing). Read off the tokenizer itself: ids of a probe text with special tokens, up to
    where the ids without them begin."""
    probe = "Instruction"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k])
    raise DataError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} changes a text's own tokens when it adds "
        "special tokens; cannot tell which prefix it adds"
    )


def load_instruction_rows(path: str | Path) -> list[dict]:
    """The examples of an Alpaca-style ``.json`` (a list of objects) or ``.jsonl`` (one object per line) file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"instruction data {path} does not exist; give an Alpaca-style .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from exc
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON "
                                        "object") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); give a list of objects") from exc
    for i, row in enumerate(rows):
        if not (
            isinstance(row, dict)
            and isinstance(row.get("instruction"), str)
            and isinstance(row.get("output"), str)
            and isinstance(row.get("input") or "", str)
        ):
            raise DataError(
                f"{path}: example {i} lacks an 'instruction' or 'output' string (or has a non-string 'input'); "
                'each example must look like {"instruction": "...", "input": "...", "output": "..."}'
            )
    return rows


def alpaca_examples(
    tokenizer, path: str | Path, source_len: int, target_len: int, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples of ``path`` in a seeded order -> ``(input_ids, labels)``, both ``int64 [n, source_len +
    target_len]`` (the layout of the module docstring).

    Examples are the first ``n`` of :func:`frugal_qat.data.text.seeded_order` over the file's examples, so a larger
    ``n`` keeps the smaller one's examples first. The prompt keeps the tokenizer's BOS prefix and its last
    ``source_len - len(BOS prefix)`` tokens; the response is ``output`` + EOS, cut to ``target_len`` tokens.
    Padding is the pad token (EOS when there is none). Raises :class:`DataError` for a missing or malformed file
    or fewer than ``n`` examples.
    """
    if n < 0 or target_len < 1:
        raise ValueError(f"need n >= 0 and target_len >= 1, got n={n}, target_len={target_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no EOS token to end a response; "
            "set tokenizer.eos_token"
        )
    prefix = bos_prefix(tokenizer)
    if source_len <= len(prefix):
        raise ValueError(f"source_len={source_len} leaves no room for a prompt after the {len(prefix)} BOS token(s)")
    rows = load_instruction_rows(path)
    if len(rows) < n:
        raise DataError(f"{path} has {len(rows)} examples; --train-size {n} needs that many; lower --train-size")
    order = seeded_order(len(rows), seed, "alpaca")
    picked = [rows[next(order)] for _ in range(n)]

    width = source_len + target_len
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.full((n, width), pad, dtype=torch.int64)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.int64)
    keep = source_len - len(prefix)
    for r, row in enumerate(picked):
        prompt = tokenizer(alpaca_prompt(row["instruction"], row.get("input")), add_special_tokens=False)["input_ids"]
        src = prefix + prompt[-keep:]
        tgt = (tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [eos])[:target_len]
        ids[r, : len(src) + len(tgt)] = torch.tensor(src + tgt)
        labels[r, len(src) : len(src) + len(tgt)] = torch.tensor(tgt)
    logger.info("instruction data: %d of %d examples from %s (BOS prefix %s)", n, len(rows), path, prefix)
    return ids, labels


__all__ = ["ALPACA_PREAMBLE_INPUT", "ALPACA_PREAMBLE_NO_INPUT", "alpaca_examples", "alpaca_prompt", "bos_prefix",
           "load_instruction_rows"]
