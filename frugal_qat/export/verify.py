"""Check an export on the spot: decode it as the format says, reload it with the format's own library, compare.

Two checks, both recorded in the export report:

1. ``weights`` (always; streamed one block at a time): every tensor of the export is decoded by a reader written
   from the format's specification, independently of frugal-qat's packer (``read_bitstream`` extracts value j
   from stream bits ``[j*b, j*b + b)``), and compared with the run's dequantized weights ``(q - z) * s`` in fp32.
   GPTQ and compressed-tensors must match exactly (0.0, else the export fails as a bug); fp16 differs by the
   fp16 rounding of each weight (0.0 with ``dtype="float32"``).
2. ``logits``: the export loaded by the format's own library through transformers (GPTQ: optimum + gptqmodel;
   compressed-tensors: compressed-tensors; fp16: transformers alone) and frugal-qat's forward (the run as a
   transformers model, fp32) run on the same token windows: max abs logit difference and both perplexities.
   This needs both models in memory; it is skipped, with the reason, when the library is not installed or the
   dense model would not fit comfortably in the available RAM.

The windows are cut from a short English text with the run's tokenizer (random tokens if it cannot load).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

import psutil
import torch

from frugal_qat.arch import EMBED_KEY, LM_HEAD_KEY, NORM_KEY, block_prefix
from frugal_qat.errors import CorruptCheckpoint
from frugal_qat.offload.blocks import ModelSource
from frugal_qat.offload.weights import WeightStore, read_config

log = logging.getLogger(__name__)

TEXT = (
    "The history of computing is a story of machines that grew smaller while their memories grew larger. Early "
    "computers filled whole rooms and could hold only a few thousand numbers. Engineers learned to store each "
    "number with fewer bits, to move data from slow disks into fast memory just before it was needed, and to keep "
    "the processor busy while the next piece of work was being read. The same ideas help today when a large "
    "language model has to run on a small machine: the weights are kept in a compact form, and only the part of "
    "the model that is working at the moment needs to be in memory. "
)


def verify_export(run_dir: str | Path, out_dir: str | Path, fmt: str, *, n_windows: int = 4,
                  seqlen: int = 64, windows: torch.Tensor | None = None) -> dict[str, Any]:
    """Both checks above for the export of ``run_dir`` in ``out_dir`` (format ``fmt``); returns their results."""
    report: dict[str, Any] = {"weights": check_weights(run_dir, out_dir, fmt)}
    diff = report["weights"]["max_abs_weight_diff"]
    log.info("verify %s: weights decoded from the export differ from the run by at most %.3g", fmt, diff)
    if fmt != "fp16" and diff != 0.0:
        raise CorruptCheckpoint(
            f"the {fmt} export in {out_dir} does not decode to the run's weights (max diff {diff:.3g}); "
            f"this is a bug in frugal-qat's exporter, please report it with the run's config.json"
        )
    if windows is None:
        windows = sample_windows(run_dir, n_windows, seqlen)
    report["logits"] = check_logits(run_dir, out_dir, fmt, windows)
    if "max_abs_logit_diff" in report["logits"]:
        lg = report["logits"]
        log.info("verify %s via %s: max |logit diff| %.3g, perplexity %.4f (frugal-qat %.4f)", fmt, lg["loader"],
                 lg["max_abs_logit_diff"], lg["ppl_export"], lg["ppl_frugal_qat"])
    else:
        log.warning("verify %s: logits not compared: %s", fmt, report["logits"]["skipped"])
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
# 2. Logits, through the format's own library
# ---------------------------------------------------------------------------------------------------------------


def sample_windows(model_dir: str | Path, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
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


def check_logits(run_dir: str | Path, out_dir: str | Path, fmt: str, windows: torch.Tensor) -> dict[str, Any]:
    from frugal_qat.export.hf_model import load_quantized_model

    need = _required_packages(fmt)
    missing = [p for p in need if importlib.util.find_spec(p.replace("-", "_")) is None]
    if missing:
        return {"skipped": f"{', '.join(missing)} not installed (pip install {' '.join(missing)})"}
    dense_bytes = 4 * _n_params(read_config(run_dir))
    if 2.5 * dense_bytes > psutil.virtual_memory().available:  # ours (fp32) + the loaded export + activations
        return {"skipped": f"the dense model ({dense_bytes / 2**30:.1f} GiB in fp32) twice does not fit in free RAM"}
    ref = load_quantized_model(run_dir)
    ours, ppl_ours = _logits_and_ppl(ref, windows)
    del ref
    # gptqmodel torch.compile()s every layer's dequantization; on CPU that takes minutes and changes only speed.
    with torch._dynamo.config.patch(disable=True):
        model = _load_export(out_dir, fmt)
        theirs, ppl_theirs = _logits_and_ppl(model, windows)
    return {
        "loader": " + ".join(f"{p} {importlib.metadata.version(p)}" for p in ("transformers", *need)),
        "compute_dtype": str(model.dtype).removeprefix("torch."),
        "windows": list(windows.shape),
        "max_abs_logit_diff": float((ours - theirs).abs().max()),
        "ppl_frugal_qat": ppl_ours,
        "ppl_export": ppl_theirs,
    }


def _required_packages(fmt: str) -> tuple[str, ...]:
    return {"gptq": ("optimum", "gptqmodel"), "compressed-tensors": ("compressed-tensors",), "fp16": ()}[fmt]


def _load_export(out_dir: Path, fmt: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if fmt == "gptq":
        from transformers import GPTQConfig

        # GPTQModel's reference kernel (TorchLinear, fp16), which decodes the file as GPTQ specifies. Its
        # auto-selected CPU int4 kernels (TorchFused/TorchAten) compute group_size -1 wrongly in gptqmodel 7.7.0.
        bits = read_config(out_dir)["quantization_config"]["bits"]
        return AutoModelForCausalLM.from_pretrained(
            str(out_dir), device_map="cpu", quantization_config=GPTQConfig(bits=bits, backend="torch")
        ).eval()
    if fmt == "compressed-tensors":
        from transformers import CompressedTensorsConfig

        # dequantize=True: compressed-tensors decompresses each weight at load. (Its default "keep compressed"
        # path fails for asymmetric pack-quantized in compressed-tensors 0.20.0 + transformers 5.23: it sizes
        # weight_zero_point unpacked, [out, G], and refuses the packed tensor, also for files it writes itself.)
        return AutoModelForCausalLM.from_pretrained(
            str(out_dir), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
        ).eval()
    return AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()


@torch.no_grad()
def _logits_and_ppl(model: torch.nn.Module, windows: torch.Tensor) -> tuple[torch.Tensor, float]:
    logits = torch.cat([model(w.unsqueeze(0)).logits.float() for w in windows])
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return logits, math.exp(float(nll))


def _n_params(cfg: dict[str, Any]) -> int:
    """Parameters of a Llama-like model from its config (for the memory check only)."""
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    per_layer = h * heads * head_dim * 2 + 2 * h * kv * head_dim + 3 * h * inter
    return layers * per_layer + vocab * h * (1 if cfg.get("tie_word_embeddings") else 2)
