"""compressed-tensors pack-quantized export: decoded bit by bit as the format specifies, identical to what the
compressed-tensors library writes itself, and reloaded through transformers + compressed-tensors."""

import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

from frugal_qat.export import export_run
from frugal_qat.export.verify import check_weights
from frugal_qat.offload.blocks import ModelSource
from frugal_qat.quantizer import unpack_linear
from tests.export import RunCache, bit_value, tree_digest

HAS_CT = importlib.util.find_spec("compressed_tensors") is not None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return RunCache(tmp_path_factory.mktemp("ct-runs"))


def _tensors(out_dir, prefix):
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(out_dir / index[prefix + ".weight_packed"]), "pt") as f:
        return {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}


def _decode_plain(t, bits, group):
    """W[o, i] = (x_q - zp) * s with compressed-tensors' signed integers: stored values minus 2^(b-1).
    weight_packed rows and weight_zero_point columns are the bitstreams."""
    n_out, n_in = t["weight_shape"].tolist()
    packed, zp_words = t["weight_packed"].t().tolist(), t["weight_zero_point"].tolist()
    scale = t["weight_scale"].float()
    g = n_in if group == -1 else group
    offset = 2 ** (bits - 1)
    w = torch.empty(n_out, n_in)
    for o in range(n_out):
        zps = [bit_value(zp_words, grp, o, bits) - offset for grp in range(n_in // g)]
        for i in range(n_in):
            x_q = bit_value(packed, o, i, bits) - offset
            w[o, i] = (x_q - zps[i // g]) * scale[o, i // g]
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, -1])
def test_pack_quantized_decodes_to_the_run_weights(runs, tmp_path, bits, group):
    run = runs(bits, group)
    before = tree_digest(run)
    out = tmp_path / "ct"
    export_run(run, "compressed-tensors", out, verify=False)
    assert tree_digest(run) == before, "the export wrote into the run directory"

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"], qc["ignore"]) == \
        ("compressed-tensors", "pack-quantized", "compressed", ["lm_head"])
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["type"]) == (bits, False, "int")
    assert (weights["strategy"], weights["group_size"]) == (("channel", None) if group == -1 else ("group", group))

    t = _tensors(out, "model.layers.1.self_attn.k_proj")  # [out 32, in 64]
    assert t["weight_packed"].shape == (32, -(-64 * bits // 32)) and t["weight_packed"].dtype == torch.int32
    assert t["weight_zero_point"].shape == (-(-32 * bits // 32), 1 if group == -1 else 64 // group)
    assert t["weight_scale"].dtype == torch.float16 and t["weight_shape"].tolist() == [32, 64]
    ref = ModelSource(run).block_state(1)["self_attn.k_proj.weight"]
    assert torch.equal(_decode_plain(t, bits, group), ref)
    assert check_weights(run, out, "compressed-tensors")["max_abs_weight_diff"] == 0.0


def test_shapes_gptq_refuses_export_exactly(runs, tmp_path):
    # 48 inputs x 3 bits end mid-word: the dense layout pads the last word, and readers use weight_shape.
    run = runs(3, 16, hidden=48, intermediate=96, heads=4, kv_heads=2)
    export_run(run, "compressed-tensors", tmp_path / "ct", verify=False)
    assert _tensors(tmp_path / "ct", "model.layers.0.self_attn.q_proj")["weight_packed"].shape == (48, 5)
    assert check_weights(run, tmp_path / "ct", "compressed-tensors")["max_abs_weight_diff"] == 0.0


@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors not installed")
@pytest.mark.parametrize("bits,group", [(2, 32), (3, -1), (4, 32), (8, 32)])
def test_library_writes_the_same_tensors_and_reads_ours(runs, tmp_path, bits, group):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    run = runs(bits, group)
    out = tmp_path / "ct"
    export_run(run, "compressed-tensors", out, verify=False)
    scheme = QuantizationConfig.model_validate(
        json.loads((out / "config.json").read_text())["quantization_config"]).config_groups["group_0"]

    # compressed-tensors' own compressor, given the dense weight and our scales and (signed) zero points,
    # writes bit-identical tensors.
    name = "mlp.up_proj"
    src = ModelSource(run)
    raw = src.store.block_state(0, dtype=None)
    packed = {k: raw[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
    _, scale, zero = unpack_linear(packed, bits, group, 64, 128)
    dense = src.block_state(0)[f"{name}.weight"]
    theirs = PackedQuantizationCompressor.compress(
        {"weight": dense.half(), "weight_scale": scale.half(),
         "weight_zero_point": (zero - 2 ** (bits - 1)).to(torch.int8)},
        scheme)
    ours = _tensors(out, f"model.layers.0.{name}")
    assert set(theirs) == set(ours)
    for key in ours:
        assert theirs[key].dtype == ours[key].dtype and torch.equal(theirs[key], ours[key]), key

    # And its decompressor reads our files back to the run's weights (it computes in fp16).
    back = PackedQuantizationCompressor.decompress(dict(ours), scheme)["weight"]
    assert torch.allclose(back.float(), dense, rtol=2**-10, atol=1e-6)


@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors not installed")
def test_transformers_loads_the_export_and_agrees(runs, tmp_path):
    report = export_run(runs(3, 32), "compressed-tensors", tmp_path / "ct")
    defaults, recommended = report["verify"]["loaders"]
    # transformers' default (keep-compressed) path fails on every asymmetric pack-quantized file: reported with
    # the cause and the call that works, not raised.
    assert (defaults["settings"], defaults["status"]) == ("defaults", "fails")
    assert "compressed-tensors" in recommended["versions"] and recommended["status"] == "ok"
    assert "dequantize=True" in recommended["call"] and recommended["compute_dtype"] == "float32"
    assert abs(recommended["rel_diff"]) < 1e-3 and recommended["max_abs_logit_diff"] < 0.01  # fp16 decompression
    [warning] = report["verify"]["warnings"]
    assert "weight_zero_point" in warning and warning.endswith(recommended["call"])
    assert report["verify"]["reproduce"] == [recommended["call"]]
    readme = (tmp_path / "ct" / "README.md").read_text()
    assert recommended["call"].replace("PATH", '"PATH/TO/THIS/FOLDER"') in readme and "**fails**" in readme
