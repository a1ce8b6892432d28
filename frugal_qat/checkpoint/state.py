"""What a run directory records: the manifest (settings, fingerprints, progress) and in-block training checkpoints.

The manifest is the single source of truth for progress. Block-AP walks block by block through the stages

    embed (block 0 only) -> fp_update -> train -> q_update -> save -> next block ... -> finalize -> done

and the manifest's ``progress`` names the first stage not finished. A block is *committed* when its packed weights
are durably written and the quant stream holds the next block's inputs; resume starts at the first uncommitted stage.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from frugal_qat import __version__
from frugal_qat.checkpoint.store import atomic_save_tensors, atomic_write_json, kill_point, load_tensors, read_json
from frugal_qat.errors import CorruptCheckpoint, ResumeMismatch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAGES = ("embed", "fp_update", "train", "q_update", "save", "finalize", "done")


@dataclass
class Progress:
    block: int = 0
    stage: str = "embed"

    def __post_init__(self):
        if self.stage not in STAGES:
            raise CorruptCheckpoint(f"manifest progress stage {self.stage!r} is unknown")


@dataclass
class Manifest:
    command: str  # block-ap | e2e-qp
    config: dict[str, Any]  # the resolved RunConfig
    model: dict[str, Any]  # source path + fingerprint
    data: dict[str, Any]  # calibration fingerprint
    progress: Progress = field(default_factory=Progress)
    format_version: int = FORMAT_VERSION
    frugal_qat_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format_version") != FORMAT_VERSION:
            raise ResumeMismatch(
                f"run directory format {d.get('format_version')} (frugal-qat {d.get('frugal_qat_version')}) "
                f"is not this version's format {FORMAT_VERSION}; rerun with --restart or use that frugal-qat version"
            )
        try:
            d = dict(d)
            d["progress"] = Progress(**d.get("progress", {}))
            return cls(**d)
        except TypeError as e:
            raise CorruptCheckpoint(f"manifest is malformed ({e}); rerun with --restart") from None


def save_manifest(run_dir: Path, m: Manifest) -> None:
    kill_point("manifest")
    atomic_write_json(Path(run_dir) / MANIFEST, m.to_json())


def load_manifest(run_dir: Path) -> Manifest:
    return Manifest.from_json(read_json(Path(run_dir) / MANIFEST))


# Settings whose change alters results: a resume with a different value is refused.
RESULT_KEYS = ("quant", "data", "block_ap")


def diff_settings(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_settings(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: run has {a!r}, now {b!r}")
    return out


# ---- in-block training checkpoints ------------------------------------------------------------------------------


def save_train_checkpoint(
    path: Path, state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, step: int,
    metrics: dict[str, Any] | None = None,
) -> None:
    """Named trained tensors, optimizer state, step, RNG and the metrics so far in one safetensors file (no pickle).

    The optimizer's tensors are stored by parameter position, so the optimizer must be rebuilt with the same
    parameter order before :func:`load_train_checkpoint`.
    """
    tensors: dict[str, torch.Tensor] = {f"param.{k}": v.detach() for k, v in state.items()}
    scalars: dict[str, Any] = {}  # non-tensor optimizer state (bitsandbytes keeps its step as an int)
    aliases: dict[str, str] = {}  # bitsandbytes shares its quantization maps between parameters: store them once
    first_key: dict[int, str] = {}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, p in enumerate(params):
        for name, value in optimizer.state.get(p, {}).items():
            key = f"opt.{idx}.{name}"
            if not isinstance(value, torch.Tensor):
                scalars[f"{idx}.{name}"] = value
            elif value.data_ptr() in first_key and value.numel():
                aliases[key] = first_key[value.data_ptr()]
            else:
                first_key[value.data_ptr()] = key
                tensors[key] = value.reshape(-1) if value.dim() == 0 else value
    tensors["rng.cpu"] = torch.get_rng_state()
    meta = {"step": str(step), "metrics": json.dumps(metrics or {}), "opt_scalars": json.dumps(scalars),
            "opt_aliases": json.dumps(aliases)}
    kill_point("train_checkpoint")
    atomic_save_tensors(path, tensors, metadata=meta)


def load_train_checkpoint(
    path: Path, optimizer: torch.optim.Optimizer
) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]]:
    """Restore the optimizer and the RNG in place; returns (steps done, metrics so far, the named tensors)."""
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    step, metrics = int(meta["step"]), json.loads(meta.get("metrics", "{}"))
    scalars = json.loads(meta.get("opt_scalars", "{}"))
    shared: dict[str, torch.Tensor] = {}  # one restored tensor per stored one, so aliases share again
    for alias, key in json.loads(meta.get("opt_aliases", "{}")).items():
        tensors[alias] = tensors[key]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, p in enumerate(params):
        state = {k.split(".", 1)[1]: v for k, v in scalars.items() if k.split(".", 1)[0] == str(idx)}
        for key, v in tensors.items():
            if key.startswith(f"opt.{idx}."):
                name = key[len(f"opt.{idx}.") :]
                if name == "step":
                    state[name] = v.reshape(())
                else:
                    if id(v) not in shared:
                        shared[id(v)] = v.to(p.device)
                    state[name] = shared[id(v)]
        if state:
            optimizer.state[p] = state
    torch.set_rng_state(tensors["rng.cpu"])
    return step, metrics, {k[6:]: v for k, v in tensors.items() if k.startswith("param.")}
