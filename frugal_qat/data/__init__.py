"""Calibration and evaluation data: text sources, tokenization, seeded windows, instruction data, and the offline
demo."""

from frugal_qat.data.demo import demo_texts, find_smollm2_gguf, make_smollm2_checkpoint
from frugal_qat.data.instructions import alpaca_examples, alpaca_prompt
from frugal_qat.data.text import iter_documents, load_documents, tokenize_documents
from frugal_qat.data.windows import (
    SAMPLINGS,
    build_calibration,
    draw_windows,
    eval_windows,
    fingerprint_windows,
    load_token_stream,
    sample_text_windows,
    sample_windows,
)

__all__ = [
    "SAMPLINGS",
    "alpaca_examples",
    "alpaca_prompt",
    "build_calibration",
    "demo_texts",
    "draw_windows",
    "eval_windows",
    "find_smollm2_gguf",
    "fingerprint_windows",
    "iter_documents",
    "load_documents",
    "load_token_stream",
    "make_smollm2_checkpoint",
    "sample_text_windows",
    "sample_windows",
    "tokenize_documents",
]
