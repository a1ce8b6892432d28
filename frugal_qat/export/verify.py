"""Check an export on the spot: decode it as the format says, then load it the ways users will and compare.

Two checks, both recorded in the export report and summarised in the export's README:

1. ``weights`` (always; streamed one block at a time): every tensor of the export is decoded by a reader written
   from the format's specification, independently of frugal-qat's packer (``read_bitstream`` extracts value j
   from stream bits ``[j*b, j*b + b)``), and compared with the run's dequantized weights ``(q - z) * s`` in fp32.
   GPTQ and compressed-tensors must match exactly (0.0, else the export fails as a bug); fp16 differs by the
   fp16 rounding of each weight (0.0 with ``dtype="float32"``).
2. ``loaders``: the export loaded through each loader of its format (``loaders.py``: the library's defaults on the
   device at hand, and the recommended settings), and frugal-qat's own forward (the run as a transformers model,
   fp32), run on the same token windows. For each: the perplexity, its relative difference from frugal-qat's

       rel_diff = ppl_loader / ppl_frugal_qat - 1 = exp(mean_t(nll_loader[t] - nll_ours[t])) - 1

   with its standard error over windows (the paired difference, so a 1 % shift shows on a few thousand tokens),
   and the largest logit difference on the first window. A loader that fails, or whose perplexity differs by more
   than ``tolerance`` (0.5 %), gets a warning naming the cause (the dtype it computed in, or the error) and the
   fix (the recommended call). Loaders whose library is not installed are skipped with the reason, as is the
   whole check when the dense model would not fit twice in free RAM.

The token windows are the run's own calibration windows (``calib.safetensors``; the held-out validation windows
first), up to ``tokens`` tokens; a short English text when the run has none.
"""

from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import logging
import math
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from frugal_qat import __version__
from frugal_qat.arch import EMBED_KEY, LM_HEAD_KEY, NORM_KEY, block_prefix
from frugal_qat.errors import CorruptCheckpoint
from frugal_qat.export.loaders import Loader, loaders_for
from frugal_qat.offload.blocks import ModelSource
from frugal_qat.offload.weights import WeightStore, read_config

log = logging.getLogger(__name__)

TOLERANCE = 0.005  # a loader "reproduces" frugal-qat's quality when its perplexity is within 0.5 %
# Verification tokens: the paired difference's standard error was 0.22 % at 2048 tokens on SmolLM2-135M w2g64
# (docs/EXPORT.md), so a 1 % difference stands out at 4.5 standard errors; more tokens cost minutes per GPTQ
# loader on CPU (fp16 kernels).
TOKENS = 2048
TEXT = (
    "The history of computing is a story of machines that grew smaller while their memories grew larger. Early "
    "computers filled whole rooms and could hold only a few thousand numbers. Engineers learned to store each "
    "number with fewer bits, to move data from slow disks into fast memory just before it was needed, and to keep "
    "the processor busy while the next piece of work was being read. The same ideas help today when a large "
    "language model has to run on a small machine: the weights are kept in a compact form, and only the part of "
    "the model that is working at the moment needs to be in memory. "
)


def verify_export(run_dir: str | Path, out_dir: str | Path, fmt: str, *, export_dtype: str = "float16",
                  windows: torch.Tensor | None = None, tokens: int = TOKENS, tolerance: float = TOLERANCE,
                  device: torch.device | str | None = None) -> dict[str, Any]:
    """Both checks above for the export of ``run_dir`` in ``out_dir`` (format ``fmt``); returns their results.

    ``windows`` [n, L] token ids replace the run's calibration windows (the benchmark passes held-out text);
    ``device`` defaults to CUDA when available, else CPU.
    """
    report: dict[str, Any] = {"weights": check_weights(run_dir, out_dir, fmt)}
    diff = report["weights"]["max_abs_weight_diff"]
    log.info("verify %s: weights decoded from the export differ from the run by at most %.3g", fmt, diff)
    if fmt != "fp16" and diff != 0.0:
        raise CorruptCheckpoint(
            f"the {fmt} export in {out_dir} does not decode to the run's weights (max diff {diff:.3g}); "
            f"this is a bug in frugal-qat's exporter, please report it with the run's config.json"
        )
    if windows is None:
        windows = calibration_windows(run_dir, tokens)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                           else "cpu")
    report.update(check_loaders(run_dir, out_dir, fmt, windows, export_dtype, device, tolerance))
    return report


# ---------------------------------------------------------------------------------------------------------------
# 1. Weights, decoded from the specification
# ---------------------------------------------------------------------------------------------------------------


