"""Block-AP end to end on a tiny random model, in process."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from frugal_qat.block_ap.run import open_run_stream, run_block_ap
from frugal_qat.config import resolve
from frugal_qat.eval.ppl import perplexity, run_blocks
from frugal_qat.offload.activations import new_stream
from frugal_qat.offload.blocks import ModelSource


def _cfg(**over):
    base = {"quant.wbits": 2, "quant.group_size": 32, "data.train_size": 8, "data.val_size": 4, "data.seqlen": 32,
            "block_ap.epochs": 2, "block_ap.batch_size": 2, "block_ap.quant_lr": 5e-3, "block_ap.weight_lr": 1e-3,
            "offload.device": "cpu", "offload.chunk_mb": 1}
    base.update(over)
    return resolve(None, base)


def _windows(n=12, L=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, L), generator=g)


def test_block_ap_beats_rtn_and_reloads_exactly(tiny_llama, tmp_path):
    cfg = _cfg()
    windows = _windows()
    summary = run_block_ap(tiny_llama, tmp_path / "run", cfg, windows, keep_work=True, show_progress=False)
    for blk in summary["blocks"]:
        rtn_mse, trained = blk["val_mse"][0], blk["val_mse"][-1]
        assert trained < rtn_mse * 0.95, f"block {blk['block']}: Block-AP {trained} vs RTN {rtn_mse}"

    # The reloaded run, fed the calibration embeddings, reproduces the quant stream bit for bit: what was
    # trained, frozen and propagated is exactly what the packed files compute.
    run = tmp_path / "run"
    src = ModelSource(run)
    qs = open_run_stream(run, "quant")
    scratch = new_stream(tmp_path / "scratch.bin", (12, 32, 64), chunk_mb=0.01)
    scratch.write(0, src.embed_weight()[windows].half())
    run_blocks(src, scratch, torch.device("cpu"), batch_size=2, show=False)
    assert torch.equal(scratch.read(0, 12), qs.read(0, 12))

    # On held-out tokens too, the last hidden state is closer to the full-precision model's than RTN's is.
    rtn = run_block_ap(tiny_llama, tmp_path / "rtn", _cfg(**{"block_ap.epochs": 0}), windows, show_progress=False)
    assert len(rtn["blocks"][0]["val_mse"]) == 1, "RTN trains nothing: only the starting MSE is recorded"
    held_out = _windows(6, 32, seed=1)

    def last_hidden(model_dir):
        src = ModelSource(model_dir)
        st = new_stream(tmp_path / f"h-{model_dir.name}.bin", (6, 32, 64), chunk_mb=0.01, dtype=torch.float32)
        st.write(0, src.embed_weight()[held_out].float())
        run_blocks(src, st, torch.device("cpu"), batch_size=2, show=False)
        return st.read(0, 6)

    ref = last_hidden(tiny_llama)
    err_ap = (last_hidden(run) - ref).pow(2).mean()
    err_rtn = (last_hidden(tmp_path / "rtn") - ref).pow(2).mean()
    assert err_ap < 0.9 * err_rtn


def test_streamed_perplexity_equals_transformers(tiny_llama):
    windows = _windows(5, 32, seed=3)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        loss = model(windows, labels=windows).loss.item()  # mean over all predicted tokens of the batch
    ours = perplexity(tiny_llama, windows, batch_size=2, show_progress=False)
    assert ours["tokens"] == 5 * 31
    assert ours["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_run_directory_layout(tiny_llama, tmp_path):
    run_block_ap(tiny_llama, tmp_path / "run", _cfg(**{"block_ap.epochs": 0}), _windows(), show_progress=False)
    run = tmp_path / "run"
    assert not (run / "work").exists(), "a finished run keeps no streams"
    import json

    cfg = json.loads((run / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 2 and cfg["quantization_config"]["group_size"] == 32
    idx = json.loads((run / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.down_proj.qweight" in idx and "model.embed_tokens.weight" in idx
    from safetensors.torch import load_file

    blk = load_file(run / "blocks" / "block_00000.safetensors")
    assert blk["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    assert blk["model.layers.0.self_attn.q_proj.qweight"].shape == (64 * 2 // 32, 64)
    assert blk["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16
    assert (run / "tokenizer.json").is_file() and (run / "summary.json").is_file()


def test_scales_stay_positive_at_a_reckless_quant_lr(tiny_llama, tmp_path):
    # A quant lr this large drives step sizes through zero within a few steps; each is clamped back to the
    # initial lower bound after every step, so the run finishes and every saved scale is positive.
    from safetensors.torch import load_file

    from frugal_qat.quantizer.primitives import SCALE_MIN

    cfg = _cfg(**{"quant.wbits": 4, "block_ap.quant_lr": 0.5, "block_ap.weight_lr": 0.0})
    run_block_ap(tiny_llama, tmp_path / "run", cfg, _windows(), show_progress=False)
    scales = [t for f in sorted((tmp_path / "run" / "blocks").iterdir())
              for k, t in load_file(f).items() if k.endswith(".scales")]
    low = min(t.float().min().item() for t in scales)
    assert low > 0 and low == pytest.approx(SCALE_MIN, rel=1e-2), "some scales were pushed to the bound and held"
