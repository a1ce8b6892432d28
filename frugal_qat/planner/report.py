"""A plan as text (one table per phase, GiB, the largest term marked; the time stage by stage) or as JSON, with
the simulated peaks beside the planned ones when ``plan --simulate`` ran."""

from __future__ import annotations

import dataclasses
from typing import Any

from frugal_qat.planner.estimate import PHASE_TITLES, GiB, PhasePlan, Plan, StageTime, Term


def _gib(n: int) -> str:
    return f"{n / GiB:9.2f}"


def _hours(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _decimal(n: float) -> str:
    return f"{n / 1e12:.1f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB"


def _limit(value: int | None) -> str:
    return "unchecked" if value is None else f"{value / GiB:.1f} GiB"


def _section(title: str, terms: list[Term], total_label: str, total: int, limit: int | None) -> list[str]:
    largest = max(terms, key=lambda t: t.bytes) if terms else None
    lines = [f"  {title}"]
    for t in terms:
        mark = "*" if t is largest else " "
        stage = f" [{', '.join(t.stages)}]" if t.stages else ""
        lines.append(f"   {mark} {t.name + stage:<66}{_gib(t.bytes)}   {t.note}")
    verdict = "" if limit is None else ("  ok" if total <= limit else "  TOO BIG")
    bound = "" if limit is None else f" / {limit / GiB:.2f}"
    lines.append(f"     {total_label:<66}{_gib(total)}{bound}{verdict}")
    return lines


def _stage_line(st: StageTime) -> str:
    how = "overlapped" if st.overlapped else "in sequence"
    rep = f" x{st.repeat}" if st.repeat > 1 else ""
    below = st.io_bound_below_gbps
    hint = f"; disk-bound below {below:.2f} GB/s" if below is not None and below != float("inf") else ""
    return (f"    {st.name + rep:<18} {_hours(st.seconds):>10}   compute {_hours(st.compute_seconds):>9}, "
            f"I/O {_hours(st.io_seconds):>9} ({_decimal(st.io_bytes)}, {how}): {st.bound}-bound{hint}")


def _phase_lines(p: PhasePlan, plan: Plan, simulated: dict | None) -> list[str]:
    s = plan.settings
    dev_title = "GPU" if p.device == "cuda" else "compute (host RAM, device=cpu)"
    lines = [f"{PHASE_TITLES[p.phase]}, compute in {p.compute_dtype}"
             + ("  (figures per block; * = largest term)" if p.blocks > 1 else "  (* = largest term)")]
    lines += _section(dev_title, p.device_terms, "peak", p.device_peak, s.gpu_mem if p.device == "cuda" else None)
    if simulated and p.phase in simulated:
        sim = simulated[p.phase]
        lines.append(f"     {'simulated peak (the code on fake tensors, + CUDA-only terms)':<66}{_gib(sim.peak)}"
                     f"   planned / simulated {p.device_peak / sim.peak:.3f}; simulation {sim.seconds:.0f} s")
    ram_label = "peak (with the compute terms above)" if p.device == "cpu" else "peak"
    lines += _section("host RAM", p.host_terms, ram_label, p.ram_peak, s.cpu_mem)
    lines += _section("disk", p.disk_terms, "total", p.disk_total, s.disk_free)
    per = f" = {p.blocks} x {_hours(p.block_seconds)} per block" if p.blocks > 1 else ""
    stages = [(st, p.blocks) for st in p.time_stages] + [(st, 1) for st in p.once_stages]
    waiting = sum(n * st.repeat * st.io_seconds for st, n in stages if not st.overlapped)
    lines.append(f"  time: about {_hours(p.seconds)}{per} (compute {_hours(p.compute_seconds)}; disk I/O "
                 f"{_hours(p.io_seconds)}, {_decimal(p.io_bytes)}, of which {_hours(waiting)} not overlapped)")
    if p.time_stages:
        waits, exceeds = p.io_bound_below_gbps, p.io_exceeds_compute_below_gbps
        if waits is not None and exceeds is not None:
            lines.append(f"   disk: some stage of a block waits on the disk below {waits:.2f} GB/s; a block's disk "
                         f"time exceeds its compute time below {exceeds:.2f} GB/s")
        lines.append("   per block:")
        lines += [_stage_line(st) for st in p.time_stages]
    if p.once_stages:
        lines.append("   once:" if p.time_stages else "   stages:")
        lines += [_stage_line(st) for st in p.once_stages]
    return lines


def reference_line(plan: Plan) -> str:
    """The reference implementation's Block-AP host RAM beside ours, for the same model and data."""
    ref = plan.reference_terms
    total = sum(t.bytes for t in ref)
    ours = ""
    for p in plan.phases:
        if p.phase == "block_ap":
            ours = f"; frugal-qat Block-AP: {p.ram_peak / GiB:.1f} GiB"
    parts = " + ".join(f"{t.bytes / GiB:.1f} GiB {t.name.replace(' in RAM', '')}" for t in ref)
    return (f"reference implementation (OpenGVLab/EfficientQAT) Block-AP host RAM: {parts} = "
            f"{total / GiB:.1f} GiB ({total / 1e9:.0f} GB){ours}")


def format_plan(plan: Plan, simulated: dict | None = None) -> str:
    """A readable table per phase (GiB, the largest term of each section marked with *), the time stage by
    stage, then the verdict. ``simulated``: ``{phase: Simulated}`` from ``planner.simulate``, shown beside."""
    s, shape = plan.settings, plan.shape
    if s.device == "cuda":
        g = s.gpu_spec
        peak = g.tflops["bfloat16"] if s.gpu_tflops is None else s.gpu_tflops
        util = "measured fractions" if s.gpu_util is None else f"{s.gpu_util:.2f} of peak for every matmul"
        machine = f"{s.gpu} ({peak:.0f} TFLOP/s 16-bit, {g.hbm_gbps:.0f} GB/s, {util}), disk {s.disk_gbps} GB/s"
    else:
        machine = f"CPU ({s.cpu_tflops} TFLOP/s effective), disk {s.disk_gbps} GB/s"
    head = [
        f"plan for {plan.model}: w{s.wbits}g{s.group_size}, device {s.device} (GPU {_limit(s.gpu_mem)}, "
        f"RAM {_limit(s.cpu_mem)}, disk {_limit(s.disk_free)})",
        f"time priced for {machine}; precision policy {plan.precision.get('policy', '?')}: "
        + ", ".join(f"{k} {v}" for k, v in plan.precision.items() if k != "policy"),
        f"model: {shape.total_params / 1e9:.2f} B parameters, {shape.layers} blocks of {shape.block_params:,} "
        f"({shape.block_linear_params:,} in linears); hidden {shape.hidden}, intermediate {shape.intermediate}, "
        f"heads {shape.heads}/{shape.kv_heads}, vocab {shape.vocab}",
        f"Block-AP: {s.train_size}+{s.val_size} windows x {s.seqlen}, micro-batch {s.batch_size}"
        + (f" x accumulation {s.block_ap_grad_accum}" if s.block_ap_grad_accum > 1 else "")
        + f", {s.epochs} epochs; E2E-QP: {s.e2e_train_size} x {s.e2e_seqlen}, batch {s.e2e_batch_size} x "
        f"accumulation {s.grad_accum}, {s.e2e_epochs} epoch(s)",
        "",
    ]
    body = []
    for p in plan.phases:
        body += _phase_lines(p, plan, simulated) + [""]
    planned = [p for p in plan.phases if p.phase in ("block_ap", "e2e_qp")]
    tail = []
    if planned:
        tail.append("time, " + " + ".join(PHASE_TITLES[p.phase].split(" (")[0] for p in planned)
                    + f": about {_hours(sum(p.seconds for p in planned))}")
    tail += [reference_line(plan), f"verdict: {plan.verdict}"]
    if plan.fixes:
        tail.append("settings that fit:")
        tail += [f"  - {fix}" for fix in plan.fixes]
    elif not plan.fits:
        tail.append("no setting tried fits; a larger GPU, more RAM or a larger disk is needed")
    return "\n".join(head + body + tail)


def _stage_json(st: StageTime) -> dict[str, Any]:
    return {"name": st.name, "repeat": st.repeat, "seconds": st.seconds, "compute_seconds": st.compute_seconds,
            "io_seconds": st.io_seconds, "io_bytes": st.io_bytes, "overlapped": st.overlapped, "bound": st.bound,
            "io_bound_below_gbps": st.io_bound_below_gbps, "flops": dict(st.flops),
            "elementwise_bytes": st.elementwise_bytes}


def plan_to_json(plan: Plan, simulated: dict | None = None) -> dict[str, Any]:
    """The plan as plain JSON types: settings, precision, model shape, per-phase terms, peaks and time (per block
    where the phase repeats per block), reference, verdict, fixes; ``simulated_peak`` per phase with
    ``simulated`` (``{phase: Simulated}``)."""

    def terms(ts: list[Term]) -> list[dict[str, Any]]:
        return [{**dataclasses.asdict(t), "stages": list(t.stages)} for t in ts]

    def phase(p: PhasePlan) -> dict[str, Any]:
        out = {
            "phase": p.phase,
            "device": p.device,
            "compute_dtype": p.compute_dtype,
            "device_terms": terms(p.device_terms),
            "host_terms": terms(p.host_terms),
            "disk_terms": terms(p.disk_terms),
            "device_peak": p.device_peak,
            "host_peak": p.host_peak,
            "ram_peak": p.ram_peak,
            "disk_total": p.disk_total,
            "largest": p.largest.name,
            "seconds": p.seconds,
            "compute_seconds": p.compute_seconds,
            "io_seconds": p.io_seconds,
            "io_bytes": p.io_bytes,
            "blocks": p.blocks,
            "io_bound_below_gbps": p.io_bound_below_gbps,
            "once": [_stage_json(st) for st in p.once_stages],
            "problems": list(p.problems),
        }
        if p.time_stages:
            out["per_block"] = {
                "seconds": p.block_seconds,
                "compute_seconds": sum(st.repeat * st.compute_seconds for st in p.time_stages),
                "io_seconds": sum(st.repeat * st.io_seconds for st in p.time_stages),
                "io_bytes": p.io_bytes_per_block,
                "io_bound_below_gbps": p.io_bound_below_gbps,
                "io_exceeds_compute_below_gbps": p.io_exceeds_compute_below_gbps,
                "stages": [_stage_json(st) for st in p.time_stages],
            }
        if simulated and p.phase in simulated:
            sim = simulated[p.phase]
            out["simulated_peak"] = sim.peak
            out["simulation"] = sim.to_json()
        return out

    shape, s = plan.shape, plan.settings
    settings = dataclasses.asdict(s)
    if s.device == "cuda":
        g = s.gpu_spec
        settings["gpu_spec"] = {"tflops": dict(g.tflops), "hbm_gbps": g.hbm_gbps, "achieved": dict(g.achieved),
                                "memory": g.memory}
    return {
        "model": plan.model,
        "settings": settings,
        "precision": dict(plan.precision),
        "shape": {
            "hidden": shape.hidden, "intermediate": shape.intermediate, "layers": shape.layers,
            "heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "vocab": shape.vocab,
            "tied": shape.tied, "block_params": shape.block_params, "block_linear_params": shape.block_linear_params,
            "total_params": shape.total_params,
            "linears": [dataclasses.asdict(lin) for lin in shape.linears],
        },
        "phases": [phase(p) for p in plan.phases],
        "seconds_block_ap_e2e_qp": sum(p.seconds for p in plan.phases if p.phase in ("block_ap", "e2e_qp")),
        "reference_host_terms": terms(plan.reference_terms),
        "reference_host_bytes": sum(t.bytes for t in plan.reference_terms),
        "verdict": plan.verdict,
        "fits": plan.fits,
        "fixes": list(plan.fixes),
    }