def read_bitstream(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Values ``[k, N]`` (int64) of the LSB-first bitstreams held by the columns of ``words`` (int32 ``[W, N]``).

    Value j of a column occupies stream bits ``[j*b, j*b + b)``; stream bit ``t`` is bit ``t % 32`` of word
    ``t // 32``. A value that starts at bit ``sh`` with ``sh + b > 32`` continues in the low bits of the next word
    (GPTQ's and compressed-tensors' 3-bit layout).
    """
    u = words.to(torch.int64) & 0xFFFFFFFF  # int32 words read as unsigned
    if 32 % bits == 0:  # no value straddles a word: word w holds values w*(32/b) ... in its bits 0, b, 2b, ...
        per_word = 32 // bits
        shifts = (torch.arange(per_word, dtype=torch.int64) * bits).view(1, per_word, 1)
        return ((u.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1, u.shape[1])[:k]
    start = torch.arange(k, dtype=torch.int64) * bits
    word, shift = start // 32, (start % 32).unsqueeze(1)
    lo = u[word] >> shift
    hi = u[(word + 1).clamp(max=u.shape[0] - 1)] << (32 - shift)
    straddles = (shift + bits) > 32
    return torch.where(straddles, lo | hi, lo) & (2**bits - 1)


def dense_linear(tensors: dict[str, torch.Tensor], fmt: str, quant: dict[str, Any]) -> torch.Tensor:
    """``W[out, in]`` fp32 of one quantized linear of an export, computed as the format specifies.

    gptq: ``W[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o]`` with ``z`` = stored (gptq_v2) or stored + 1
    (gptq, v1). compressed-tensors: ``W[o, i] = (x_q[o, i] - zp[o, i // g]) * s[o, i // g]`` with signed
    ``x_q = stored - 2^(b-1)`` and ``zp = stored - 2^(b-1)``.
    """
    if fmt == "gptq":
        bits = quant["bits"]
        g_idx = tensors["g_idx"].long()
        scales = tensors["scales"].float()  # [G, out]
        n_in, n_out = g_idx.numel(), scales.shape[1]
        q = read_bitstream(tensors["qweight"], bits, n_in).float()  # [in, out]; small integers, exact in fp32
        z = read_bitstream(tensors["qzeros"].t(), bits, n_out).t().float()  # [G, out]
        if quant["checkpoint_format"] == "gptq":
            z = z + 1
        return ((q - z[g_idx]) * scales[g_idx]).t().contiguous()
    weights = quant["config_groups"]["group_0"]["weights"]
    bits = weights["num_bits"]
    n_out, n_in = (int(v) for v in tensors["weight_shape"])
    offset = 2 ** (bits - 1)
    x_q = read_bitstream(tensors["weight_packed"].t(), bits, n_in).t().float() - offset  # [out, in]
    zp = read_bitstream(tensors["weight_zero_point"], bits, n_out).float() - offset  # [out, G]
    g = n_in if weights["strategy"] == "channel" else weights["group_size"]
    # Groups are runs of g consecutive input columns (actorder null): view [out, in] as [out, G, g].
    grouped = (x_q.view(n_out, n_in // g, g) - zp.unsqueeze(-1)) * tensors["weight_scale"].float().unsqueeze(-1)
    return grouped.view(n_out, n_in)


def check_weights(run_dir: str | Path, out_dir: str | Path, fmt: str) -> dict[str, Any]:
    """Max abs difference between the export's decoded tensors and the run's, one block at a time."""
    src, exp = ModelSource(run_dir), WeightStore(out_dir)
    quant = read_config(out_dir).get("quantization_config")
    worst, count = 0.0, 0

    def compare(key: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        nonlocal worst, count
        if ours.shape != theirs.shape:
            raise CorruptCheckpoint(f"{key}: export shape {tuple(theirs.shape)} != run shape {tuple(ours.shape)}")
        worst = max(worst, float((ours.float() - theirs.float()).abs().max()))
        count += 1

    for i in range(src.n_layers):
        prefix = block_prefix(i)
        theirs_raw = exp.block_state(i, dtype=None)  # keys relative to the block
        for key, ours in src.block_state(i).items():
            owner, kind = key.rsplit(".", 1)
            if fmt != "fp16" and owner in src.arch.linears and kind == "weight":
                theirs = dense_linear({k.rsplit(".", 1)[1]: v for k, v in theirs_raw.items()
                                       if k.rsplit(".", 1)[0] == owner}, fmt, quant)
            else:
                theirs = theirs_raw[key]
            compare(prefix + key, ours, theirs)
    compare(EMBED_KEY, src.embed_weight(), exp.get(EMBED_KEY))
    compare(NORM_KEY, src.store.get(NORM_KEY), exp.get(NORM_KEY))
    if exp.has(LM_HEAD_KEY):
        compare(LM_HEAD_KEY, src.lm_head_weight(), exp.get(LM_HEAD_KEY))
    return {"reader": "frugal_qat.export.verify (format specification)", "tensors": count,
            "max_abs_weight_diff": worst}


# ---------------------------------------------------------------------------------------------------------------
# 2. The loaders users run, against frugal-qat's forward
# ---------------------------------------------------------------------------------------------------------------


def calibration_windows(run_dir: str | Path, tokens: int) -> torch.Tensor:
    """``[n, L]`` windows of at least ``tokens`` tokens in all (fewer if the run has fewer): the run's calibration
    windows, last first (Block-AP's validation windows come last, and no block trained on them)."""
    calib = Path(run_dir) / "calib.safetensors"
    if calib.is_file():
        from safetensors.torch import load_file

        windows = load_file(calib)["windows"].long().flip(0)
        return windows[: max(1, math.ceil(tokens / windows.shape[1]))]
    return text_windows(run_dir, math.ceil(tokens / 256), 256)


def text_windows(model_dir: str | Path, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``[n, seqlen]`` token ids cut from ``TEXT`` (repeated as needed) with the model's tokenizer."""
    vocab = int(read_config(model_dir)["vocab_size"])
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(str(model_dir))(TEXT)["input_ids"]
    except (OSError, ValueError) as e:
        log.warning("tokenizer of %s did not load (%s); verifying on random tokens", model_dir, e)
        return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    ids = torch.tensor(ids * (n * seqlen // max(len(ids), 1) + 1))[: n * seqlen]
    return ids.clamp(max=vocab - 1).reshape(n, seqlen)


def check_loaders(run_dir: str | Path, out_dir: str | Path, fmt: str, windows: torch.Tensor, export_dtype: str,
                  device: torch.device, tolerance: float = TOLERANCE, loaders: list[Loader] | None = None,
                  reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """frugal-qat's perplexity on ``windows`` and, for every loader (default: ``loaders_for`` the format), its
    result and verdict. ``reference``: ``reference_nll(run_dir, windows, device)`` when already computed."""
    out: dict[str, Any] = {"device": str(device), "windows": list(windows.shape), "tolerance": tolerance}
    dense_bytes = 4 * _n_params(read_config(run_dir))
    if device.type == "cpu" and 2.5 * dense_bytes > psutil.virtual_memory().available:
        out["skipped"] = f"the dense model ({dense_bytes / 2**30:.1f} GiB in fp32) twice does not fit in free RAM"
        log.warning("verify %s: loaders not checked: %s", fmt, out["skipped"])
        return out
    nll_ours, logits_ours = reference if reference is not None else reference_nll(run_dir, windows, device)
    out["ppl_frugal_qat"] = math.exp(float(nll_ours.mean()))
    log.info("verify %s: frugal-qat's own perplexity %.4f on %d x %d tokens", fmt, out["ppl_frugal_qat"],
             *windows.shape)

    if loaders is None:
        loaders = loaders_for(fmt, read_config(out_dir).get("quantization_config"), export_dtype, device)
    results = []
    for loader in loaders:
        res = run_loader(loader, out_dir, windows, nll_ours, logits_ours)
        res["warning"] = judge(res, loader, loaders, out["ppl_frugal_qat"], tolerance, device, export_dtype)
        _log_result(fmt, res)
        results.append(res)
    out["loaders"] = results
    out["warnings"] = [r["warning"] for r in results if r["warning"]]
    out["reproduce"] = [r["call"] for r in results if r["status"] == "ok"]
    return out


def reference_nll(run_dir: str | Path, windows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """frugal-qat's own per-token NLL and first-window logits: the run as a transformers model, fp32."""
    from frugal_qat.export.hf_model import load_quantized_model

    ours = load_quantized_model(run_dir).to(device)
    try:
        return token_nll(ours, windows)
    finally:
        del ours
        gc.collect()


def run_loader(loader: Loader, out_dir: str | Path, windows: torch.Tensor, nll_ours: torch.Tensor,
               logits_ours: torch.Tensor) -> dict[str, Any]:
    """Load the export through ``loader`` and score it on ``windows``; an error is recorded, not raised."""
    res: dict[str, Any] = {"loader": loader.name, "settings": loader.settings, "call": loader.call}
    missing = [p for p in ("transformers", *loader.packages) if importlib.util.find_spec(p.replace("-", "_")) is None]
    if missing:
        res.update(status="skipped", reason=f"{', '.join(missing)} not installed (pip install {' '.join(missing)})")
        return res
    res["versions"] = " + ".join(f"{p} {importlib.metadata.version(p)}" for p in ("transformers", *loader.packages))
    t0 = time.perf_counter()
    try:
        # gptqmodel torch.compile()s every layer's dequantization; on CPU that takes minutes and changes only speed.
        with torch._dynamo.config.patch(disable=True):
            model = loader.load(Path(out_dir))
            device = next(model.parameters()).device
            res.update(compute_dtype=str(model.dtype).removeprefix("torch."), device=str(device))
            nll, logits = token_nll(model, windows)
    except Exception as e:  # any loader failure is a finding to report, never a crash of the export
        res.update(status="fails", error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
        return res
    finally:
        model = None
        gc.collect()
        res["seconds"] = round(time.perf_counter() - t0, 1)
    d = (nll - nll_ours).view(windows.shape[0], -1).mean(1)  # per-window mean of the paired difference
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    res.update(status="ok", ppl=math.exp(float(nll.mean())), rel_diff=math.expm1(float(d.mean())),
               rel_diff_se=se, max_abs_logit_diff=float((logits - logits_ours).abs().max()))
    return res


def judge(res: dict[str, Any], loader: Loader, loaders: list[Loader], ppl_ours: float, tolerance: float,
          device: torch.device, export_dtype: str) -> str | None:
    """The warning for one loader's result (``None`` when it reproduces frugal-qat's perplexity within
    ``tolerance``); sets ``res["status"]`` to ``"differs"`` when the perplexity is off."""
    if res["status"] == "skipped":
        return None
    rec = next((x for x in loaders if x.library == loader.library and x.settings == "recommended"), None)
    fix = f"load it with {rec.call}" if rec is not None and rec is not loader else (
        f"please report it (frugal-qat {__version__}, with this export's frugal_qat_export.json)")
    if res["status"] == "fails":
        cause = f" ({loader.known_failure})" if loader.known_failure else ""
        return f"{loader.name}, `{loader.call}`, fails: {res['error']}{cause}; {fix}"
    if abs(res["rel_diff"]) <= tolerance:
        return None
    res["status"] = "differs"
    dtype = res["compute_dtype"]
    cause = f"it computes in {dtype} on {res['device']}"
    if loader.known_failure:
        cause += f" and {loader.known_failure}"
    if dtype == "bfloat16":
        cause += ", which rounds every fp16 scale to 8 significant bits (a whole group of weights moves at once)"
        if rec is loader and export_dtype == "bfloat16":
            fix = ("the source model is bf16-native: if its activations stay below 65504, dtype=torch.float16 "
                   "avoids this; or export --format fp16 --dtype float32")
    return (f"{loader.name}, `{loader.call}`: perplexity {res['ppl']:.4g} is {res['rel_diff']:+.1%} against "
            f"frugal-qat's {ppl_ours:.4g}: {cause}; {fix}")


def _log_result(fmt: str, res: dict[str, Any]) -> None:
    if res["status"] == "skipped":
        log.info("verify %s via %s: skipped (%s)", fmt, res["loader"], res["reason"])
    elif res["status"] == "fails":
        log.warning("verify %s: %s", fmt, res["warning"])
    else:
        log.info("verify %s via %s (%s): perplexity %.4f (%+.2f %% +- %.2f against frugal-qat), max |logit diff| %.3g",
                 fmt, res["loader"], res["compute_dtype"], res["ppl"], 100 * res["rel_diff"],
                 100 * res["rel_diff_se"], res["max_abs_logit_diff"])
        if res["warning"]:
            log.warning("verify %s: %s", fmt, res["warning"])


@torch.no_grad()
def token_nll(model: torch.nn.Module, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token negative log-likelihoods ``[n * (L - 1)]`` (fp64) over ``windows`` [n, L], one window at a time,
    and the fp32 logits of the first window (for the logit comparison)."""
    device = next(model.parameters()).device
    nll, first = [], None
    for w in windows:
        logits = model(w.unsqueeze(0).to(device)).logits[0].float()
        if first is None:
            first = logits.cpu()
        nll.append(torch.nn.functional.cross_entropy(logits[:-1], w[1:].to(device), reduction="none").double().cpu())
    return torch.cat(nll), first


def _n_params(cfg: dict[str, Any]) -> int:
    """Parameters of a Llama-like model from its config (for the memory check only)."""
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    per_layer = h * heads * head_dim * 2 + 2 * h * kv * head_dim + 3 * h * inter
    return layers * per_layer + vocab * h * (1 if cfg.get("tie_word_embeddings") else 2)
