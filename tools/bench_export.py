"""Which loader settings reproduce frugal-qat's quality: SmolLM2-135M at w4/w3/w2 g64, every export format x loader
x (defaults, recommended), held-out perplexity against frugal-qat's own.

    python tools/make_smollm2_checkpoint.py --out /tmp/xb/smollm2                       # once
    PYTHONPATH=/tmp/xb/site FRUGAL_QAT_CACHE=/tmp/xb/cache \\
        python tools/bench_export.py --model /tmp/xb/smollm2 --root /tmp/xb/bench
    python tools/bench_export.py --root /tmp/xb/bench --table                           # the table again

``PYTHONPATH`` points at a folder holding the loaders that are not project dependencies (gptqmodel, auto-round:
docs/EXPORT.md says how to install them without touching torch); a loader whose library is missing is reported
as skipped. Per bit width: the run is the demo recipe's Block-AP (``frugal-qat block-ap --recipe
recipes/demo.yaml --wbits B``, made once under ``ROOT/run_wB``; with ``--epochs N`` the same with N epochs, 0 =
round-to-nearest, under ``ROOT/run_wB-eN``); frugal-qat's perplexity is its own forward (the
run as a transformers model in fp32, equal to the streamed ``ppl`` path: tests/export/test_hf_model.py) on the
held-out Python tutorial (``--windows`` x 512 tokens of ``demo-heldout``), and every loader is scored on the same
windows through ``frugal_qat.export.verify.check_loaders``, the code the export's own verification runs (plus
AutoRound's loader for GPTQ files, which verification does not run). Results land in
``ROOT/results/wB-FORMAT.json`` and a finished one is not redone (the benchmark resumes after a kill).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FORMATS = {"gptq": ("gptq", "v2"), "gptq-v1": ("gptq", "v1"), "compressed-tensors": ("compressed-tensors", "v2"),
           "fp16": ("fp16", "v2")}
TOLERANCE = 0.005
PACKAGES = ("torch", "transformers", "optimum", "gptqmodel", "compressed-tensors", "auto-round")


def make_run(model: Path, run: Path, bits: int, epochs: int | None) -> None:
    if (run / "manifest.json").is_file() and json.loads((run / "manifest.json").read_text())["progress"]["stage"] \
            == "done":
        return
    cmd = [sys.executable, "-m", "frugal_qat", "block-ap", "--model", str(model), "--out", str(run),
           "--recipe", str(REPO / "recipes" / "demo.yaml"), "--wbits", str(bits), "--device", "cpu", "--io", "buffered"]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def heldout_windows(run: Path, n: int, seqlen: int) -> torch.Tensor:
    from frugal_qat.cli.main import cache_dir, load_tokenizer
    from frugal_qat.data.windows import eval_windows, load_token_stream

    tokens = load_token_stream(load_tokenizer(run), "demo-heldout", cache_dir() / "tokens")
    return eval_windows(tokens, seqlen, n, protocol="sequential", seed=0)


def autoround_loader():
    from frugal_qat.export.loaders import Arg, Loader

    def make():
        from transformers import AutoRoundConfig

        return AutoRoundConfig()

    return Loader("transformers", "defaults", (Arg("quantization_config", "AutoRoundConfig()", make),),
                  ("auto-round",), label="AutoRound")


def bench_one(run: Path, root: Path, bits: int, epochs: int | None, fmt: str, zp: str, windows: torch.Tensor,
              reference) -> dict:
    from frugal_qat.errors import ConfigError
    from frugal_qat.export import export_run
    from frugal_qat.export.loaders import loaders_for
    from frugal_qat.export.verify import check_loaders
    from frugal_qat.offload.weights import read_config

    name = f"{run_tag(bits, epochs)}-{fmt}" + ("-v1" if zp == "v1" else "")
    out = root / "exports" / name
    t0 = time.time()
    try:
        rep = export_run(run, fmt, out, verify=False, zero_point=zp)
    except ConfigError as e:  # v1 cannot hold a zero point of 0
        return {"name": name, "bits": bits, "epochs": epochs, "refused": str(e)}
    device = torch.device("cpu")
    loaders = loaders_for(fmt, read_config(out).get("quantization_config"), rep["dtype"], device)
    if fmt == "gptq":
        loaders.append(autoround_loader())
    res = check_loaders(run, out, fmt, windows, rep["dtype"], device, TOLERANCE, loaders=loaders, reference=reference)
    return {"name": name, "bits": bits, "epochs": epochs, "format": fmt, "zero_point": zp, "seconds": round(time.time() - t0, 1), **res}


def table(root: Path) -> str:
    rows = []
    for path in sorted((root / "results").glob("w*.json"), key=lambda p: (-int(p.name[1]), p.name)):
        r = json.loads(path.read_text())
        if "refused" in r:
            fmt = next(f for f in FORMATS if r["name"].endswith("-" + f)).replace("-v1", " v1")
            bits = _bits_cell(r) if "bits" in r else r["name"].split("-")[0]
            rows.append(f"| {bits} | {fmt} | | export refused: `{r['refused'].split(';')[0]}` | | | | |")
            continue
        for x in r["loaders"]:
            head = f"| {_bits_cell(r)} | {r['format']}{' v1' if r['zero_point'] == 'v1' else ''} | {x['loader']} | "
            if x["status"] in ("skipped", "fails"):
                why = x.get("reason") or x.get("error", "")
                rows.append(head + f"`{x['call']}` | | {x['status']}: {why[:110]} | | |")
                continue
            ok = "**yes**" if abs(x["rel_diff"]) <= TOLERANCE else "no"
            rows.append(head + f"`{x['call']}` | {x['compute_dtype']} | {x['ppl']:.3f} vs {r['ppl_frugal_qat']:.3f}"
                        f" | {100 * x['rel_diff']:+.2f} % (+- {100 * x['rel_diff_se']:.2f}) | {ok} |")
    head = ("| bits | format | loader | call | computes in | ppl (loader vs frugal-qat) | difference (+- s.e.) "
            "| within 0.5 % |\n|---|---|---|---|---|---|---:|---|")
    return head + "\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="the fp16 SmolLM2-135M checkpoint (tools/make_smollm2_checkpoint.py)")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--windows", type=int, default=4, help="held-out windows of 512 tokens")
    p.add_argument("--epochs", type=int, default=None,
                   help="Block-AP epochs per block instead of the recipe's 2 (0 = round-to-nearest: the loaders' "
                        "agreement with frugal-qat does not depend on training; the run goes to ROOT/run_wB-eN)")
    p.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS), help="in this order")
    p.add_argument("--table", action="store_true", help="print the table from stored results and exit")
    args = p.parse_args(argv)
    if not args.table:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        for noisy in ("transformers", "gptqmodel", "httpx", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from frugal_qat.export.verify import reference_nll

        (args.root / "results").mkdir(parents=True, exist_ok=True)
        for bits in args.bits:
            tag = run_tag(bits, args.epochs)
            run = args.root / f"run_{tag}"
            make_run(args.model, run, bits, args.epochs)
            windows = heldout_windows(run, args.windows, 512)
            reference = None  # frugal-qat's own NLL, once per bit width
            for fmt, zp in (FORMATS[f] for f in args.formats):
                dest = args.root / "results" / f"{tag}-{fmt}{'-v1' if zp == 'v1' else ''}.json"
                if dest.is_file():
                    continue
                if reference is None:
                    reference = reference_nll(run, windows, torch.device("cpu"))
                res = bench_one(run, args.root, bits, args.epochs, fmt, zp, windows, reference)
                dest.write_text(json.dumps(res, indent=2) + "\n")
                print(f"{tag} {fmt} {zp}: done", flush=True)
    versions = ", ".join(f"{p} {_version(p)}" for p in PACKAGES)
    print(f"versions: {versions}\n")
    print(table(args.root))
    return 0


def run_tag(bits: int, epochs: int | None) -> str:
    """``w4`` for the recipe's training, ``w4-e0`` for a run with ``--epochs 0`` (kept apart: not the same run)."""
    return f"w{bits}" if epochs is None else f"w{bits}-e{epochs}"


def _bits_cell(r: dict) -> str:
    epochs = r.get("epochs")
    extra = "" if epochs is None else (" RTN" if epochs == 0 else f" {epochs} ep")
    n = r.get("windows", [None])[0]
    return f"w{r['bits']}{extra}" + ("" if n is None else f" ({n}x512)")


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
