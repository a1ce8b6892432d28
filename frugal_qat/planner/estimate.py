"""What a run needs, before it starts: bytes per device, host RAM and disk, and time, from config.json alone.

Every figure is a named :class:`Term` with the formula in its note, so a measured peak can be compared term by
term. Symbols (per decoder block unless said otherwise)::

    H hidden, I intermediate, nh / nkv attention / key-value heads, d head_dim, V vocab, n layers
    P   trainable parameters of one block (7 linears + 2 RMSNorms + biases)
    Pl  linear weights of one block (sum of out*in), Wmax = the largest linear's out*in
    G   quantization groups of one block (sum of out*in/g); scale and zero hold G elements each
    b, L micro-batch and sequence length, T = b*L tokens, c = compute bytes (2: bf16 on CUDA, 4: fp32 on CPU)
    N, Nv training and validation windows, S = (N+Nv)*L*H*2 bytes: one fp16 activation stream

The per-token activation formulas were fitted to what torch 2.13 autograd actually keeps for a Hugging Face
Llama decoder layer with SDPA and no mask (flash/efficient kernels: no L x L matrix, also on CPU; GQA without
repeating k/v): see :func:`saved_bytes_per_token`. Counts of read-ahead buffers follow
``frugal_qat.offload.prefetch.prefetch``, which keeps ``depth + 1`` loads in flight beside the item in use.

A phase's peak is the largest, over its stages, of the stage-less terms plus that stage's terms: the stream update,
the training steps and the checkpoint save of Block-AP do not hold their buffers at the same time.
"""

from __future__ import annotations

import dataclasses
import difflib
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
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")  # frugal_qat.arch.ARCHS

# prefetch(depth=k) keeps k+1 loads ahead of the item in use (offload/prefetch.py).
BLOCKS_AHEAD = 1  # block_ap/run.py and eval/ppl.py: prefetch(block_state, depth=1)
BATCHES_AHEAD = 2  # block_ap/run.py: prefetch(micro-batch pairs, depth=2)
CHUNKS_AHEAD = 1  # offload/activations.update_in_place: prefetch(chunk reads, depth=1)
TORCH_TILE_ROWS = 512  # quantizer/packed.py DEFAULT_TILE_ROWS: rows of W the CPU path dequantizes at a time
# bitsandbytes 8-bit AdamW (0.50.2, measured here): uint8 states with one fp32 absmax per 256 elements.
BNB_BLOCK = 256

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


# ---- model shapes from config.json ------------------------------------------------------------------------------


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
    """The dimensions of a decoder-only model that the formulas need (read from config.json)."""

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

    @property
    def block_linear_params(self) -> int:
        return sum(lin.numel for lin in self.linears)

    @property
    def block_params(self) -> int:
        """Linear weights + biases + the two RMSNorm weights of one decoder block."""
        biases = sum(lin.out_features for lin in self.linears if lin.bias)
        return self.block_linear_params + biases + 2 * self.hidden

    @property
    def largest_linear(self) -> Linear:
        return max(self.linears, key=lambda lin: lin.numel)

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
    """Shapes of a Llama / Mistral / Qwen2 model from its config.json dict.

    Biases: Qwen2 has them on q/k/v; Llama-family configs may set ``attention_bias`` (q/k/v/o) and ``mlp_bias``.
    """
    name = str(config.get("_name_or_path") or config.get("model_type") or "model")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"model_type {model_type!r} of {name} is not supported by the planner; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in need if not isinstance(config.get(k), int) or config[k] <= 0]
    if missing:
        raise UnsupportedModel(f"config of {name} lacks a positive integer {', '.join(missing)}; is it a config.json?")
    H, I, nh = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    nkv = config.get("num_key_value_heads") or nh
    d = config.get("head_dim") or H // nh
    attn_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
    o_bias = bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))
    linears = (
        Linear("self_attn.q_proj", H, nh * d, attn_bias),
        Linear("self_attn.k_proj", H, nkv * d, attn_bias),
        Linear("self_attn.v_proj", H, nkv * d, attn_bias),
        Linear("self_attn.o_proj", nh * d, H, o_bias),
        Linear("mlp.gate_proj", H, I, mlp_bias),
        Linear("mlp.up_proj", H, I, mlp_bias),
        Linear("mlp.down_proj", I, H, mlp_bias),
    )
    return ModelShape(name, model_type, H, I, config["num_hidden_layers"], nh, nkv, d, config["vocab_size"],
                      bool(config.get("tie_word_embeddings", False)), linears)


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


