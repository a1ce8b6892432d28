"""GGUF on SmolLM2-135M: llama.cpp's own quantizer (without / with an importance matrix) against frugal-qat's grid.

    python tools/bench_gguf.py build                      # llama.cpp's tools from source, once (cached, not in CI)
    python tools/bench_gguf.py run --model /tmp/smollm2 --root /tmp/gguf_bench [--types q4_k,q3_k,q2_k]
        [--stages init,bap,e2e] [--chunks 40] [--transformers-all] [--no-plain-llama]
    python tools/bench_gguf.py table --root /tmp/gguf_bench
    python tools/bench_gguf.py block --model /tmp/smollm2 --root /tmp/gguf_bench --grids q4_k --lrs 0,1e-4:1e-5

``build``: downloads llama-cpp-python's source distribution from PyPI (``pip download --no-deps --no-binary
:all: llama-cpp-python==VERSION``; it vendors the whole llama.cpp tree), configures a CPU-only static build and
compiles only the tools used here with ``-j 2`` (a wider build can run out of memory), into ``--cache``
(default ``llama.cpp`` in frugal-qat's cache folder: ``$FRUGAL_QAT_CACHE``, else ``~/.cache/frugal_qat``). With
``FRUGAL_QAT_BENCH_LOCK=FILE`` every heavy step runs under ``flock FILE`` (for a machine shared by several
benchmarks; unset, nothing is locked). Idempotent: it stops at once when the tools are there.

``run``: for each type, these rows (one ``ROOT/ROW/result.json`` each; a row whose result exists is skipped, so
the benchmark resumes after a kill):

- ``fp16``: the dense model, written by frugal-qat's GGUF writer (F16 linears; embeddings F16) -- the source of
  llama.cpp's own quantizations, so both sides start from the same file and tokenizer metadata;
- ``llama.cpp <TYPE>``: ``llama-quantize --pure`` (one type for every linear, no Q6_K mixture), embeddings and
  output kept F16 (``--token-embedding-type f16 --output-tensor-type f16``) as frugal-qat keeps them;
- ``llama.cpp <TYPE> + imatrix``: the same with ``llama-imatrix`` computed on frugal-qat's calibration text
  (the 32 x 256-token demo windows, decoded to text);
- ``frugal-qat <TYPE> init``: ``frugal-qat block-ap --gguf TYPE --epochs 0`` (the recipe
  ``recipes/smollm2_135m_<TYPE>.yaml`` otherwise): the grid initialisation weighted by each column's mean squared
  input on the same calibration windows (frugal-qat's importance matrix), no training: the like-for-like
  comparison with llama-quantize + imatrix;
- ``frugal-qat <TYPE> Block-AP`` / ``+ E2E-QP``: ``frugal-qat block-ap --gguf TYPE --recipe
  recipes/smollm2_135m_<TYPE>.yaml`` (then ``e2e-qp`` with its e2e_qp section), each exported with ``frugal-qat
  export --format gguf --out FILE.gguf``.

Where a row is not a multiple of 256 (SmolLM2's hidden size is 576: q/k/v/o, gate and up), llama.cpp falls back
to Q4_0 (q2_k, q3_k) or Q5_0 (q4_k) and frugal-qat to Q4_0 / Q4_1 (kquant.K_FALLBACK); the table gives the
bits per weight of the linears of each file, so the sizes compare.

Perplexity, per file: ``llama-perplexity -c 512 --chunks N`` (``--chunks``, default 40) on the held-out text (the
first N of the 40 x 512 demo-heldout windows of docs/QUALITY.md, decoded to text and tokenized again by llama.cpp,
which scores the second half of each window), and transformers' GGUF loader on the same N token windows, every
token scored (the protocol of docs/QUALITY.md) -- for the trained rows always, for the others with
``--transformers-all``; for the trained rows also frugal-qat's own model of the run on those windows (the GGUF
must match it within 0.5 %). Each file also generates 32 tokens greedily with ``llama-completion``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON = "0.3.36"  # vendors llama.cpp; the version the table was measured with
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-completion", "llama-tokenize")
QUANTIZE_FTYPE = {"q4_k": "Q4_K_S", "q3_k": "Q3_K_S", "q2_k": "Q2_K"}  # with --pure: every linear in that type
PROMPT = "def fibonacci(n):"
THREADS = "2"


# ---- build ----------------------------------------------------------------------------------------------------


def bin_dir(cache: Path) -> Path:
    return cache / "build" / "bin"


def build(cache: Path, version: str = LLAMA_CPP_PYTHON, jobs: int = 2) -> Path:
    """llama.cpp's tools in ``cache/build/bin`` (see the module docstring). Returns that folder."""
    if all((bin_dir(cache) / t).is_file() for t in TOOLS):
        return bin_dir(cache)
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={version}", "-d", str(sdist.parent)])
    src = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not src.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
    configure = ["cmake", "-S", str(src), "-B", str(cache / "build"), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                 "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CUDA=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"]
    compile_ = ["cmake", "--build", str(cache / "build"), "-j", str(jobs), "--target", *TOOLS]
    t0 = time.time()
    _run(_locked(configure))
    _run(_locked(compile_))
    print(f"built {', '.join(TOOLS)} in {time.time() - t0:.0f} s into {bin_dir(cache)}")
    return bin_dir(cache)


