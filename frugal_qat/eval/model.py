"""The model lm-eval scores: a run's weights kept packed on the device, after a memory check made before loading.

A frugal-qat run directory (Block-AP or E2E-QP output) is assembled as E2E-QP's model
(:func:`frugal_qat.e2e_qp.run.build_packed_model`): a transformers causal LM whose linears are
:class:`~frugal_qat.quantizer.packed.PackedLinear`, read one block at a time straight onto the device. Each linear
keeps its int32 codes and zero points and computes ``y = x @ ((q - z) * s) + bias`` tile by tile inside its matmul
(``quantizer/packed.py``), so no dense copy of any weight outlives one matmul. A 70B at 2 bits then needs about
b/8 bytes per weight plus the fp32 scales (4 bytes per group) on the GPU instead of a 276 GB dense fp32 model in
host RAM. The frozen tensors (embeddings, norms, lm_head, biases) are in the precision policy's ``e2e_dtype``, and
lm-eval runs the forward under its no-grad autocast dtype (``frugal_qat/precision.py``).

A dense checkpoint (not a frugal-qat run) is loaded as before (``export.hf_model.load_quantized_model``: fp32,
whole, in host RAM, then moved to the device).

Both are sized first (:func:`eval_memory_need`, from the memory planner's functions) and refused before anything is
read when they do not fit the device and host RAM available (:func:`check_fits`), with the size they need and the
commands that work instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frugal_qat.errors import OutOfSpace
from frugal_qat.planner import PlanSettings, Term, forward_bytes_per_token, model_shape
from frugal_qat.planner.estimate import GiB, packed_linear_bytes
from frugal_qat.precision import Precision, dtype_bytes
from frugal_qat.precision import resolve as resolve_precision

log = logging.getLogger(__name__)

# lm-eval's own fallback context (HFLM._DEFAULT_MAX_LENGTH): the longest sequence a request may have, unless
# --max-length says otherwise. The memory check sizes the forward for batch_size x this many tokens.
DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class EvalNeed:
    """What one lm-eval forward over a model needs, term by term: ``device_terms`` live where the model computes
    (the GPU, or host RAM on a CPU run), ``host_terms`` in host RAM besides."""

    device_type: str
    packed: bool
    device_terms: tuple[Term, ...]
    host_terms: tuple[Term, ...]

    @property
    def gpu_bytes(self) -> int:
        """Bytes on the GPU; 0 for a CPU run."""
        return sum(t.bytes for t in self.device_terms) if self.device_type == "cuda" else 0

    @property
    def ram_bytes(self) -> int:
        """Bytes of host RAM (on a CPU run, the device terms too)."""
        host = sum(t.bytes for t in self.host_terms)
        return host if self.device_type == "cuda" else host + sum(t.bytes for t in self.device_terms)

    @property
    def model_bytes(self) -> int:
        """The model's own tensors (the device terms named "model: ..."), for messages."""
        return sum(t.bytes for t in self.device_terms if t.name.startswith("model:"))


