"""The precision policy: in which dtype every tensor of every phase is stored and computed.

This module is the only place that decides a dtype. The runs (Block-AP, E2E-QP, perplexity, lm-eval) and the
memory/time planner both read :func:`resolve`, so a plan can never assume a dtype the code does not use.

Two policies, by the kind of device the run computes on::

                                     cpu (fp32 compute)          cuda (16-bit compute)
    Block-AP training forward/backward fp32                        bf16 autocast, fp32 masters
    Block-AP masters + AdamW state     fp32                        fp32
    quant stream update + validation   fp32                        bf16 autocast over the fp32 residual
    fp (teacher) stream update         fp32                        fp16 autocast (fp16 streams), TF32 (bf16 streams)
    E2E-QP model (embeddings, norms,   fp32                        bf16 (the residual stream and the
      lm_head, biases)                                             checkpointed block inputs follow)
    E2E-QP packed matmul inputs        fp32                        bf16 (autocast)
    E2E-QP scale masters + grads       fp32                        fp32
    perplexity forward                 fp32                        bf16 autocast over an fp32 residual
    lm-eval on a run                   fp32                        the E2E-QP model's (bf16, bf16 autocast)
    activation streams on disk         fp16, or bf16 for models whose activations overflow fp16 (both)

Why fp32 on CPU: the CPUs we run on have no AVX512-BF16/AMX, and their bf16/fp16 matmuls are 8-500x slower
than fp32 (shared/docs/environment.md §7). Why bf16 rather than the paper's fp16 with loss scaling on CUDA: the
same tensor-core speed, no loss scale to tune, and no overflow in models such as Gemma.

``nograd`` and ``teacher`` (the no-grad forwards of Block-AP) on CUDA. The quant stream update and the validation
run under bf16 autocast over the fp32 residual stream, like the Block-AP training forward they feed and measure.
The fp teacher stream update, whose outputs are the next block's training targets, runs under fp16 autocast where
the streams are stored in fp16, and in TF32 (fp32 inputs; cuBLAS rounds them to 10 mantissa bits) where the
architecture needs bf16 streams, since fp16 would overflow there. Measured on SmolLM2-135M's 30 blocks against an
fp32 forward (``tools/bench_precision.py``, docs/PRECISION.md; the rule was fixed before measuring): bf16 adds at
most 0.47 % of the MSE a trained w4g64 student leaves on a block, which neither training nor validation can see.
But on half the blocks it adds 12-484x the rounding the fp16 stream storage already adds to the targets, and its
drift over a whole teacher stream reaches 1.1 % of the student's MSE. fp16 autocast adds at most 5.3x the storage
rounding (drift 0.06 %), and TF32 at most 2.8x (drift 0.03 %, no more than the CPU policy's own 0.04 %). fp16 runs
at bf16's tensor-core rate. TF32 runs at half of it (A100 156 vs 312 TFLOP/s, H100 SXM 495 vs 989), about +13 % of a
Block-AP run's compute where it is used. TF32 must round its inputs, as cuBLAS does: a kernel that truncates them
adds up to 27x the storage rounding.

The CUDA policy can be forced on a CPU (``offload.precision: cuda``, ``--precision cuda``): the same dtypes,
computed slowly by the CPU. Tests use it to check, with spies, that the layers really receive 16-bit inputs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

POLICIES = ("auto", "cpu", "cuda")
STREAM_DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16}

_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def dtype_name(dtype: torch.dtype | None) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; None (no autocast) -> ``"float32"``."""
    return "float32" if dtype is None else _NAMES[dtype]


