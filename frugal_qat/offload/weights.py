"""Weights side of the offload manager: lazy, memory-mapped reads of a Hugging Face safetensors checkpoint.

:class:`WeightStore` opens every shard with ``safetensors.safe_open`` (a memory map; nothing is read until a tensor
is asked for) and hands out one decoder block, or one named tensor, at a time. The full model is never
materialised. The source directory is opened read-only and never written to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from frugal_qat.arch import block_prefix
from frugal_qat.checkpoint.store import kill_point
from frugal_qat.errors import CorruptCheckpoint

log = logging.getLogger(__name__)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CorruptCheckpoint(f"model directory {model_dir} does not exist; pass a Hugging Face checkpoint directory")
    if not path.is_file():
        raise CorruptCheckpoint(f"{path} is missing; --model must be a Hugging Face checkpoint directory with config.json")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{path} is not valid JSON ({e}); restore it from the original checkpoint") from None
    if not isinstance(cfg, dict):
        raise CorruptCheckpoint(f"{path} must hold a JSON object")
    return cfg


def _read_header(path: Path) -> bytes:
    """The raw safetensors header (8-byte little-endian length + JSON); validates sizes against the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpoint(f"{path} is truncated ({size} bytes); re-download the checkpoint")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CorruptCheckpoint(f"{path} is truncated or corrupt (header of {n} bytes in a {size}-byte file)")
        header = f.read(n)
    try:
        meta = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptCheckpoint(f"{path} has a corrupt header; re-download the checkpoint") from None
    end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CorruptCheckpoint(f"{path} is truncated: tensors need {8 + n + end} bytes, the file has {size}")
    return head + header


class WeightStore:
    """Read-only, lazy view of a checkpoint directory's tensors (one or many safetensors shards)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.config = read_config(self.dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise CorruptCheckpoint(f"{index} is malformed ({e}); restore it from the original checkpoint") from None
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise CorruptCheckpoint(f"no *.safetensors file in {self.dir}; convert the checkpoint to safetensors")
            weight_map = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.weight_map: dict[str, str] = weight_map
        self.headers: dict[str, bytes] = {}
        for name in sorted(set(weight_map.values())):
            path = self.dir / name
            if not path.is_file():
                raise CorruptCheckpoint(f"shard {name} is listed in the index but missing from {self.dir}; re-download it")
            self.headers[name] = _read_header(path)
        self._handles: dict[str, Any] = {}

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.dir / shard), framework="pt", device="cpu")
        return self._handles[shard]

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str, dtype: torch.dtype | None = None, check_finite: bool = True) -> torch.Tensor:
        """One tensor, copied out of the memory map (so the page cache, not our heap, holds the file)."""
        if key not in self.weight_map:
            raise CorruptCheckpoint(f"tensor {key} is not in the checkpoint {self.dir}")
        t = self._handle(self.weight_map[key]).get_tensor(key)
        t = t.to(dtype or t.dtype, copy=True)
        if check_finite and t.is_floating_point() and not torch.isfinite(t).all():
            raise CorruptCheckpoint(f"tensor {key} of {self.dir} contains NaN or Inf; the source checkpoint is damaged")
        return t

    def block_state(self, i: int, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        prefix = block_prefix(i)
        keys = [k for k in self.weight_map if k.startswith(prefix)]
        if not keys:
            raise CorruptCheckpoint(f"block {i} ({prefix}*) is not in the checkpoint {self.dir}")
        out = {}
        for k in keys:
            out[k[len(prefix):]] = self.get(k, dtype)
            kill_point("read_weights")
        # Close the shards' memory maps (reopened for the next block, a header parse): every page a map has read
        # stays in this process's RSS while it is open, which over a run grew RSS by ~7 MB per block (SmolLM2).
        self._handles.clear()
        return out

    def fingerprint(self) -> dict[str, Any]:
        """Names, sizes and header hashes of the shards: cheap, and changes whenever the weights do."""
        files = {}
        for name, header in self.headers.items():
            files[name] = {"size": (self.dir / name).stat().st_size, "header_sha256": hashlib.sha256(header).hexdigest()}
        cfg = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()
        return {"config_sha256": cfg, "files": files}

    def nbytes_of_block(self, i: int) -> int:
        prefix = block_prefix(i)
        total = 0
        for name, header in self.headers.items():
            meta = json.loads(header[8:])
            total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in meta.items() if k.startswith(prefix))
        return total
