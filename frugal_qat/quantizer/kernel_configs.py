"""The launch configurations of the packed-matmul Triton kernels: one small static table, no autotuning.

Autotuning needs a GPU at run time and compiles every candidate on first use; a static table keeps the set of
binaries small and known, so that the test suite can compile every one of them ahead of time for sm80 and sm90
(``kernel_compile.py``) and fail on a spill or on too much shared memory. Every entry is part of that check.

This module imports neither triton nor CUDA: the chooser in ``packed.py`` and the memory planner read it on any
machine.

Kernels (``triton_kernels.py``) and what a configuration means for each:

==============  ======================================================  =========================================
kernel          program computes                                         block_m x block_n x block_k
==============  ======================================================  =========================================
matmul          y[m-block, n-block] over a K range (split-K)             tokens x out-features x K step
grad_input      grad_x[m-block, k-block] over an N range (split-N)       tokens x N step x in-features
grad_scales     (x^T grad_y)[k-block, n-block] over all M, reduced       M step x out-features x in-features
                into its groups
dequant         W[k-block, n-block] of one tile (torch path helper)      unused x out-features x in-features
group_reduce    one group's rows of a dL/dW tile against q - z           unused x out-features x K step
                (torch path helper)
==============  ======================================================  =========================================

The fused kernels (matmul, grad_input) step through K one ``FUSED_BLOCK_K`` = 32 rows at a time, so a step never
crosses a group boundary when 32 divides the group size: the zero points and scales of a step are then one
``[block_n]`` vector each, decoded once per step instead of once per weight. Layers whose group size is not a
multiple of 32 take the torch path (``packed.choose_backend``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FUSED_BLOCK_K = 32  # K step of the fused forward / grad-input kernels; must divide the group size

# Programs the split-K / split-N launchers aim for: about four waves on a 132-SM H100 (three on a 108-SM A100), so
# that a generation-sized call (M of 1..16, few output blocks) still keeps every SM streaming weights. A constant
# rather than the device's SM count, so that the launch (and the planner's transients) is a pure function of shape.
TARGET_PROGRAMS = 512
MIN_STEPS_PER_SPLIT = 8  # a split streams at least this many K (N) steps, so a program's set-up stays amortized


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes (powers of two, >= 16 where they feed ``tl.dot``), warps and pipeline stages of one binary."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} = {v}: use a power of two >= 16")
        if max(self.block_m * self.block_k, self.block_k * self.block_n, self.block_m * self.block_n) > 1 << 20:
            raise ValueError(f"{self} exceeds triton's 2^20 elements per block: use smaller tiles")

    @property
    def name(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k}w{self.num_warps}s{self.num_stages}"


# (largest M the entry serves, config); the last entry serves every larger M (backend="triton" forced at any M).
# Small M (generation): 16-row tiles, the least padding for tl.dot's 16-row minimum; the weights dominate and are
# streamed once per call. Up to packed.FUSED_MAX_TOKENS (64): one 64-row tile, so the weights are still decoded once.
FUSED_TABLE: dict[str, tuple[tuple[int, KernelConfig], ...]] = {
    "matmul": (
        (16, KernelConfig(16, 64, FUSED_BLOCK_K, num_warps=4, num_stages=4)),
        (1 << 62, KernelConfig(64, 64, FUSED_BLOCK_K, num_warps=4, num_stages=3)),
    ),
    "grad_input": (
        (16, KernelConfig(16, 64, FUSED_BLOCK_K, num_warps=4, num_stages=4)),
        # 8 warps: with 4, the 3-bit variant needs 255 registers and spills on sm80 (kernel_compile.py).
        (1 << 62, KernelConfig(64, 64, FUSED_BLOCK_K, num_warps=8, num_stages=3)),
    ),
    # One config: the M loop is the reduction, so M only changes the trip count. 64 x 64 output tiles hold two
    # whole groups of 32, or a part of a larger group.
    "grad_scales": ((1 << 62, KernelConfig(32, 64, 64, num_warps=4, num_stages=3)),),
}

# Element-wise helpers of the torch path on CUDA (memory-bound: large tiles, few warps' worth of registers each).
HELPER_TABLE: dict[str, KernelConfig] = {
    "dequant": KernelConfig(16, 128, 32, num_warps=4, num_stages=1),
    "group_reduce": KernelConfig(16, 128, 32, num_warps=4, num_stages=2),
}

FUSED_KERNELS = tuple(FUSED_TABLE)
HELPER_KERNELS = tuple(HELPER_TABLE)
KERNELS = FUSED_KERNELS + HELPER_KERNELS
# The bit width is a run-time argument: for 2, 4 and 8 bits a code lies in one word and one binary serves all
# three (the shift and the word index are per-row vectors, so a constant width would save no per-weight
# instruction); 3 bits, whose codes can straddle two words, is a compile-time variant. Label -> a width it covers.
BIT_VARIANTS = {"2,4,8": 2, "3": 3}
# Input dtypes the Triton launchers accept: bf16 only, the dtype the precision policy (frugal_qat/precision.py) gives
# every packed matmul on CUDA. Other dtypes take the tiled path with torch ops; one dtype keeps the set of binaries
# (and the test suite's compile check) small.
DTYPES = ("bfloat16",)


def fused_config(kernel: str, tokens: int) -> KernelConfig:
    """The table's configuration of a fused kernel for ``tokens`` rows of x."""
    for max_tokens, config in FUSED_TABLE[kernel]:
        if tokens <= max_tokens:
            return config
    raise AssertionError("the last table entry serves every M")


