"""Data parallelism over N processes: the few collectives Block-AP and E2E-QP share, and E2E-QP's DeepSpeed config.

A run is launched on N processes by the ``deepspeed`` launcher or ``torchrun`` (they set RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); :func:`init_from_env` joins the process group through DeepSpeed's comm layer. Every
rank computes; rank 0 alone writes the run directory, and the others wait for it at barriers. Every helper here
is a no-op in a single process, so the single-process path runs exactly the code it always ran.

The split that keeps a data-parallel run equal to the single-process run with the same global batch: a step's
``A`` micro-batches are dealt out round-robin (rank r takes micro-batches r, r+N, ...), each rank scales its
losses by ``1/A`` as the single process does, and the gradients are summed across ranks. With one micro-batch
per rank and step, ``g_0 + g_1`` is even bit-identical to the single process's accumulation; with more, only the
order of the floating-point additions differs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from frugal_qat.config import RunConfig
from frugal_qat.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

DS_CONFIG_FILE = "deepspeed_config.json"


# ---- the process group --------------------------------------------------------------------------------------------


def launched() -> bool:
    """Started by a launcher on more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_ifname() -> str:
    """The network interface holding 127.0.0.1 (gloo is told to use it for single-machine groups)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == "127.0.0.1" for a in addrs):
            return name
    return "lo"


def init_from_env(required: bool = False, timeout_s: float = 1800) -> tuple[int, int]:
    """Join the process group the launcher described in the environment; returns (rank, world size).

    Not launched: (0, 1) and no group, unless ``required`` (DeepSpeed's engine wants a group even alone), which
    makes a group of one on a free local port. Backend: NCCL on CUDA, gloo on CPU. Idempotent.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if not required:
            return 0, 1
        # DeepSpeed's comm init reads these; a launcher would have set them.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        # gloo otherwise binds the interface the host name resolves to, which a sandbox may not route
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_ifname())
    cuda = torch.cuda.is_available()
    # Named before DeepSpeed's first import, which otherwise guesses the accelerator and logs a warning on CPU.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    import deepspeed

    if cuda:
        torch.cuda.set_device(local_rank())
    # timeout_s: how long a collective (and joining) waits for a missing rank before failing instead of hanging
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    log.info("process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return dist.get_rank(), dist.get_world_size()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU when ``device`` is CUDA and the run is data parallel (one GPU per process)."""
    if device.type == "cuda" and rank_world()[1] > 1:
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return device


def check_launch() -> None:
    """Refuse N launched processes that never joined a group: each would run the whole job into the same run
    directory, writing over the others."""
    if launched() and rank_world()[1] == 1:
        raise ConfigError(f"launched on {os.environ['WORLD_SIZE']} processes but not data parallel; "
                          "pass --deepspeed, or launch a single process")


# ---- collectives (no-ops in a single process) ---------------------------------------------------------------------


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """``t <- sum over ranks of t`` for each tensor, in place (one call per tensor: no flat copy of a block's
    gradients)."""
    if rank_world()[1] > 1:
        for t in tensors:
            dist.all_reduce(t)


def sum_floats(*values: float) -> list[float]:
    """The sums over ranks of a few Python numbers (float64 on the wire)."""
    if rank_world()[1] == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def agreed(flag: Callable[[], bool]) -> Callable[[], bool]:
    """``flag`` made collective: true on every rank as soon as it is true on one, so a Ctrl-C that reaches one
    rank stops all of them at the same step. Every rank must call the result at the same points."""
    if rank_world()[1] == 1:
        return flag

    def call() -> bool:
        t = torch.tensor([float(flag())], device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    return call


def on_rank0(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its exception) to every rank: for the steps that write
    the run directory, which must fail on all ranks alike instead of leaving the others waiting at a barrier."""
    rank, world = rank_world()
    if world == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # re-raised below on every rank, rank 0 included
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def shard_rows(n: int, chunk: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of an n-row stream that ``rank`` updates: a contiguous run of whole ``chunk``-row chunks,
    so every chunk is computed exactly as in a single process (same rows, same micro-batches)."""
    n_chunks = -(-n // chunk)
    first, last = n_chunks * rank // world, n_chunks * (rank + 1) // world
    return min(n, first * chunk), min(n, last * chunk)


# ---- DeepSpeed config for E2E-QP ----------------------------------------------------------------------------------


def default_ds_config(cfg: RunConfig, world: int, device_type: str, offload_optimizer: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of an E2E-QP run from its own settings: the global batch of the single-process run
    (``batch_size x grad_accum`` sequences per step, ``grad_accum / world`` micro-batches per rank), clipping,
    bf16 on CUDA (fp32 on CPU, where bf16 matmuls are slow), and ZeRO stage 2, which partitions the scales'
    fp32 master copy, gradients and 8-bit optimizer state across ranks. frugal-qat keeps its own optimizer
    (bitsandbytes' 8-bit AdamW, hence ``zero_allow_untested_optimizer``) and its warmup-cosine schedule."""
    e = cfg.e2e_qp
    if e.grad_accum % world:
        raise ConfigError(f"e2e_qp.grad_accum={e.grad_accum} is not a multiple of the {world} processes; each "
                          f"process takes grad_accum/world micro-batches per step: use a multiple of {world}")
    zero: dict[str, Any] = {"stage": 2, "contiguous_gradients": True, "overlap_comm": device_type == "cuda",
                            "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    return {
        "train_batch_size": e.batch_size * e.grad_accum,
        "train_micro_batch_size_per_gpu": e.batch_size,
        "gradient_accumulation_steps": e.grad_accum // world,
        "gradient_clipping": e.max_grad_norm,
        "bf16": {"enabled": device_type == "cuda"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # the 8-bit AdamW runs on the offloaded partitions too
        "steps_per_print": 2**31 - 1,  # frugal-qat reports progress itself
    }


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_ds_config(user: str | Path | dict | None, cfg: RunConfig, world: int, device_type: str) -> dict[str, Any]:
    """:func:`default_ds_config`, with a user's JSON file (or dict) merged over it key by key; refuses what would
    make the run differ from the single-process one or that frugal-qat does itself."""
    if isinstance(user, (str, Path)):
        try:
            user = json.loads(Path(user).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"--deepspeed {user}: not a readable JSON file ({e})") from None
    user = user or {}
    offload = user.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    ds = _merge(default_ds_config(cfg, world, device_type, offload), user)
    problems = [f"{k!r}: frugal-qat sets its own 8-bit AdamW and warmup-cosine schedule; remove it"
                for k in ("optimizer", "scheduler") if k in ds]
    e = cfg.e2e_qp
    want = {"train_batch_size": e.batch_size * e.grad_accum, "train_micro_batch_size_per_gpu": e.batch_size,
            "gradient_accumulation_steps": e.grad_accum // world}
    problems += [f"{k}={ds[k]} but the run's batch needs {v} (set --batch-size/--grad-accum instead)"
                 for k, v in want.items() if ds[k] != v]
    stage = ds["zero_optimization"].get("stage", 0)
    if stage not in (0, 1, 2):
        problems.append(f"zero_optimization.stage={stage}; use 0, 1 or 2 (stage 3 partitions the model's own "
                        "parameters, and the trainable scales are small enough to replicate)")
    if ds.get("fp16", {}).get("enabled"):
        problems.append("fp16 is not supported (the scales' gradients need no loss scaling in bf16); use bf16")
    if problems:
        raise ConfigError("DeepSpeed config: " + "; ".join(problems))
    return ds
