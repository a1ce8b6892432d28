"""The planner's formulas: exact parameter counts, the paper's 70B recipe on 80 GiB, streams, disk, fixes, and the
activation formulas checked against what torch really keeps alive for a decoder layer on CPU."""

import dataclasses
import json

import pytest
import torch

from frugal_qat.errors import ConfigError, UnsupportedModel
from frugal_qat.planner import (
    PlanSettings,
    find_fixes,
    format_plan,
    list_known_models,
    load_model_config,
    model_shape,
    packed_model_bytes,
    parse_bytes,
    plan,
    plan_to_json,
    saved_bytes_per_token,
)
from frugal_qat.planner.estimate import PROFILES, GiB, Term, _peak

W2G64 = dict(wbits=2, group_size=64)


def term(terms, name):
    (t,) = [t for t in terms if t.name == name]
    return t


# ---- shapes and configs ---------------------------------------------------------------------------------------


def test_llama2_70b_block_params_are_exact():
    shape = model_shape(load_model_config("llama-2-70b"))
    # q, o: 8192^2; k, v: 8192 x 1024; gate, up, down: 8192 x 28672
    assert shape.block_linear_params == 855_638_016
    assert shape.block_params == 855_638_016 + 2 * 8192  # + the two RMSNorm weights
    assert shape.total_params == 80 * shape.block_params + 2 * 32000 * 8192 + 8192 == 68_976_648_192
    assert shape.block_groups(64) == 855_638_016 // 64


# Published sizes (billions of parameters) of the shipped configs.
KNOWN_SIZES = {
    "llama-2-7b": 6.738, "llama-2-13b": 13.016, "llama-2-70b": 68.977, "llama-3-8b": 8.030,
    "llama-3-70b": 70.554, "mistral-large-instruct-2407": 122.61, "qwen2.5-72b": 72.706, "smollm2-135m": 0.1345,
    "qwen3-32b": 32.762, "gemma-3-27b": 27.009,  # Gemma 3 27B: its language model (the vision tower is not planned)
}


@pytest.mark.parametrize("name", sorted(KNOWN_SIZES))
def test_every_shipped_config_loads_and_plans(name):
    assert name in list_known_models()
    config = load_model_config(name)
    shape = model_shape(config)
    assert shape.total_params / 1e9 == pytest.approx(KNOWN_SIZES[name], rel=0.005)
    p = plan(config, PlanSettings(**W2G64, device="cpu" if name == "smollm2-135m" else "cuda"))
    assert [ph.phase for ph in p.phases] == ["block_ap", "e2e_qp", "ppl_eval"]
    for ph in p.phases:
        assert ph.device_peak > 0 and ph.host_peak > 0 and ph.disk_total > 0 and ph.seconds > 0
    json.dumps(plan_to_json(p))  # plain JSON types only
    assert name in format_plan(p)


def test_shipped_list_matches_the_issue():
    assert set(KNOWN_SIZES) == set(list_known_models())


def test_load_model_config_from_dir_and_file_and_bad_name(tmp_path):
    cfg = load_model_config("smollm2-135m")
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "_name_or_path"}))
    from_dir = load_model_config(tmp_path)
    from_file = load_model_config(tmp_path / "config.json")
    assert model_shape(from_dir) == dataclasses.replace(model_shape(cfg), name=str(tmp_path))
    assert model_shape(from_file).hidden == 576
    with pytest.raises(ConfigError, match="did you mean llama-2-70b"):
        load_model_config("llama-2-70")


def test_qwen2_has_qkv_biases_and_unknown_types_are_refused():
    shape = model_shape(load_model_config("qwen2.5-72b"))
    assert [lin.bias for lin in shape.linears] == [True, True, True, False, False, False, False]
    assert shape.block_params == shape.block_linear_params + 8192 + 2 * 1024 + 2 * 8192
    with pytest.raises(UnsupportedModel, match="gpt2"):
        model_shape({"model_type": "gpt2", "hidden_size": 8})


def test_group_size_must_divide_every_layer():
    with pytest.raises(ConfigError, match="group size 128 does not divide in_features 576"):
        plan(load_model_config("smollm2-135m"), PlanSettings(wbits=4, group_size=128))


