"""GGUF export: one file that llama.cpp, Ollama and transformers load, holding exactly the run's weights.

    write_gguf(src, path)         the file (``export_run(..., "gguf", FILE.gguf)``; also a dense checkpoint: F16/BF16/F32)
    verify_gguf(run_dir, path)    gguf-py decodes every tensor to the run's weights exactly; transformers' GGUF loader
                                  against frugal-qat's own perplexity (``verify.check_loaders``)

What each linear becomes (``frugal_qat.quantizer.kquant`` has the block layouts):

- a run trained in a GGUF grid (``quantization_config.gguf``, docs/GGUF.md): its ``<linear>.ggml`` blocks are copied
  byte for byte, in the type recorded per linear (``gguf_types``: the k-quant asked for, or its legacy fallback
  where a row is not a multiple of 256);
- a plain run (uniform asymmetric grid, GPTQ layout): the legacy type that holds ``(q - z) * s`` exactly
  (``kquant.legacy_type_for``: q4_0 for 2-3 bits, q5_0 for 4 bits, q8_0 for 8 bits when ``q - z`` fits), or a
  refusal with the reason (group size not a multiple of 32, ...), before anything is written;
- a dense checkpoint (no quantization): its stored dtype, F16, BF16 or F32 (the benchmark's starting point for
  llama.cpp's own quantizer).

Norms and biases are written as F32, embeddings and lm_head in their stored 16-bit dtype: all exact. As
llama.cpp's converter does for the Llama family (Llama, Mistral), the rows of ``q_proj`` and ``k_proj`` are
permuted (``permute_rows``) so that its rotary embedding pairs dimensions the way the HF layout computes them;
rows carry their blocks (scales, mins and codes) with them, so this moves bytes and changes no value. transformers'
GGUF loader undoes the permutation.

Streaming: the header (metadata, tokenizer, every tensor's name, shape and type) is written first from the shapes
alone, then block i's tensors are read, converted and written before block i+1 is read; the file is written to
``path.partial`` and renamed at the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frugal_qat import __version__
from frugal_qat.arch import EMBED_KEY, LM_HEAD_KEY, NORM_KEY, block_prefix
from frugal_qat.errors import ConfigError, CorruptCheckpoint, UnsupportedModel
from frugal_qat.offload.blocks import ModelSource
from frugal_qat.quantizer import kquant, unpack_linear

log = logging.getLogger(__name__)

# llama.cpp architecture of each supported family, and whether its converter permutes q/k rows.
GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
PERMUTES_QK = {"llama": True, "qwen2": False}
_DENSE = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
LLAMA_CPP = "llama.cpp of llama-cpp-python 0.3.36"  # the build tools/bench_gguf.py measured with


def engine_support() -> list:
    """What loads a frugal-qat GGUF (``export.engines.EngineSupport`` entries, as the other formats list theirs)."""
    from frugal_qat.export.engines import CHECKED_VERSIONS, EngineSupport

    return [
        EngineSupport(f"{LLAMA_CPP} (llama-perplexity, llama-completion)", True, "checked",
                      "by tools/bench_gguf.py on SmolLM2-135M (docs/GGUF.md), not in CI"),
        EngineSupport(f"transformers {CHECKED_VERSIONS['transformers']} (from_pretrained(dir, gguf_file=...))", True,
                      "checked", "dequantizes every tensor through gguf-py; the export's verification loads it"),
        EngineSupport("Ollama and other llama.cpp front ends", True, "not checked",
                      "they read GGUF through llama.cpp; not run here"),
    ]


def engine_line(types: dict[str, str]) -> str:
    """One line, as ``engines.engine_line`` gives for the other formats."""
    kinds = ", ".join(f"{t} x{list(types.values()).count(t)}" for t in sorted(set(types.values())))
    support = engine_support()
    yes = "; ".join(e.text() for e in support if e.loads)
    return f"gguf ({kinds} per block): loads in {yes}"


# ---------------------------------------------------------------------------------------------------------------
# What each tensor becomes
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    """One tensor of the file: GGUF name, HF key (relative to its block for block tensors), shape [out, in] or
    [n], and type ("q4_k", ..., or "F16"/"BF16"/"F32")."""

    name: str
    key: str
    shape: tuple[int, ...]
    gtype: str

    @property
    def ggml_type(self):
        import gguf

        if self.gtype in kquant.TYPES:
            return gguf.GGMLQuantizationType(kquant.TYPES[self.gtype].ggml_id)
        return gguf.GGMLQuantizationType[self.gtype]

    @property
    def nbytes(self) -> int:
        if self.gtype in kquant.TYPES:
            return self.shape[0] * kquant.row_bytes(kquant.TYPES[self.gtype], self.shape[1])
        return math.prod(self.shape) * {"F16": 2, "BF16": 2, "F32": 4}[self.gtype]


def run_kind(src: ModelSource) -> str:
    """``"grid"`` (trained in a GGUF grid), ``"plain"`` (uniform grid, GPTQ layout) or ``"dense"``."""
    if src.quant is None:
        return "dense"
    return "grid" if src.quant.get("gguf") else "plain"


def linear_types(src: ModelSource) -> dict[str, str]:
    """The GGUF type of each quantized linear (by name relative to the block), decided from the shapes alone.

    Raises:
        ConfigError: a plain run whose grid no legacy type holds (the reason from ``kquant.legacy_type_for``).
        CorruptCheckpoint: a grid run whose config does not name the type of every linear.
    """
    kind = run_kind(src)
    shapes = src.linear_shapes()
    if kind == "dense":
        dtype = src.store.block_state(0, dtype=None)[f"{shapes[0].name}.weight"].dtype
        return {lin.name: _DENSE.get(dtype, "F32") for lin in shapes}
    if kind == "grid":
        types = src.quant.get("gguf_types", {})
        missing = [lin.name for lin in shapes if lin.name not in types]
        if missing:
            raise CorruptCheckpoint(f"{src.dir}: quantization_config.gguf_types lacks {missing}; the run is damaged")
        return {lin.name: types[lin.name] for lin in shapes}
    bits, group = src.quant["bits"], src.quant["group_size"]
    out = {}
    for lin in shapes:
        try:
            out[lin.name] = kquant.legacy_type_for(bits, group, lin.in_features)
        except kquant.GridRefused as e:
            raise ConfigError(f"layers.*.{lin.name}: {e}") from None
    return out


def plan_tensors(src: ModelSource, types: dict[str, str]) -> tuple[list[Tensor], list[list[Tensor]], list[Tensor]]:
    """(head tensors, per-block tensors, tail tensors) with their GGUF names, shapes and types.

    Block tensors are read off block 0 (every block of a supported family has the same tensors).
    """
    import gguf

    arch = _arch(src)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], src.n_layers)

    def gguf_name(key: str) -> str:
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedModel(f"{key} has no GGUF name for architecture {arch}")
        return name

    shapes = {lin.name: lin for lin in src.linear_shapes()}
    raw0 = src.store.block_state(0, dtype=None)
    block_keys: list[tuple[str, tuple[int, ...], str]] = []
    for key in sorted(raw0):
        owner, kind = key.rsplit(".", 1)
        if owner not in shapes:  # norms
            block_keys.append((key, tuple(raw0[key].shape), "F32"))
        elif kind in ("weight", "ggml", "qweight"):  # the linear itself, in whatever layout the run stores it
            lin = shapes[owner]
            block_keys.append((f"{owner}.weight", (lin.out_features, lin.in_features), types[owner]))
        elif kind == "bias":
            block_keys.append((key, (shapes[owner].out_features,), "F32"))
    blocks = [[Tensor(gguf_name(block_prefix(i) + k), k, shape, gt) for k, shape, gt in block_keys]
              for i in range(src.n_layers)]
    emb = src.embed_weight()
    head = [Tensor("token_embd.weight", EMBED_KEY, tuple(emb.shape), _DENSE.get(emb.dtype, "F32"))]
    tail = [Tensor("output_norm.weight", NORM_KEY, (src.hidden,), "F32")]
    if not src.tied:
        lm = src.store.get(LM_HEAD_KEY)
        tail.append(Tensor("output.weight", LM_HEAD_KEY, tuple(lm.shape), _DENSE.get(lm.dtype, "F32")))
    if _rope_type(src) == "llama3":
        tail.append(Tensor("rope_freqs.weight", "rope_freqs", (_head_dim(src) // 2,), "F32"))
    return head, blocks, tail


def permute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, rows ``[0, d/2)`` and ``[d/2, d)`` interleaved
    (``x.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``). Works on weights, biases and ggml block rows alike."""
    rest = x.shape[1:]
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *rest).swapaxes(1, 2).reshape(x.shape)


