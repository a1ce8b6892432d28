"""E2E-QP on a run trained in a GGUF grid: the packed model over ggml blocks equals the dequantized run; only the
grid's scales train (codes and zero points frozen), in the grid, and the new run's blocks are exact ggml blocks that
the GGUF export copies; a stopped run resumes bit-identical."""

import pytest
import torch
from safetensors.torch import load_file

from frugal_qat.block_ap.run import run_block_ap
from frugal_qat.checkpoint.chaos import result_files
from frugal_qat.config import resolve
from frugal_qat.e2e_qp.run import build_packed_model, chunked_lm_loss, named_scales, run_e2e_qp
from frugal_qat.errors import Interrupted
from frugal_qat.eval.ppl import perplexity
from frugal_qat.export import export_run
from frugal_qat.quantizer import kquant
from frugal_qat.quantizer.kquant import GGUFPackedLinear
from tests.conftest import save_tiny_model

DOWN = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-gguf")
    model = save_tiny_model(root / "model", layers=2, hidden=64, intermediate=256)
    cfg = resolve(None, {"quant.gguf": "q2_k", "data.train_size": 4, "data.val_size": 0, "data.seqlen": 32,
                         "block_ap.epochs": 0, "offload.device": "cpu"})
    windows = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    run_block_ap(model, root / "run", cfg, windows, show_progress=False)
    return root, root / "run"


def _cfg(**over):
    base = {"e2e_qp.seqlen": 32, "e2e_qp.train_size": 8, "e2e_qp.batch_size": 2, "e2e_qp.grad_accum": 1,
            "e2e_qp.lr": 1e-3, "e2e_qp.ckpt_every_steps": 1, "e2e_qp.logits_chunk": 16, "offload.device": "cpu"}
    base.update(over)
    return resolve(None, base)


def _data():
    base = torch.randint(0, 16, (8, 32), generator=torch.Generator().manual_seed(3))  # few distinct tokens
    return base, base


def test_packed_grid_model_matches_the_dequantized_run_and_trains_only_grid_scales(grid_run):
    _, run = grid_run
    model, _ = build_packed_model(run, torch.device("cpu"))
    down = model.get_submodule(DOWN)
    assert isinstance(down, GGUFPackedLinear) and down.gguf_type == "q2_k"
    assert model.get_submodule("model.layers.0.self_attn.q_proj").gguf_type == "q4_0"  # 64-wide rows: fallback
    scales = named_scales(model)
    assert {n.rsplit(".", 1)[1] for n in scales if n.startswith(DOWN)} == {"super_scale", "scale", "super_min"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(scales)
    ids = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss_sum, count = chunked_lm_loss(model, ids, ids, chunk=20)
    ref = perplexity(run, ids, batch_size=3, show_progress=False)
    assert (loss_sum / count).item() == pytest.approx(ref["nll"], rel=1e-5)


def test_e2e_trains_the_grid_in_the_grid_resumes_exactly_and_exports_bit_exact(grid_run):
    root, run = grid_run
    summary = run_e2e_qp(run, root / "e2e", _cfg(), _data(), device=torch.device("cpu"), show_progress=False)
    losses = summary["losses"]
    assert len(losses) == 4 and min(losses[-2:]) < losses[0]
    t = kquant.TYPES["q2_k"]
    old = load_file(run / "blocks" / "block_00000.safetensors")[f"{DOWN}.ggml"]
    new = load_file(root / "e2e" / "blocks" / "block_00000.safetensors")[f"{DOWN}.ggml"]
    (c_old, g_old), (c_new, g_new) = kquant.unpack(old, t, 256), kquant.unpack(new, t, 256)
    assert torch.equal(c_old, c_new), "codes stay frozen"
    assert not torch.equal(g_old.d, g_new.d) or not torch.equal(g_old.k, g_new.k), "the grid's scales trained"
    assert perplexity(root / "e2e", _data()[0], show_progress=False)["ppl"] < perplexity(
        run, _data()[0], show_progress=False)["ppl"]

    # Stopped after step 2 (at its checkpoint), then the same call: bit-identical to the uninterrupted run.
    steps = iter(range(100))
    with pytest.raises(Interrupted):
        run_e2e_qp(run, root / "e2e-stopped", _cfg(), _data(), device=torch.device("cpu"), show_progress=False,
                   should_stop=lambda: next(steps) >= 2)
    run_e2e_qp(run, root / "e2e-stopped", _cfg(), _data(), device=torch.device("cpu"), show_progress=False)
    assert result_files(root / "e2e-stopped") == result_files(root / "e2e")

    # The GGUF holds exactly what E2E-QP trained: gguf-py decodes it to the run's weights, and transformers' GGUF
    # loader gives frugal-qat's perplexity.
    report = export_run(root / "e2e", "gguf", root / "e2e.gguf", verify_tokens=64)
    assert report["verify"]["weights"]["max_abs_weight_diff"] == 0.0
    assert report["gguf_types"]["mlp.down_proj"] == "q2_k" and abs(report["verify"]["loaders"][0]["rel_diff"]) < 5e-3