def _locked(cmd: list[str]) -> list[str]:
    """``cmd`` under ``flock $FRUGAL_QAT_BENCH_LOCK`` when that is set, unless this process already runs under it
    (``flock LOCK env BENCH_LOCK_HELD=1 python tools/bench_gguf.py run ...``)."""
    lock = os.environ.get("FRUGAL_QAT_BENCH_LOCK")
    if not lock or os.environ.get("BENCH_LOCK_HELD"):
        return cmd
    return ["flock", lock, *cmd]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kwargs)


# ---- data -----------------------------------------------------------------------------------------------------


def prepare_data(model: Path, root: Path) -> dict:
    """The held-out windows (40 x 512) and calibration windows (32 x 256, the demo recipe's) as token files and as
    text for llama.cpp (decoded with the model's tokenizer)."""
    import torch

    from frugal_qat.cli.main import cache_dir, calibration_windows, load_tokenizer
    from frugal_qat.config import load_recipe, resolve
    from frugal_qat.data.windows import eval_windows, load_token_stream

    out = root / "data"
    if (out / "done.json").is_file():
        return json.loads((out / "done.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(model)
    heldout = eval_windows(load_token_stream(tok, "demo-heldout", cache_dir() / "tokens"), 512, 40)
    cfg = resolve(load_recipe(REPO / "recipes" / "demo.yaml"), {})
    calib = calibration_windows(model, cfg)[: cfg.data.train_size]
    torch.save({"heldout": heldout, "calib": calib}, out / "windows.pt")
    (out / "heldout.txt").write_text(tok.decode(heldout.reshape(-1).tolist()), encoding="utf-8")
    (out / "calib.txt").write_text(tok.decode(calib.reshape(-1).tolist()), encoding="utf-8")
    info = {"heldout": list(heldout.shape), "calib": list(calib.shape)}
    (out / "done.json").write_text(json.dumps(info))
    return info


# ---- rows -----------------------------------------------------------------------------------------------------


def fp16_gguf(model: Path, root: Path) -> Path:
    from frugal_qat.export.gguf import write_gguf
    from frugal_qat.offload.blocks import ModelSource

    path = root / "fp16" / "model.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(ModelSource(model), path, name="SmolLM2-135M-Instruct fp16 (frugal-qat)")
    return path


def llama_quantize(bins: Path, f16: Path, out: Path, gtype: str, imatrix: Path | None) -> Path:
    path = out / "model.gguf"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        cmd = [str(bins / "llama-quantize"), "--pure", "--token-embedding-type", "f16", "--output-tensor-type",
               "f16"]
        if imatrix is not None:
            cmd += ["--imatrix", str(imatrix)]
        _run(_locked(cmd + [str(f16), str(path), QUANTIZE_FTYPE[gtype], THREADS]),
             stdout=open(out / "quantize.log", "w"), stderr=subprocess.STDOUT)
    return path


def llama_imatrix(bins: Path, f16: Path, root: Path) -> Path:
    path = root / "imatrix" / "imatrix.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        _run(_locked([str(bins / "llama-imatrix"), "-m", str(f16), "-f", str(root / "data" / "calib.txt"),
                      "-c", "256", "--chunks", "32", "-t", THREADS, "-o", str(path)]),
             stdout=open(path.parent / "imatrix.log", "w"), stderr=subprocess.STDOUT)
    return path


