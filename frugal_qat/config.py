"""Run settings: one typed dataclass per section, a YAML recipe that sets what differs, CLI flags on top.

A recipe is a YAML mapping of sections (``quant``, ``data``, ``block_ap``, ``e2e_qp``, ``offload``) to fields.
:func:`resolve` merges defaults <- recipe <- flags, coerces every value to its field's type, rejects unknown keys
with the nearest valid name, and collects *all* problems into one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from frugal_qat.errors import ConfigError
from frugal_qat.precision import POLICIES, STREAM_DTYPES

SUPPORTED_BITS = (2, 3, 4, 8)


# The GGUF (llama.cpp) types Block-AP trains in (docs/GGUF.md), with their nominal bits: what a run in that grid
# reports as its bit width and what picks the bit-dependent defaults (the paper's learning rates).
GGUF_BITS = {"q4_k": 4, "q3_k": 3, "q2_k": 2, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q8_0": 8}
GGUF_TYPES = tuple(GGUF_BITS)
SAMPLINGS = ("documents", "joined")


@dataclass
class QuantConfig:
    wbits: int = 4
    group_size: int = 128  # -1: one group per output row
    # Train in a GGUF grid (docs/GGUF.md): q4_k | q3_k | q2_k | q4_0 | q4_1 | q5_0 | q8_0. The type then decides the
    # grid: wbits and group_size are not used (each layer is in the type, or its legacy fallback where a row is not
    # a multiple of 256).
    gguf: str | None = None

    def problems(self) -> list[str]:
        out = []
        if self.gguf is not None and self.gguf not in GGUF_TYPES:
            out.append(f"quant.gguf={self.gguf!r} is not a GGUF type we train in; choose one of {list(GGUF_TYPES)}")
        if self.wbits not in SUPPORTED_BITS:
            out.append(f"quant.wbits={self.wbits} is not supported; choose one of {list(SUPPORTED_BITS)}")
        if self.group_size != -1 and self.group_size <= 0:
            out.append(f"quant.group_size={self.group_size}; use a positive divisor of the layer width or -1")
        return out

    @property
    def bits(self) -> int:
        """The bit width the run reports and its bit-dependent defaults use: ``wbits``, or the GGUF type's nominal
        bits (``GGUF_BITS``)."""
        return GGUF_BITS[self.gguf] if self.gguf else self.wbits


@dataclass
class DataConfig:
    calib: str = "redpajama"  # .txt, .jsonl, directory, 'demo', or redpajama | c4 | wikitext2 (online)
    train_size: int = 4096  # calibration windows used for training
    val_size: int = 64  # held-out windows for the per-epoch validation MSE
    seqlen: int = 2048
    seed: int = 2
    # documents: each window at a random offset inside one document at least a window long (the reference's way);
    # joined: windows cut from all documents joined with EOS (crosses document boundaries)
    sampling: str = "documents"

    def problems(self) -> list[str]:
        out = []
        if self.sampling not in SAMPLINGS:
            out.append(f"data.sampling={self.sampling!r}; choose one of {', '.join(SAMPLINGS)}")
        for name in ("train_size", "seqlen"):
            if getattr(self, name) <= 0:
                out.append(f"data.{name}={getattr(self, name)} must be positive")
        if self.val_size < 0:
            out.append(f"data.val_size={self.val_size} must be >= 0")
        return out


@dataclass
class BlockAPConfig:
    epochs: int = 2  # 0 = round-to-nearest baseline (no training)
    batch_size: int = 2  # samples per optimizer step (the paper's batch)
    grad_accum: int = 1  # micro-batches per step: batch_size / grad_accum samples go through the block at once
    weight_lr: float | None = None  # None: 2e-5 for 2-bit, 1e-5 for 3/4/8-bit (the paper's values)
    quant_lr: float = 1e-4
    min_lr_ratio: float = 1 / 20  # cosine from lr down to lr * min_lr_ratio, no warmup (paper)
    # Departure from the reference, which accepts a clipping flag and ignores it: we clip when > 0.
    max_grad_norm: float = 0.0
    ckpt_every_steps: int = 0  # 0: checkpoint only at epoch ends

    def problems(self, data: DataConfig) -> list[str]:
        out = []
        if self.epochs < 0:
            out.append(f"block_ap.epochs={self.epochs} must be >= 0 (0 = RTN)")
        if self.batch_size <= 0:
            out.append(f"block_ap.batch_size={self.batch_size} must be positive")
        elif data.train_size % self.batch_size:
            out.append(
                f"data.train_size={data.train_size} is not divisible by block_ap.batch_size={self.batch_size}; "
                f"use a train size that is a multiple of {self.batch_size}"
            )
        elif self.grad_accum <= 0 or self.batch_size % self.grad_accum:
            out.append(f"block_ap.grad_accum={self.grad_accum} must divide block_ap.batch_size={self.batch_size}")
        if self.quant_lr <= 0 or (self.weight_lr is not None and self.weight_lr < 0):
            out.append("learning rates must be positive")
        if not 0 < self.min_lr_ratio <= 1:
            out.append(f"block_ap.min_lr_ratio={self.min_lr_ratio} must be in (0, 1]")
        if self.ckpt_every_steps < 0:
            out.append("block_ap.ckpt_every_steps must be >= 0")
        return out

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    def resolved_weight_lr(self, wbits: int) -> float:
        if self.weight_lr is not None:
            return self.weight_lr
        return 2e-5 if wbits == 2 else 1e-5


@dataclass
class E2EConfig:
    """E2E-QP (paper §3.3): only the step sizes train, end to end on the language-model loss."""

    data: str = "redpajama"  # text source (as --calib), or an Alpaca-style .json/.jsonl with format: alpaca
    format: str = "pretrain"  # pretrain: text packed into seqlen windows | alpaca: instruction/input/output
    seqlen: int = 4096
    train_size: int = 4096  # sequences
    batch_size: int = 4
    grad_accum: int = 8
    epochs: int = 1
    lr: float | None = None  # None: 2e-5 for 2-bit, 1e-5 otherwise (paper)
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    source_len: int = 384  # alpaca: prompt tokens kept
    target_len: int = 128  # alpaca: response tokens kept
    optimizer: str = "auto"  # auto: paged 8-bit AdamW on CUDA, 8-bit AdamW on CPU | adamw8bit | adamw
    logits_chunk: int = 1024  # tokens per lm_head/loss chunk: the vocab-sized logits never exist for a whole batch
    ckpt_every_steps: int = 16
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.format not in ("pretrain", "alpaca"):
            out.append(f"e2e_qp.format={self.format!r}; choose pretrain or alpaca")
        if self.optimizer not in ("auto", "adamw8bit", "paged_adamw8bit", "adamw"):
            out.append(f"e2e_qp.optimizer={self.optimizer!r}; choose auto, adamw8bit, paged_adamw8bit or adamw")
        for name in ("seqlen", "train_size", "batch_size", "grad_accum", "epochs", "logits_chunk", "ckpt_every_steps"):
            if getattr(self, name) <= 0:
                out.append(f"e2e_qp.{name}={getattr(self, name)} must be positive")
        if self.batch_size > 0 and self.grad_accum > 0 and self.train_size % (self.batch_size * self.grad_accum):
            out.append(f"e2e_qp.train_size={self.train_size} is not a multiple of batch_size x grad_accum "
                       f"= {self.batch_size * self.grad_accum}")
        if not 0 <= self.warmup_ratio < 1:
            out.append("e2e_qp.warmup_ratio must be in [0, 1)")
        return out

    def resolved_lr(self, wbits: int) -> float:
        return self.lr if self.lr is not None else (2e-5 if wbits == 2 else 1e-5)


@dataclass
class OffloadConfig:
    work_dir: str | None = None  # None: <out>/work
    chunk_mb: float = 64  # MiB per read/compute/write chunk of the activation streams
    device: str = "auto"  # auto | cpu | cuda
    io: str = "auto"  # activation-stream backend: auto | aio (DeepSpeed async_io, O_DIRECT) | buffered (docs/IO.md)
    precision: str = "auto"  # dtype policy (frugal_qat/precision.py): auto (the device's) | cpu | cuda (forced)
    stream_dtype: str = "auto"  # activation streams: auto (fp16; bf16 for models that overflow it) | float16 | bfloat16
    deterministic: bool = False  # bit-identical resume on CUDA too: deterministic algorithms, math SDPA (slower)

    def problems(self) -> list[str]:
        out = []
        if self.io not in ("auto", "aio", "buffered"):
            out.append(f"offload.io={self.io!r}; choose auto, aio or buffered")
        if self.chunk_mb <= 0:
            out.append("offload.chunk_mb must be positive")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            out.append(f"offload.device={self.device!r}; choose auto, cpu or cuda")
        if self.precision not in POLICIES:
            out.append(f"offload.precision={self.precision!r}; choose {', '.join(POLICIES)}")
        if self.stream_dtype not in STREAM_DTYPES:
            out.append(f"offload.stream_dtype={self.stream_dtype!r}; choose {', '.join(STREAM_DTYPES)}")
        return out


@dataclass
class RunConfig:
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    block_ap: BlockAPConfig = field(default_factory=BlockAPConfig)
    e2e_qp: E2EConfig = field(default_factory=E2EConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)

    def validate(self) -> RunConfig:
        problems = self.quant.problems() + self.data.problems() + self.block_ap.problems(self.data)
        problems += self.e2e_qp.problems() + self.offload.problems()
        if problems:
            raise ConfigError("invalid settings: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Coerce a YAML/CLI value to a field's annotated type (annotations are strings here: int, float | None...)."""
    ann = str(annotation)
    optional = "None" in ann
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{where} may not be empty")
    base = ann.replace("| None", "").replace("None |", "").strip()
    try:
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base == "float":
            return float(value)
        if base == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r} is not a valid {base}") from None


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(sorted(options))})"


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; see recipes/ for the shipped ones")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections to settings")
    return data


def resolve(recipe: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """defaults <- recipe <- overrides. ``overrides`` keys are ``section.field``; a None value means 'not given'."""
    cfg = RunConfig()
    problems: list[str] = []
    merged: list[tuple[str, str, Any]] = []
    for section, body in (recipe or {}).items():
        if section in ("name", "description"):  # informational
            continue
        if section not in SECTIONS:
            problems.append(f"unknown recipe section {section!r}{_suggest(section, list(SECTIONS))}")
            continue
        if not isinstance(body, dict):
            problems.append(f"recipe section {section!r} must be a mapping")
            continue
        merged += [(section, k, v) for k, v in body.items()]
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, name = key.partition(".")
        merged.append((section, name, value))
    for section, name, value in merged:
        obj = getattr(cfg, section)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if name not in fields:
            problems.append(f"unknown setting {section}.{name}{_suggest(name, list(fields))}")
            continue
        try:
            setattr(obj, name, _coerce(value, fields[name].type, f"{section}.{name}"))
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg.validate()


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig stored in a manifest (exact round trip of :meth:`RunConfig.to_dict`)."""
    return resolve({k: v for k, v in d.items() if k in SECTIONS})
