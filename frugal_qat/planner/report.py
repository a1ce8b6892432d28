"""A plan as text (one table per phase, GiB, the largest term marked) or as JSON."""

from __future__ import annotations

import dataclasses
from typing import Any

from frugal_qat.planner.estimate import PHASE_TITLES, GiB, PhasePlan, Plan, Term


def _gib(n: int) -> str:
    return f"{n / GiB:9.2f}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _decimal(n: float) -> str:
    return f"{n / 1e12:.1f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB"


def _limit(value: int | None) -> str:
    return "unchecked" if value is None else f"{value / GiB:.1f} GiB"


def _section(title: str, terms: list[Term], total_label: str, total: int, limit: int | None) -> list[str]:
    largest = max(terms, key=lambda t: t.bytes) if terms else None
    lines = [f"  {title}"]
    for t in terms:
        mark = "*" if t is largest else " "
        stage = f" [{t.stage}]" if t.stage else ""
        lines.append(f"   {mark} {t.name + stage:<60}{_gib(t.bytes)}   {t.note}")
    verdict = "" if limit is None else ("  ok" if total <= limit else "  TOO BIG")
    bound = "" if limit is None else f" / {limit / GiB:.2f}"
    lines.append(f"     {total_label:<60}{_gib(total)}{bound}{verdict}")
    return lines


def _phase_lines(p: PhasePlan, plan: Plan) -> list[str]:
    s = plan.settings
    dev_title = "GPU" if p.device == "cuda" else "compute (host RAM, device=cpu)"
    lines = [f"{PHASE_TITLES[p.phase]}" + ("  (figures per block; * = largest term)" if p.blocks > 1 else
                                          "  (* = largest term)")]
    lines += _section(dev_title, p.device_terms, "peak", p.device_peak, s.gpu_mem if p.device == "cuda" else None)
    ram_label = "peak (with the compute terms above)" if p.device == "cpu" else "peak"
    lines += _section("host RAM", p.host_terms, ram_label, p.ram_peak, s.cpu_mem)
    lines += _section("disk", p.disk_terms, "total", p.disk_total, s.disk_free)
    per_block = f"; I/O per block {_decimal(p.io_bytes_per_block)}" if p.blocks > 1 else ""
    lines.append(f"  time: about {_hours(p.seconds)} (compute {_hours(p.compute_seconds)} + I/O "
                 f"{_hours(p.io_seconds)}, {_decimal(p.io_bytes)} moved{per_block})")
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


def format_plan(plan: Plan) -> str:
    """A readable table per phase (GiB, the largest term of each section marked with *), then the verdict."""
    s, shape = plan.settings, plan.shape
    head = [
        f"plan for {plan.model}: w{s.wbits}g{s.group_size}, device {s.device} (GPU {_limit(s.gpu_mem)}, "
        f"RAM {_limit(s.cpu_mem)}, disk {_limit(s.disk_free)})",
        f"model: {shape.total_params / 1e9:.2f} B parameters, {shape.layers} blocks of {shape.block_params:,} "
        f"({shape.block_linear_params:,} in linears); hidden {shape.hidden}, intermediate {shape.intermediate}, "
        f"heads {shape.heads}/{shape.kv_heads}, vocab {shape.vocab}",
        f"Block-AP: {s.train_size}+{s.val_size} windows x {s.seqlen}, batch {s.batch_size}"
        + (f" x accumulation {s.block_ap_grad_accum}" if s.block_ap_grad_accum > 1 else "")
        + f", {s.epochs} epochs; E2E-QP: {s.e2e_train_size} x {s.e2e_seqlen}, batch {s.e2e_batch_size} x "
        f"accumulation {s.grad_accum}, {s.e2e_epochs} epoch(s)",
        "",
    ]
    body = []
    for p in plan.phases:
        body += _phase_lines(p, plan) + [""]
    tail = [reference_line(plan), f"verdict: {plan.verdict}"]
    if plan.fixes:
        tail.append("settings that fit:")
        tail += [f"  - {fix}" for fix in plan.fixes]
    elif not plan.fits:
        tail.append("no setting tried fits; a larger GPU, more RAM or a larger disk is needed")
    return "\n".join(head + body + tail)


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """The plan as plain JSON types: settings, model shape, per-phase terms and peaks, reference, verdict, fixes."""

    def terms(ts: list[Term]) -> list[dict[str, Any]]:
        return [dataclasses.asdict(t) for t in ts]

    shape = plan.shape
    return {
        "model": plan.model,
        "settings": dataclasses.asdict(plan.settings),
        "shape": {
            "hidden": shape.hidden, "intermediate": shape.intermediate, "layers": shape.layers,
            "heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim, "vocab": shape.vocab,
            "tied": shape.tied, "block_params": shape.block_params, "block_linear_params": shape.block_linear_params,
            "total_params": shape.total_params,
        },
        "phases": [
            {
                "phase": p.phase,
                "device": p.device,
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
                "io_bytes_per_block": p.io_bytes_per_block,
                "blocks": p.blocks,
                "problems": list(p.problems),
            }
            for p in plan.phases
        ],
        "reference_host_terms": terms(plan.reference_terms),
        "reference_host_bytes": sum(t.bytes for t in plan.reference_terms),
        "verdict": plan.verdict,
        "fits": plan.fits,
        "fixes": list(plan.fixes),
    }