def frugal_qat_gguf(model: Path, root: Path, gtype: str, stage: str) -> Path:
    """``stage``: ``init`` (``block-ap --epochs 0``), ``bap`` (Block-AP) or ``e2e`` (+ E2E-QP), all with the type's
    recipe, then ``export --format gguf``. Runs resume (the CLI's own resume) and a finished row is reused."""
    out = root / f"fq_{gtype}_{stage}"
    path = out / "model.gguf"
    if path.is_file():
        return path
    cli = [sys.executable, "-m", "frugal_qat"]
    recipe = REPO / "recipes" / f"smollm2_135m_{gtype}.yaml"
    bap = root / "runs" / f"{gtype}_{'init' if stage == 'init' else 'bap'}"
    if not (bap / "summary.json").is_file():
        _run(_locked(cli + ["block-ap", "--model", str(model), "--out", str(bap), "--recipe", str(recipe),
                            "--device", "cpu", *(["--epochs", "0"] if stage == "init" else [])]))
    run = bap
    if stage == "e2e":
        run = root / "runs" / f"{gtype}_e2e"
        if not (run / "summary.json").is_file():
            _run(_locked(cli + ["e2e-qp", "--run", str(bap), "--out", str(run), "--recipe", str(recipe),
                                "--device", "cpu"]))
    out.mkdir(parents=True, exist_ok=True)
    _run(_locked(cli + ["export", "--run", str(run), "--format", "gguf", "--out", str(path)]))
    return path


# ---- measurements ---------------------------------------------------------------------------------------------


def llama_ppl(bins: Path, gguf_path: Path, root: Path, chunks: int = 40) -> dict:
    log = gguf_path.parent / "perplexity.log"
    proc = subprocess.run(_locked([str(bins / "llama-perplexity"), "-m", str(gguf_path), "-f",
                                   str(root / "data" / "heldout.txt"), "-c", "512", "--chunks", str(chunks), "-b",
                                   "512", "-t", THREADS]), capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", proc.stdout + proc.stderr)
    if proc.returncode or not m:
        raise RuntimeError(f"llama-perplexity failed on {gguf_path}; see {log}")
    return {"ppl_llama_cpp": float(m.group(1)), "ppl_llama_cpp_err": float(m.group(2)), "llama_chunks": chunks}


def transformers_ppl(gguf_path: Path, root: Path, n_windows: int = 40) -> float:
    import torch

    from frugal_qat.export.gguf import load_gguf_model

    windows = torch.load(root / "data" / "windows.pt")["heldout"][:n_windows]
    model = load_gguf_model(gguf_path)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows.split(4):
            logits = model(w).logits.float()
            nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                           w[:, 1:].reshape(-1), reduction="sum"))
            n += w[:, 1:].numel()
    return math.exp(nll / n)


