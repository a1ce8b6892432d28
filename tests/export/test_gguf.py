"""GGUF export: every tensor decodes (gguf-py) to the run's weights exactly, for plain runs (legacy types) and runs
trained in a GGUF grid (bytes copied); transformers' GGUF loader gives frugal-qat's perplexity; refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import frugal_qat.export
from frugal_qat.arch import block_prefix
from frugal_qat.errors import ConfigError
from frugal_qat.export import export_run
from frugal_qat.export.gguf import (
    check_gguf_weights,
    permute_rows,
    unpermute_rows,
    verify_gguf,
    write_gguf,
)
from frugal_qat.offload.blocks import ModelSource
from frugal_qat.quantizer import kquant
from tests.conftest import save_tiny_model
from tests.export import make_run, tree_digest

gguf = pytest.importorskip("gguf")

# k-quant rows need in_features % 256 == 0: hidden and intermediate 256 (head_dim 64: 4 heads, 2 kv heads), one
# block (the grid initialisation of a 256-wide model dominates these tests' time);
# the legacy types run on conftest's default tiny model (hidden 64, intermediate 128: multiples of 32)
WIDE = {"hidden": 256, "intermediate": 256, "heads": 4, "kv_heads": 2, "layers": 1}
GGUF_FILE = "model.gguf"


def _widths(gguf_type: str) -> dict:
    return WIDE if gguf_type in kquant.K_QUANTS else {}


def make_grid_run(root: Path, gguf_type: str, **model_kwargs) -> Path:
    """A finished Block-AP run in a GGUF grid (``--epochs 0``: the imatrix-weighted grid initialisation) of a tiny
    model."""
    from frugal_qat.block_ap.run import run_block_ap
    from frugal_qat.config import resolve

    model = save_tiny_model(root / "model", **model_kwargs)
    cfg = resolve(None, {"quant.gguf": gguf_type, "data.train_size": 4, "data.val_size": 0, "data.seqlen": 16,
                         "block_ap.epochs": 0, "offload.device": "cpu"})
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    run_block_ap(model, root / "run", cfg, windows=windows, show_progress=False)
    return root / "run"


def _gguf_tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


@pytest.fixture(scope="module")
def grid_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-grid-runs")
    cache = {}

    def get(gguf_type: str, **model_kwargs) -> Path:
        key = (gguf_type, tuple(sorted(model_kwargs.items())))
        if key not in cache:
            cache[key] = make_grid_run(root / f"{gguf_type}-{len(cache)}", gguf_type, **model_kwargs)
        return cache[key]

    return get


# ---- runs trained in a GGUF grid: the bytes are the run's --------------------------------------------------------


@pytest.mark.parametrize("gguf_type", list(kquant.TYPES))
def test_grid_run_is_copied_byte_for_byte(grid_runs, tmp_path, gguf_type):
    run = grid_runs(gguf_type, **_widths(gguf_type))
    src = ModelSource(run)
    details = write_gguf(src, tmp_path / GGUF_FILE)
    assert set(details["gguf_types"].values()) == {gguf_type} and details["fallbacks"] == {}
    assert details["bits_per_weight"] == kquant.TYPES[gguf_type].bits_per_weight
    tensors = _gguf_tensors(tmp_path / GGUF_FILE)
    last = src.n_layers - 1
    raw = src.store.block_state(last, dtype=None)
    for hf, name, heads in (("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2),
                            ("mlp.down_proj", "ffn_down", None)):
        t = tensors[f"blk.{last}.{name}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType(kquant.TYPES[gguf_type].ggml_id)
        ours = raw[f"{hf}.ggml"]
        expected = permute_rows(ours, heads) if heads else ours  # q/k rows move whole, blocks and all
        assert torch.equal(torch.from_numpy(t.data.copy()).reshape(expected.shape), expected)
    assert check_gguf_weights(src, tmp_path / GGUF_FILE)["max_abs_weight_diff"] == 0.0


@pytest.mark.parametrize("gguf_type", ["q4_k", "q3_k", "q2_k"])
def test_transformers_loads_the_gguf_with_frugal_qat_perplexity(grid_runs, tmp_path, gguf_type):
    run = grid_runs(gguf_type, **WIDE)
    v = verify_gguf(run, _written(run, tmp_path), tokens=64)
    assert v["weights"]["max_abs_weight_diff"] == 0.0 and v["weights"]["tensors"] == 9 + 3
    (res,) = v["loaders"]
    assert res["status"] == "ok" and res["loader"] == "transformers GGUF loader (recommended)"
    assert abs(res["rel_diff"]) < 0.005  # the issue's bar; measured: equal
    assert res["max_abs_logit_diff"] < 1e-3 and v["warnings"] == []


def test_k_quant_falls_back_per_tensor_on_narrow_rows(grid_runs, tmp_path):
    run = grid_runs("q4_k", hidden=64, intermediate=256)  # in_features 64 (q/k/v/o, gate, up) and 256 (down)
    details = write_gguf(ModelSource(run), tmp_path / GGUF_FILE)
    assert details["gguf_types"]["mlp.down_proj"] == "q4_k"
    assert details["fallbacks"] == {name: "q4_1" for name in details["gguf_types"] if name != "mlp.down_proj"}
    tensors = _gguf_tensors(tmp_path / GGUF_FILE)
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_K
    assert check_gguf_weights(ModelSource(run), tmp_path / GGUF_FILE)["max_abs_weight_diff"] == 0.0


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_families(grid_runs, tmp_path, arch):
    run = grid_runs("q4_0", arch=arch)
    v = verify_gguf(run, _written(run, tmp_path), tokens=32)
    assert v["weights"]["max_abs_weight_diff"] == 0.0
    assert v["loaders"][0]["max_abs_logit_diff"] < 1e-3
    reader = gguf.GGUFReader(str(tmp_path / GGUF_FILE))
    assert reader.fields["general.architecture"].contents() == ("qwen2" if arch == "qwen2" else "llama")
    if arch == "qwen2":  # q/k/v biases as F32, rows not permuted
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias"} <= {t.name for t in reader.tensors}


def _written(run: Path, tmp_path: Path) -> Path:
    write_gguf(ModelSource(run), tmp_path / GGUF_FILE)
    return tmp_path / GGUF_FILE


# ---- plain runs: the legacy type that holds the grid -------------------------------------------------------------


@pytest.mark.parametrize("bits,expected", [(2, "q4_0"), (4, "q5_0")])
def test_plain_run_in_its_exact_legacy_type(tmp_path, bits, expected):
    run = make_run(tmp_path / "r", bits, 32, tie=True)
    report = export_run(run, "gguf", tmp_path / "out" / "tiny.gguf", verify_tokens=64)
    assert set(report["gguf_types"].values()) == {expected}
    v = report["verify"]
    assert v["weights"]["max_abs_weight_diff"] == 0.0
    assert abs(v["loaders"][0]["rel_diff"]) < 0.005
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "out" / "tiny.gguf")).tensors}
    assert "output.weight" not in names  # tied: llama.cpp and transformers reuse token_embd
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny.frugal_qat_export.json", "tiny.gguf"]


def test_plain_run_refused_with_the_reason_before_writing(tmp_path):
    run = make_run(tmp_path / "r", 4, 16)
    with pytest.raises(ConfigError, match="group size 16 .*not a multiple of 32.*--gguf"):
        export_run(run, "gguf", tmp_path / "out.gguf", verify=False)
    assert not any(tmp_path.glob("*.gguf*")) and not any(tmp_path.glob(".*partial"))


def test_eight_bit_run_refused_when_codes_leave_q8_0(tmp_path):
    run = make_run(tmp_path / "r", 8, 32)
    with pytest.raises(ConfigError, match=r"q - z outside \[-128, 127\]"):
        write_gguf(ModelSource(run), tmp_path / GGUF_FILE)
    assert not any(tmp_path.glob("*.gguf*"))


# ---- metadata ----------------------------------------------------------------------------------------------------


def test_metadata_and_tokenizer(grid_runs, tmp_path):
    run = grid_runs("q3_k", **WIDE)
    reader = gguf.GGUFReader(str(_written(run, tmp_path)))

    def field(key):
        return reader.fields[key].contents()

    assert field("llama.block_count") == 1 and field("llama.embedding_length") == 256
    assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
    assert field("llama.rope.dimension_count") == 64 and field("general.file_type") == 11  # MOSTLY_Q3_K_S
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "default"
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == 128 and len(types) == 128
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run)
    for special in ("<unk>", "<s>", "</s>"):
        assert types[tok.convert_tokens_to_ids(special)] == gguf.TokenType.CONTROL
    assert field("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert len(field("tokenizer.ggml.merges")) > 0


def test_permutation_is_llama_cpps():
    """Row r of head h: llama.cpp's converter puts rows [0, d/2) and [d/2, d) of each head interleaved."""
    x = torch.arange(8).unsqueeze(1)  # 2 heads of 4 rows
    assert permute_rows(x, 2).squeeze(1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    y = torch.randn(24, 5)
    assert torch.equal(unpermute_rows(permute_rows(y, 3), 3), y)
    assert block_prefix(0) == "model.layers.0."


# ---- the CLI contract: --out FILE.gguf, atomic, a re-run is a no-op ----------------------------------------------


def test_one_file_export_is_atomic_and_a_rerun_is_a_no_op(grid_runs, tmp_path, monkeypatch):
    run = grid_runs("q4_0")
    out = tmp_path / "exports" / "tiny-q4_0.gguf"
    first = export_run(run, "gguf", out, verify=False)
    assert first["files"] == ["tiny-q4_0.gguf", "tiny-q4_0.frugal_qat_export.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(first["files"])  # no staging folder left
    before = tree_digest(out.parent)
    assert export_run(run, "gguf", out, verify=False) == {**first, "already_complete": True}
    assert tree_digest(out.parent) == before

    with pytest.raises(ConfigError, match="writes one file: pass --out FILE.gguf"):
        export_run(run, "gguf", tmp_path / "folder", verify=False)
    with pytest.raises(ConfigError, match=r"holds another export \(verify_windows_sha256"):
        export_run(run, "gguf", out, verify_tokens=16)
    (tmp_path / "foreign.gguf").write_bytes(b"GGUF, someone else's")
    with pytest.raises(ConfigError, match="is not a frugal-qat export"):
        export_run(run, "gguf", tmp_path / "foreign.gguf", verify=False)
    assert (tmp_path / "foreign.gguf").read_bytes() == b"GGUF, someone else's"

    # Killed at each step of the commit: before the report, between the report and the rename (the commit point),
    # after the rename; each time the same command finishes the export, equal byte for byte.
    for point in ("export_commit", "export_rename", "export_cleanup"):
        target = tmp_path / point / "tiny-q4_0.gguf"

        def kill(name, point=point):
            if name == point:
                raise KeyboardInterrupt(name)

        monkeypatch.setattr(frugal_qat.export, "kill_point", kill)
        with pytest.raises(KeyboardInterrupt):
            export_run(run, "gguf", target, verify=False)
        assert target.exists() == (point == "export_cleanup")
        monkeypatch.undo()
        again = export_run(run, "gguf", target, verify=False)
        assert again.get("already_complete", False) == (point == "export_cleanup")
        assert target.read_bytes() == out.read_bytes()
        assert sorted(p.name for p in target.parent.iterdir()) == sorted(first["files"])