# ---- settings and results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanSettings:
    """Everything a plan depends on besides the model. Sizes are bytes (a string such as "80GiB" is parsed).

    Defaults: the paper's recipe (Block-AP 4096 x 2048 windows, batch 2, 2 epochs; E2E-QP 4096 x 4096, batch 4 x
    accumulation 8, 1 epoch) on an A100-80GB (312 TFLOP/s bf16 at 40 % utilisation) with an NVMe disk (2 GB/s).
    ``cpu_tflops`` is the effective fp32 throughput measured on our 2-core CPUs (a 50.6 M-parameter layer,
    forward+backward on 1024 tokens in 2.0 s). ``cuda_reserve``: CUDA context, cuBLAS workspace and allocator
    slack, which ``torch.cuda.max_memory_allocated`` does not see. ``host_baseline``: the RSS of a run that is not
    its tensors (Python, torch, transformers' model code, tokenizer, allocator arenas): 0.72-0.80 GiB measured in
    Block-AP and E2E-QP runs on CPU (docs/MEMORY.md).
    """

    wbits: int
    group_size: int
    seqlen: int = 2048
    batch_size: int = 2
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
    dequant_tile: int = 128
    eval_samples: int = 256
    eval_batch_size: int = 4
    device: str = "cuda"
    gpu_mem: int | None = 80 * GiB
    cpu_mem: int | None = None
    disk_free: int | None = None
    chunk_mb: float = 64
    host_baseline: int = 800 * MiB
    cuda_reserve: int = 1 * GiB
    gpu_tflops: float = 312.0
    gpu_util: float = 0.4
    cpu_tflops: float = 0.15
    disk_gbps: float = 2.0

    def __post_init__(self):
        for f in ("gpu_mem", "cpu_mem", "disk_free", "host_baseline", "cuda_reserve"):
            v = getattr(self, f)
            if isinstance(v, str):
                object.__setattr__(self, f, parse_bytes(v))
        problems = []
        if self.wbits not in (2, 3, 4, 8):
            problems.append(f"wbits={self.wbits}; choose 2, 3, 4 or 8")
        if self.group_size != -1 and self.group_size <= 0:
            problems.append(f"group_size={self.group_size}; choose a positive divisor of the layer widths or -1")
        positive = ("seqlen", "batch_size", "block_ap_grad_accum", "train_size", "e2e_seqlen", "e2e_batch_size",
                    "e2e_train_size", "grad_accum", "logits_chunk", "dequant_tile", "eval_samples", "eval_batch_size")
        problems += [f"{f}={getattr(self, f)}; it must be a positive integer"
                     for f in positive if getattr(self, f) <= 0]
        problems += [f"{f}={getattr(self, f)}; it must be >= 0" for f in ("val_size", "epochs", "e2e_epochs")
                     if getattr(self, f) < 0]
        if self.device not in ("cuda", "cpu"):
            problems.append(f"device={self.device!r}; choose cuda or cpu")
        for f in ("chunk_mb", "gpu_tflops", "cpu_tflops", "disk_gbps"):
            if not getattr(self, f) > 0:
                problems.append(f"{f}={getattr(self, f)}; it must be positive")
        if not 0 < self.gpu_util <= 1:
            problems.append(f"gpu_util={self.gpu_util}; give a fraction in (0, 1], e.g. 0.4")
        for f in ("gpu_mem", "cpu_mem", "disk_free"):
            v = getattr(self, f)
            if v is not None and v <= 0:
                problems.append(f"{f}={v}; give a positive size such as 80GiB, or leave it unset")
        if problems:
            raise ConfigError("invalid plan settings: " + "; ".join(problems))

    @property
    def compute_bytes(self) -> int:
        """bf16 autocast on CUDA, fp32 on CPU (block_ap/train_block.py)."""
        return 2 if self.device == "cuda" else 4

    @property
    def flops_per_second(self) -> float:
        if self.device == "cuda":
            return self.gpu_tflops * 1e12 * self.gpu_util
        return self.cpu_tflops * 1e12


@dataclass
class Term:
    name: str
    bytes: int
    note: str
    stage: str = ""  # "" = held throughout the phase; otherwise only during that stage


def _peak(terms: list[Term]) -> int:
    base = sum(t.bytes for t in terms if not t.stage)
    stages = {t.stage for t in terms if t.stage}
    return base + max((sum(t.bytes for t in terms if t.stage == s) for s in stages), default=0)


