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
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from frugal_qat.offload.activations import ActivationStream, new_stream
from frugal_qat.offload.blocks import ModelSource
from frugal_qat.offload.prefetch import prefetch
from frugal_qat.planner import PlanSettings
from frugal_qat.planner.check import machine_limits, require_fit
from frugal_qat.precision import Precision, frozen
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
                with frozen(block), precision.nograd(device):
                    outs.append(runner(block, i, xb).to("cpu", x.dtype))
            return torch.cat(outs)

        stream.update(apply, progress=None, tag=f"eval-{i}")  # a scratch stream: nothing resumes from it
        del block, apply  # free this block before the next one is built
        bar.update(1)
    bar.close()


def window_nll(h: torch.Tensor, labels: torch.Tensor, head: torch.Tensor, token_chunk: int,
               logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda h, w: h @ w.T) -> torch.Tensor:
    """Summed next-token cross-entropy of one window: ``h`` [L, H] its final-normed hidden states, ``labels`` [L-1]
    the tokens that follow, ``head`` [V, H]. The [tokens, V] logits exist for ``token_chunk`` tokens at a time.
    A 0-d float64 tensor (no ``.item()``: the planner's simulation runs this on fake tensors)."""
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    for a in range(0, labels.shape[0], token_chunk):
        chunk = logits(h[a : min(a + token_chunk, labels.shape[0])], head)
        total += torch.nn.functional.cross_entropy(chunk, labels[a : a + chunk.shape[0]], reduction="sum").double()
    return total


def check_fits(src: ModelSource, n: int, seqlen: int, batch_size: int, chunk_mb: float, device: torch.device,
               work_dir: str | Path | None) -> None:
    """Refuse, before anything is read, an evaluation this machine cannot hold (the planner's ppl_eval phase:
    one block, a batch of hidden states, the lm_head and a logits chunk; the fp32 scratch stream on disk)."""
    quant = src.quant or {"bits": 4, "group_size": -1}  # a dense model: its shapes, not its bits, size the pass
    scratch = Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir())
    settings = PlanSettings(wbits=quant["bits"], group_size=quant["group_size"], seqlen=seqlen, eval_samples=n,
                            eval_batch_size=batch_size, chunk_mb=chunk_mb, device=device.type,
                            **machine_limits(device, (scratch,)))
    require_fit(src.config, settings, ("ppl_eval",))


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
    check_fits(src, n, seqlen, batch_size, chunk_mb, device, work_dir)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="frugal-eval-") as tmp:
        stream = new_stream(Path(tmp) / "hidden.bin", (n, seqlen, src.hidden), chunk_mb, dtype=torch.float32)
        emb = src.embed_weight()
        for s in range(0, n, batch_size):
            stream.write(s, src.embed(windows[s : s + batch_size], emb).float())
        del emb
        run_blocks(src, stream, device, batch_size, show=show_progress)
        norm = src.final_norm().to(device)
        head = src.lm_head_weight().to(device, torch.float32)
        nll, count = 0.0, n * (seqlen - 1)
        for s in range(n):
            h = norm(stream.read(s, s + 1)[0].to(device))
            nll += window_nll(h, windows[s, 1:].to(device), head, token_chunk, src.logits).item()
        stream.close()
    ppl = math.exp(nll / count)
    return {"ppl": ppl, "nll": nll / count, "tokens": count, "windows": n, "seqlen": seqlen, "seconds": time.time() - t0}