def generate(bins: Path, gguf_path: Path) -> str:
    proc = subprocess.run([str(bins / "llama-completion"), "-m", str(gguf_path), "-p", PROMPT, "-n", "32",
                           "--temp", "0", "-t", THREADS, "-no-cnv", "--no-warmup"],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    return proc.stdout.strip()[:400] if proc.returncode == 0 else f"(failed: {proc.stderr.strip()[-200:]})"


def file_stats(gguf_path: Path) -> dict:
    """Bits per weight of the quantized linears (blk.*.attn_*/ffn_* weights), the types used, and the size."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    n_w = n_b = 0
    types: dict[str, int] = {}
    for t in reader.tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name:
            n_w += int(t.n_elements)
            n_b += int(t.n_bytes)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"bits_per_weight_linears": round(8 * n_b / n_w, 3), "linear_types": types,
            "file_mb": round(gguf_path.stat().st_size / 1e6, 2)}


def weight_error(gguf_path: Path, f16_path: Path) -> dict:
    """Relative RMS error of the quantized linears against the fp16 file (both in llama.cpp's row order), over all
    linears and split by the tensors stored in a k-quant and those stored in a fallback type."""
    import gguf
    import numpy as np

    ref = {t.name: t for t in gguf.GGUFReader(str(f16_path)).tensors}
    sums = {"all": [0.0, 0.0], "k-quant": [0.0, 0.0], "fallback": [0.0, 0.0]}
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        if not (t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name):
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        w0 = gguf.quants.dequantize(ref[t.name].data, ref[t.name].tensor_type).astype(np.float64)
        err, sig = float(((w - w0) ** 2).sum()), float((w0**2).sum())
        part = "k-quant" if t.tensor_type.name in ("Q2_K", "Q3_K", "Q4_K") else "fallback"
        for key in ("all", part):
            sums[key][0] += err
            sums[key][1] += sig
    return {f"weight_rel_rmse_{k}": round(math.sqrt(e / s), 5) for k, (e, s) in sums.items() if s > 0}


def torch_side(gguf_path: Path, root: Path, with_transformers: bool = True, n_windows: int = 40) -> dict:
    """The measurements that need no llama.cpp (file stats, weight error, transformers' perplexity), cached in
    ``torch_side.json`` next to the file (they run while llama.cpp's tools are still being built);
    ``with_transformers=False`` leaves the perplexity for a later run."""
    cache = gguf_path.parent / "torch_side.json"
    res = json.loads(cache.read_text()) if cache.is_file() else {}
    if not res:
        res = {**file_stats(gguf_path), **weight_error(gguf_path, root / "fp16" / "model.gguf")}
    if with_transformers and "ppl_transformers" not in res:
        res["ppl_transformers"] = transformers_ppl(gguf_path, root, n_windows)
        res["transformers_windows"] = n_windows
    cache.write_text(json.dumps(res, indent=2))
    return res


def measure(row: str, gguf_path: Path | None, bins: Path, root: Path, note: str = "",
            with_transformers: bool = True, chunks: int = 40) -> dict:
    out = root / row / "result.json"
    if out.is_file():
        res = json.loads(out.read_text())
        if with_transformers and "ppl_transformers" not in res and gguf_path is not None:
            res.update(torch_side(gguf_path, root, True, chunks))
            out.write_text(json.dumps(res, indent=2))
        return res
    if gguf_path is None:
        return {"row": row, "skipped": note}
    res = {"row": row, "note": note, **torch_side(gguf_path, root, with_transformers, chunks),
           **llama_ppl(bins, gguf_path, root, chunks), "generation": generate(bins, gguf_path)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res), flush=True)
    return res


def block_check(model: Path, root: Path, block: int, grids: list[str], lrs: list[tuple[float, float]],
                inits: tuple[str, ...] = ("unit", "imatrix"), steps: int = 24) -> None:
    """One block trained as Block-AP trains it, in a plain grid (``plainB``: w``B``g64) or a GGUF grid: validation
    MSE of the block's output before and after (24 steps of 2 x 256-token windows = 2 epochs of the 24 first
    calibration windows, cosine lr from ``lr`` to ``lr / 20``; ``lrs`` holds (weight lr, quantizer lr) pairs; the
    last 8 windows validate). Inputs are the fp model's, so the numbers isolate the quantizer. A GGUF grid is
    initialised without and/or with the importance matrix of the 24 training windows (``inits``: ``unit`` /
    ``imatrix``); lr 0 is the initialisation alone."""
    import torch
    from torch import nn

    from frugal_qat.block_ap.train_block import linear_input_importance
    from frugal_qat.offload.blocks import ModelSource
    from frugal_qat.precision import resolve as resolve_precision
    from frugal_qat.quantizer import QuantLinear, kquant

    prepare_data(model, root)
    torch.manual_seed(0)
    src = ModelSource(model)
    runner = src.runner("cpu")
    windows = torch.load(root / "data" / "windows.pt")["calib"]
    with torch.no_grad():
        x = src.embed(windows).float()
        for i in range(block):
            b = src.block(i)
            x = torch.cat([runner(b, i, xb) for xb in x.split(8)])
        fp = src.block(block)
        y = torch.cat([runner(fp, block, xb) for xb in x.split(8)])
    xt, yt, xv, yv = x[:24], y[:24], x[24:], y[24:]

    def val(blk) -> float:
        with torch.no_grad():
            return sum(float((runner(blk, block, xv[j:j + 4]) - yv[j:j + 4]).square().sum())
                       for j in range(0, len(xv), 4)) / yv.numel()

    importance = linear_input_importance(src.block(block), lambda m, xb: runner(m, block, xb), xt.split(4),
                                         resolve_precision("cpu"), torch.device("cpu"))
    for grid, init in [(g, i) for g in grids for i in (("-",) if g.startswith("plain") else inits)]:
        for lr, qlr in lrs:
            blk = src.block(block)
            layers = []
            for path, mod in list(blk.named_modules()):
                if isinstance(mod, nn.Linear):
                    parent, _, child = path.rpartition(".")
                    q = (QuantLinear.from_linear(mod, int(grid[5:]), 64) if grid.startswith("plain")
                         else kquant.GGUFQuantLinear.from_linear(mod, grid, importance=importance[path]
                                                                 if init == "imatrix" else None))
                    setattr(blk.get_submodule(parent), child, q)
                    layers.append(q)
            quant = [p for q in layers for p in q.quant_parameters()]
            others = [p for p in blk.parameters() if id(p) not in {id(t) for t in quant}]
            opt = torch.optim.AdamW([{"params": others, "lr": lr, "base": lr},
                                     {"params": quant, "lr": qlr, "base": qlr}],
                                    weight_decay=0.0)
            before = val(blk)
            for s in range(steps if lr > 0 or qlr > 0 else 0):
                for g in opt.param_groups:
                    g["lr"] = g["base"] * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / (steps - 1))))
                j = (s % (len(xt) // 2)) * 2
                opt.zero_grad()
                (runner(blk, block, xt[j:j + 2]) - yt[j:j + 2]).square().mean().backward()
                opt.step()
                with torch.no_grad():
                    for q in layers:
                        q.project_() if hasattr(q, "project_") else q.scale.clamp_(min=1e-4)
            for q in layers:
                q.freeze_()
            after = val(blk)
            print(f"| block {block} | {grid} | {init} | {lr:g} / {qlr:g} | {before:.3e} | {after:.3e} | "
                  f"{100 * (after / before - 1):+.1f} % |", flush=True)


def prepare(model: Path, root: Path, types: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    prepare_data(model, root)
    torch_side(fp16_gguf(model, root), root)
    for gtype in types:
        print(gtype, torch_side(frugal_qat_gguf(model, root, gtype, "init"), root), flush=True)


def frugal_qat_ppl(run_dir: Path, root: Path, n_windows: int = 40) -> float:
    """frugal-qat's own perplexity of the run (its packed model through transformers, fp32) on the same held-out
    windows as ``transformers_ppl``: the reference the GGUF file must match within 0.5 %."""
    import torch

    from frugal_qat.export.verify import reference_nll

    windows = torch.load(root / "data" / "windows.pt")["heldout"][:n_windows]
    nll, _ = reference_nll(run_dir, windows, torch.device("cpu"))
    return math.exp(float(nll.mean()))


def run(model: Path, root: Path, cache: Path, types: list[str], stages: list[str], llama: bool = True,
        with_transformers: bool = True, transformers_all: bool = False, chunks: int = 40,
        plain_llama: bool = True) -> None:
    """Per type: llama.cpp's two rows first (minutes), then frugal-qat's ``stages`` (``init``, ``bap``, ``e2e``).
    transformers' perplexity (and frugal-qat's own, for the 0.5 % check) is measured on the trained rows, and on
    llama-quantize's and the init rows too with ``transformers_all`` (they cost as much again: 2 cores)."""
    bins = build(cache)
    root.mkdir(parents=True, exist_ok=True)
    prepare_data(model, root)
    f16 = fp16_gguf(model, root)
    tf = with_transformers
    tf_other = tf and transformers_all
    measure("fp16", f16, bins, root, "frugal-qat's GGUF writer, F16 linears", tf, chunks)
    imatrix = llama_imatrix(bins, f16, root) if llama else None
    notes = {"init": "frugal-qat imatrix-weighted grid init, no training (block-ap --epochs 0)",
             "bap": "frugal-qat Block-AP in the {t} grid (recipes/smollm2_135m_{t}.yaml)",
             "e2e": "frugal-qat Block-AP + E2E-QP in the {t} grid (recipes/smollm2_135m_{t}.yaml)"}
    for gtype in types:
        if llama:
            measure(f"llama_{gtype}_imatrix", llama_quantize(bins, f16, root / f"llama_{gtype}_imatrix", gtype,
                                                             imatrix),
                    bins, root, f"llama-quantize --pure {QUANTIZE_FTYPE[gtype]} --imatrix (calibration text)",
                    tf_other, chunks)
            if plain_llama:
                measure(f"llama_{gtype}", llama_quantize(bins, f16, root / f"llama_{gtype}", gtype, None), bins, root,
                        f"llama-quantize --pure {QUANTIZE_FTYPE[gtype]}", tf_other, chunks)
        for stage in stages:
            row = f"fq_{gtype}_{stage}"
            tf_row = tf if stage in ("bap", "e2e") else tf_other
            res = measure(row, frugal_qat_gguf(model, root, gtype, stage), bins, root,
                          notes[stage].format(t=gtype), tf_row, chunks)
            run_dir = root / "runs" / f"{gtype}_{stage}"
            if tf_row and "ppl_frugal_qat" not in res and run_dir.is_dir():
                res["ppl_frugal_qat"] = frugal_qat_ppl(run_dir, root, chunks)
                (root / row / "result.json").write_text(json.dumps(res, indent=2))
    table(root)


def table(root: Path) -> None:
    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if (d / "result.json").is_file():
            rows.append(json.loads((d / "result.json").read_text()))
        elif (d / "torch_side.json").is_file():  # llama.cpp not run yet: the torch-side measurements alone
            rows.append({"row": d.name, **json.loads((d / "torch_side.json").read_text())})
    order = {"fp16": 0}
    rows.sort(key=lambda r: (order.get(r["row"], 1), r["row"].split("_")[1] if "_" in r["row"] else "", r["row"]))
    print("| row | linears (types) | bits/w linears | weight err k-quant / fallback | file MB | ppl llama.cpp | "
          "ppl transformers | ppl frugal-qat (transformers vs it) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['row']} | skipped: {r['skipped']} | | | | | | |")
            continue
        types = ", ".join(f"{k} x{v}" for k, v in sorted(r["linear_types"].items()))
        err = " / ".join(f"{r[k]:.4f}" for k in ("weight_rel_rmse_k-quant", "weight_rel_rmse_fallback") if k in r)
        tf = f"{r['ppl_transformers']:.3f}" if "ppl_transformers" in r else "-"
        print(f"| {r['row']} | {types} | {r['bits_per_weight_linears']} | {err or '-'} | {r['file_mb']} | "
              f"{_ppl_cell(r)} | {tf} | {_fq_cell(r)} |")
    block_table(root)


def block_table(root: Path) -> None:
    """What Block-AP bought per block, from each Block-AP run's summary: validation MSE after training against the
    grid initialisation on the same (quantized-stream) inputs, and the run's wall time."""
    runs = sorted((root / "runs").glob("*_bap/summary.json")) if (root / "runs").is_dir() else []
    if not runs:
        return
    print("\n| Block-AP run | wall s | val MSE trained / init, geometric mean over blocks | blocks worse than init | "
          "last block: init -> trained |")
    print("|---|---:|---:|---:|---|")
    for path in runs:
        s = json.loads(path.read_text())
        ratios = [b["val_mse"][-1] / b["val_mse"][0] for b in s["blocks"]]
        gmean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        last = s["blocks"][-1]["val_mse"]
        print(f"| {path.parent.name} | {s['seconds']:.0f} | {gmean:.3f} | {sum(r > 1 for r in ratios)} / "
              f"{len(ratios)} | {last[0]:.3e} -> {last[-1]:.3e} |")


def _fq_cell(r: dict) -> str:
    if "ppl_frugal_qat" not in r or "ppl_transformers" not in r:
        return "-"
    return f"{r['ppl_frugal_qat']:.3f} ({100 * (r['ppl_transformers'] / r['ppl_frugal_qat'] - 1):+.2f} %)"


def _ppl_cell(r: dict) -> str:
    return f"{r['ppl_llama_cpp']:.3f} ± {r['ppl_llama_cpp_err']:.3f}" if "ppl_llama_cpp" in r else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--cache", type=Path, default=None,
                   help="llama.cpp build folder (default: llama.cpp in frugal-qat's cache folder)")
    b.add_argument("--jobs", type=int, default=2)
    r = sub.add_parser("run")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--root", type=Path, required=True)
    r.add_argument("--cache", type=Path, default=None,
                   help="llama.cpp build folder (default: llama.cpp in frugal-qat's cache folder)")
    r.add_argument("--types", default="q4_k,q3_k,q2_k")
    r.add_argument("--stages", default="init,bap,e2e", help="frugal-qat rows: init, bap (Block-AP), e2e (+ E2E-QP)")
    r.add_argument("--no-llama", action="store_true", help="skip llama-quantize's rows")
    r.add_argument("--no-plain-llama", action="store_true", help="skip llama-quantize's row without an imatrix")
    r.add_argument("--chunks", type=int, default=40,
                   help="held-out 512-token windows (the first N): llama-perplexity's chunks, transformers' windows")
    r.add_argument("--transformers-all", action="store_true",
                   help="transformers' perplexity of llama-quantize's and the init rows too (trained rows always)")
    r.add_argument("--no-transformers", action="store_true",
                   help="llama.cpp's measurements only (a later run without the flag adds transformers' perplexity)")
    pr = sub.add_parser("prepare", help="the rows that need no llama.cpp: data, fp16 file, frugal-qat grid rows")
    pr.add_argument("--model", type=Path, required=True)
    pr.add_argument("--root", type=Path, required=True)
    pr.add_argument("--types", default="q4_k,q3_k,q2_k")
    bl = sub.add_parser("block", help="one block trained in a plain or GGUF grid: validation MSE before/after")
    bl.add_argument("--model", type=Path, required=True)
    bl.add_argument("--root", type=Path, required=True)
    bl.add_argument("--block", type=int, default=3)
    bl.add_argument("--grids", default="q4_k,q3_k,q2_k")
    bl.add_argument("--lrs", default="0,1e-4,1e-3", help="comma-separated; LR (weights and quantizer) or WLR:QLR")
    bl.add_argument("--inits", default="unit,imatrix")
    t = sub.add_parser("table")
    t.add_argument("--root", type=Path, required=True)
    args = p.parse_args(argv)
    if getattr(args, "cache", "unset") is None:
        from frugal_qat.cli.main import cache_dir

        args.cache = cache_dir() / "llama.cpp"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.cmd == "build":
        build(args.cache, jobs=args.jobs)
    elif args.cmd == "block":
        lrs = [tuple(float(x) for x in (v.split(":") if ":" in v else (v, v))) for v in args.lrs.split(",")]
        block_check(args.model, args.root, args.block, args.grids.split(","), lrs, tuple(args.inits.split(",")))
    elif args.cmd == "prepare":
        prepare(args.model, args.root, args.types.split(","))
    elif args.cmd == "run":
        run(args.model, args.root, args.cache, args.types.split(","), [s for s in args.stages.split(",") if s],
            not args.no_llama, not args.no_transformers, args.transformers_all, args.chunks, not args.no_plain_llama)
    else:
        table(args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