@dataclass
class PhasePlan:
    phase: str
    device_terms: list[Term]
    host_terms: list[Term]
    disk_terms: list[Term]
    seconds: float
    io_bytes: int
    device: str = "cuda"
    compute_seconds: float = 0.0
    io_seconds: float = 0.0
    io_bytes_per_block: int = 0
    blocks: int = 1  # how many times the per-block figures repeat (n layers for the streamed phases)
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


@dataclass
class Plan:
    model: str
    settings: PlanSettings
    phases: list[PhasePlan]
    verdict: str
    fixes: list[str]
    shape: ModelShape
    reference_terms: list[Term]  # what the reference implementation keeps in host RAM for the same Block-AP

    @property
    def fits(self) -> bool:
        return not any(p.problems for p in self.phases)

    def phase(self, name: str) -> PhasePlan:
        for p in self.phases:
            if p.phase == name:
                return p
        raise KeyError(f"phase {name!r} was not planned; planned: {', '.join(p.phase for p in self.phases)}")


def _term(name: str, nbytes: float, note: str, stage: str = "") -> Term:
    return Term(name, int(math.ceil(nbytes)), note, stage)


# ---- activation formulas ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationProfile:
    """How many tensors of each width autograd keeps per token in one decoder layer, and at which dtype.

    ``norm_h``: hidden-sized tensors at ``norm_bytes`` kept by the two RMSNorms (their fp32 inputs and normalised
    outputs, and the mid-block residual); ``cast_h``: hidden-sized 16-bit casts of norm outputs (autocast / bf16
    only); ``attn_h``: nh*d-sized tensors around attention (q and the output; under autocast also the o_proj
    input copy). k and v (nkv*d each) and the four intermediate-sized MLP tensors (gate out, act out, up out,
    down in) are always kept at ``compute_bytes``. ``residual_bytes``: the residual stream's dtype.
    """

    compute_bytes: int
    norm_bytes: int
    residual_bytes: int
    norm_h: int
    cast_h: int
    attn_h: int


# Fitted with saved_tensors_hooks on transformers 5.23 / torch 2.13 (CPU fp32 exactly; the CUDA rows from the same
# layer under CPU bf16 autocast, the E2E rows with frozen norms and trainable linears):
PROFILES = {
    ("block_ap", "cpu"): ActivationProfile(4, 4, 4, norm_h=5, cast_h=0, attn_h=2),
    ("block_ap", "cuda"): ActivationProfile(2, 4, 4, norm_h=3, cast_h=4, attn_h=3),  # fp32 residual, bf16 autocast
    ("e2e_qp", "cpu"): ActivationProfile(4, 4, 4, norm_h=3, cast_h=0, attn_h=2),  # block input not counted
    ("e2e_qp", "cuda"): ActivationProfile(2, 4, 2, norm_h=2, cast_h=2, attn_h=2),  # pure bf16 model
}


def saved_bytes_per_token(shape: ModelShape, p: ActivationProfile) -> int:
    """Bytes autograd keeps per token for one decoder layer's backward (block input excluded)::

        norm_bytes*norm_h*H + c*(cast_h*H + attn_h*nh*d + 2*nkv*d + 4*I) + 4*nh (logsumexp) + 8 (two rstd)
    """
    H, I, nh, nkv, d = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim
    c = p.compute_bytes
    return p.norm_bytes * p.norm_h * H + c * (p.cast_h * H + p.attn_h * nh * d + 2 * nkv * d + 4 * I) + 4 * nh + 8


def backward_bytes_per_token(shape: ModelShape, p: ActivationProfile) -> int:
    """Bytes per token alive beside the saved tensors at the backward peak (inside the MLP backward)::

        c*2*I + residual_bytes*3*H     (two intermediate-sized grads; block output, loss diff / grad, input grad)
    """
    return p.compute_bytes * 2 * shape.intermediate + p.residual_bytes * 3 * shape.hidden


def forward_bytes_per_token(shape: ModelShape, compute_bytes: int, residual_bytes: int) -> int:
    """Peak transient bytes per token of one layer's forward without grad (gate, up, act; output and residual)::

        c*3*I + residual_bytes*2*H
    """
    return compute_bytes * 3 * shape.intermediate + residual_bytes * 2 * shape.hidden


def _attention_flops(shape: ModelShape, L: int) -> int:
    """Forward FLOPs of attention for one sequence in one layer: QK^T and AV, 2*L*L*nh*d each (no causal halving)."""
    return 4 * L * L * shape.heads * shape.head_dim


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
    return shape.layers * (block + 2 * shape.hidden * 2) + shape.extra_params * 2


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


