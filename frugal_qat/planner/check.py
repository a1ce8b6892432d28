"""Refuse before building: plan a run for this machine and stop with the planner's advice when it cannot fit."""

from __future__ import annotations

import logging
from typing import Any

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
