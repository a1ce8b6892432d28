"""What a run needs, before it starts: bytes per device, host RAM and disk, and time, from config.json alone.

Every figure is a named :class:`Term` with the formula in its note, so a measured (or simulated) peak can be
compared term by term. Symbols (per decoder block unless said otherwise)::

    H hidden, I intermediate, nh / nkv attention / key-value heads, d head_dim, V vocab, n layers
    P   trainable parameters of one block (its quantized linears, norms, biases: counted on transformers' layer)
    Pl  linear weights of one block (sum of out*in), Wmax = the largest linear's out*in
    G   quantization groups of one block (sum of out*in/g); scale and zero hold G elements each
    b, L micro-batch and sequence length, T = b*L tokens
    c   bytes of a compute operand in the phase's dtype, from the precision policy (frugal_qat/precision.py):
        2 under bf16 autocast (CUDA), 4 in fp32 (CPU)
    N, Nv training and validation windows, S = (N+Nv)*L*H*s: one activation stream of s-byte elements

Dtypes come from :func:`frugal_qat.precision.resolve`, the one place the runs take them from, so a plan never
assumes a dtype the code does not use. The per-token activation formulas count what torch 2.13 autograd keeps for
transformers' decoder layer with SDPA and no mask (flash kernels: no L x L matrix; GQA without repeating k/v): see
:func:`saved_bytes_per_token` and ``tests/planner``. Counts of read-ahead buffers follow
``frugal_qat.offload.prefetch.prefetch``, which keeps ``depth`` loads in flight beside the item in use.

A phase's peak is the largest, over its stages, of the stage-less terms plus that stage's terms. ``frugal-qat plan
--simulate`` (``planner/simulate.py``) runs the code itself on fake tensors to check these sums.

Time (:class:`StageTime`): each stage's compute is priced per kind of work in the dtype the policy uses (16-bit
or fp32 matmuls at the GPU's peak times an achieved fraction measured in public benchmarks, memory-bound
elementwise work at its HBM bandwidth times an achieved fraction: ``GPUS``, cited in docs/PERFORMANCE.md), and its
disk I/O at ``disk_gbps``. Where the code reads ahead or writes behind on a thread, a stage takes max(compute, I/O);
where it waits, their sum.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from frugal_qat.errors import ConfigError, UnsupportedModel

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
PHASES = ("block_ap", "e2e_qp", "ppl_eval")
PHASE_TITLES = {"block_ap": "Block-AP (per block)", "e2e_qp": "E2E-QP", "ppl_eval": "perplexity evaluation"}

# prefetch(depth=k) runs k loads ahead of the item in use (offload/prefetch.py).
BLOCKS_AHEAD = 1  # block_ap/run.py and eval/ppl.py: prefetch(block_state, depth=1)
BATCHES_AHEAD = 2  # block_ap/run.py: prefetch(micro-batch lists, depth=2); on CUDA they are loaded onto the GPU
CHUNKS_AHEAD = 1  # offload/activations.READS_AHEAD: stream chunks read ahead of the one being computed
WRITES_AHEAD = 2  # offload/activations.WRITES_AHEAD: output chunks queued for the writer beyond the one it writes
TORCH_TILE_ROWS = 512  # quantizer/packed.py DEFAULT_TILE_ROWS: rows of W the CPU path dequantizes at a time
# bitsandbytes 8-bit AdamW (0.50.2, measured here): uint8 states with one fp32 absmax per 256 elements.
BNB_BLOCK = 256

# Memory traffic of the memory-bound (elementwise) work, bytes per element, counted from the code (the passes are
# listed where each is used): fake-quant of one weight, AdamW of one fp32 parameter, one packed weight.
FAKE_QUANT_FORWARD_BYTES = 54  # 6 fp32 passes (W/s, round, +z, clamp, -z, *s: read 4 + write 4) + the bf16 cast
FAKE_QUANT_BACKWARD_BYTES = 113  # primitives._FakeQuant.backward: 16 passes, listed in fake_quant_bytes()
ADAMW_BYTES = 28  # fused AdamW (CUDA), fp32: reads param, grad, exp_avg, exp_avg_sq; writes param and the two moments

_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kib": KiB, "kb": 10**3,
    "m": MiB, "mib": MiB, "mb": 10**6,
    "g": GiB, "gib": GiB, "gb": 10**9,
    "t": TiB, "tib": TiB, "tb": 10**12,
}


def parse_bytes(s: str | int) -> int:
    """Bytes from a size such as ``"80GiB"``, ``"64GB"``, ``"500MiB"``, ``"1.5 TB"`` or ``"4096"``.

    ``KiB/MiB/GiB/TiB`` are powers of 1024, ``KB/MB/GB/TB`` powers of 1000; a bare ``K/M/G/T`` means the binary
    unit (as ``free -g`` and docker do). Case and spaces do not matter. An int is returned as is.
    """
    if isinstance(s, int) and not isinstance(s, bool):
        if s < 0:
            raise ValueError(f"size {s} is negative; give a number of bytes >= 0")
        return s
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(s))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"cannot read the size {s!r}; write a number and a unit, e.g. 80GiB, 64GB or 500MiB")
    return int(float(m.group(1)) * _UNITS[unit])


# ---- GPUs -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    """A GPU's peaks and the fraction of each that real kernels achieve (one figure per kind of work, from public
    measurements of that GPU; sources in docs/PERFORMANCE.md). ``tflops``: dense peaks (no sparsity) for
    "bfloat16" (tensor cores), "tf32" (tensor cores) and "float32" (CUDA cores: what an fp32 matmul gets, since
    torch keeps TF32 off for matmuls by default and frugal-qat does not turn it on). ``achieved``: the same keys
    plus "elementwise", the fraction of ``hbm_gbps`` a streaming kernel sustains. ``memory``: bytes the driver
    reports."""

    name: str
    memory: int
    tflops: dict[str, float]
    hbm_gbps: float
    achieved: dict[str, float]


GPUS = {
    # A100 SXM4 80GB: datasheet 312 / 156 / 19.5 TFLOP/s, 2039 GB/s. Achieved: bf16 267.9 TFLOP/s (MAMF table),
    # TF32 143 (CUTLASS GEMM), fp32 18.88 of 19.49 (cuBLAS SGEMM), 1737 GB/s (stream "scale" kernel).
    "a100-80gb": GPU("a100-80gb", 81920 * MiB, {"bfloat16": 312.0, "tf32": 156.0, "float32": 19.5}, 2039.0,
                     {"bfloat16": 0.859, "tf32": 0.917, "float32": 0.969, "elementwise": 0.852}),
    # H100 SXM5 80GB: datasheet 989.4 / 494.7 / 66.9 TFLOP/s, 3350 GB/s. Achieved: bf16 792.1 (MAMF), elementwise
    # 1704 of 2000 GB/s on the H100 PCIe; no public TF32 / fp32 GEMM measurement found: the A100's fractions.
    "h100-80gb": GPU("h100-80gb", 81559 * MiB, {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9}, 3350.0,
                     {"bfloat16": 0.801, "tf32": 0.917, "float32": 0.969, "elementwise": 0.852}),
    # H200 SXM 141GB: the H100 SXM's compute, 4800 GB/s. Achieved: bf16 the H100 SXM's (same chip and clocks),
    # elementwise 3174 of 4000 GB/s on a GH200's Hopper GPU (HBM3); TF32 / fp32 as the H100.
    "h200": GPU("h200", 143771 * MiB, {"bfloat16": 989.4, "tf32": 494.7, "float32": 66.9}, 4800.0,
                {"bfloat16": 0.801, "tf32": 0.917, "float32": 0.969, "elementwise": 0.794}),
}


# ---- model shapes -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    def groups(self, group_size: int) -> int:
        """Scale (and zero) elements: ``out * in / g``, or ``out`` for ``g = -1``."""
        return self.out_features * (1 if group_size == -1 else self.in_features // group_size)


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only model that the formulas need.

    ``linears`` and ``block_params`` come from the architecture's own decoder layer (transformers, built on the
    meta device): the quantized linears with their widths and biases, and every parameter of the block (norms,
    q/k norms, biases). The scalar dimensions come from the config, for the activation formulas.
    """

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    linears: tuple[Linear, ...]
    block_params: int
    bf16_activations: bool = False

    @property
    def block_linear_params(self) -> int:
        return sum(lin.numel for lin in self.linears)

    @property
    def largest_linear(self) -> Linear:
        return max(self.linears, key=lambda lin: lin.numel)

    @property
    def largest_attention_linear(self) -> Linear:
        """The largest linear outside the MLP (q/k/v/o, or a fused qkv): what attention's forward casts at most."""
        return max((lin for lin in self.linears if not lin.name.startswith("mlp.")), key=lambda lin: lin.numel)

    @property
    def other_params(self) -> int:
        """Block parameters outside the quantized linears' weights: norms (and q/k norms), biases."""
        return self.block_params - self.block_linear_params

    @property
    def extra_params(self) -> int:
        """Embeddings, lm_head (unless tied) and the final norm: kept in 16 bits, never quantized."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def total_params(self) -> int:
        return self.layers * self.block_params + self.extra_params

    def block_groups(self, group_size: int) -> int:
        return sum(lin.groups(group_size) for lin in self.linears)


def model_shape(config: dict[str, Any]) -> ModelShape:
    """The shapes of the model described by ``config`` (a config.json dict), read off the architecture code.

    ``frugal_qat.arch`` gives the quantized linears (``linear_shapes``: names, widths, biases of transformers' own
    layer built on meta) and the block's other parameters are counted on the same meta layer, so any family the
    arch registry supports plans without changes here.

    Raises:
        UnsupportedModel: an architecture frugal-qat does not support, or a config without the sizes.
    """
    return _model_shape(json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=32)
def _model_shape(config_json: str) -> ModelShape:
    import torch

    from frugal_qat.arch import arch_for, hf_config, linear_shapes

    config = json.loads(config_json)
    name = str(config.get("_name_or_path") or config.get("model_type") or "model")
    arch = arch_for(config)
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in need if not isinstance(config.get(k), int) or config[k] <= 0]
    if missing:
        raise UnsupportedModel(f"config of {name} lacks a positive integer {', '.join(missing)}; is it a config.json?")
    hf = hf_config(config)
    linears = tuple(Linear(s.name, s.in_features, s.out_features, s.bias) for s in linear_shapes(hf, arch))
    with torch.device("meta"):
        layer = arch.layer_cls(hf, layer_idx=0)
    block_params = sum(p.numel() for p in layer.parameters())
    H, nh = int(hf.hidden_size), int(hf.num_attention_heads)
    nkv = int(getattr(hf, "num_key_value_heads", None) or nh)
    d = int(getattr(hf, "head_dim", None) or H // nh)
    return ModelShape(name, str(config.get("model_type")), H, int(hf.intermediate_size), int(hf.num_hidden_layers),
                      nh, nkv, d, int(hf.vocab_size), bool(getattr(hf, "tie_word_embeddings", False)), linears,
                      block_params, arch.bf16_activations)


def _configs_dir():
    return resources.files(__package__) / "model_configs"


def list_known_models() -> list[str]:
    """Names of the config.json files shipped with frugal-qat (``plan`` works offline for these)."""
    return sorted(p.name[: -len(".json")] for p in _configs_dir().iterdir() if p.name.endswith(".json"))


def load_model_config(name_or_path: str | Path) -> dict[str, Any]:
    """A config.json dict from a shipped model name (``llama-2-70b``), a config.json path or a model directory.

    ``_name_or_path`` is set to the name or path given when the file lacks it, so plans are titled.
    """
    key = str(name_or_path)
    known = list_known_models()
    if key.lower() in known:
        text, label = (_configs_dir() / f"{key.lower()}.json").read_text(), key.lower()
    else:
        path = Path(key)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            near = difflib.get_close_matches(key.lower(), known, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise ConfigError(
                f"no model config at {key!r}; {hint}pass a model directory, a config.json or one of: {', '.join(known)}"
            )
        text, label = path.read_text(), str(path.parent if path.name == "config.json" else path)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{label} is not valid JSON ({e}); pass a Hugging Face config.json") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{label} must hold a JSON object (a Hugging Face config.json)")
    config.setdefault("_name_or_path", label)
    return config


# ---- settings and results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanSettings:
    """Everything a plan depends on besides the model. Sizes are bytes (a string such as "80GiB" is parsed).

    Defaults: the paper's recipe (Block-AP 4096 x 2048 windows, batch 2, 2 epochs; E2E-QP 4096 x 4096, batch 4 x
    accumulation 8, 1 epoch) on an A100-80GB (``gpu``) with an NVMe disk (2 GB/s). ``gpu_mem="auto"``: the GPU's
    memory; None: unchecked. ``gpu_tflops`` overrides the GPU's peak 16-bit FLOP/s (its other peaks scale with
    it), ``gpu_util`` the achieved fraction of every matmul peak. ``precision_policy`` and ``stream_dtype`` are
    the run's ``offload.precision`` / ``offload.stream_dtype`` (``precision.resolve``); ``deterministic`` its
    ``offload.deterministic`` (attention on SDPA's math backend, ``precision.deterministic``). ``cpu_tflops`` is the
    effective fp32 throughput measured on our 2-core CPUs (a 50.6 M-parameter layer, forward+backward on 1024
    tokens in 2.0 s). ``cuda_reserve``: CUDA context, cuBLAS workspace and allocator slack, which
    ``torch.cuda.max_memory_allocated`` does not see. ``host_baseline``: the RSS of a run that is not its tensors
    (Python, torch, transformers' model code, tokenizer, allocator arenas): 0.72-0.80 GiB measured in Block-AP and
    E2E-QP runs on CPU (docs/MEMORY.md).
    """

    wbits: int
    group_size: int
    seqlen: int = 2048
    batch_size: int = 2  # Block-AP micro-batch (block_ap.batch_size / grad_accum)
    block_ap_grad_accum: int = 1
    train_size: int = 4096
    val_size: int = 64
    epochs: int = 2
    e2e_seqlen: int = 4096
    e2e_batch_size: int = 4
    e2e_train_size: int = 4096
    e2e_epochs: int = 1
    grad_accum: int = 8
    logits_chunk: int = 1024
    e2e_ckpt_every: int = 16
    eval_samples: int = 256
    eval_batch_size: int = 4
    device: str = "cuda"
    precision_policy: str = "auto"
    stream_dtype: str = "auto"
    deterministic: bool = False
    gpu: str = "a100-80gb"
    gpu_mem: int | str | None = "auto"
    cpu_mem: int | str | None = None
    disk_free: int | str | None = None
    chunk_mb: float = 64
    host_baseline: int | str = 800 * MiB
    cuda_reserve: int | str = 1 * GiB
    gpu_tflops: float | None = None
    gpu_util: float | None = None
    cpu_tflops: float = 0.15
    disk_gbps: float = 2.0

    def __post_init__(self):
        problems = []
        if self.gpu not in GPUS:
            problems.append(f"gpu={self.gpu!r}; choose one of {', '.join(GPUS)}")
        elif self.gpu_mem == "auto":
            object.__setattr__(self, "gpu_mem", GPUS[self.gpu].memory)
        for f in ("gpu_mem", "cpu_mem", "disk_free", "host_baseline", "cuda_reserve"):
            v = getattr(self, f)
            if isinstance(v, str):
                try:
                    object.__setattr__(self, f, parse_bytes(v))
                except ValueError as e:
                    problems.append(f"{f}: {e}")
        if self.wbits not in (2, 3, 4, 8):
            problems.append(f"wbits={self.wbits}; choose 2, 3, 4 or 8")
        if self.group_size != -1 and self.group_size <= 0:
            problems.append(f"group_size={self.group_size}; choose a positive divisor of the layer widths or -1")
        positive = ("seqlen", "batch_size", "block_ap_grad_accum", "train_size", "e2e_seqlen", "e2e_batch_size",
                    "e2e_train_size", "grad_accum", "logits_chunk", "e2e_ckpt_every", "eval_samples",
                    "eval_batch_size")
        problems += [f"{f}={getattr(self, f)}; it must be a positive integer"
                     for f in positive if getattr(self, f) <= 0]
        problems += [f"{f}={getattr(self, f)}; it must be >= 0" for f in ("val_size", "epochs", "e2e_epochs")
                     if getattr(self, f) < 0]
        if self.device not in ("cuda", "cpu"):
            problems.append(f"device={self.device!r}; choose cuda or cpu")
        if self.precision_policy not in ("auto", "cpu", "cuda"):
            problems.append(f"precision_policy={self.precision_policy!r}; choose auto, cpu or cuda")
        if self.stream_dtype not in ("auto", "float16", "bfloat16"):
            problems.append(f"stream_dtype={self.stream_dtype!r}; choose auto, float16 or bfloat16")
        for f in ("chunk_mb", "cpu_tflops", "disk_gbps"):
            if not getattr(self, f) > 0:
                problems.append(f"{f}={getattr(self, f)}; it must be positive")
        if self.gpu_tflops is not None and not self.gpu_tflops > 0:
            problems.append(f"gpu_tflops={self.gpu_tflops}; it must be positive")
        if self.gpu_util is not None and not 0 < self.gpu_util <= 1:
            problems.append(f"gpu_util={self.gpu_util}; give a fraction in (0, 1], e.g. 0.8")
        for f in ("gpu_mem", "cpu_mem", "disk_free"):
            v = getattr(self, f)
            if isinstance(v, int) and v <= 0:
                problems.append(f"{f}={v}; give a positive size such as 80GiB, or leave it unset")
        if problems:
            raise ConfigError("invalid plan settings: " + "; ".join(problems))

    def precision(self, bf16_activations: bool = False, run_device: str | None = None):
        """The run's :class:`frugal_qat.precision.Precision`: the policy of ``device`` (or the forced
        ``precision_policy``), computed on ``run_device`` (default ``device``; the simulation runs the CUDA policy
        on the CPU)."""
        from frugal_qat.precision import resolve

        policy = self.device if self.precision_policy == "auto" else self.precision_policy
        return resolve(run_device or self.device, policy, self.stream_dtype, needs_bf16_streams=bf16_activations)

    @property
    def gpu_spec(self) -> GPU:
        return GPUS[self.gpu]

    def matmul_flops_per_second(self, dtype: str) -> float:
        """Achieved FLOP/s of a matmul in ``dtype`` ("bfloat16"/"float16" on tensor cores, "float32")."""
        if self.device == "cpu":
            return self.cpu_tflops * 1e12
        g = self.gpu_spec
        kind = "bfloat16" if dtype in ("bfloat16", "float16") else dtype
        scale = 1.0 if self.gpu_tflops is None else self.gpu_tflops / g.tflops["bfloat16"]
        util = g.achieved[kind] if self.gpu_util is None else self.gpu_util
        return g.tflops[kind] * scale * 1e12 * util

    @property
    def elementwise_bytes_per_second(self) -> float | None:
        """Achieved device-memory bandwidth of streaming kernels; None on CPU (not priced: see PhasePlan)."""
        if self.device == "cpu":
            return None
        g = self.gpu_spec
        return g.hbm_gbps * 1e9 * g.achieved["elementwise"]


@dataclass
class Term:
    name: str
    bytes: int
    note: str
    stages: tuple[str, ...] = ()  # () = held throughout the phase; otherwise only during these stages


def _peak(terms: list[Term]) -> int:
    base = sum(t.bytes for t in terms if not t.stages)
    stages = {s for t in terms for s in t.stages}
    return base + max((sum(t.bytes for t in terms if s in t.stages) for s in stages), default=0)


@dataclass
class StageTime:
    """One stage of a phase: its compute, its disk I/O, and whether the code overlaps them (a read-ahead or
    writer thread: the stage takes the longer of the two) or not (the sum). ``repeat``: how many times the stage
    runs per block (Block-AP's validation runs once before training and after each epoch). ``flops`` by dtype
    and ``elementwise_bytes`` are what the compute seconds were priced from."""

    name: str
    compute_seconds: float
    io_seconds: float
    io_bytes: float
    overlapped: bool
    repeat: int = 1
    flops: dict[str, float] = field(default_factory=dict)
    elementwise_bytes: float = 0.0

    @property
    def seconds(self) -> float:
        one = max(self.compute_seconds, self.io_seconds) if self.overlapped else self.compute_seconds + self.io_seconds
        return self.repeat * one

    @property
    def bound(self) -> str:
        return "disk" if self.io_seconds > self.compute_seconds else "compute"

    @property
    def io_bound_below_gbps(self) -> float | None:
        """Disk GB/s below which this stage waits on the disk (overlapped stages only)."""
        if not self.overlapped or self.io_bytes == 0:
            return None
        return self.io_bytes / self.compute_seconds / 1e9 if self.compute_seconds > 0 else math.inf


@dataclass
class PhasePlan:
    phase: str
    device_terms: list[Term]
    host_terms: list[Term]
    disk_terms: list[Term]
    time_stages: list[StageTime]
    compute_dtype: str
    device: str = "cuda"
    blocks: int = 1  # how many times the per-block figures repeat (n layers for the streamed phases)
    once_stages: list[StageTime] = field(default_factory=list)  # stages that run once per phase, not per block
    problems: list[str] = field(default_factory=list)

    @property
    def device_peak(self) -> int:
        return _peak(self.device_terms)

    @property
    def host_peak(self) -> int:
        return _peak(self.host_terms)

    @property
    def ram_peak(self) -> int:
        """Host RAM at the peak: on CPU the "device" is RAM too, so both lists add up (stage by stage)."""
        return _peak(self.device_terms + self.host_terms) if self.device == "cpu" else self.host_peak

    @property
    def disk_total(self) -> int:
        return sum(t.bytes for t in self.disk_terms)

    @property
    def largest(self) -> Term:
        """The largest device term: the first thing to shrink when the phase does not fit."""
        return max(self.device_terms, key=lambda t: t.bytes)

    @property
    def block_seconds(self) -> float:
        return sum(s.seconds for s in self.time_stages)

    @property
    def seconds(self) -> float:
        return self.blocks * self.block_seconds + sum(s.seconds for s in self.once_stages)

    @property
    def compute_seconds(self) -> float:
        stages = [(s, self.blocks) for s in self.time_stages] + [(s, 1) for s in self.once_stages]
        return sum(n * s.repeat * s.compute_seconds for s, n in stages)

    @property
    def io_seconds(self) -> float:
        stages = [(s, self.blocks) for s in self.time_stages] + [(s, 1) for s in self.once_stages]
        return sum(n * s.repeat * s.io_seconds for s, n in stages)

    @property
    def io_bytes(self) -> float:
        stages = [(s, self.blocks) for s in self.time_stages] + [(s, 1) for s in self.once_stages]
        return sum(n * s.repeat * s.io_bytes for s, n in stages)

    @property
    def io_bytes_per_block(self) -> float:
        return sum(s.repeat * s.io_bytes for s in self.time_stages)

    @property
    def io_exceeds_compute_below_gbps(self) -> float | None:
        """Disk GB/s below which a block's disk time exceeds its compute time, however well overlapped: the
        block's (or the phase's) bytes over its compute seconds."""
        stages = self.time_stages or self.once_stages
        compute = sum(st.repeat * st.compute_seconds for st in stages)
        moved = sum(st.repeat * st.io_bytes for st in stages)
        return moved / compute / 1e9 if compute > 0 and moved else None

    @property
    def io_bound_below_gbps(self) -> float | None:
        """Disk GB/s below which a block (or the phase) waits on the disk in at least one overlapped stage."""
        values = [v for s in self.time_stages + self.once_stages if (v := s.io_bound_below_gbps) is not None]
        return max(values) if values else None


@dataclass
class Plan:
    model: str
    settings: PlanSettings
    phases: list[PhasePlan]
    verdict: str
    fixes: list[str]
    shape: ModelShape
    reference_terms: list[Term]  # what the reference implementation keeps in host RAM for the same Block-AP
    precision: dict[str, str] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return not any(p.problems for p in self.phases)

    def phase(self, name: str) -> PhasePlan:
        for p in self.phases:
            if p.phase == name:
                return p
        raise KeyError(f"phase {name!r} was not planned; planned: {', '.join(p.phase for p in self.phases)}")


def _term(name: str, nbytes: float, note: str, *stages: str) -> Term:
    return Term(name, int(math.ceil(nbytes)), note, tuple(stages))


# ---- activation formulas ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationProfile:
    """How many tensors of each width autograd keeps per token in one decoder layer, and at which dtype.

    ``norm_h``: hidden-sized fp32 tensors kept by the two RMSNorms (their fp32 inputs and normalised outputs);
    ``cast_h``: hidden-sized ``compute_bytes`` copies of norm outputs (under autocast each linear casts its fp32
    input anew: q, k, v, gate, up, and the o_proj input); ``attn_h``: nh*d-sized tensors around attention (the
    rotated q and the attention output). k and v (nkv*d each) and the four intermediate-sized MLP tensors (gate
    out, act out, up out, down in) are always kept at ``compute_bytes``. ``residual_bytes``: the residual stream's
    dtype (what a block takes in and gives out). ``rstd``: per-token fp32 norm statistics kept, one per norm
    whose input requires grad (Block-AP's block input does not).
    """

    compute_bytes: int
    norm_bytes: int
    residual_bytes: int
    norm_h: int
    cast_h: int
    attn_h: int
    rstd: int = 2  # fp32 per-token statistics kept by the norms whose input requires grad


# Counted with saved_tensors_hooks on transformers 5.23 / torch 2.13 for the code as it is (tests/planner), keyed by
# (phase, precision policy). Block-AP: fp32 masters and an fp32 residual, trained norms; E2E-QP: the model in the
# policy's e2e dtype, frozen norms, block inputs that require grad (every block but the first).
PROFILES = {
    ("block_ap", "cpu"): ActivationProfile(4, 4, 4, norm_h=5, cast_h=0, attn_h=2, rstd=1),
    ("block_ap", "cuda"): ActivationProfile(2, 4, 4, norm_h=3, cast_h=5, attn_h=2, rstd=1),
    ("e2e_qp", "cpu"): ActivationProfile(4, 4, 4, norm_h=3, cast_h=0, attn_h=2),
    ("e2e_qp", "cuda"): ActivationProfile(2, 4, 2, norm_h=2, cast_h=2, attn_h=2),
}


def saved_bytes_per_token(shape: ModelShape, p: ActivationProfile) -> int:
    """Bytes autograd keeps per token for one decoder layer's backward (block input excluded)::

        norm_bytes*norm_h*H + c*(cast_h*H + attn_h*nh*d + 2*nkv*d + 4*I) + 4*nh (logsumexp) + 4*rstd
    """
    H, I, nh, nkv, d = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim
    c = p.compute_bytes
    return (p.norm_bytes * p.norm_h * H + c * (p.cast_h * H + p.attn_h * nh * d + 2 * nkv * d + 4 * I) + 4 * nh
            + 4 * p.rstd)


def forward_bytes_per_token(shape: ModelShape, compute_bytes: int, residual_bytes: int) -> int:
    """Peak transient bytes per token of one layer's forward without grad (gate, up, act; output and residual)::

        c*3*I + residual_bytes*2*H
    """
    return compute_bytes * 3 * shape.intermediate + residual_bytes * 2 * shape.hidden


def _attention_flops(shape: ModelShape, L: int) -> float:
    """Forward FLOPs of causal attention for one sequence in one layer: QK^T and AV, 2*L*L*nh*d each, halved
    because flash attention skips the blocks above the diagonal."""
    return 2 * L * L * shape.heads * shape.head_dim


def _flops(s: PlanSettings, shape: ModelShape, dtype: str, linear: float, sequences: float, L: int,
           passes: float) -> dict[str, float]:
    """FLOPs by dtype: ``linear`` in the policy's ``dtype``, plus ``passes`` forward-equivalents of attention for
    ``sequences`` sequences. ``--deterministic`` runs SDPA's math backend: the whole L x L square (no causal
    skipping, 4*L*L*nh*d forward), computed in fp32 (it upcasts 16-bit inputs), so on the CUDA cores."""
    out = {dtype: linear}
    if s.deterministic:
        out["float32"] = out.get("float32", 0.0) + passes * sequences * 2 * _attention_flops(shape, L)
    else:
        out[dtype] += passes * sequences * _attention_flops(shape, L)
    return out


def packed_linear_bytes(lin: Linear, wbits: int, group_size: int) -> dict[str, int]:
    """GPTQ-layout tensors of one packed linear (notes §4): qweight int32 [in*b/32, out], qzeros int32
    [in/g, out*b/32], scales fp16 [in/g, out], g_idx int32 [in], bias fp16."""
    rows = 1 if group_size == -1 else lin.in_features // group_size
    return {
        "qweight": math.ceil(lin.in_features * wbits / 32) * lin.out_features * 4,
        "qzeros": rows * math.ceil(lin.out_features * wbits / 32) * 4,
        "scales": rows * lin.out_features * 2,
        "g_idx": lin.in_features * 4,
        "bias": lin.out_features * 2 if lin.bias else 0,
    }


def packed_model_bytes(shape: ModelShape, wbits: int, group_size: int) -> int:
    """The quantized model on disk: packed blocks, fp16 norms, 16-bit embeddings / lm_head / final norm."""
    block = sum(sum(packed_linear_bytes(lin, wbits, group_size).values()) for lin in shape.linears)
    norms = shape.other_params - sum(lin.out_features for lin in shape.linears if lin.bias)
    return shape.layers * (block + 2 * norms) + shape.extra_params * 2


def packed_matmul_bytes(wbits: int, compute_bytes: int) -> float:
    """Device-memory traffic per weight of one micro-batch's packed matmuls in E2E-QP, beyond the GEMMs' own
    operands (memory-bound; the dequantize-then-GEMM path): three dequantizations (forward, recomputed forward,
    backward for dL/dx), each reading the b-bit code and writing the c-byte weight; the scale gradient's
    reduction reads dL/dW (fp32) and the code again::

        3*(b/8 + c) + 4 + b/8
    """
    return 3 * (wbits / 8 + compute_bytes) + 4 + wbits / 8


def _adam8bit_bytes(numel: int) -> int:
    """Two bitsandbytes 8-bit states: 1 byte each + an fp32 absmax per 256 elements. E2E-QP makes its optimizer
    with ``min_8bit_size=1`` (e2e_qp/run.py), so even tensors under bitsandbytes' default 4096 elements are 8-bit."""
    return 2 * numel + 2 * 4 * math.ceil(numel / BNB_BLOCK)


def _chunk_bytes(shape: ModelShape, seqlen: int, chunk_mb: float, itemsize: int, samples: int) -> int:
    """One stream chunk: chunk_mb MiB rounded down to whole samples, at least one, at most the whole stream
    (offload/activations.py)."""
    per_sample = seqlen * shape.hidden * itemsize
    return min(samples, max(1, int(chunk_mb * MiB) // per_sample)) * per_sample


def _check_groups(shape: ModelShape, group_size: int) -> None:
    for lin in shape.linears:
        if group_size != -1 and lin.in_features % group_size:
            raise ConfigError(
                f"group size {group_size} does not divide in_features {lin.in_features} of layers.*.{lin.name} "
                f"({shape.name}); choose a divisor of {lin.in_features} or -1"
            )


def _cast_cache(compute_bytes: int, largest: int) -> int:
    """Bytes of the 16-bit weight copies a no-grad forward of a block holds under autocast. Autocast caches its cast
    of every leaf tensor that requires grad until the region ends (``c*Pl`` for a fresh block); the runs wrap these
    forwards in ``precision.frozen`` so no weight requires grad, and each cast lives only while its matmul runs
    (``c*Wmax``, the largest). Without autocast (fp32) there is none."""
    return compute_bytes * largest if compute_bytes < 4 else 0


def _cast_cache_note(compute_bytes: int, largest: str = "Wmax") -> str:
    if compute_bytes >= 4:
        return "0: no autocast (fp32)"
    return (f"{compute_bytes}*{largest}: one weight's cast at a time (precision.frozen: no weight requires grad, so "
            "autocast caches none)")


def math_attention_bytes(shape: ModelShape, batch: int, seqlen: int, backward: bool) -> int:
    """Attention on SDPA's math backend (``--deterministic``), which computes 16-bit inputs in fp32 and
    materialises ``[b, nh, L, L]`` tensors, and the float causal mask (``4*L*L``).

    Forward (no grad): the scores and the masked scores (8 B per element), and beside them the fp32 q (rotated,
    then scaled), k and v (repeated to all heads) and the normed hidden state: ``20*b*L*nh*d + 4*b*L*H``.
    Backward: the saved probabilities, their grad and the softmax's grad (12 B per element); the q/k/v copies are
    left out there, as the stage's other terms (the whole layer's saved activations) already over-count it.
    """
    squares = (12 if backward else 8) * batch * shape.heads * seqlen * seqlen + 4 * seqlen * seqlen
    if backward:
        return squares
    return squares + 20 * batch * seqlen * shape.heads * shape.head_dim + 4 * batch * seqlen * shape.hidden


def cuda_only_terms(phase: str, shape: ModelShape, s: PlanSettings) -> list[Term]:
    """What a GPU holds that torch's allocator counters (and a simulation on the CPU) do not see: the CUDA context,
    cuBLAS workspace and allocator reserve; flash attention's backward accumulates dL/dq in an fp32 buffer
    allocated inside the kernel (``T*nh*d*4``)."""
    out = [_term("CUDA context + workspace", s.cuda_reserve, "not seen by max_memory_allocated")]
    tokens = {"block_ap": s.batch_size * s.seqlen, "e2e_qp": s.e2e_batch_size * s.e2e_seqlen}.get(phase)
    if tokens is not None and not s.deterministic:  # the math backend has no such buffer
        out.append(_term("flash-attention backward dq accumulator (fp32)", tokens * shape.heads * shape.head_dim * 4,
                         "T*nh*d*4, inside the kernel"))
    return out


# ---- time -------------------------------------------------------------------------------------------------------


def _stage(s: PlanSettings, name: str, *, flops: dict[str, float] | None = None, elementwise: float = 0.0,
           io: float = 0.0, overlapped: bool = True, repeat: int = 1) -> StageTime:
    """A stage's time: matmul FLOPs per dtype at that dtype's achieved rate, elementwise bytes at the achieved
    memory bandwidth (not priced on a CPU: the CPU rate is an effective one), disk bytes at ``disk_gbps``."""
    flops = {k: v for k, v in (flops or {}).items() if v}
    compute = sum(v / s.matmul_flops_per_second(k) for k, v in flops.items())
    bandwidth = s.elementwise_bytes_per_second
    if bandwidth:
        compute += elementwise / bandwidth
    return StageTime(name, compute, io / (s.disk_gbps * 1e9), io, overlapped, repeat, flops,
                     elementwise if bandwidth else 0.0)


def fake_quant_bytes() -> dict[str, int]:
    """Device-memory traffic of ``primitives.fake_quant`` per weight (fp32 W), counted pass by pass::

        forward   W/s, round, +z, clamp, -z, *s: 6 x (read 4 + write 4) = 48; the autocast cast to 16 bits 6
        backward  grad to fp32 6; W/s 8; round 8; +z 8; >= 0 5; <= qmax 5; & 3; clamp_ 8; -z 8;
                  x*inside 9; qz - x 12; *go 12; sum 4; go*inside 9; sum 4; sum 4        = 113
    """
    return {"forward": FAKE_QUANT_FORWARD_BYTES, "backward": FAKE_QUANT_BACKWARD_BYTES}


# ---- the phases -------------------------------------------------------------------------------------------------


def plan_block_ap(shape: ModelShape, s: PlanSettings) -> PhasePlan:
    """Block-AP, one block at a time (block_ap/run.py): the peak of any block, the time of all of them."""
    prec = s.precision(shape.bf16_activations)
    P, Pl, G, H = shape.block_params, shape.block_linear_params, shape.block_groups(s.group_size), shape.hidden
    Wmax, cuda = shape.largest_linear.numel, s.device == "cuda"
    ct, cn, sb = prec.train_bytes, prec.nograd_bytes, prec.stream_bytes
    mb, ga, L = s.batch_size, s.block_ap_grad_accum, s.seqlen
    T, n_all = mb * L, s.train_size + s.val_size
    prof = PROFILES[("block_ap", prec.name)]
    stream = n_all * L * H * sb
    chunk = _chunk_bytes(shape, L, s.chunk_mb, sb, n_all)
    ckpt = 12 * P + 24 * G
    train = s.epochs > 0
    update, wrap, fwdbwd, opt, val = "stream update", "wrap", "forward+backward", "optimizer step", "validation"
    pairs = (BATCHES_AHEAD + 1) * ga * 2 * T * H * 4
    # --deterministic: attention on SDPA's math backend peaks in stages of its own, after the MLP (forward) or
    # once the MLP's backward is done (its activations freed, its weights' fp32 grads made)
    math_update, math_back, math_val = ((("stream attention",), ("attention backward",), ("validation attention",))
                                        if s.deterministic else ((), (), ()))
    mlp = sum(lin.numel for lin in shape.linears if lin.name.startswith("mlp."))
    up_cast = 4 if ct < 4 else 0  # the fp32 copy of W_hat's incoming 16-bit grad (fake_quant computes in fp32)

    dev = [
        _term("block fp32 master weights", 4 * P, "4*P: linears, norms and biases of one block"),
        _term("scales + zeros", 2 * G * (16 if train else 4),
              "2*G*16: fp32 value, grad and two AdamW moments each" if train else "2*G*4: fp32"),
        _term("stream update micro-batch (fp32 input)", T * 4 * H, "T*4*H", update, *math_update),
        _term("stream update forward transients", T * forward_bytes_per_token(shape, max(cn, prec.teacher_bytes), 4),
              f"T*({max(cn, prec.teacher_bytes)}*3*I + 4*2*H): the layer's forward activations (no grad; the fp "
              "update in the teacher's dtype)", update),
        _term("autocast's cast of one weight (fp update)", _cast_cache(cn, Wmax),
              _cast_cache_note(cn), update),
        _term("nn.Linear weights until wrap_linears returns", 4 * P, "4*P: replaced, freed at the end of the wrap",
              wrap),
    ]
    if train:
        dev += [
            _term("AdamW exp_avg + exp_avg_sq", 8 * P, "8*P, fp32: made by the first step, freed with the block"),
            _term("micro-batches in flight (fp32 input + target)", pairs,
                  f"{BATCHES_AHEAD + 1}*{ga}*2*T*H*4: the step in use and {BATCHES_AHEAD} read ahead onto the device",
                  fwdbwd, opt, val, *math_back, *math_val),
            _term("saved activations of one layer", T * saved_bytes_per_token(shape, prof),
                  f"T*{saved_bytes_per_token(shape, prof)} B/token (see saved_bytes_per_token)", fwdbwd),
            _term("fake-quantized weights kept for backward", ct * Pl, f"{ct}*Pl: each matmul keeps its W_hat", fwdbwd),
            _term("fake-quant backward, largest linear", (12 + up_cast) * Wmax,
                  f"{12 + up_cast}*Wmax: W/s, round, + z (fp32)" + (", the incoming grad made fp32" if up_cast else ""),
                  fwdbwd),
            _term("fp32 grad of the linear before it", (4 - ct) * Wmax,
                  f"(4 - {ct})*Wmax: took the place of its {ct}-byte W_hat", fwdbwd),
            _term("weight grads", 4 * P, "4*P fp32, until the next step's zero_grad", opt, val, *math_val),
            _term("AdamW temporaries", 0 if cuda else 8 * Wmax,
                  "0: fused AdamW updates each tensor in place (make_optimizer(fused=True) on CUDA)" if cuda
                  else "8*Wmax: the single-tensor AdamW's sqrt and its quotient, one parameter at a time", opt),
            _term("fake-quant forward (validation), largest linear", 12 * Wmax
                  + T * forward_bytes_per_token(shape, cn, 4),
                  f"12*Wmax + T*({cn}*3*I + 4*2*H): W/s, round, q - z live at once; the layer's activations", val),
        ]
    dev.append(_term("pack (quantize + check), largest linear", 13 * Wmax, "13*Wmax: codes, fp32 temporaries", "save"))
    if s.deterministic:
        dev.append(_term("autocast's cast of one attention weight", _cast_cache(cn, shape.largest_attention_linear.numel),
                         _cast_cache_note(cn, "Wattn"), "stream attention"))
        dev.append(_term("math attention, no grad (deterministic)", math_attention_bytes(shape, mb, L, False),
                         "8*b*nh*L*L + 4*L*L + 20*b*L*nh*d + 4*b*L*H: fp32 scores, mask, q, k, v, normed input",
                         "stream attention", *math_val))
        if train:
            dev += [
                _term("saved activations of the attention half", T * (saved_bytes_per_token(shape, prof)
                                                                      - prof.compute_bytes * 4 * shape.intermediate),
                      "T*(saved per token - c*4*I): the MLP's are freed by now", *math_back),
                _term("fp32 grads of the MLP linears, attention's W_hat", 4 * mlp + ct * (Pl - mlp),
                      f"4*Pl_mlp + {ct}*Pl_attn", *math_back),
                _term("math attention backward (deterministic)", math_attention_bytes(shape, mb, L, True),
                      "12*b*nh*L*L + 4*L*L: fp32 probabilities, their grads, the mask",
                      *math_back),
            ]
    if cuda:
        dev += cuda_only_terms("block_ap", shape, s)

    host = [
        _term("Python + torch baseline", s.host_baseline, "RSS of a run that is not tensors (measured)"),
        _term("blocks read ahead (fp32)", BLOCKS_AHEAD * 4 * P, f"{BLOCKS_AHEAD}*4*P from the safetensors mmap"),
        _term("stream chunks in flight", (CHUNKS_AHEAD + 1 + 2 + WRITES_AHEAD + 1) * chunk,
              f"{CHUNKS_AHEAD + 1 + 2 + WRITES_AHEAD + 1}*chunk ({chunk / MiB:.0f} MiB): {CHUNKS_AHEAD + 1} read, "
              f"the outputs + their concatenation, {WRITES_AHEAD + 1} with the writer thread", update),
        _term("embedding table (first block only)", shape.vocab * H * 2 + 2 * chunk,
              "V*H*2 + 2*chunk: embeds the windows into both streams", "embed"),
    ]
    if train and cuda:  # on CPU the checkpoint is written straight from the training tensors (no copy)
        host += [
            _term("training checkpoint host copies", ckpt,
                  "12*P + 24*G: the GPU training state copied to RAM for safetensors' save_file", "checkpoint save"),
            _term("micro-batch staging (pinned)", (BATCHES_AHEAD + 1) * ga * 2 * T * H * (sb + 4),
                  "the read-ahead steps' stream rows and their fp32 pinned copies", fwdbwd),
        ]

    disk = [
        _term("fp stream (teacher activations)", stream, f"(N+Nv)*L*H*{sb}, updated in place"),
        _term("quant stream", stream, f"(N+Nv)*L*H*{sb}, updated in place"),
        _term("spare chunk of each stream", 2 * chunk, "2*chunk: an update writes each output one chunk away"),
        _term("block training checkpoint (x2 while replaced)", 2 * ckpt if train else 0,
              "2*(12*P + 24*G): fp32 weights + AdamW + scales/zeros; old and new during the atomic rename"),
        _term("packed output model", packed_model_bytes(shape, s.wbits, s.group_size),
              "b/8 bytes/weight + fp16 scales + b-bit zeros + int32 g_idx; 16-bit embeddings/norms"),
    ]

    # Time of one block. Reads ahead (weights, micro-batches, stream chunks) and the stream writes (a writer
    # thread, each update reading and writing its stream once) overlap compute; checkpoints do not.
    row = L * H * sb
    steps = s.epochs * (s.train_size // (mb * ga))
    nograd = _dtype_name(prec.nograd_autocast)
    teacher = "tf32" if prec.teacher_tf32 else _dtype_name(prec.teacher_autocast)  # the fp stream's dtype
    micro_update = math.ceil(n_all / mb)  # calls of the block in one update: each casts the weights anew
    fq = fake_quant_bytes()
    stages = [
        _stage(s, "fp update", flops=_flops(s, shape, teacher, n_all * 2 * Pl * L, n_all, L, 1),
               elementwise=micro_update * 6 * Pl,
               io=2 * stream + 2 * P),  # + the next block's 16-bit weights, read ahead meanwhile
    ]
    if train:
        val_calls = math.ceil(s.val_size / mb)
        stages += [
            _stage(s, "validation", flops=_flops(s, shape, nograd, s.val_size * 2 * Pl * L, s.val_size, L, 1),
                   elementwise=val_calls * fq["forward"] * Pl, io=2 * s.val_size * row, repeat=s.epochs + 1),
            _stage(s, "training", flops=_flops(s, shape, _dtype_name(prec.train_autocast),
                                               steps * mb * ga * 6 * Pl * L, steps * mb * ga, L, 3),
                   elementwise=steps * (ga * (fq["forward"] + fq["backward"]) * Pl + 12 * (ga - 1) * P
                                        + ADAMW_BYTES * (P + 2 * G)),
                   io=steps * mb * ga * 2 * row),
            _stage(s, "checkpoints", io=s.epochs * ckpt, overlapped=False),
        ]
    stages.append(_stage(s, "quant update", flops=_flops(s, shape, nograd, n_all * 2 * Pl * L, n_all, L, 1),
                         elementwise=micro_update * 6 * Pl, io=2 * stream))
    stages.append(_stage(s, "save", io=packed_model_bytes(shape, s.wbits, s.group_size) / shape.layers,
                         overlapped=False))
    return _phase("block_ap", s, dev, host, disk, stages, _dtype_name(prec.train_autocast if train else
                                                                      prec.nograd_autocast), shape.layers)


def plan_e2e_qp(shape: ModelShape, s: PlanSettings) -> PhasePlan:
    """E2E-QP (e2e_qp/run.py): the model assembled over packed weights in the policy's e2e dtype, activation
    checkpointing per block, the lm_head and loss over chunks of tokens; only the fp32 scales train."""
    prec = s.precision(shape.bf16_activations)
    H, V, n, cuda = shape.hidden, shape.vocab, shape.layers, s.device == "cuda"
    e, c = prec.e2e_bytes, _dtype_bytes(prec.e2e_autocast)
    T, L = s.e2e_batch_size * s.e2e_seqlen, s.e2e_seqlen
    prof = PROFILES[("e2e_qp", prec.name)]
    G = n * shape.block_groups(s.group_size)
    packed = n * sum(sum(v for k, v in packed_linear_bytes(lin, s.wbits, s.group_size).items()
                         if k in ("qweight", "qzeros", "g_idx")) for lin in shape.linears)
    adam = n * sum(_adam8bit_bytes(lin.groups(s.group_size)) for lin in shape.linears)
    frozen = n * shape.other_params + shape.extra_params
    big = shape.largest_linear
    rows = min(s.logits_chunk, s.e2e_batch_size * (L - 1))
    back, loss = "block backward", "loss"
    from frugal_qat.quantizer.packed import packed_matmul_transients  # the kernels' own accounting

    mm = packed_matmul_transients(big.in_features, big.out_features, T, c, s.device)

    dev = [
        _term("packed weights, zeros, g_idx (int32)", packed, "n*sum(in*b/32*out + in/g*out*b/32 + in)*4"),
        _term("scales fp32 master", 4 * G, "4*G over all blocks"),
        _term("scale grads (fp32)", 4 * G, "4*G, accumulated over the micro-batches"),
        _term("8-bit AdamW states", adam, f"2 B/scale + 2*4 B per {BNB_BLOCK} (min_8bit_size=1: every tensor 8-bit)"),
        _term("embeddings, lm_head, norms, biases", e * frozen,
              f"{e}*(V*H*{1 if shape.tied else 2} + H + n*(norms + biases)): frozen, {_dtype_name(prec.e2e_dtype)}"),
        _term("checkpointed block inputs", n * T * H * e,
              f"n*T*H*{e}: the embeddings' output and every block's but the last, kept by activation checkpointing"),
        _term("recomputed block: saved activations", T * saved_bytes_per_token(shape, prof),
              f"T*{saved_bytes_per_token(shape, prof)} B/token (see saved_bytes_per_token)", back),
        _term("MLP backward working set", T * e * H + max(3 * T * c * shape.intermediate,
                                                          T * c * shape.intermediate + mm["backward"]),
              f"T*{e}*H (the grad of the block output) + the larger of T*3*{c}*I (the grads around the activation "
              f"function) and T*{c}*I + the down projection's packed backward transients "
              f"(quantizer.packed.packed_matmul_transients: {mm['backward'] / GiB:.2f} GiB)", back),
        _term("last hidden states, final norm, shifted copy", T * H * (3 * e + 4),
              f"T*H*(3*{e} + 4): the last block's output, the norm's fp32 input and output, hidden[:, :-1]", loss),
        _term("logits chunk, recomputed, and its grads", (2 * c + 12) * rows * V,
              f"(2*{c} + 12)*chunk*V: {c}-byte logits, fp32 copy, log-softmax and their grads", loss),
    ]
    if s.deterministic:  # after the recomputed block's MLP backward: its activations freed
        attn = "attention backward"
        dev += [
            _term("recomputed block: saved activations of the attention half",
                  T * (saved_bytes_per_token(shape, prof) - prof.compute_bytes * 4 * shape.intermediate),
                  "T*(saved per token - c*4*I)", attn),
            _term("grad of the block's attention output", T * e * H, f"T*{e}*H", attn),
            _term("math attention backward (deterministic)", math_attention_bytes(shape, s.e2e_batch_size, L, True),
                  "12*b*nh*L*L + 4*L*L: fp32 probabilities, their grads, the mask", attn),
        ]
    if cuda:
        dev += cuda_only_terms("e2e_qp", shape, s)
    host = [
        _term("Python + torch baseline", s.host_baseline, "RSS of a run that is not tensors (measured)"),
        _term("token batches", 2 * 2 * T * 8, "2 micro-batches of int64 inputs + labels"),
    ]
    state = 4 * G + adam
    disk = [
        _term("output model (packed, trained scales)", packed_model_bytes(shape, s.wbits, s.group_size), "as Block-AP"),
        _term("E2E checkpoint (x2 while replaced)", 2 * state, "2*(4*G + 8-bit AdamW)"),
    ]
    # Time: per token, forward 2*Pl, recomputed forward 2*Pl, dL/dx 2*Pl and dL/dW for the scale gradient 2*Pl
    # per block; the frozen lm_head forward, recompute and dL/dh: 6*V*H. Attention: forward, recompute, backward.
    sequences = s.e2e_epochs * s.e2e_train_size
    tokens = sequences * L
    micro = sequences / s.e2e_batch_size
    steps = sequences // (s.e2e_batch_size * s.grad_accum)
    dtype = _dtype_name(prec.e2e_autocast)
    model_bytes = packed_model_bytes(shape, s.wbits, s.group_size)
    once = [
        _stage(s, "build model", io=model_bytes, overlapped=False),
        _stage(s, "steps", flops=_flops(s, shape, dtype, tokens * (8 * n * shape.block_linear_params + 6 * V * H),
                                        sequences * n, L, 4),
               elementwise=micro * n * shape.block_linear_params * packed_matmul_bytes(s.wbits, c) + steps * 20 * G),
        _stage(s, "checkpoints", io=state * math.ceil(steps / s.e2e_ckpt_every), overlapped=False),
        _stage(s, "write", io=model_bytes, overlapped=False),
    ]
    return _phase("e2e_qp", s, dev, host, disk, [], dtype, 1, once)


def plan_ppl_eval(shape: ModelShape, s: PlanSettings) -> PhasePlan:
    """Perplexity, streamed block by block (eval/ppl.py): hidden states of all windows in an fp32 scratch file,
    blocks under the policy's no-grad context, then the fp32 final norm and lm_head window by window."""
    prec = s.precision(shape.bf16_activations)
    H, V, P, L = shape.hidden, shape.vocab, shape.block_params, s.seqlen
    cn, T = prec.nograd_bytes, s.eval_batch_size * s.seqlen
    stream = s.eval_samples * L * H * 4
    chunk = _chunk_bytes(shape, L, s.chunk_mb, 4, s.eval_samples)
    rows = min(s.logits_chunk, L - 1)
    Wmax = shape.largest_linear.numel
    attention = ("attention",) if s.deterministic else ()  # math SDPA peaks before the MLP
    dev = [
        _term("current block (fp32)", 4 * P, "4*P", "blocks", *attention),
        _term("micro-batch hidden states (fp32 in)", T * H * 4, "T*H*4", "blocks", *attention),
        _term("layer forward transients (no grad)", T * forward_bytes_per_token(shape, cn, 4),
              f"T*({cn}*3*I + 4*2*H): activations", "blocks"),
        _term("autocast's cast of one weight", _cast_cache(cn, Wmax),
              _cast_cache_note(cn), "blocks"),
        _term("lm_head (fp32) + one window", V * H * 4 + 2 * L * H * 4, "V*H*4 + 2*L*H*4", "head"),
        _term("logits chunk + log-softmax (fp32)", 2 * rows * V * 4, "2*chunk*V*4, one window", "head"),
    ]
    if s.deterministic:
        dev.append(_term("autocast's cast of one attention weight", _cast_cache(cn, shape.largest_attention_linear.numel),
                         _cast_cache_note(cn, "Wattn"), "attention"))
        dev.append(_term("math attention, no grad (deterministic)", math_attention_bytes(shape, s.eval_batch_size, L,
                                                                                          False),
                         "8*b*nh*L*L + 4*L*L + 20*b*L*nh*d + 4*b*L*H: fp32 scores, mask, q, k, v, normed input",
                         "attention"))
    if s.device == "cuda":
        dev += cuda_only_terms("ppl_eval", shape, s)
    host = [
        _term("Python + torch baseline", s.host_baseline, "RSS of a run that is not tensors (measured)"),
        _term("blocks read ahead (fp32)", BLOCKS_AHEAD * 4 * P, f"{BLOCKS_AHEAD}*4*P"),
        _term("stream chunks in flight (fp32)", (CHUNKS_AHEAD + 1 + 2 + WRITES_AHEAD + 1) * chunk,
              f"{CHUNKS_AHEAD + 1 + 2 + WRITES_AHEAD + 1}*chunk ({chunk / MiB:.0f} MiB): {CHUNKS_AHEAD + 1} read, "
              f"the outputs + their concatenation, {WRITES_AHEAD + 1} with the writer thread", "blocks"),
        _term("embedding table", shape.vocab * H * 2, "V*H*2 while the windows are embedded", "embed"),
    ]
    disk = [_term("hidden-state scratch stream (fp32)", stream + chunk, "n_eval*L*H*4 + a spare chunk, deleted at "
                  "the end")]
    nograd = _dtype_name(prec.nograd_autocast)
    stages = [_stage(s, "block", flops=_flops(s, shape, nograd, s.eval_samples * 2 * shape.block_linear_params * L,
                                              s.eval_samples, L, 1),
                     elementwise=math.ceil(s.eval_samples / s.eval_batch_size) * 6 * shape.block_linear_params,
                     io=2 * stream + 2 * P)]
    once = [_stage(s, "head (fp32)", flops={"float32": 2 * V * H * s.eval_samples * (L - 1)})]
    return _phase("ppl_eval", s, dev, host, disk, stages, nograd, shape.layers, once)


def _dtype_name(dtype) -> str:
    from frugal_qat.precision import dtype_name

    return dtype_name(dtype)


def _dtype_bytes(dtype) -> int:
    from frugal_qat.precision import dtype_bytes

    return dtype_bytes(dtype)


def _phase(name: str, s: PlanSettings, dev: list[Term], host: list[Term], disk: list[Term],
           stages: list[StageTime], compute_dtype: str, blocks: int, once: list[StageTime] | None = None) -> PhasePlan:
    p = PhasePlan(name, dev, host, disk, stages, compute_dtype, device=s.device, blocks=blocks,
                  once_stages=once or [])
    p.problems = _problems(p, s)
    return p


def _problems(p: PhasePlan, s: PlanSettings) -> list[str]:
    title, out = PHASE_TITLES[p.phase], []
    if s.device == "cuda" and s.gpu_mem is not None and p.device_peak > s.gpu_mem:
        out.append(f"{title}: GPU peak {p.device_peak / GiB:.1f} GiB > {s.gpu_mem / GiB:.1f} GiB "
                   f"(largest: {p.largest.name}, {p.largest.bytes / GiB:.1f} GiB)")
    if s.cpu_mem is not None and p.ram_peak > s.cpu_mem:
        out.append(f"{title}: host RAM peak {p.ram_peak / GiB:.1f} GiB > {s.cpu_mem / GiB:.1f} GiB")
    if s.disk_free is not None and p.disk_total > s.disk_free:
        out.append(f"{title}: disk {p.disk_total / GiB:.1f} GiB > {s.disk_free / GiB:.1f} GiB free")
    return out


_PLANNERS = {"block_ap": plan_block_ap, "e2e_qp": plan_e2e_qp, "ppl_eval": plan_ppl_eval}


def reference_host_terms(shape: ModelShape, s: PlanSettings) -> list[Term]:
    """Host RAM of the reference implementation's Block-AP (notes §2): both streams and the fp16 model in RAM."""
    stream = (s.train_size + s.val_size) * s.seqlen * shape.hidden * 2
    return [
        _term("fp stream in RAM", stream, "(N+Nv)*L*H*2"),
        _term("quant stream in RAM", stream, "(N+Nv)*L*H*2"),
        _term("whole fp16 model in RAM", 2 * shape.total_params, "2 bytes * all parameters"),
    ]


def _plan_phases(config: dict[str, Any], s: PlanSettings,
                 phases: tuple[str, ...]) -> tuple[ModelShape, list[PhasePlan]]:
    unknown = [p for p in phases if p not in _PLANNERS]
    if unknown:
        raise ConfigError(f"unknown phase(s) {unknown}; choose from {', '.join(PHASES)}")
    shape = model_shape(config)
    _check_groups(shape, s.group_size)
    return shape, [_PLANNERS[p](shape, s) for p in phases]


def plan(config: dict[str, Any], settings: PlanSettings, phases: tuple[str, ...] = PHASES) -> Plan:
    """Plan ``phases`` of a run of the model described by ``config`` (a config.json dict) with ``settings``.

    The verdict is "fits" or "does not fit: <every limit exceeded>"; when it does not fit, ``fixes`` lists settings
    that do, each verified by planning again (:func:`suggest_fixes`).
    """
    shape, phase_plans = _plan_phases(config, settings, phases)
    problems = [msg for p in phase_plans for msg in p.problems]
    verdict = "fits" if not problems else "does not fit: " + "; ".join(problems)
    fixes = suggest_fixes(config, settings, phases) if problems else []
    return Plan(shape.name, settings, phase_plans, verdict, fixes, shape, reference_host_terms(shape, settings),
                settings.precision(shape.bf16_activations).to_json())


# ---- fixes ------------------------------------------------------------------------------------------------------


def _divisors_below(n: int) -> list[int]:
    return [k for k in range(n - 1, 0, -1) if n % k == 0]


def _halvings(n: int, floor: int) -> list[int]:
    out = []
    while n // 2 >= floor:
        n //= 2
        out.append(n)
    return out


# (label, keeps results, candidates from mildest to strongest)
_KNOBS = [
    ("Block-AP micro-batch with gradient accumulation, same global batch", True,
     lambda s: [dataclasses.replace(s, batch_size=k, block_ap_grad_accum=s.block_ap_grad_accum * s.batch_size // k)
                for k in _divisors_below(s.batch_size)]),
    ("E2E-QP micro-batch with more accumulation, same global batch", True,
     lambda s: [dataclasses.replace(s, e2e_batch_size=k, grad_accum=s.grad_accum * s.e2e_batch_size // k)
                for k in _divisors_below(s.e2e_batch_size)]),
    ("smaller logits chunks", True,
     lambda s: [dataclasses.replace(s, logits_chunk=k) for k in (256, 64) if k < s.logits_chunk]),
    ("smaller evaluation micro-batch", True,
     lambda s: [dataclasses.replace(s, eval_batch_size=k) for k in _divisors_below(s.eval_batch_size)]),
    ("smaller stream chunks", True,
     lambda s: [dataclasses.replace(s, chunk_mb=k) for k in (16, 4) if k < s.chunk_mb]),
    ("shorter Block-AP windows", False,
     lambda s: [dataclasses.replace(s, seqlen=k) for k in _halvings(s.seqlen, 256)]),
    ("shorter E2E-QP sequences", False,
     lambda s: [dataclasses.replace(s, e2e_seqlen=k) for k in _halvings(s.e2e_seqlen, 512)]),
    ("run on the CPU (fp32, much slower)", False,
     lambda s: [dataclasses.replace(s, device="cpu")] if s.device == "cuda" and s.cpu_mem is not None else []),
    ("fewer calibration windows", False,
     lambda s: [dataclasses.replace(s, train_size=k) for k in _halvings(s.train_size, 128)]),
]


def _describe(old: PlanSettings, new: PlanSettings, label: str, keeps: bool, phase_plans: list[PhasePlan]) -> str:
    changes = ", ".join(f"{f.name} {getattr(old, f.name)} -> {getattr(new, f.name)}"
                        for f in dataclasses.fields(PlanSettings) if getattr(old, f.name) != getattr(new, f.name))
    mem = "GPU" if new.device == "cuda" else "RAM"
    peak = max(p.device_peak if new.device == "cuda" else p.ram_peak for p in phase_plans)
    hours = sum(p.seconds for p in phase_plans) / 3600
    return (f"{changes} ({label}; {'same results' if keeps else 'changes the recipe'}): fits, peak {mem} "
            f"{peak / GiB:.1f} GiB, about {hours:.1f} h over the planned phases")


def _phases_fit(config: dict[str, Any], s: PlanSettings, phases: tuple[str, ...]) -> list[PhasePlan] | None:
    phase_plans = _plan_phases(config, s, phases)[1]
    return None if any(p.problems for p in phase_plans) else phase_plans


def _fix_phase(config: dict[str, Any], s: PlanSettings, phase: str) -> tuple[PlanSettings, list[str], bool] | None:
    """The mildest single knob value that makes ``phase`` fit, else the knobs stacked (strongest each) in order."""
    for label, keeps, candidates in _KNOBS:
        for cand in candidates(s):
            if _phases_fit(config, cand, (phase,)) is not None:
                return cand, [label], keeps
    stacked, labels, keeps_all = s, [], True
    for label, keeps, candidates in _KNOBS:
        options = candidates(stacked)
        if options:
            stacked, keeps_all = options[-1], keeps_all and keeps
            labels.append(label)
            if _phases_fit(config, stacked, (phase,)) is not None:
                return stacked, labels, keeps_all
    return None


def find_fixes(config: dict[str, Any], settings: PlanSettings,
               phases: tuple[str, ...] = PHASES) -> list[tuple[PlanSettings, str]]:
    """Settings under which the run fits, each with its description; every one was planned again and fits.

    First each knob alone (at its mildest sufficient value), then, when no knob alone keeps the results, one
    combination: for each phase that does not fit, its own mildest fix, applied on top of the others'. Empty if
    the run already fits or nothing tried makes it fit.
    """
    if _phases_fit(config, settings, phases) is not None:
        return []
    fixes = []
    for label, keeps, candidates in _KNOBS:
        for cand in candidates(settings):
            ok = _phases_fit(config, cand, phases)
            if ok is not None:
                fixes.append((cand, _describe(settings, cand, label, keeps, ok), keeps))
                break
    if not any(keeps for _, _, keeps in fixes):
        merged, labels, keeps_all = settings, [], True
        for phase in phases:
            if _phases_fit(config, merged, (phase,)) is None:
                found = _fix_phase(config, merged, phase)
                if found is None:
                    break
                merged, keeps_all = found[0], keeps_all and found[2]
                labels += [lab for lab in found[1] if lab not in labels]
        ok = _phases_fit(config, merged, phases)
        if ok is not None and all(merged != f for f, _, _ in fixes):
            fix = (merged, _describe(settings, merged, " + ".join(labels), keeps_all, ok), keeps_all)
            fixes.insert(0 if keeps_all else len(fixes), fix)
    return [(f, text) for f, text, _ in fixes]


def suggest_fixes(config: dict[str, Any], settings: PlanSettings, phases: tuple[str, ...] = PHASES) -> list[str]:
    """The descriptions of :func:`find_fixes`: "batch_size 2 -> 1, ... (why; same results): fits, peak GPU ..."."""
    return [text for _, text in find_fixes(config, settings, phases)]
