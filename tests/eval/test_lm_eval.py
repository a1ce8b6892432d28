"""lm-eval on a run directory through its packed model: the dense path's accuracy, no dense copy, the planner's
size, and a refusal before loading when the model does not fit (offline, a 4-question local task)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from frugal_qat.cli.main import main
from frugal_qat.errors import OutOfSpace
from frugal_qat.eval import model as eval_model
from frugal_qat.eval.lm_eval import run_lm_eval
from frugal_qat.eval.model import eval_memory_need, load_eval_model
from frugal_qat.export.hf_model import load_quantized_model
from frugal_qat.offload.weights import read_config
from frugal_qat.precision import resolve as resolve_precision
from frugal_qat.quantizer.packed import PackedLinear
from tests.conftest import save_tiny_model

# The local multiple-choice task of the export tests, reused by path.
TASKS = Path(__file__).parents[1] / "export" / "lm_eval_tasks"
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")
GiB = 2**30


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished Block-AP run (RTN: 0 epochs, 4 bits, group 32) of a random tiny 2-layer Llama."""
    from frugal_qat.block_ap.run import run_block_ap
    from frugal_qat.config import resolve

    root = tmp_path_factory.mktemp("lm_eval")
    model = save_tiny_model(root / "model", seed=1)  # this seed gets 1 of the 4 questions right: a non-trivial match
    cfg = resolve(None, {"quant.wbits": 4, "quant.group_size": 32, "data.train_size": 4, "data.val_size": 0,
                         "data.seqlen": 16, "block_ap.epochs": 0, "offload.device": "cpu"})
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    run_block_ap(model, root / "run", cfg, windows=windows, show_progress=False)
    return root / "run"


def _hand_accuracy(model, tok) -> float:
    """acc by hand: the choice whose tokens have the highest summed log-likelihood after the prompt."""
    docs = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines()]
    correct = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = []
        for choice in doc["choices"]:
            ctx_ids, all_ids = tok(context)["input_ids"], tok(context + choice)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([all_ids])).logits[0, :-1].log_softmax(-1)
            scores.append(sum(logprobs[t - 1, all_ids[t]].item() for t in range(len(ctx_ids), len(all_ids))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(docs)


@pytest.mark.slow  # importing lm-eval and indexing the local task take ~15 s here
@needs_lm_eval
def test_packed_path_scores_like_the_dense_path(run, tmp_path, monkeypatch):
    # Today's dense path: the same dequantized weights saved as a plain fp32 checkpoint (not a frugal-qat run).
    dense_dir = tmp_path / "dense"
    load_quantized_model(run).save_pretrained(dense_dir)
    AutoTokenizer.from_pretrained(run).save_pretrained(dense_dir)

    monkeypatch.chdir(TASKS)  # the task's data_files path is relative
    packed = run_lm_eval(run, "frugal_tiny_mc", include_path=TASKS, batch_size=3)  # batches padded together
    dense = run_lm_eval(dense_dir, "frugal_tiny_mc", include_path=TASKS)
    assert packed["packed"] and not dense["packed"]
    acc = packed["tasks"]["frugal_tiny_mc"]["acc"]
    assert acc == dense["tasks"]["frugal_tiny_mc"]["acc"] == packed["mean_acc"]
    hand = _hand_accuracy(load_quantized_model(run), AutoTokenizer.from_pretrained(run))
    assert hand > 0 and acc == hand, "lm-eval scored the packed model as the dense forward does"


@pytest.mark.parametrize("policy", ["cpu", "cuda"])  # "cuda": the GPU's dtypes, computed by the CPU
def test_packed_model_keeps_weights_packed(run, policy):
    precision = resolve_precision("cpu", policy)
    model = load_eval_model(run, torch.device("cpu"), precision)
    src_cfg = read_config(run)
    layers = model.model.layers
    linears = [m for m in layers.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))]
    assert linears and all(isinstance(m, PackedLinear) for m in linears), "every decoder linear stays packed"
    for m in linears:
        assert m.qweight.dtype == m.qzeros.dtype == torch.int32 and m.scales.dtype == torch.float32
    # No dense copy of a quantized weight anywhere: the only 2-D floating tensors are the embeddings and lm_head.
    dense_2d = {n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()
                and t.dim() == 2 and not n.endswith(".scales")}
    assert dense_2d <= {"model.embed_tokens.weight", "lm_head.weight"}
    frozen = [t for n, t in model.named_parameters() if not n.endswith(".scales")]
    assert {t.dtype for t in frozen} == {precision.e2e_dtype}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training

    # The planner's model terms are the model's tensors, byte for byte (the rotary table aside).
    need = eval_memory_need(src_cfg, src_cfg["quantization_config"], policy, 1, 16)
    storages = {t.untyped_storage().data_ptr(): t.nbytes for n, t in [*model.named_parameters(),
                *model.named_buffers()] if "rotary" not in n}
    assert need.model_bytes == sum(storages.values())

    # The forward and the generation (K/V cache through the packed linears) match the dense model's.
    dense = load_quantized_model(run)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = dense(ids).logits
        with precision.nograd(torch.device("cpu")):
            got = model(ids).logits.float()
            gen = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    tol = 1e-5 if policy == "cpu" else 0.1  # bf16 model and matmuls against the fp32 dense forward
    assert torch.allclose(got, want, atol=tol, rtol=0), (got - want).abs().max()
    if policy == "cpu":
        assert torch.equal(gen, dense.generate(ids[:1], max_new_tokens=5, do_sample=False))


