"""The precision policy: in which dtype every tensor of every phase is stored and computed.

This module is the only place that decides a dtype. The runs (Block-AP, E2E-QP, perplexity, lm-eval) and the
memory/time planner both read :func:`resolve`, so a plan can never assume a dtype the code does not use.

Two policies, by the kind of device the run computes on::

                                     cpu (fp32 compute)          cuda (16-bit compute)
    Block-AP training forward/backward fp32                        bf16 autocast, fp32 masters
    Block-AP masters + AdamW state     fp32                        fp32
    stream updates + validation        fp32                        see ``nograd`` below
    E2E-QP model (embeddings, norms,   fp32                        bf16 (the residual stream and the
      lm_head, biases)                                             checkpointed block inputs follow)
    E2E-QP packed matmul inputs        fp32                        bf16 (autocast)
    E2E-QP scale masters + grads       fp32                        fp32
    perplexity / lm-eval forward       fp32                        bf16 autocast over an fp32 residual
    activation streams on disk         fp16, or bf16 for models whose activations overflow fp16 (both)

Why fp32 on CPU: the CPUs we run on have no AVX512-BF16/AMX, and their bf16/fp16 matmuls are 8-500x slower
than fp32 (shared/docs/environment.md §7). Why bf16 rather than the paper's fp16 with loss scaling on CUDA: the
same tensor-core speed, no loss scale to tune, and no overflow in models such as Gemma.

``nograd`` (the stream updates, whose outputs are the teacher targets and the student's next inputs, and the
validation): on CUDA these run under bf16 autocast over the fp32 residual stream. Measured on SmolLM2-135M's blocks
against an fp32 forward (``tools/bench_precision.py``, docs/METHOD.md), the error bf16 adds to the targets is
far below the error the student's quantization leaves, so TF32 (half bf16's tensor-core rate) would buy nothing
the training can see.

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
    nograd_autocast: torch.dtype | None  # stream updates, validation, perplexity, lm-eval
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
        """Context of a forward without gradient: stream updates, validation, evaluation."""
        return _autocast(device, self.nograd_autocast)

    def e2e(self, device: torch.device) -> contextlib.AbstractContextManager:
        return _autocast(device, self.e2e_autocast)

    def to_json(self) -> dict[str, str]:
        """The dtypes as names, as a run's summary and the planner's JSON record them."""
        return {
            "policy": self.name,
            "block_ap_train": dtype_name(self.train_autocast),
            "block_ap_nograd": dtype_name(self.nograd_autocast),
            "e2e_qp_compute": dtype_name(self.e2e_autocast),
            "e2e_qp_model": dtype_name(self.e2e_dtype),
            "stream": dtype_name(self.stream_dtype),
            "master": dtype_name(self.master),
        }


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


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
        bf16 = torch.bfloat16
        return Precision("cuda", train_autocast=bf16, nograd_autocast=bf16, e2e_dtype=bf16, e2e_autocast=bf16,
                         stream_dtype=stream)
    return Precision("cpu", train_autocast=None, nograd_autocast=None, e2e_dtype=torch.float32, e2e_autocast=None,
                     stream_dtype=stream)


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
