"""Refuse before building: plan a run for this machine and stop with the planner's advice when it cannot fit."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import psutil

from frugal_qat.config import GGUF_BITS, RunConfig
from frugal_qat.errors import OutOfSpace
from frugal_qat.planner.estimate import PHASE_TITLES, GiB, Plan, PlanSettings, plan

log = logging.getLogger(__name__)


def require_fit(config: dict[str, Any], settings: PlanSettings, phases: tuple[str, ...]) -> Plan:
    """Plan ``phases`` of the model ``config`` (a config.json dict) under ``settings`` (the machine's limits in
    ``gpu_mem``, ``cpu_mem``, ``disk_free``) and return the plan, logging each phase's peak; a run that does not
    fit is refused before anything is built.

    Raises:
        OutOfSpace: some phase exceeds a limit. One line: what does not fit and by how much (the planner's
            verdict), then up to three settings that fit, each planned again, or what to get instead.
    """
    p = plan(config, settings, phases)
    if not p.fits:
        fixes = "; ".join(p.fixes[:3]) or "free space, use a larger disk (--work-dir), more memory or a smaller run"
        raise OutOfSpace(f"this run does not fit this machine ({p.verdict.removeprefix('does not fit: ')}); "
                         f"it would fit with: {fixes}. See `frugal-qat plan` for the full table")
    for phase in p.phases:
        cuda = phase.device == "cuda"
        log.info("plan: %s peak %s %.2f GiB (%s), disk %.2f GiB, about %.1f h", PHASE_TITLES[phase.phase],
                 "GPU" if cuda else "RAM", (phase.device_peak if cuda else phase.ram_peak) / GiB,
                 phase.compute_dtype, phase.disk_total / GiB, phase.seconds / 3600)
    return p


def planner_grid(wbits: int, group_size: int, gguf: str | None) -> tuple[int, int]:
    """(wbits, group_size) the planner sizes a run with. It does not know the GGUF grids (their terms are in
    docs/GGUF.md): a run in one is planned as the uniform grid of at least its bits with one group per sub-block,
    which holds at least as many trainable and stored values (q4_k -> w4g32, q3_k -> w3g16, q2_k -> w2g16, q5_0 and
    q8_0 -> w8g32)."""
    if not gguf:
        return wbits, group_size
    from frugal_qat.quantizer import kquant

    return min(b for b in (2, 3, 4, 8) if b >= GGUF_BITS[gguf]), kquant.TYPES[gguf].sub


def settings_from_config(cfg: RunConfig, device: str, **overrides: Any) -> PlanSettings:
    """The planner's view of a run's settings: every field of ``cfg`` the formulas read (the run's recipe and
    flags), for a run on ``device`` ("cuda" or "cpu"); ``overrides`` set the rest (machine limits, the GPU model,
    a run directory's own bits and group size for E2E-QP). The one place a RunConfig becomes PlanSettings."""
    q, d, b, e, o = cfg.quant, cfg.data, cfg.block_ap, cfg.e2e_qp, cfg.offload
    wbits, group_size = planner_grid(q.wbits, q.group_size, q.gguf)
    fields = dict(
        wbits=wbits, group_size=group_size, seqlen=d.seqlen, batch_size=b.micro_batch,
        block_ap_grad_accum=b.grad_accum, train_size=d.train_size, val_size=d.val_size, epochs=b.epochs,
        e2e_seqlen=e.seqlen, e2e_batch_size=e.batch_size, e2e_train_size=e.train_size, e2e_epochs=e.epochs,
        grad_accum=e.grad_accum, logits_chunk=e.logits_chunk, e2e_ckpt_every=e.ckpt_every_steps,
        chunk_mb=o.chunk_mb, device=device, precision_policy=o.precision, stream_dtype=o.stream_dtype,
        deterministic=o.deterministic,
    )
    return PlanSettings(**{**fields, **overrides})


def machine_limits(device: Any, disk_dirs: tuple[Path, ...] = ()) -> dict[str, int | None]:
    """This machine's limits for :func:`require_fit`: the GPU's memory (CUDA), the host's RAM, and the free disk
    under the first of ``disk_dirs`` plus what its files already hold (a resumed run has paid for them)."""
    import torch

    device = torch.device(device)
    limits: dict[str, int | None] = {
        "gpu_mem": torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
        "cpu_mem": psutil.virtual_memory().total,
    }
    if disk_dirs:
        first = Path(disk_dirs[0])
        existing = next(p for p in [first, *first.parents] if p.exists())
        present = sum(f.stat().st_size for d in set(disk_dirs) if Path(d).exists()
                      for f in Path(d).rglob("*") if f.is_file())
        limits["disk_free"] = shutil.disk_usage(existing).free + present
    return limits