def _forbid_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the memory check refused")

    monkeypatch.setattr("frugal_qat.e2e_qp.run.build_packed_model", refuse)
    monkeypatch.setattr("frugal_qat.export.hf_model.load_quantized_model", refuse)
    monkeypatch.setattr("frugal_qat.offload.weights.WeightStore.block_state", refuse)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_refused_before_loading_with_size_and_commands(run, monkeypatch, device):
    _forbid_loading(monkeypatch)
    cfg = read_config(run)
    need = eval_memory_need(cfg, cfg["quantization_config"], device, 4, 512)
    small = eval_memory_need(cfg, cfg["quantization_config"], device, 1, 512)
    size = need.gpu_bytes if device == "cuda" else need.ram_bytes
    assert (small.gpu_bytes if device == "cuda" else small.ram_bytes) < size
    # Too little for anything: the larger machine, streamed perplexity and the export are offered.
    tiny = (1 * 2**20 if device == "cuda" else None, 100 * GiB if device == "cuda" else 1 * 2**20)
    monkeypatch.setattr(eval_model, "available_memory", lambda dev: tiny)
    with pytest.raises(OutOfSpace) as e:
        run_lm_eval(run, "frugal_tiny_mc", batch_size=4, device=device)
    msg = str(e.value)
    assert f"needs {size / GiB:.1f} GiB" in msg and ("on cuda" if device == "cuda" else "of host RAM") in msg
    assert f"frugal-qat ppl --model {run}" in msg and f"frugal-qat export --run {run} --format gptq" in msg
    assert "--batch-size 1" not in msg and "\n" not in msg
    # Room for one sequence at a time but not four: that is the first fix offered.
    room = (small.gpu_bytes + 1, 100 * GiB) if device == "cuda" else (None, small.ram_bytes + 1)
    monkeypatch.setattr(eval_model, "available_memory", lambda dev: room)
    with pytest.raises(OutOfSpace, match=r"instead use a smaller forward: --batch-size 1;"):
        run_lm_eval(run, "frugal_tiny_mc", batch_size=4, device=device)


def test_dense_checkpoint_refused_and_cli_says_one_line(tmp_path, monkeypatch, capsys):
    dense = save_tiny_model(tmp_path / "dense")
    capsys.readouterr()  # the save's progress bars
    _forbid_loading(monkeypatch)
    monkeypatch.setattr(eval_model, "available_memory", lambda dev: (None, 2**20))
    assert main(["lm-eval", "--model", str(dense), "--tasks", "frugal_tiny_mc", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("frugal-qat: error: lm-eval on") and "\n" not in err
    assert "dense fp32 model" in err and "frugal-qat block-ap --model" in err and "frugal-qat ppl" in err
