"""The built-in demo: SmolLM2-135M quantized with RTN, Block-AP and Block-AP + E2E-QP, against its fp16 original.

Each step runs the real command in a subprocess (so each reports its own peak RSS, as a user would see it):
convert the shipped GGUF to a safetensors checkpoint, measure fp16 perplexity on held-out text, run `block-ap`
with 0 epochs (RTN) and with the recipe's epochs, then `e2e-qp` on the Block-AP run, and measure every run's
perplexity. Results go to DIR/demo_results.json.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from frugal_qat.checkpoint.store import atomic_write_json
from frugal_qat.errors import ConfigError, FrugalQATError

log = logging.getLogger(__name__)
DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
EVAL = {"data": "demo-heldout", "seqlen": 512, "max_windows": 40}  # notes §8: 40 x 512 held-out tokens


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "frugal_qat", *args]
    log.info("$ frugal-qat %s", " ".join(args))
    if subprocess.run(cmd).returncode != 0:
        raise FrugalQATError(f"demo step failed: frugal-qat {' '.join(args)} (its error is printed above)")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors") if f.name != "calib.safetensors")


def _ppl(model: Path, out_json: Path, device: str) -> float:
    _cli("ppl", "--model", str(model), "--data", EVAL["data"], "--seqlen", str(EVAL["seqlen"]),
         "--max-windows", str(EVAL["max_windows"]), "--device", device, "--json", str(out_json))
    return json.loads(out_json.read_text())["ppl"]


def _run_row(method: str, run: Path, device: str) -> dict:
    """A table row for a finished run: wall time, peak RSS and output size from the run's own summary.json (the
    time and memory of training, not of the perplexity evaluation that follows)."""
    summary = json.loads((run / "summary.json").read_text())
    return {"method": method, "seconds": summary["seconds"], "peak_rss_bytes": summary["peak_rss_bytes"],
            "bytes": summary["output_bytes"], "ppl": _ppl(run, run / "ppl_heldout.json", device)}


def run_demo(root: Path, wbits: int, group_size: int, recipe: Path | None = None, device: str = "auto",
             extra_args: tuple[str, ...] = ()) -> list[dict]:
    from frugal_qat.data.demo import make_smollm2_checkpoint

    recipe = Path(recipe or DEFAULT_RECIPE)
    if not recipe.is_file():
        raise ConfigError(f"demo recipe {recipe} not found; pass --recipe recipes/demo.yaml from a frugal-qat checkout")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = make_smollm2_checkpoint(root / "smollm2-135m")
    rows = [{"method": "fp16", "seconds": round(time.time() - t0, 1), "peak_rss_bytes": None,
             "bytes": _dir_bytes(model), "ppl": _ppl(model, root / "ppl_fp16.json", device)}]
    tag = f"w{wbits}g{group_size}"
    for method, epochs in (("RTN", ["--epochs", "0"]), ("Block-AP", [])):
        run = root / f"run-{tag}-{'rtn' if method == 'RTN' else 'block-ap'}"
        _cli("block-ap", "--model", str(model), "--out", str(run), "--recipe", str(recipe), "--wbits", str(wbits),
             "--group-size", str(group_size), "--device", device, *epochs, *extra_args)
        rows.append(_run_row(f"{method} {tag}", run, device))
    # E2E-QP (the recipe's e2e_qp section) on the Block-AP run: only the step sizes train, end to end.
    bap, e2e = root / f"run-{tag}-block-ap", root / f"run-{tag}-e2e-qp"
    _cli("e2e-qp", "--run", str(bap), "--out", str(e2e), "--recipe", str(recipe), "--device", device)
    rows.append(_run_row(f"+ E2E-QP {tag}", e2e, device))
    gens = generations({"fp16": model, f"Block-AP {tag}": bap, f"+ E2E-QP {tag}": e2e})
    for r in rows:
        r["generation"] = gens.get(r["method"])
    atomic_write_json(root / "demo_results.json", {"recipe": str(recipe), "eval": EVAL, "prompt": PROMPT, "rows": rows})
    return rows


PROMPT = "The Python tutorial explains that a list is"


def generations(models: dict[str, Path], prompt: str = PROMPT, new_tokens: int = 24) -> dict[str, str]:
    """Greedy continuations of one prompt by each model (a run directory loads as a transformers model)."""
    import torch
    from transformers import AutoTokenizer

    from frugal_qat.export.hf_model import load_quantized_model

    out = {}
    for name, path in models.items():
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = load_quantized_model(path)
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        out[name] = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        del model
    return out


def format_table(rows: list[dict]) -> str:
    lines = [f"{'method':<18} {'held-out ppl':>12} {'wall s':>8} {'peak RSS':>9} {'size on disk':>13}",
             "-" * 64]
    for r in rows:
        rss = f"{r['peak_rss_bytes'] / 2**30:.2f} GiB" if r["peak_rss_bytes"] else "-"
        lines.append(f"{r['method']:<18} {r['ppl']:>12.2f} {r['seconds']:>8.1f} {rss:>9} {r['bytes'] / 2**20:>9.1f} MiB")
    return "\n".join(lines)