def unpermute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_rows`."""
    rest = x.shape[1:]
    return x.reshape(n_head, x.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(x.shape)


def block_tensors(src: ModelSource, i: int, types: dict[str, str]) -> dict[str, torch.Tensor]:
    """Block i's tensors as they go into the file (keys relative to the block, linears as ``<name>.weight``):
    ggml block bytes (uint8 [out, row bytes]) or dense weights, F32 norms and biases; q/k not yet permuted.

    Raises:
        ConfigError: (8-bit plain runs) codes no q8_0 block holds.
    """
    kind = run_kind(src)
    raw = src.store.block_state(i, dtype=None)
    out: dict[str, torch.Tensor] = {}
    for lin in src.linear_shapes():
        name, gtype = lin.name, types[lin.name]
        if kind == "grid":
            blocks = raw[f"{name}.ggml"]
            if tuple(blocks.shape) != (lin.out_features, kquant.row_bytes(kquant.TYPES[gtype], lin.in_features)):
                raise CorruptCheckpoint(f"{block_prefix(i)}{name}.ggml has shape {tuple(blocks.shape)}, not that of "
                                        f"{gtype} for [{lin.out_features}, {lin.in_features}]; the run is damaged")
            out[f"{name}.weight"] = blocks
        elif kind == "plain":
            bits, group = src.quant["bits"], src.quant["group_size"]
            packed = {k: raw[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            codes, scale, zero = unpack_linear(packed, bits, group, lin.in_features, lin.out_features)
            try:
                t_name, c, grid = kquant.legacy_from_gptq(codes, scale, zero, bits, group, f"{block_prefix(i)}{name}")
            except kquant.GridRefused as e:
                raise ConfigError(str(e)) from None
            out[f"{name}.weight"] = kquant.pack(c, grid, kquant.TYPES[t_name])
        else:
            out[f"{name}.weight"] = raw[f"{name}.weight"]
        if f"{name}.bias" in raw:
            out[f"{name}.bias"] = raw[f"{name}.bias"].float()
    for key, t in raw.items():
        if key.rsplit(".", 1)[0] not in src.arch.linears:
            out[key] = t.float()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def write_gguf(src: ModelSource, path: Path, *, pre_tokenizer: str | None = None, name: str | None = None) -> dict:
    """Write ``src`` (a run, or a dense checkpoint) as one GGUF file at ``path`` (module docstring).

    Returns ``{"gguf_file", "gguf_types", "fallbacks", "bytes", "bits_per_weight"}``: the type of each linear,
    the linears stored in another type than the run asked for (k-quant rows that are not multiples of 256), and
    the size of the quantized linears per weight.

    Raises:
        ConfigError: a run no GGUF type holds exactly; UnsupportedModel: an architecture or rope scaling llama.cpp
        would not read the same way.
    """
    import gguf

    path = Path(path)
    arch = _arch(src)
    types = linear_types(src)  # refusals happen here, before any byte is written
    if run_kind(src) == "plain" and src.quant["bits"] == 8:
        for i in range(src.n_layers):  # q8_0 holds an 8-bit run only where q - z fits: check every block first
            block_tensors(src, i, types)
    head, blocks, tail = plan_tensors(src, types)
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _add_metadata(writer, src, arch, types, name)
        add_tokenizer(writer, src, arch, pre_tokenizer)
        for t in [*head, *(t for b in blocks for t in b), *tail]:
            if t.gtype in kquant.TYPES:  # gguf-py takes the byte shape of pre-packed blocks
                byte_shape = (t.shape[0], kquant.row_bytes(kquant.TYPES[t.gtype], t.shape[1]))
                writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.ggml_type)
            else:
                writer.add_tensor_info(t.name, t.shape, _NP_DTYPE[t.gtype], t.nbytes, raw_dtype=t.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.write_tensor_data(_as_numpy(src.embed_weight(), head[0].gtype))
        n_head, n_kv = int(src.hf.num_attention_heads), int(src.hf.num_key_value_heads or src.hf.num_attention_heads)
        for i, plan in enumerate(blocks):
            tensors = block_tensors(src, i, types)
            for t in plan:
                x = tensors[t.key]
                if PERMUTES_QK[arch] and t.key.startswith(("self_attn.q_proj.", "self_attn.k_proj.")):
                    x = permute_rows(x, n_head if "q_proj" in t.key else n_kv)
                writer.write_tensor_data(_as_numpy(x, t.gtype))
            del tensors  # one block's tensors at a time
        for t in tail:
            if t.key == NORM_KEY:
                x = src.store.get(NORM_KEY).float()
            elif t.key == "rope_freqs":
                x = _llama3_rope_factors(src)
            else:
                x = src.store.get(LM_HEAD_KEY)
            writer.write_tensor_data(_as_numpy(x, t.gtype))
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    quantized = [t for b in blocks for t in b if t.gtype in kquant.TYPES]
    asked = src.quant.get("gguf") if src.quant else None
    fallbacks = {k: v for k, v in types.items() if asked and v != asked}
    if fallbacks:
        log.warning("GGUF: %s stored as %s (rows not a multiple of 256)", ", ".join(fallbacks),
                    ", ".join(sorted(set(fallbacks.values()))))
    n_weights = sum(math.prod(t.shape) for t in quantized)
    return {"gguf_file": path.name, "gguf_types": types, "fallbacks": fallbacks, "bytes": path.stat().st_size,
            "bits_per_weight": round(8 * sum(t.nbytes for t in quantized) / n_weights, 4) if n_weights else None}


_NP_DTYPE = {"F16": np.dtype(np.float16), "BF16": np.dtype(np.int16), "F32": np.dtype(np.float32)}


def _as_numpy(x: torch.Tensor, gtype: str) -> np.ndarray:
    x = x.detach().cpu().contiguous()
    if gtype in kquant.TYPES:
        if x.dtype != torch.uint8:
            raise CorruptCheckpoint(f"expected ggml block bytes (uint8) for a {gtype} tensor, got {x.dtype}")
        return x.numpy()
    if gtype == "BF16":
        return x.to(torch.bfloat16).view(torch.int16).numpy()
    return x.to({"F16": torch.float16, "F32": torch.float32}[gtype]).numpy()


def _arch(src: ModelSource) -> str:
    if src.arch.name not in GGUF_ARCH:
        raise UnsupportedModel(f"{src.arch.name} has no GGUF export; supported: {', '.join(GGUF_ARCH)}")
    return GGUF_ARCH[src.arch.name]


def _head_dim(src: ModelSource) -> int:
    hf = src.hf
    return int(getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)


def _rope(src: ModelSource) -> dict[str, Any]:
    hf = src.hf
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    return dict(params)


def _rope_type(src: ModelSource) -> str:
    rope = _rope(src)
    return rope.get("rope_type", rope.get("type", "default")) or "default"


def _rope_theta(src: ModelSource) -> float:
    rope = _rope(src)
    return float(rope.get("rope_theta", getattr(src.hf, "rope_theta", 10000.0)))


def _llama3_rope_factors(src: ModelSource) -> torch.Tensor:
    """llama.cpp's ``rope_freqs``: per frequency, the divisor Llama 3.1's rope scaling applies to the default
    inverse frequency, computed by transformers' own rope initialisers (default / llama3)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d, theta = _head_dim(src), _rope_theta(src)
    default = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](src.hf, "cpu")
    return (default / scaled.double()).float()


def _add_metadata(writer, src: ModelSource, arch: str, types: dict[str, str], name: str | None) -> None:
    import gguf

    hf = src.hf
    writer.add_name(name or src.dir.name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(int(hf.max_position_embeddings))
    writer.add_embedding_length(int(hf.hidden_size))
    writer.add_block_count(src.n_layers)
    writer.add_feed_forward_length(int(hf.intermediate_size))
    writer.add_head_count(int(hf.num_attention_heads))
    writer.add_head_count_kv(int(hf.num_key_value_heads or hf.num_attention_heads))
    head_dim = _head_dim(src)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hf.hidden_size // hf.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(src))
    rope_type = _rope_type(src)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(_rope(src)["factor"]))
    elif rope_type not in ("default", "llama3"):
        raise UnsupportedModel(f"rope scaling {rope_type!r} has no GGUF export yet; supported: default, linear, "
                               f"llama3")
    writer.add_layer_norm_rms_eps(float(hf.rms_norm_eps))
    writer.add_vocab_size(int(hf.vocab_size))
    kind = run_kind(src)
    if kind == "dense":
        dense = next(iter(types.values()))
        writer.add_file_type({"F16": gguf.LlamaFileType.MOSTLY_F16, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
                              "F32": gguf.LlamaFileType.ALL_F32}[dense])
    else:
        main = src.quant["gguf"] if kind == "grid" else max(types.values(), key=list(types.values()).count)
        writer.add_file_type(kquant.TYPES[main].file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("general.quantized_by", f"frugal-qat {__version__}")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


def pre_tokenizer_name(src: ModelSource, tokenizer_json: dict[str, Any], arch: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a GPT-2-style BPE tokenizer, read off its pre-tokenizer.

    llama.cpp's converter identifies the pre-tokenizer by hashing the token ids of a test text against a table of
    known models; we read the tokenizer's own definition instead: Qwen2 -> ``qwen2``; a split regex with the Llama 3
    contractions and 1-3 digit groups -> ``llama-bpe``; a plain byte-level pre-tokenizer (GPT-2's regex) ->
    ``default``. Anything else gets ``default`` with a warning: pass ``pre_tokenizer`` to override.
    """
    if arch == "qwen2":
        return "qwen2"
    pre = json.dumps(tokenizer_json.get("pre_tokenizer"))
    if "(?i:'s|'t|'re|'ve|'m|'ll|'d)" in pre and "\\\\p{N}{1,3}" in pre:
        return "llama-bpe"
    spec = tokenizer_json.get("pre_tokenizer") or {}
    if spec.get("type") != "ByteLevel" or not spec.get("use_regex", True):
        log.warning("%s: pre-tokenizer %s is not one we recognise; writing tokenizer.ggml.pre 'default' (GPT-2's "
                    "regex): llama.cpp may split some text differently; pass pre_tokenizer= to override",
                    src.dir, pre[:120])
    return "default"


def add_tokenizer(writer, src: ModelSource, arch: str, pre_tokenizer: str | None = None) -> None:
    """The tokenizer of ``src`` as GGUF metadata: tokens, types, merges (or scores), special token ids, chat
    template. Reads ``tokenizer.json`` with gguf-py's vocabulary readers (``BpeVocab`` for GPT-2-style byte-level
    BPE, model ``gpt2``; ``LlamaHfVocab`` for SentencePiece-style BPE with byte fallback, model ``llama``);
    tokens added as special in ``tokenizer.json`` are marked CONTROL, other added tokens USER_DEFINED, and the
    table is padded to the model's vocab_size with unused ``[PAD<i>]`` tokens, as llama.cpp's converter does.

    Raises:
        UnsupportedModel: no ``tokenizer.json``, or a tokenizer of another kind.
    """
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    tj_path = src.dir / "tokenizer.json"
    if not tj_path.is_file():
        raise UnsupportedModel(f"{src.dir} has no tokenizer.json; the GGUF export needs the fast tokenizer's file")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    try:
        vocab = BpeVocab(src.dir)
    except (FileNotFoundError, ValueError):
        try:
            vocab = LlamaHfVocab(src.dir)
        except (FileNotFoundError, TypeError) as e:
            raise UnsupportedModel(f"{tj_path}: a tokenizer of this kind has no GGUF export yet ({e})") from None
    tokens, scores, toktypes = [], [], []
    for text, score, tt in vocab.all_tokens():
        tokens.append(text if isinstance(text, bytes) else text.encode("utf-8"))
        scores.append(score)
        toktypes.append(tt)
    by_text = {t.decode("utf-8", errors="replace"): i for i, t in enumerate(tokens)}
    for added in tj.get("added_tokens", []):
        i = by_text.get(added["content"])
        if i is not None:
            toktypes[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    vocab_size = int(src.hf.vocab_size)
    if len(tokens) > vocab_size:
        raise UnsupportedModel(f"tokenizer has {len(tokens)} tokens, more than the model's vocab_size {vocab_size}")
    for j in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{j}]".encode())
        scores.append(-1000.0)
        toktypes.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer or pre_tokenizer_name(src, tj, arch))
    else:
        writer.add_token_scores(scores)
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
    SpecialVocab(src.dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer)


# ---------------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------------


def check_gguf_weights(src: ModelSource, path: Path) -> dict[str, Any]:
    """Every tensor of the file decoded by gguf-py's dequantizer (q/k rows un-permuted) against the run's fp32
    weights: the largest absolute difference (0.0 when the file holds the run exactly)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _arch(src)
    n_head, n_kv = int(src.hf.num_attention_heads), int(src.hf.num_key_value_heads or src.hf.num_attention_heads)
    tensors = {t.name: t for t in reader.tensors}
    _, blocks, _ = plan_tensors(src, linear_types(src))
    worst, count = 0.0, 0

    def compare(name: str, ours: torch.Tensor, unpermute: int | None = None) -> None:
        nonlocal worst, count
        t = tensors[name]
        theirs = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        theirs = theirs.reshape(ours.shape)
        if unpermute:
            theirs = unpermute_rows(theirs, unpermute)
        worst = max(worst, float((theirs - ours.float()).abs().max()))
        count += 1

    compare("token_embd.weight", src.embed_weight())
    for i, plan in enumerate(blocks):
        state = src.block_state(i)
        for t in plan:
            heads = None
            if PERMUTES_QK[arch] and t.key.startswith(("self_attn.q_proj.", "self_attn.k_proj.")):
                heads = n_head if "q_proj" in t.key else n_kv
            compare(t.name, state[t.key], heads)
    compare("output_norm.weight", src.store.get(NORM_KEY))
    if "output.weight" in tensors:
        compare("output.weight", src.lm_head_weight())
    return {"reader": f"gguf-py {_version('gguf')} (gguf.quants.dequantize)", "tensors": count,
            "max_abs_weight_diff": worst}


def load_gguf_model(path: Path) -> torch.nn.Module:
    """The GGUF file through transformers' own GGUF loader (dequantized by gguf-py), fp32."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def gguf_loader(file_name: str, device: torch.device):
    """transformers' GGUF loader as an ``export.loaders.Loader`` (dequantized by gguf-py, fp32 on CPU), so the
    verification scores it like every other format's loaders."""
    from frugal_qat.export.loaders import Arg, Loader

    args = (Arg("gguf_file", repr(file_name), lambda: file_name), Arg("dtype", "torch.float32", lambda: torch.float32))
    if device.type == "cuda":
        args += (Arg("device_map", '"cuda"', lambda: "cuda"),)
    return Loader("transformers", "recommended", args, ("gguf",), label="transformers GGUF loader")


def verify_gguf(run_dir: str | Path, path: Path, *, windows: torch.Tensor | None = None, tokens: int = 256,
                device: torch.device | str | None = None) -> dict[str, Any]:
    """Both checks of a GGUF export, as ``verify.verify_export`` makes them for the other formats: ``weights``
    (gguf-py's dequantizer against the run, must be exact, else CorruptCheckpoint: a bug of ours), then the file
    loaded by transformers' GGUF loader scored against frugal-qat's own forward of the run on ``windows`` (default:
    ``tokens`` of the run's calibration windows, ``verify.calibration_windows``) by ``verify.check_loaders``."""
    from frugal_qat.export.verify import TOLERANCE, calibration_windows, check_loaders

    src = ModelSource(run_dir)
    path = Path(path)
    report: dict[str, Any] = {"weights": check_gguf_weights(src, path)}
    diff = report["weights"]["max_abs_weight_diff"]
    if diff != 0.0:
        raise CorruptCheckpoint(f"{path} does not decode to the run's weights (max diff {diff:.3g}); this is a bug "
                                f"in frugal-qat's GGUF exporter, please report it with the run's config.json")
    if windows is None:
        windows = calibration_windows(run_dir, tokens)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                           else "cpu")
    report.update(check_loaders(run_dir, path.parent, "gguf", windows, "float32", device, TOLERANCE,
                                loaders=[gguf_loader(path.name, device)]))
    return report


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


__all__ = ["engine_line", "engine_support", "verify_gguf", "write_gguf"]