def dtype_bytes(dtype: torch.dtype | None) -> int:
    return 4 if dtype is None else torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Precision:
    """One device kind's dtypes (see the module docstring). ``None`` autocast means plain fp32."""

    name: str  # "cpu" or "cuda": the policy, not necessarily the device it runs on
    train_autocast: torch.dtype | None  # Block-AP training forward and backward
    nograd_autocast: torch.dtype | None  # quant stream update, validation, perplexity, lm-eval's compute
    teacher_autocast: torch.dtype | None  # fp (teacher) stream update; None + teacher_tf32: fp32 in TF32
    teacher_tf32: bool
    e2e_dtype: torch.dtype  # E2E-QP embeddings, norms, lm_head, biases; hence its residual stream
    e2e_autocast: torch.dtype | None  # E2E-QP forward and backward (the packed matmuls' input dtype)
    stream_dtype: torch.dtype  # the activation streams on disk
    master: torch.dtype = torch.float32  # trainable tensors (block weights, scales, zeros) and optimizer state

    @property
    def train_bytes(self) -> int:
        """Bytes of a Block-AP training matmul operand or saved activation."""
        return dtype_bytes(self.train_autocast)

    @property
    def nograd_bytes(self) -> int:
        return dtype_bytes(self.nograd_autocast)

    @property
    def e2e_bytes(self) -> int:
        """Bytes of an E2E-QP activation (the residual stream, checkpointed block inputs) and frozen weight."""
        return dtype_bytes(self.e2e_dtype)

    @property
    def stream_bytes(self) -> int:
        return dtype_bytes(self.stream_dtype)

    def train(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Context of a Block-AP training forward (the backward follows the forward's dtypes)."""
        return _autocast(device, self.train_autocast)

    def nograd(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Context of a forward without gradient: the quant stream update, validation, evaluation."""
        return _autocast(device, self.nograd_autocast)

    def teacher(self, device: torch.device) -> contextlib.AbstractContextManager:
        """Context of the fp (teacher) stream update, whose outputs are the training targets."""
        return _tf32() if self.teacher_tf32 else _autocast(device, self.teacher_autocast)

    @property
    def teacher_bytes(self) -> int:
        return dtype_bytes(self.teacher_autocast)

    def e2e(self, device: torch.device) -> contextlib.AbstractContextManager:
        return _autocast(device, self.e2e_autocast)

    def to_json(self) -> dict[str, str]:
        """The dtypes as names, as a run's summary and the planner's JSON record them."""
        return {
            "policy": self.name,
            "block_ap_train": dtype_name(self.train_autocast),
            "block_ap_nograd": dtype_name(self.nograd_autocast),
            "block_ap_teacher": "tf32" if self.teacher_tf32 else dtype_name(self.teacher_autocast),
            "e2e_qp_compute": dtype_name(self.e2e_autocast),
            "e2e_qp_model": dtype_name(self.e2e_dtype),
            "stream": dtype_name(self.stream_dtype),
            "master": dtype_name(self.master),
        }


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """``module``'s parameters do not require grad inside the region (each one's flag restored after).

    Wrap every no-grad forward under autocast in it: autocast caches its 16-bit cast of each leaf tensor that
    requires grad until the autocast region ends, so a freshly built block (nn.Parameter's default) would hold a
    16-bit copy of all its weights at once (``2*Pl``: 1.6 GiB for a 70B block); without the flag each cast is made
    when its matmul runs and freed after it (the planner's ``_cast_cache``)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def _tf32() -> Iterator[None]:
    """fp32 matmuls on TF32 tensor cores (cuBLAS rounds the inputs to 10 mantissa bits) for the block inside only:
    the setting is process-wide, so it is restored on the way out."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def resolve(device: torch.device | str, policy: str = "auto", stream_dtype: str = "auto",
            needs_bf16_streams: bool = False) -> Precision:
    """The precision of a run on ``device``.

    Args:
        device: where the run computes (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a torch.device).
        policy: ``"auto"`` (the device's own), or ``"cpu"`` / ``"cuda"`` to force a policy (``"cuda"`` on a CPU:
            the GPU's dtypes, computed by the CPU, for tests).
        stream_dtype: ``"auto"``, ``"float16"`` or ``"bfloat16"`` for the activation streams.
        needs_bf16_streams: the architecture's activations exceed fp16's range (e.g. Gemma), so ``"auto"`` stores
            the streams in bf16.

    Raises:
        ValueError: an unknown policy or stream dtype.
    """
    if policy not in POLICIES:
        raise ValueError(f"precision policy {policy!r} is unknown; choose one of {', '.join(POLICIES)}")
    if stream_dtype not in STREAM_DTYPES:
        raise ValueError(f"stream dtype {stream_dtype!r} is unknown; choose one of {', '.join(STREAM_DTYPES)}")
    kind = torch.device(device).type if policy == "auto" else policy
    stream = STREAM_DTYPES[stream_dtype] or (torch.bfloat16 if needs_bf16_streams else torch.float16)
    if kind == "cuda":
        bf16, fp16_streams = torch.bfloat16, stream == torch.float16
        return Precision("cuda", train_autocast=bf16, nograd_autocast=bf16,
                         teacher_autocast=torch.float16 if fp16_streams else None, teacher_tf32=not fp16_streams,
                         e2e_dtype=bf16, e2e_autocast=bf16, stream_dtype=stream)
    return Precision("cpu", train_autocast=None, nograd_autocast=None, teacher_autocast=None, teacher_tf32=False,
                     e2e_dtype=torch.float32, e2e_autocast=None, stream_dtype=stream)


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    """Bit-identical results from run to run, and so across a kill and resume, on CUDA too (``--deterministic``).

    On CPU every op we use is deterministic already (the kill tests compare bit for bit). On CUDA two things are
    not: flash/memory-efficient attention's backward accumulates dQ with atomics, and cuBLAS may split reductions
    by workspace. This turns on torch's deterministic algorithms, gives cuBLAS a fixed workspace
    (``CUBLAS_WORKSPACE_CONFIG``, read when its handle is created, so set before the first matmul) and runs SDPA on
    its math backend, which materialises the ``[b, heads, L, L]`` attention matrix (more memory and time: the
    planner adds it when the run is deterministic). Our own Triton kernels reduce in a fixed order and need nothing.
    """
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.use_deterministic_algorithms(before)
