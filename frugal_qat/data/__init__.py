"""Calibration and evaluation data: text sources, tokenization, seeded windows, and the offline demo."""

from frugal_qat.data.demo import demo_texts, find_smollm2_gguf, make_smollm2_checkpoint
from frugal_qat.data.text import load_documents, tokenize_documents
from frugal_qat.data.windows import (
    build_calibration,
    eval_windows,
    fingerprint_windows,
    load_token_stream,
    sample_windows,
)

__all__ = [
    "build_calibration",
    "demo_texts",
    "eval_windows",
    "find_smollm2_gguf",
    "fingerprint_windows",
    "load_documents",
    "load_token_stream",
    "make_smollm2_checkpoint",
    "sample_windows",
    "tokenize_documents",
]