# ---- the phases ------------------------------------------------------------------------------------------------


def plan_block_ap(shape: ModelShape, s: PlanSettings) -> PhasePlan:
    """Block-AP, one block at a time (block_ap/run.py): the peak of any block, the time of all of them."""
    P, Pl, G, H = shape.block_params, shape.block_linear_params, shape.block_groups(s.group_size), shape.hidden
    Wmax, c, cuda = shape.largest_linear.numel, s.compute_bytes, s.device == "cuda"
    T, L, n_all = s.batch_size * s.seqlen, s.seqlen, s.train_size + s.val_size
    prof = PROFILES[("block_ap", s.device)]
    stream = n_all * L * H * 2
    chunk = _chunk_bytes(shape, L, s.chunk_mb, 2, n_all)
    ckpt = 12 * P + 24 * G
    train = s.epochs > 0

    dev = [
        _term("block fp32 master weights", 4 * P, "4*P: linears, norms and biases of one block"),
        _term("scales + zeros", 2 * G * (16 if train else 4),
              "2*G*16: fp32 value, grad and two AdamW moments each" if train else "2*G*4: fp32"),
        _term("stream update micro-batch (no grad)", T * (4 * H + forward_bytes_per_token(shape, c, 4)),
              "T*(4*H + c*3*I + 4*2*H): fp32 input and the layer's forward transients", "stream update"),
    ]
    if train:
        dev += [
            # Each linear's saved weight is freed by the backward node that creates its fp32 grad, so the two
            # trade places during backward instead of adding up; the grads are the larger (c <= 4, Pl <= P).
            _term("block weight grads / weights kept for backward", 4 * P,
                  "4*P: fp32 grads (zero_grad sets None), exchanged during backward for the c-byte weight each "
                  "matmul saved (c*Pl <= 4*P; fake_quant itself saves only W, s, z)"),
            _term("AdamW exp_avg + exp_avg_sq", 8 * P, "8*P, fp32"),
            _term("fake-quant backward, largest linear", (13 + (2 if cuda else 0)) * Wmax,
                  f"{13 + (2 if cuda else 0)}*Wmax: fp32 grad of W_hat, recomputed W/s and q - z, the clip mask"
                  + (" + the bf16 grad" if cuda else ""), "training"),
            _term("micro-batches in flight (fp32 input + target)", (BATCHES_AHEAD + 1) * 2 * T * H * 4,
                  f"{BATCHES_AHEAD + 1}*2*T*H*4: the pair in use and {BATCHES_AHEAD} read ahead", "training"),
            _term("saved activations of one layer", T * saved_bytes_per_token(shape, prof),
                  f"T*{saved_bytes_per_token(shape, prof)} B/token (see saved_bytes_per_token)", "training"),
            _term("backward working set", T * backward_bytes_per_token(shape, prof),
                  f"T*{backward_bytes_per_token(shape, prof)} B/token: c*2*I + 4*3*H", "training"),
        ]
    if cuda:
        dev.append(_term("CUDA context + workspace", s.cuda_reserve, "not seen by max_memory_allocated"))

    host = [
        _term("Python + torch baseline", s.host_baseline, "RSS of a run that is not tensors (measured)"),
        _term("blocks read ahead (fp32)", BLOCKS_AHEAD * 4 * P, f"{BLOCKS_AHEAD}*4*P from the safetensors mmap"),
        _term("stream chunks in flight", (CHUNKS_AHEAD + 1 + 2 + 1) * chunk,
              f"6*chunk ({chunk / MiB:.0f} MiB): {CHUNKS_AHEAD + 1} read, outputs + their concatenation, "
              "journal serialisation", "stream update"),
        _term("embedding table (first block only)", shape.vocab * H * 2 + 2 * chunk,
              "V*H*2 + 2*chunk: embeds the windows into both streams", "embed"),
    ]
    if train and cuda:  # on CPU the checkpoint is written straight from the training tensors (no copy)
        host.append(_term("training checkpoint host copies", ckpt,
                          "12*P + 24*G: the GPU training state copied to RAM for safetensors' save_file",
                          "checkpoint save"))
        if cuda:
            host.append(_term("micro-batch staging (fp16, pinned)", 2 * T * H * 2, "2*T*H*2", "training"))

    disk = [
        _term("fp stream (teacher activations)", stream, "(N+Nv)*L*H*2, fp16, updated in place"),
        _term("quant stream", stream, "(N+Nv)*L*H*2, fp16, updated in place"),
        _term("stream journal", chunk, "one chunk"),
        _term("block training checkpoint (x2 while replaced)", 2 * ckpt if train else 0,
              "2*(12*P + 24*G): fp32 weights + AdamW + scales/zeros; old and new during the atomic rename"),
        _term("packed output model", packed_model_bytes(shape, s.wbits, s.group_size),
              "b/8 bytes/weight + fp16 scales + b-bit zeros + int32 g_idx; 16-bit embeddings/norms"),
    ]

    steps = s.epochs * (s.train_size // s.batch_size)
    val_batches = (s.epochs + 1) * math.ceil(s.val_size / s.batch_size)
    att = _attention_flops(shape, L)
    flops = (steps * s.batch_size * (6 * Pl * L + 3 * att)  # train: forward + backward
             + val_batches * s.batch_size * (2 * Pl * L + att)  # validation before training and per epoch
             + 2 * n_all * (2 * Pl * L + att))  # fp stream and quant stream updates
    io = (2 * 3 * stream  # both updates: read, journal, write
          + 2 * L * H * 2 * (steps + val_batches) * s.batch_size  # input + target of every (validation) step
          + P * 2  # the block's 16-bit weights
          + (s.epochs * ckpt if train else 0))  # a checkpoint at every epoch end
    return _phase("block_ap", s, dev, host, disk, flops * shape.layers, io, shape.layers)


def plan_e2e_qp(shape: ModelShape, s: PlanSettings) -> PhasePlan:
    """E2E-QP: packed weights stay packed, only the scales train; gradient checkpointing per block; chunked logits."""
    H, V, n, c, cuda = shape.hidden, shape.vocab, shape.layers, s.compute_bytes, s.device == "cuda"
    T, L = s.e2e_batch_size * s.e2e_seqlen, s.e2e_seqlen
    prof = PROFILES[("e2e_qp", s.device)]
    G = n * shape.block_groups(s.group_size)
    packed = n * sum(sum(v for k, v in packed_linear_bytes(lin, s.wbits, s.group_size).items() if k in
                         ("qweight", "qzeros")) for lin in shape.linears)
    adam = n * sum(_adam8bit_bytes(lin.groups(s.group_size)) for lin in shape.linears)
    frozen = n * (2 * H + sum(lin.out_features for lin in shape.linears if lin.bias)) + shape.extra_params
    big = shape.largest_linear
    chunk_tokens = s.e2e_batch_size * min(s.logits_chunk, L)

    dev = [
        _term("packed weights + zeros (int32)", packed, "n*sum(in*out*b/32 + in/g*out*b/32 words)*4"),
        _term("scales fp32 master", 4 * G, "4*G over all blocks"),
        _term("scale grads (fp32)", 4 * G, "4*G, accumulated over the micro-batches"),
        _term("8-bit AdamW states", adam, f"2 B/scale + 2*4 B per {BNB_BLOCK} (min_8bit_size=1: every tensor 8-bit)"),
        _term("embeddings + lm_head + norms (frozen)", c * frozen, f"{c}*(V*H*{1 if shape.tied else 2} + norms)"),
        _term("checkpointed block inputs", (n + 1) * T * H * c, "(n+1)*T*H*c: one hidden state per block + the last"),
        _term("recompute: saved activations of one block", T * saved_bytes_per_token(shape, prof),
              f"T*{saved_bytes_per_token(shape, prof)} B/token"),
        _term("backward working set", T * backward_bytes_per_token(shape, prof),
              f"T*{backward_bytes_per_token(shape, prof)} B/token"),
        _term("logits chunk + its grad (fp32)", 2 * chunk_tokens * V * 4, "2*b*chunk*V*4"),
    ]
    if cuda:
        dev += [
            _term("scales bf16 compute copy", 2 * G, "2*G"),
            _term("dequantized tile of the largest layer", s.dequant_tile * big.out_features * 2,
                  f"tile*out*2 = {s.dequant_tile}*{big.out_features}*2"),
            _term("CUDA context + workspace", s.cuda_reserve, "not seen by max_memory_allocated"),
        ]
    else:  # the torch path dequantizes TORCH_TILE_ROWS rows at a time, never a whole layer (measured: docs/MEMORY.md)
        tile = TORCH_TILE_ROWS * max(lin.out_features for lin in shape.linears)
        dev += [
            _term("dequantized tile of the widest layer (fp32)", 4 * tile,
                  f"rows*out*4 = {TORCH_TILE_ROWS}*{tile // TORCH_TILE_ROWS}*4, one tile at a time"),
            _term("scale-grad temporaries, one tile", 2 * 4 * tile, "2*rows*out*4: the tile's dL/dW and (q - z)"),
        ]
    host = [
        _term("Python + torch baseline", s.host_baseline, "RSS of a run that is not tensors (measured)"),
        _term("token batches", 2 * 2 * T * 8, "2 micro-batches of int64 inputs + labels"),
    ]
    disk = [
        _term("output model (packed, trained scales)", packed_model_bytes(shape, s.wbits, s.group_size), "as Block-AP"),
        _term("E2E checkpoint (x2 while replaced)", 2 * (4 * G + adam), "2*(4*G + 8-bit AdamW)"),
    ]
    tokens = s.e2e_epochs * s.e2e_train_size * L
    # forward 2, recompute 2, grad of inputs 2, grad of scales (needs dL/dW per group) 2; lm_head frozen: 4*V*H
    flops = (tokens * (8 * n * shape.block_linear_params + 4 * V * H)
             + s.e2e_epochs * s.e2e_train_size * n * 4 * _attention_flops(shape, L))  # forward, recompute, backward
    io = 2 * packed_model_bytes(shape, s.wbits, s.group_size)  # read once, write once
    return _phase("e2e_qp", s, dev, host, disk, flops, io, 1)


def plan_ppl_eval(shape: ModelShape, s: PlanSettings) -> PhasePlan:
    """Perplexity, streamed block by block (eval/ppl.py): hidden states of all windows in an fp32 scratch file."""
    H, V, P, L = shape.hidden, shape.vocab, shape.block_params, s.seqlen
    c, T = s.compute_bytes, s.eval_batch_size * s.seqlen
    stream = s.eval_samples * L * H * 4
    chunk = _chunk_bytes(shape, L, s.chunk_mb, 4, s.eval_samples)
    logit_rows = min(s.logits_chunk, L - 1)
    dev = [
        _term("current block (fp32)", 4 * P, "4*P", "blocks"),
        _term("micro-batch hidden states (fp32 in)", T * H * 4, "T*H*4", "blocks"),
        _term("layer forward transients (no grad)", T * forward_bytes_per_token(shape, c, 4),
              "T*(c*3*I + 4*2*H)", "blocks"),
        _term("lm_head (fp32) + one window", V * H * 4 + 2 * L * H * 4, "V*H*4 + 2*L*H*4", "head"),
        _term("logits chunk + log-softmax (fp32)", 2 * logit_rows * V * 4, "2*chunk*V*4, one window", "head"),
    ]
    if s.device == "cuda":
        dev.append(_term("CUDA context + workspace", s.cuda_reserve, "not seen by max_memory_allocated"))
    host = [
        _term("Python + torch baseline", s.host_baseline, "RSS of a run that is not tensors (measured)"),
        _term("blocks read ahead (fp32)", BLOCKS_AHEAD * 4 * P, f"{BLOCKS_AHEAD}*4*P"),
        _term("stream chunks in flight (fp32)", (CHUNKS_AHEAD + 1 + 2) * chunk,
              f"5*chunk ({chunk / MiB:.0f} MiB): {CHUNKS_AHEAD + 1} read, outputs + concatenation", "blocks"),
        _term("embedding table", shape.vocab * H * 2, "V*H*2 while the windows are embedded", "embed"),
    ]
    disk = [_term("hidden-state scratch stream (fp32)", stream, "n_eval*L*H*4, deleted at the end")]
    tokens = s.eval_samples * L
    flops = (shape.layers * (2 * shape.block_linear_params * tokens + s.eval_samples * _attention_flops(shape, L))
             + 2 * V * H * tokens)
    io_block = 2 * stream + 2 * P
    return _phase("ppl_eval", s, dev, host, disk, flops, io_block, shape.layers)


def _phase(name: str, s: PlanSettings, dev: list[Term], host: list[Term], disk: list[Term], flops: float,
           io_per_block: int, blocks: int) -> PhasePlan:
    compute = flops / s.flops_per_second
    io_seconds = io_per_block * blocks / (s.disk_gbps * 1e9)
    p = PhasePlan(name, dev, host, disk, seconds=compute + io_seconds, io_bytes=io_per_block * blocks,
                  device=s.device, compute_seconds=compute, io_seconds=io_seconds, io_bytes_per_block=io_per_block,
                  blocks=blocks)
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
    return Plan(shape.name, settings, phase_plans, verdict, fixes, shape, reference_host_terms(shape, settings))


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
