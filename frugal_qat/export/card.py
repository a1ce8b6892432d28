"""The export's README.md: what it holds, which engines load it, and which loader settings reproduce frugal-qat's
quality (from the verification in the report, when it ran)."""

from __future__ import annotations

from typing import Any

_IMPORTS = {
    "gptqmodel": "import torch\nfrom gptqmodel import GPTQModel, BACKEND",
    "transformers": "import torch\nfrom transformers import AutoModelForCausalLM, CompressedTensorsConfig, GPTQConfig",
}


def model_card(report: dict[str, Any]) -> str:
    """Markdown for ``README.md`` from the export report (written before the report itself, into the staging
    folder, so it never names the staging path)."""
    fmt, bits, group = report["format"], report["bits"], report["group_size"]
    g = "per channel" if group == -1 else f"group size {group}"
    lines = [
        f"# frugal-qat export: {fmt}, {bits}-bit asymmetric, {g}",
        "",
        f"Made by frugal-qat {report['frugal_qat_version']} from a quantized run (EfficientQAT). Default compute "
        f"dtype in config.json: `{report['dtype']}`; scales are stored in float16.",
        "",
        "## Engines",
        "",
    ]
    for e in report["engines"]:
        verdict = "loads" if e["loads"] else "does not load"
        note = f": {e['note']}" if e["note"] else ""
        lines.append(f"- {e['engine']} {verdict} this file{note} [{e['basis']}]")
    lines += ["", "## Loading it with frugal-qat's quality", ""]
    verify = report.get("verify") or {}
    results = verify.get("loaders")
    if not results:
        reason = verify.get("skipped") or ("the export was made without verification" if not verify else "")
        lines += [f"Not measured ({reason})." if reason else "Not measured.", ""]
        return "\n".join(lines)
    tokens = verify["windows"][0] * verify["windows"][1]
    tol = verify["tolerance"]
    lines += [
        f"Measured at export time on {verify['device']} ({tokens} tokens of the run's own text): frugal-qat's "
        f"perplexity is {verify['ppl_frugal_qat']:.4f}. A loader reproduces it when within {tol:.1%}.",
        "",
        "| loader | call | computes in | perplexity | vs frugal-qat | reproduces |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in results:
        if r["status"] == "skipped":
            lines.append(f"| {r['loader']} | `{r['call']}` | | | | not checked: {r['reason']} |")
        elif r["status"] == "fails":
            lines.append(f"| {r['loader']} | `{r['call']}` | | | | **fails**: {r['error']} |")
        else:
            ok = "yes" if r["status"] == "ok" else "**no**"
            lines.append(f"| {r['loader']} | `{r['call']}` | {r['compute_dtype']} | {r['ppl']:.4f} | "
                         f"{r['rel_diff']:+.2%} | {ok} |")
    good = [r for r in results if r["status"] == "ok" and r["settings"] == "recommended"]
    good = good or [r for r in results if r["status"] == "ok"]
    if good:
        lines += ["", "Calls that reproduce it:"]
        for library in ("gptqmodel", "transformers"):
            calls = [r["call"] for r in good if r["call"].startswith("GPTQModel") == (library == "gptqmodel")]
            if calls:
                call = calls[0].replace("PATH", '"PATH/TO/THIS/FOLDER"')
                lines += ["", "```python", _IMPORTS[library], f"model = {call}", "```"]
    if verify.get("warnings"):
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in verify["warnings"]]
    lines.append("")
    return "\n".join(lines)


__all__ = ["model_card"]
