"""Ahead-of-time compile check of every packed-matmul Triton kernel for real GPUs, on a machine without one.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 80 | 90, 32))`` runs triton's
whole pipeline down to ptxas (which ships in the triton wheel) and yields a cubin. We compile every kernel
(``kernel_configs.KERNELS``) for every bit width, every input dtype the launchers accept and every configuration
the launchers can pick (``kernel_configs.all_configs``), for sm80 (A100) and sm90 (H100), and report per binary:
registers, spill stores and loads (ptxas ``-v``), and shared memory against the architecture's per-block limit.

The signature is not written by hand: each row builds its launch with the launchers' own code
(``triton_kernels.*_launch``) on meta tensors of a Llama-2-70B layer shape, and triton's own binder turns the
arguments into the signature and specialization attributes that a real launch of that shape compiles (16-divisible
sizes and strides, 16-byte-aligned pointers). A launch with a dimension that is not a multiple of 16 compiles a
less specialized variant that this check does not cover (docs/KERNELS.md).

Imports triton lazily, in worker processes started without ``TRITON_INTERPRET`` (an interpreted kernel cannot be
compiled). Used by ``tools/compile_kernels.py`` and ``tests/quantizer/test_compile_kernels.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from frugal_qat.quantizer import kernel_configs as kc

logger = logging.getLogger(__name__)

# Shared memory one block may use (CUDA C Programming Guide, "Technical Specifications per Compute Capability":
# 163 KB on 8.0, 227 KB on 9.0).
ARCHS = {"sm80": (80, 163 * 1024), "sm90": (90, 227 * 1024)}

# The layer shape the launches are built for: Llama-2-70B's down_proj (K 28672, N 8192) with group 64, at 16 tokens.
# Every size and stride is a multiple of 16, as at every 70B (and most other) layer shape.
_SHAPE = dict(M=16, K=28672, N=8192, g=64)

_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class Spec:
    kernel: str
    bits: str  # a kernel_configs.BIT_VARIANTS label: "2,4,8" (one binary) or "3"
    dtype: str  # torch dtype name of the input (or of the dequantized tile / dL/dW tile for the helpers)
    config: kc.KernelConfig
    arch: str


@dataclass
class Row:
    kernel: str
    arch: str
    bits: str
    dtype: str
    config: str
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared: int = -1
    shared_limit: int = -1
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return (not self.error and self.spill_stores == 0 and self.spill_loads == 0
                and 0 <= self.shared <= self.shared_limit)

    def problem(self) -> str:
        if self.error:
            return self.error
        if self.spill_stores or self.spill_loads:
            return f"spills ({self.spill_stores} B stored, {self.spill_loads} B loaded)"
        if self.shared > self.shared_limit:
            return f"shared memory {self.shared} B > {self.shared_limit} B"
        return ""


def specs(archs: list[str]) -> list[Spec]:
    """Every (kernel, bit variant, dtype, configuration, arch) binary the launchers can produce."""
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"arch {arch!r} is unknown; choose from {', '.join(ARCHS)}")
    return [Spec(kernel, bits, dtype, config, arch)
            for arch in archs for kernel in kc.KERNELS for config in kc.all_configs(kernel)
            for bits in kc.BIT_VARIANTS for dtype in kc.DTYPES]


def _launch(spec: Spec):
    """The Launch that ``triton_kernels`` builds for ``spec`` at the 70B shape, on meta tensors."""
    import torch

    from frugal_qat.quantizer import triton_kernels as tk
    from frugal_qat.quantizer.packing import packed_rows

    M, K, N, g, b = _SHAPE["M"], _SHAPE["K"], _SHAPE["N"], _SHAPE["g"], kc.BIT_VARIANTS[spec.bits]
    dtype = getattr(torch, spec.dtype)

    def meta(*shape, dt=torch.int32):
        return torch.empty(shape, dtype=dt, device="meta")

    qweight, qzeros = meta(packed_rows(K, b), N), meta(K // g, packed_rows(N, b))
    scales = meta(K // g, N, dt=torch.float32)
    if spec.kernel == "matmul":
        plan = dataclasses.replace(kc.plan_matmul(M, N, K), config=spec.config)
        part = meta(*plan.partial_shape(M, N, K), dt=torch.float32)
        return tk.matmul_launch(meta(M, K, dt=dtype), qweight, qzeros, scales, part, b, g, plan)
    if spec.kernel == "grad_input":
        plan = dataclasses.replace(kc.plan_grad_input(M, N, K), config=spec.config)
        part = meta(*plan.partial_shape(M, N, K), dt=torch.float32)
        return tk.grad_input_launch(meta(M, N, dt=dtype), qweight, qzeros, scales, part, b, g, K, plan)
    if spec.kernel == "grad_scales":
        plan = dataclasses.replace(kc.plan_grad_scales(M, N, K, g), config=spec.config)
        part = meta(*plan.partial_shape(M, N, K), dt=torch.float32)
        return tk.grad_scales_launch(meta(M, K, dt=dtype), meta(M, N, dt=dtype), qweight, qzeros, part, b, g, plan)
    if spec.kernel == "dequant":
        return tk.dequant_launch(qweight, qzeros, scales, meta(K, N, dt=dtype), b, g, 0, 0)
    if spec.kernel == "group_reduce":
        return tk.group_reduce_launch(meta(K // g, N, dt=torch.float32), meta(K, N, dt=dtype), qweight, qzeros, b,
                                      g, 0)
    raise ValueError(f"kernel {spec.kernel!r} is unknown; choose from {', '.join(kc.KERNELS)}")


def compile_binary(spec: Spec):
    """triton's CompiledKernel for ``spec`` (``asm["cubin"]``, ``metadata``) and the ptxas ``-v`` log."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    launch = _launch(spec)
    fn = launch.fn
    target = GPUTarget("cuda", ARCHS[spec.arch][0], 32)
    backend = make_backend(target)
    # Exactly what JITFunction.run does with these arguments: the same signature and attributes.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = binder(*launch.args, **launch.constexprs)
    options = {"num_warps": launch.config.num_warps, "num_stages": launch.config.num_stages}
    options, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, None)
    log = io.StringIO()
    with _ptxas_log_on(), contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return kernel, log.getvalue()