def test_settings_are_validated_with_the_values_seen():
    with pytest.raises(ConfigError, match=r"wbits=5.*device='tpu'"):
        PlanSettings(wbits=5, group_size=64, device="tpu")
    assert PlanSettings(**W2G64, gpu_mem="40GiB", cpu_mem="64GB").cpu_mem == 64 * 10**9


@pytest.mark.parametrize("text, expected", [
    ("80GiB", 80 * 2**30), ("64GB", 64 * 10**9), ("500MiB", 500 * 2**20), ("1.5 TB", 1_500_000_000_000),
    ("4096", 4096), ("2g", 2 * 2**30), (123, 123), ("0.5KiB", 512),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["80 GX", "", "GiB", "-5GB", "1e3GB"])
def test_parse_bytes_rejects_with_an_example(bad):
    with pytest.raises(ValueError, match="e.g. 80GiB"):
        parse_bytes(bad)


# ---- the 70B claim --------------------------------------------------------------------------------------------


def test_llama2_70b_w2g64_paper_recipe_fits_80gib_in_both_phases():
    s = PlanSettings(**W2G64, gpu_mem="80GiB")
    p = plan(load_model_config("llama-2-70b"), s)
    assert p.verdict == "fits" and p.fits and p.fixes == []
    bap, e2e = p.phase("block_ap"), p.phase("e2e_qp")
    P = 855_654_400
    assert term(bap.device_terms, "block fp32 master weights").bytes == 4 * P
    assert term(bap.device_terms, "AdamW exp_avg + exp_avg_sq").bytes == 8 * P
    # plausible: one block's fp32 training state is ~14 GB; the whole Block-AP stays far under 80 GiB
    assert 15 * GiB < bap.device_peak < 40 * GiB
    # E2E holds every packed weight (2 bits: ~16 GiB) plus the checkpointed bf16 activations of 80 blocks
    assert 16 * GiB < term(e2e.device_terms, "packed weights, zeros, g_idx (int32)").bytes < 17 * GiB
    assert term(e2e.device_terms, "checkpointed block inputs").bytes == 80 * 4 * 4096 * 8192 * 2
    assert 40 * GiB < e2e.device_peak < 80 * GiB
    # the packed model: 2 bits/weight + fp16 scales per 64 weights + 16-bit embeddings/lm_head
    assert 18 * GiB < packed_model_bytes(p.shape, 2, 64) < 21 * GiB
    # host RAM independent of the sample count: far from the reference's ~400 GB
    assert bap.host_peak < 40 * GiB
    assert plan(load_model_config("llama-2-70b"), dataclasses.replace(s, train_size=8192)).phase(
        "block_ap").host_peak == bap.host_peak
    # a run of this size takes days, not minutes or months
    assert 10 * 3600 < bap.seconds < 100 * 3600 and bap.blocks == 80


def test_reference_needs_about_400_gb_of_host_ram_for_70b():
    p = plan(load_model_config("llama-2-70b"), PlanSettings(**W2G64))
    ref = sum(t.bytes for t in p.reference_terms)
    stream = (4096 + 64) * 2048 * 8192 * 2
    assert ref == 2 * stream + 2 * p.shape.total_params
    assert 380e9 < ref < 430e9
    assert "reference implementation" in format_plan(p) and f"{ref / 1e9:.0f} GB" in format_plan(p)


# ---- streams, disk, time ------------------------------------------------------------------------------------


def test_llama2_7b_streams_are_64_gib_each():
    config = load_model_config("llama-2-7b")
    disk = plan(config, PlanSettings(**W2G64, val_size=0), ("block_ap",)).phases[0].disk_terms
    assert term(disk, "fp stream (teacher activations)").bytes == 64 * GiB
    assert term(disk, "quant stream").bytes == 64 * GiB
    disk = plan(config, PlanSettings(**W2G64), ("block_ap",)).phases[0].disk_terms
    assert term(disk, "quant stream").bytes == 4160 * 2048 * 4096 * 2


def test_smollm2_disk_plan_and_disk_verdict():
    config = load_model_config("smollm2-135m")
    s = PlanSettings(wbits=4, group_size=64, device="cpu", seqlen=256, train_size=32, val_size=8, chunk_mb=64)
    bap = plan(config, s, ("block_ap",)).phases[0]
    stream = 40 * 256 * 576 * 2
    assert term(bap.disk_terms, "fp stream (teacher activations)").bytes == stream
    assert term(bap.disk_terms, "spare chunk of each stream").bytes == 2 * stream  # chunk capped at the stream
    # packed blocks by hand: qweight in*out/2 bytes, fp16 scales and 4-bit zeros per 64 inputs, int32 g_idx
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    block = sum(i * o // 2 + (i // 64) * o * 2 + (i // 64) * o // 2 + 4 * i for i, o in shapes) + 2 * 576 * 2
    assert term(bap.disk_terms, "packed output model").bytes == 30 * block + (49152 * 576 + 576) * 2
    total = bap.disk_total
    tight = plan(config, dataclasses.replace(s, disk_free=total - 1), ("block_ap",))
    assert not tight.fits and "disk" in tight.verdict
    assert plan(config, dataclasses.replace(s, disk_free=total), ("block_ap",)).fits


def test_rtn_has_no_training_terms_and_epochs_drive_the_time():
    config = load_model_config("llama-2-7b")
    rtn = plan(config, PlanSettings(**W2G64, epochs=0), ("block_ap",)).phases[0]
    assert not any("AdamW" in t.name or "grads" in t.name for t in rtn.device_terms)
    one, two = (plan(config, PlanSettings(**W2G64, epochs=e), ("block_ap",)).phases[0] for e in (1, 2))
    assert rtn.compute_seconds < one.compute_seconds < two.compute_seconds < 2 * one.compute_seconds
    assert two.io_bytes_per_block > one.io_bytes_per_block > rtn.io_bytes_per_block


def test_peak_takes_the_largest_stage():
    terms = [Term("a", 10, ""), Term("b", 5, "", "x"), Term("c", 7, "", "y"), Term("d", 4, "", "y")]
    assert _peak(terms) == 10 + 11


def test_cpu_device_counts_compute_terms_in_ram():
    config = load_model_config("smollm2-135m")
    ph = plan(config, PlanSettings(**W2G64, device="cpu", seqlen=512), ("block_ap",)).phases[0]
    assert ph.host_peak < ph.ram_peak <= ph.host_peak + ph.device_peak
    assert not any("CUDA" in t.name for t in ph.device_terms)


# ---- fixes ------------------------------------------------------------------------------------------------------


def test_fixes_are_proposed_and_each_one_fits():
    config = load_model_config("llama-2-7b")
    s = PlanSettings(**W2G64, gpu_mem="10GiB", cpu_mem="512GiB")
    p = plan(config, s)
    assert not p.fits and "E2E-QP: GPU peak" in p.verdict
    fixes = find_fixes(config, s)
    assert [text for _, text in fixes] == p.fixes and fixes
    for fixed, text in fixes:
        assert plan(config, fixed).fits, text
    # the mildest fix keeps the global batch: 4 x 8 becomes 2 x 16
    first, text = fixes[0]
    assert (first.e2e_batch_size, first.grad_accum) == (2, 16) and "same results" in text


def test_fixes_combine_phases_when_no_single_knob_suffices():
    config = load_model_config("llama-2-7b")
    s = PlanSettings(**W2G64, gpu_mem="6GiB")
    fixes = find_fixes(config, s)
    assert fixes
    for fixed, _ in fixes:
        assert plan(config, fixed).fits and fixed.device == "cuda"


def test_hopeless_gpu_suggests_the_cpu_only_when_ram_is_known():
    config = load_model_config("llama-2-70b")
    assert find_fixes(config, PlanSettings(**W2G64, gpu_mem="1GiB")) == []
    fixes = find_fixes(config, PlanSettings(**W2G64, gpu_mem="1GiB", cpu_mem="2TiB"))
    assert [f.device for f, _ in fixes] == ["cpu"]


# ---- the activation formulas against torch --------------------------------------------------------------------


def _tiny(H=256, I=768, nh=4, nkv=2):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=H, intermediate_size=I, num_attention_heads=nh, num_key_value_heads=nkv,
                      num_hidden_layers=1, vocab_size=128)
    cfg._attn_implementation = "sdpa"
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
              "intermediate_size": I, "num_attention_heads": nh, "num_key_value_heads": nkv, "num_hidden_layers": 1,
              "vocab_size": 128}
    return LlamaDecoderLayer(cfg, 0), LlamaRotaryEmbedding(cfg), config


