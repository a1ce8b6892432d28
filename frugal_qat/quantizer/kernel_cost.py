"""A cost model of one packed matmul call on each path: bytes moved, tensor-core FLOPs, instructions issued.

Pure functions of the shapes, the launch plans (``kernel_configs``: grid and block sizes) and the instruction counts
of the compiled kernels (``kernel_compile.sass_counts``, read off the sm80/sm90 SASS of the main loop, so the
decode work is measured rather than guessed). ``tools/bench_kernels.py`` prints it for the Llama-2-70B shapes and
docs/KERNELS.md keeps the table; ``packed.FUSED_MAX_TOKENS`` is chosen from it.

Model, per kernel (an operand that several programs read comes from HBM once if it fits in half the L2, else once
per program that reads it: L2 reuse between programs is otherwise ignored, which is pessimistic for the fused
kernels at mid-size M)::

    seconds = max(bytes / bandwidth, flops / tensor-core peak, warp instructions / issue rate)
    issue rate = SMs * clock * 4    (4 schedulers per SM, one warp instruction per clock each)

``flops`` counts what the tensor cores execute (a 16-row ``tl.dot`` for one token still does 16 rows). cuBLAS is
modelled at its roofline (one read of each operand and one write of the output, at peak) and the fused kernels at
full instruction issue: both are ideals, so the comparison is like for like, and neither is a measurement. Legend: M tokens, K in_features, N out_features, b bits, G = K / g groups,
c bytes per compute element (2: bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

from frugal_qat.quantizer import kernel_configs as kc


@dataclass(frozen=True)
class Gpu:
    """Datasheet figures (NVIDIA A100 / H100 datasheets: dense bf16 tensor FLOP/s, HBM bandwidth, SMs, boost clock,
    L2 size)."""

    name: str
    tensor_flops: float
    bandwidth: float
    sms: int
    clock_hz: float
    l2_bytes: float

    @property
    def issue_rate(self) -> float:
        """Warp instructions per second over the whole GPU."""
        return self.sms * self.clock_hz * 4


GPUS = {
    "a100": Gpu("A100-SXM4-80GB", 312e12, 2.039e12, 108, 1.410e9, 40 * 2**20),
    "h100": Gpu("H100-SXM5-80GB", 989e12, 3.35e12, 132, 1.980e9, 50 * 2**20),
}


@dataclass(frozen=True)
class SassCount:
    """Warp instructions of one compiled kernel: its longest loop's body, and the whole kernel (loop once)."""

    loop: int
    total: int

    def per_program(self, iterations: int) -> int:
        return self.total + max(iterations - 1, 0) * self.loop


@dataclass(frozen=True)
class KernelCost:
    name: str
    programs: int
    bytes: float
    flops: float
    warp_instructions: float

    def seconds(self, gpu: Gpu) -> float:
        return max(self.bytes / gpu.bandwidth, self.flops / gpu.tensor_flops, self.warp_instructions / gpu.issue_rate)

    def bound(self, gpu: Gpu) -> str:
        times = {"memory": self.bytes / gpu.bandwidth, "tensor": self.flops / gpu.tensor_flops,
                 "issue": self.warp_instructions / gpu.issue_rate}
        return max(times, key=times.get)


@dataclass(frozen=True)
class Layer:
    K: int
    N: int
    bits: int
    group_size: int
    c: int = 2  # compute bytes (bf16)

    @property
    def G(self) -> int:
        return self.K // self.group_size

    @property
    def packed_bytes(self) -> float:
        """qweight, plus scales (fp32) and zero points: what one full read of the layer moves."""
        return self.K * self.N * self.bits / 8 + self.G * self.N * (4 + self.bits / 8)


Counts = dict[tuple[str, str], SassCount]  # (kernel, KernelConfig.name) -> its SASS counts


def _instr(counts: Counts, kernel: str, cfg: kc.KernelConfig, programs: int, iterations: int) -> float:
    return programs * cfg.num_warps * counts[kernel, cfg.name].per_program(iterations)


def _reads(size: float, readers: int, gpu: Gpu) -> float:
    """HBM bytes of an operand of ``size`` bytes read by ``readers`` programs (or program rows)."""
    return size if size <= gpu.l2_bytes / 2 else size * readers


def _host_sum(name: str, parts: int, rows: int, cols: int, c: int) -> list[KernelCost]:
    """The launcher's fixed-order sum of split partials (fp32) and the cast to the compute dtype."""
    out = []
    if parts > 1:
        out.append(KernelCost(f"{name} sum", 0, 4 * rows * cols * (parts + 1), 0, 0))
    out.append(KernelCost(f"{name} cast", 0, rows * cols * (4 + c), 0, 0))
    return out