def eval_memory_need(config: dict[str, Any], quant: dict[str, Any] | None, device_type: str, batch_size: int,
                     max_length: int) -> EvalNeed:
    """The memory lm-eval needs for the model described by ``config`` (config.json dict) and ``quant`` (the run's
    quantization config, None for a dense checkpoint), one forward of ``batch_size`` x ``max_length`` tokens.

    Stand-in until the planner has an lm-eval phase (``frugal_qat.planner.check.require_fit``); every term is the
    planner's own formula. T = batch_size * max_length tokens, c the policy's no-grad compute bytes, e the frozen
    tensors' bytes (``e2e_dtype``), n layers; packed model::

        model: n*sum(qweight + qzeros + g_idx) int32  +  4*n*G fp32 scales  +  e*(embeddings, lm_head, norms, biases)
        forward: T*forward_bytes_per_token(c, e) (one layer) + 2*n*T*nkv*d*c (K/V cache)
                 + the largest packed matmul's tile temporaries + T*V*(c + 4 [+ 4]) logits and fp32 log-softmax

    A dense checkpoint has ``4*all parameters`` as its model (fp32), built in host RAM and then moved.
    """
    from frugal_qat.quantizer.packed import packed_matmul_transients

    shape = model_shape(config)
    prec = resolve_precision(device_type)
    settings = PlanSettings(wbits=4, group_size=-1)  # only its measured constants are read: baseline, CUDA reserve
    V, n, T = shape.vocab, shape.layers, batch_size * max_length
    c, e = prec.nograd_bytes, dtype_bytes(prec.e2e_dtype) if quant else 4
    per_block_other = (shape.total_params - shape.extra_params) // n - shape.block_linear_params  # norms, biases
    big = shape.largest_linear
    if quant:
        b, g = quant["bits"], quant["group_size"]
        ints = n * sum(v for lin in shape.linears for k, v in packed_linear_bytes(lin, b, g).items()
                       if k in ("qweight", "qzeros", "g_idx"))
        block_on_disk = sum(sum(packed_linear_bytes(lin, b, g).values()) for lin in shape.linears)
        model = [
            Term("model: packed weights, zeros, g_idx (int32)", ints, "n*sum(in*b/32*out + in/g*out*b/32 + in)*4"),
            Term("model: scales (fp32)", 4 * n * shape.block_groups(g), "4*n*G"),
            Term("model: embeddings, lm_head, norms, biases", e * (shape.extra_params + n * per_block_other),
                 f"{e}*(V*H*{1 if shape.tied else 2} + H + n*(norms + biases))"),
        ]
        matmul = packed_matmul_transients(big.in_features, big.out_features, T, c, device_type)["forward"]
        matmul_note = "packed_matmul_transients of the largest linear (dequantized tiles)"
        build = Term("one block as read from disk", block_on_disk + 2 * 2 * per_block_other,
                     "packed tensors + 16-bit norms, while the model is assembled")
    else:
        model = [Term("model: dense fp32", 4 * shape.total_params, "4*all parameters")]
        matmul = big.numel * c if c < 4 else 0  # autocast's copy of the largest weight (no cache without grad)
        matmul_note = "c*Wmax: autocast's 16-bit copy of the largest weight"
        build = Term("one block as read (fp32)", 4 * (shape.total_params - shape.extra_params) // n, "4*P")
    logits_bytes = c + 4 + (4 if c < 4 else 0)  # the logits, lm-eval's fp32 log-softmax (and its cast input)
    device = model + [
        Term("forward of one layer (no grad)", T * forward_bytes_per_token(shape, c, e),
             f"T*({c}*3*I + {e}*2*H), T = {batch_size}*{max_length}"),
        Term("K/V cache", 2 * n * T * shape.kv_heads * shape.head_dim * c, "2*n*T*nkv*d*c"),
        Term("matmul temporaries", matmul, matmul_note),
        Term("logits + log-softmax", T * V * logits_bytes, f"T*V*{logits_bytes}"),
    ]
    if device_type == "cuda":
        device.append(Term("CUDA context + workspace", settings.cuda_reserve, "not seen by max_memory_allocated"))
    host = [Term("Python + torch baseline", settings.host_baseline, "RSS of a run that is not tensors (planner)"),
            build]
    if device_type == "cuda" and not quant:
        host.append(Term("dense fp32 model, built in RAM before it moves", 4 * shape.total_params, "4*all parameters"))
    return EvalNeed(device_type, bool(quant), tuple(device), tuple(host))


def available_memory(device: torch.device) -> tuple[int | None, int]:
    """(free bytes on the GPU, or None on a CPU run; available host RAM)."""
    import psutil

    gpu = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return gpu, psutil.virtual_memory().available


def check_fits(model_dir: Path, need: EvalNeed, device: torch.device, batch_size: int, max_length: int,
               smaller: Sequence[tuple[str, EvalNeed]] = ()) -> None:
    """Refuse, before anything is loaded, a model that does not fit the device or host RAM available now.

    ``smaller``: (flags, need) of smaller forwards, mildest first; the first that fits is suggested first.

    Raises:
        OutOfSpace: one line: what it needs and has, then the commands that work (a smaller forward, streamed
            perplexity, a larger GPU or machine, an export evaluated by an engine that keeps weights packed).
    """
    gpu_free, ram_free = available_memory(device)
    short = []
    if gpu_free is not None and need.gpu_bytes > gpu_free:
        short.append(f"{need.gpu_bytes / GiB:.1f} GiB on {device} ({gpu_free / GiB:.1f} GiB free)")
    if need.ram_bytes > ram_free:
        short.append(f"{need.ram_bytes / GiB:.1f} GiB of host RAM ({ram_free / GiB:.1f} GiB available)")
    if not short:
        log.info("lm-eval memory: %.2f GiB %s (model %.2f GiB)", (need.gpu_bytes or need.ram_bytes) / GiB,
                 "GPU" if need.device_type == "cuda" else "RAM", need.model_bytes / GiB)
        return
    kind = "packed model" if need.packed else "dense fp32 model"
    fixes = []
    for flags, alt in smaller:
        if (gpu_free is None or alt.gpu_bytes <= gpu_free) and alt.ram_bytes <= ram_free:
            fixes.append(f"a smaller forward: {flags}")
            break
    where = "a GPU" if need.device_type == "cuda" else "a machine"
    fixes.append(f"{where} with {math.ceil(max(need.gpu_bytes, need.ram_bytes) / GiB)} GiB or more")
    fixes.append(f"perplexity, which streams one block at a time at any size: `frugal-qat ppl --model {model_dir} "
                 f"--data wikitext2`")
    if need.packed:
        fixes.append(f"`frugal-qat export --run {model_dir} --format gptq --out DIR`, then evaluate DIR with an engine "
                     f"that keeps the weights packed and loads this bit width (docs/EXPORT.md)")
    else:
        fixes.append(f"quantize it first (`frugal-qat block-ap --model {model_dir} --out RUN ...`) and evaluate RUN")
    raise OutOfSpace(f"lm-eval on {model_dir} needs {' and '.join(short)}: the {kind} is "
                     f"{need.model_bytes / GiB:.2f} GiB, the forward of {batch_size} x {max_length} tokens the rest; "
                     f"instead use {'; or '.join(fixes)}")


def load_eval_model(model_dir: Path, device: torch.device, precision: Precision) -> nn.Module:
    """The model of ``model_dir`` on ``device``, in eval mode, without gradients.

    A frugal-qat run: the packed model, assembled block by block on the device (host RAM holds one block at a
    time), frozen tensors in ``precision.e2e_dtype``. A dense checkpoint: fp32, whole, then moved to ``device``.
    """
    from transformers import GenerationConfig

    from frugal_qat.checkpoint.run_dir import read_quant_config

    if read_quant_config(model_dir) is not None:
        from frugal_qat.e2e_qp.run import build_packed_model

        model, _ = build_packed_model(model_dir, device, precision.e2e_dtype)
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file():
            model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    else:
        from frugal_qat.export.hf_model import load_quantized_model

        model = load_quantized_model(model_dir).to(device)
    model.requires_grad_(False)  # E2E-QP's model trains its scales; nothing trains here
    return model.eval()