def compile_one(spec: Spec) -> Row:
    """Compile one binary for its architecture and read its resource usage (never raises: errors go in the row)."""
    capability, shared_limit = ARCHS[spec.arch]
    row = Row(spec.kernel, spec.arch, spec.bits, spec.dtype, spec.config.name, shared_limit=shared_limit)
    start = time.perf_counter()
    try:
        kernel, log = compile_binary(spec)
        # ptxas's -v report (registers, spills) is in the log only when ptxas ran: compile_all gives each run an
        # empty cache directory.
        usage, spills = _PTXAS_USAGE.findall(log), _PTXAS_SPILLS.findall(log)
        if not usage or not spills:
            raise RuntimeError("ptxas -v report not found (cache hit? compile with an empty TRITON_CACHE_DIR)")
        row.registers = int(usage[-1])
        row.spill_stores, row.spill_loads = (int(v) for v in spills[-1])
        row.shared = int(kernel.metadata.shared)
    except Exception as exc:  # reported per row; the caller fails on any error
        text = str(exc).strip()
        row.error = f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
    row.seconds = time.perf_counter() - start
    return row


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA\s+(?:`\()?(?:\.L_x_\d+|0x([0-9a-f]+))")


def sass_counts(spec: Spec) -> tuple[int, int]:
    """(instructions in the longest loop body, instructions in the kernel) of ``spec``'s SASS, per warp.

    Read with the wheel's ``cuobjdump -sass``; the loop body is the span of the longest backward branch.
    """
    import triton

    kernel, _ = compile_binary(spec)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], check=True, capture_output=True, text=True).stdout
    lines = [(int(a, 16), text.strip()) for a, text in _SASS_LINE.findall(sass)]
    loop = 0
    for addr, text in lines:
        m = _BRANCH.search(text)
        if m and m.group(1) and int(m.group(1), 16) < addr:
            loop = max(loop, sum(1 for a, _ in lines if int(m.group(1), 16) <= a <= addr))
    total = sum(1 for _, text in lines if text != "NOP" and not (text.startswith("BRA") and _self_branch(text, lines)))
    return loop, total


def _self_branch(text: str, lines) -> bool:
    m = _BRANCH.search(text)
    return bool(m and m.group(1)) and any(a == int(m.group(1), 16) and t == text for a, t in lines)


@contextlib.contextmanager
def _ptxas_log_on():
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is None:
        raise RuntimeError("the compile check needs triton >= 3.4 (triton.knobs)")
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        knobs.nvidia.dump_ptxas_log = old


def _worker_init(cache_dir: str) -> None:
    # Before triton is imported in this process: real (not interpreted) kernels, and a cache of our own.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default


def compile_all(archs: list[str], jobs: int | None = None, progress=None) -> list[Row]:
    """Compile every spec for ``archs`` in ``jobs`` fresh processes (default: one per CPU), in a fresh cache.

    ``progress``: optional callable, called with each finished Row.
    """
    todo = specs(archs)
    jobs = jobs or os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="frugal-qat-triton-cache-") as cache:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(cache,)) as pool:
            for row in pool.map(compile_one, todo):
                rows.append(row)
                if progress is not None:
                    progress(row)
    return rows


def format_table(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    head = "| kernel | arch | bits | dtype | config | regs | spill st/ld (B) | shared (B) | limit (B) | s | ok |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.arch} | {r.bits} | {r.dtype} | {r.config} | {r.registers} | "
                     f"{r.spill_stores}/{r.spill_loads} | {r.shared} | {r.shared_limit} | {r.seconds:.1f} | "
                     f"{'yes' if r.ok else 'NO: ' + r.problem()} |")
    return "\n".join(lines)


def _sass_row(spec: Spec) -> tuple[Spec, int, int]:
    return (spec, *sass_counts(spec))


def sass_counts_all(arch: str, bits: str, jobs: int | None = None) -> dict[tuple[str, str], tuple[int, int]]:
    """``sass_counts`` of every kernel configuration (bf16, the ``bits`` variant label) for ``arch``, in worker
    processes: {(kernel, config name): (loop instructions, kernel instructions)}."""
    todo = [s for s in specs([arch]) if s.bits == bits]
    with tempfile.TemporaryDirectory(prefix="frugal-qat-triton-cache-") as cache:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs or os.cpu_count() or 1, mp_context=ctx, initializer=_worker_init,
                                 initargs=(cache,)) as pool:
            return {(s.kernel, s.config.name): (loop, total) for s, loop, total in pool.map(_sass_row, todo)}