def test_saved_activations_match_autograd_on_cpu():
    layer, rot, config = _tiny()
    b, L = 2, 128
    x = torch.randn(b, L, 256)
    cos_sin = rot(x, torch.arange(L)[None])
    own = {t.untyped_storage().data_ptr() for t in [x, *cos_sin, *layer.parameters()]}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, position_embeddings=cos_sin)
    predicted = b * L * saved_bytes_per_token(model_shape(config), PROFILES[("block_ap", "cpu")])
    assert sum(saved.values()) == pytest.approx(predicted, rel=0.02)


@pytest.mark.parametrize("phase", ["block_ap", "e2e_qp"])
def test_saved_activations_match_autograd_under_the_cuda_policy(phase):
    """The CUDA profiles, counted on fake tensors under the CUDA policy forced on the CPU: Block-AP's fake-quantized
    block on an fp32 residual under bf16 autocast, E2E-QP's packed bf16 block with an input that requires grad."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from frugal_qat.arch import BlockRunner, arch_for, build_block, hf_config
    from frugal_qat.block_ap.train_block import wrap_linears
    from frugal_qat.precision import resolve
    from frugal_qat.quantizer.packed import PackedLinear
    from frugal_qat.quantizer.packing import packed_rows

    config = _tiny()[2]
    arch, hf, prec = arch_for(config), hf_config(config), resolve("cpu", policy="cuda")
    b, L, H = 3, 40, 256  # 120 tokens: no activation has a weight's shape
    with FakeTensorMode():
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in arch.layer_cls(hf, layer_idx=0).state_dict().items()}
        if phase == "block_ap":
            block = build_block(hf, arch, 0, {k: torch.empty(v) for k, v in shapes.items()})
            wrap_linears(block, 2, 32, "layers.0")
            x, ctx = torch.empty(b, L, H), prec.train("cpu")
        else:
            block = build_block(hf, arch, 0, {k: torch.empty(v) for k, v in shapes.items()}, dtype=torch.bfloat16)
            for name in arch.linears:
                K, N = block.get_submodule(name).in_features, block.get_submodule(name).out_features
                packed = {"qweight": torch.empty(packed_rows(K, 2), N, dtype=torch.int32),
                          "qzeros": torch.empty(K // 32, packed_rows(N, 2), dtype=torch.int32),
                          "scales": torch.empty(K // 32, N, dtype=torch.float16)}
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent), child, PackedLinear.from_packed(packed, 2, 32, K, N))
            for p in block.parameters():
                p.requires_grad_(p.dtype == torch.float32)  # only the scales train
            x, ctx = torch.empty(b, L, H, dtype=torch.bfloat16, requires_grad=True), prec.e2e("cpu")
        weights = {tuple(m.weight.shape) for m in block.modules() if getattr(m, "weight", None) is not None}
        weights |= {s[::-1] for s in weights}
        own = {t.untyped_storage()._cdata for t in [x, *block.parameters(), *block.buffers()]}
        saved = {}

        def pack(t):
            key = t.untyped_storage()._cdata
            # per-token tensors only: not the block's own, not the 16-bit weight copies, not RoPE's cos/sin
            if key not in own and tuple(t.shape) not in weights and tuple(t.shape[:2]) != (1, 1):
                saved[key] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            BlockRunner(hf, arch, "cpu")(block, 0, x)
    predicted = b * L * saved_bytes_per_token(model_shape(config), PROFILES[(phase, "cuda")])
    assert sum(saved.values()) == predicted