def fused_forward(L: Layer, M: int, counts: Counts, gpu: Gpu) -> list[KernelCost]:
    plan = kc.plan_matmul(M, L.N, L.K)
    cfg, (gm, gn, split) = plan.config, plan.grid
    programs = gm * gn * split
    nbytes = _reads(M * L.K * L.c, gn, gpu) + _reads(L.packed_bytes, gm, gpu) + 4 * split * M * L.N
    flops = 2 * gm * cfg.block_m * L.N * L.K
    instr = _instr(counts, "matmul", cfg, programs, plan.chunk // cfg.block_k)
    return [KernelCost("matmul (fused)", programs, nbytes, flops, instr), *_host_sum("y", split, M, L.N, L.c)]


def fused_backward(L: Layer, M: int, counts: Counts, gpu: Gpu) -> list[KernelCost]:
    gi = kc.plan_grad_input(M, L.N, L.K)
    cfg, (gm, gk, split) = gi.config, gi.grid
    programs = gm * gk * split
    nbytes = _reads(M * L.N * L.c, gk, gpu) + _reads(L.packed_bytes, gm, gpu) + 4 * split * M * L.K
    out = [KernelCost("grad_input (fused)", programs, nbytes, 2 * gm * cfg.block_m * L.K * L.N,
                      _instr(counts, "grad_input", cfg, programs, gi.chunk // cfg.block_n)),
           *_host_sum("grad_x", split, M, L.K, L.c)]
    gs = kc.plan_grad_scales(M, L.N, L.K, L.group_size)
    cfg, (gk, gn, _) = gs.config, gs.grid
    programs = gk * gn
    m_pad = kc.cdiv(M, cfg.block_m) * cfg.block_m
    nbytes = (_reads(M * L.K * L.c, gn, gpu) + _reads(M * L.N * L.c, gk, gpu) + L.packed_bytes
              + 4 * gs.partial_numel(M, L.N, L.K))
    out.append(KernelCost("grad_scales (fused)", programs, nbytes, 2 * L.K * L.N * m_pad,
                          _instr(counts, "grad_scales", cfg, programs, kc.cdiv(M, cfg.block_m))))
    out.append(KernelCost("grad_scales gather", 0, 4 * (L.G * gs.contributions + L.G) * L.N, 0, 0))
    return out


def _dequant(L: Layer, counts: Counts) -> KernelCost:
    cfg = kc.HELPER_TABLE["dequant"]
    programs = kc.cdiv(L.K, cfg.block_k) * kc.cdiv(L.N, cfg.block_n)
    return KernelCost("dequantize tile", programs, L.packed_bytes + L.K * L.N * L.c, 0,
                      _instr(counts, "dequant", cfg, programs, 1))


def _cublas(name: str, M: int, K: int, N: int, c: int) -> KernelCost:
    return KernelCost(name, 0, (M * K + K * N + M * N) * c, 2 * M * N * K, 0)


def tiled_forward(L: Layer, M: int, counts: Counts, gpu: Gpu) -> list[KernelCost]:
    """The whole layer as one tile (CUDA_TILE_BYTES holds every 70B layer): dequantize once, one cuBLAS matmul."""
    return [_dequant(L, counts), _cublas("x @ W (cuBLAS)", M, L.K, L.N, L.c)]


def tiled_backward(L: Layer, M: int, counts: Counts, gpu: Gpu) -> list[KernelCost]:
    cfg = kc.HELPER_TABLE["group_reduce"]
    programs = L.G * kc.cdiv(L.N, cfg.block_n)
    reduce_bytes = L.K * L.N * (L.c + L.bits / 8) + L.G * L.N * (8 + L.bits / 8)
    return [_dequant(L, counts), _cublas("grad_y @ W^T (cuBLAS)", M, L.N, L.K, L.c),
            _cublas("x^T @ grad_y (cuBLAS)", L.K, M, L.N, L.c),
            KernelCost("reduce (q - z) * dL/dW", programs, reduce_bytes, 0,
                       _instr(counts, "group_reduce", cfg, programs, kc.cdiv(L.group_size, cfg.block_k)))]


PATHS = {"fused": (fused_forward, fused_backward), "tiled": (tiled_forward, tiled_backward)}


def useful_flops(L: Layer, M: int, direction: str) -> float:
    """2MNK per matmul of the call: one forward, two backward (dL/dx and dL/dW)."""
    return 2 * M * L.K * L.N * (1 if direction == "forward" else 2)


def summarize(costs: list[KernelCost], gpu: Gpu) -> dict[str, float]:
    """Totals of a call: bytes, executed FLOPs (padded tensor-core tiles included), modelled seconds."""
    nbytes = sum(k.bytes for k in costs)
    flops = sum(k.flops for k in costs)
    return {"bytes": nbytes, "flops": flops,
            "warp_instructions": sum(k.warp_instructions for k in costs),
            "seconds": sum(k.seconds(gpu) for k in costs)}


def crossover(L: Layer, counts: Counts, gpu: Gpu, direction: str = "forward",
              tokens: tuple[int, ...] = tuple(2**i for i in range(15))) -> int | None:
    """Smallest token count in ``tokens`` at which the tiled path's modelled time beats the fused path's."""
    i = 0 if direction == "forward" else 1
    for M in tokens:
        fused = summarize(PATHS["fused"][i](L, M, counts, gpu), gpu)["seconds"]
        tiled = summarize(PATHS["tiled"][i](L, M, counts, gpu), gpu)["seconds"]
        if tiled < fused:
            return M
    return None
