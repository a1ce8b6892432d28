"""Perplexity, streamed block by block like Block-AP, so a 70B evaluates with one block in memory.

The hidden states of all evaluation windows live in a scratch file (fp32 by default: evaluation should not add
rounding the model does not have), every block updates them in place, and the final norm and lm_head run over
chunks of tokens so the vocabulary-sized logits never exist for the whole set.
``ppl = exp(mean next-token cross-entropy)`` over every predicted token of every window (notes §5).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from frugal_qat.offload.activations import ActivationStream, new_stream
from frugal_qat.offload.blocks import ModelSource
from frugal_qat.offload.prefetch import prefetch
from frugal_qat.precision import Precision
from frugal_qat.precision import resolve as resolve_precision

log = logging.getLogger(__name__)


@torch.no_grad()
def run_blocks(src: ModelSource, stream: ActivationStream, device: torch.device, batch_size: int,
               desc: str = "eval", show: bool = True, precision: Precision | None = None) -> None:
    """stream <- block_{n-1}(...block_0(stream)), one block in memory, the next one read in the background.
    Blocks run under the policy's no-grad dtype (bf16 autocast over the fp32 stream on CUDA, fp32 on CPU)."""
    precision = precision or resolve_precision(device)
    runner = src.runner(device)
    bar = tqdm(total=src.n_layers, desc=desc, unit="block", disable=not show, leave=False)
    for i, state in prefetch(src.block_state, range(src.n_layers), depth=1):
        block = src.block(i, state).to(device)
        del state

        def apply(x: torch.Tensor, block: torch.nn.Module = block, i: int = i) -> torch.Tensor:
            outs = []
            for xb in x.split(batch_size):
                xb = xb.to(device, torch.float32)
                with precision.nograd(device):
                    outs.append(runner(block, i, xb).to("cpu", x.dtype))
            return torch.cat(outs)

        stream.update(apply, progress=None, tag=f"eval-{i}")  # a scratch stream: nothing resumes from it
        del block, apply  # free this block before the next one is built
        bar.update(1)
    bar.close()


@torch.no_grad()
def perplexity(
    model_dir: str | Path,
    windows: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 4,
    chunk_mb: int = 64,
    work_dir: str | Path | None = None,
    token_chunk: int = 1024,
    show_progress: bool = True,
) -> dict:
    """Perplexity of a checkpoint or a run directory on ``windows`` [n, L] token ids. Returns a metrics dict."""
    device = torch.device(device)
    t0 = time.time()
    n, seqlen = windows.shape
    src = ModelSource(model_dir, seqlen=seqlen)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="frugal-eval-") as tmp:
        stream = new_stream(Path(tmp) / "hidden.bin", (n, seqlen, src.hidden), chunk_mb, dtype=torch.float32)
        emb = src.embed_weight()
        for s in range(0, n, batch_size):
            stream.write(s, src.embed(windows[s : s + batch_size], emb).float())
        del emb
        run_blocks(src, stream, device, batch_size, show=show_progress)
        norm = src.final_norm().to(device)
        head = src.lm_head_weight().to(device, torch.float32)
        nll, count = 0.0, 0
        for s in range(n):
            h = norm(stream.read(s, s + 1)[0].to(device))
            labels = windows[s, 1:].to(device)
            for a in range(0, seqlen - 1, token_chunk):
                logits = h[a : min(a + token_chunk, seqlen - 1)] @ head.T
                nll += torch.nn.functional.cross_entropy(logits, labels[a : a + logits.shape[0]], reduction="sum").item()
                count += logits.shape[0]
        stream.close()
    ppl = math.exp(nll / count)
    return {"ppl": ppl, "nll": nll / count, "tokens": count, "windows": n, "seqlen": seqlen, "seconds": time.time() - t0}