def all_configs(kernel: str) -> tuple[KernelConfig, ...]:
    """Every configuration a launcher of ``kernel`` can pick (what the ahead-of-time compile check covers)."""
    if kernel in HELPER_TABLE:
        return (HELPER_TABLE[kernel],)
    return tuple(dict.fromkeys(config for _, config in FUSED_TABLE[kernel]))


def split_count(programs: int, steps: int) -> int:
    """How many parts the reduction loop (``steps`` block steps) is cut into so that about TARGET_PROGRAMS run.

    ``programs`` is the grid size without splitting. Each part keeps at least MIN_STEPS_PER_SPLIT steps.
    """
    want = -(-TARGET_PROGRAMS // max(programs, 1))
    return max(1, min(want, steps // MIN_STEPS_PER_SPLIT))


def scale_grad_slots(block_k: int, group_size: int) -> int:
    """Partial sums one grad_scales program writes per output column: the groups a ``block_k``-row window can
    touch (at most ``block_k // g + 2``; 2 when the group is at least as tall as the window)."""
    return block_k // group_size + 2 if group_size < block_k else 2


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LaunchPlan:
    """Grid and buffers of one fused-kernel launch (a pure function of the shapes; see the launchers).

    ``split`` parts of the reduction loop run as separate programs (grid axis 2), each over ``chunk`` rows (K for
    matmul, N for grad_input), and write fp32 partial sums that the host adds in a fixed order (deterministic, no
    atomics). grad_scales writes ``slots`` partial sums per K block and output column (``scale_grad_slots``) and
    the host gathers each group's ``contributions`` of them.
    """

    kernel: str
    config: KernelConfig
    grid: tuple[int, int, int]
    split: int = 1
    chunk: int = 0
    slots: int = 0
    contributions: int = 0

    def partial_shape(self, M: int, N: int, K: int) -> tuple[int, ...]:
        """Shape of the fp32 partial-sum buffer: ``[split, M, N]`` (matmul), ``[split, M, K]`` (grad_input),
        ``[K blocks * slots + 1, N]`` (grad_scales; the last row stays zero, the target of missing
        contributions)."""
        if self.kernel == "matmul":
            return (self.split, M, N)
        if self.kernel == "grad_input":
            return (self.split, M, K)
        return (self.grid[0] * self.slots + 1, N)

    def partial_numel(self, M: int, N: int, K: int) -> int:
        return math.prod(self.partial_shape(M, N, K))


def _split(programs: int, length: int, step: int) -> tuple[int, int]:
    """(split, chunk): cut a loop of ``length`` rows in ``step`` steps; chunk is a multiple of step."""
    steps = cdiv(length, step)
    split = split_count(programs, steps)
    chunk = cdiv(steps, split) * step
    return cdiv(length, chunk), chunk


def plan_matmul(M: int, N: int, K: int) -> LaunchPlan:
    cfg = fused_config("matmul", M)
    grid = (cdiv(M, cfg.block_m), cdiv(N, cfg.block_n))
    split, chunk = _split(grid[0] * grid[1], K, cfg.block_k)
    return LaunchPlan("matmul", cfg, (*grid, split), split, chunk)


def plan_grad_input(M: int, N: int, K: int) -> LaunchPlan:
    cfg = fused_config("grad_input", M)
    grid = (cdiv(M, cfg.block_m), cdiv(K, cfg.block_k))
    split, chunk = _split(grid[0] * grid[1], N, cfg.block_n)
    return LaunchPlan("grad_input", cfg, (*grid, split), split, chunk)


def scale_grad_contributions(K: int, group_size: int, block_k: int) -> int:
    """Most K blocks of ``block_k`` rows that one group of ``group_size`` rows touches (over all groups)."""
    g = group_size
    # (j * g) mod block_k repeats with a period of at most block_k groups; the last group is never the worst.
    return max(((min((j + 1) * g, K) - 1) // block_k) - (j * g) // block_k + 1
               for j in range(min(K // g, block_k)))


def plan_grad_scales(M: int, N: int, K: int, group_size: int) -> LaunchPlan:
    cfg = fused_config("grad_scales", M)
    grid = (cdiv(K, cfg.block_k), cdiv(N, cfg.block_n), 1)
    return LaunchPlan("grad_scales", cfg, grid, slots=scale_grad_slots(cfg.block_k, group_size),
                      contributions=scale_grad_contributions(K, group_size, cfg.block_k))


def fused_transients(M: int, K: int, N: int, group_size: int) -> dict[str, int]:
    """Bytes of the fused path's temporaries at its forward and backward peaks (``packed_matmul_transients``)."""
    mm = plan_matmul(M, N, K)
    # The partials, and their sum while they still exist (a split of 1 is cast straight from the buffer).
    forward = 4 * (mm.partial_numel(M, N, K) + (M * N if mm.split > 1 else 0))
    gi = plan_grad_input(M, N, K)
    grad_input = 4 * (gi.partial_numel(M, N, K) + (M * K if gi.split > 1 else 0))
    gs = plan_grad_scales(M, N, K, group_size)
    # The partials and the gathered [G, contributions, N] copy that is summed over its middle axis.
    grad_scales = 4 * (gs.partial_numel(M, N, K) + K // group_size * gs.contributions * N)
    return {"forward": forward, "backward": max(grad_input, grad_scales)}
