"""The simulation: the real code paths on fake tensors. Its live-tensor peak equals that of the same code run on real
tensors (measured by the profiler's LiveTensors, an independent tracker); it sees the dtypes the planner plans; the
planner's peaks agree with it; ``plan --simulate`` reports it."""

import dataclasses
import json

import pytest
import torch

from frugal_qat.cli.main import main
from frugal_qat.planner import PHASES, PlanSettings, plan
from frugal_qat.planner.profile import LiveTensors
from frugal_qat.planner.simulate import LiveBytes, run_phase, simulate
from frugal_qat.precision import dtype_name, resolve

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 128,
        "tie_word_embeddings": False}
# 8-bit codes: a quarter of the unpacking ops of 2-bit ones, which the fake-tensor run pays for op by op.
SMALL = dict(wbits=8, group_size=32, seqlen=32, e2e_seqlen=32, batch_size=2, e2e_batch_size=2, grad_accum=2,
             train_size=8, val_size=2, logits_chunk=48, eval_batch_size=2)


@pytest.fixture(scope="module")
def cuda_run():
    """The tiny model planned and simulated for a GPU (CUDA policy and the CUDA path's packed matmuls)."""
    s = PlanSettings(**SMALL, device="cuda")
    return s, plan(TINY, s), simulate(TINY, s)


@pytest.mark.slow
@pytest.mark.parametrize("phase", PHASES)
def test_simulated_peak_equals_a_real_run(phase):
    # The CUDA policy's dtypes (bf16 autocast, a bf16 E2E-QP model) forced on the CPU, with PackedLinear's own
    # torch path: the same code on fake and on real tensors, measured by two different trackers.
    # One micro-batch per E2E-QP step: PackedLinear's torch path unpacks codes with many small ops, each of which
    # costs the fake-tensor run a dispatch.
    s = PlanSettings(**{**SMALL, "grad_accum": 1}, device="cpu", precision_policy="cuda")
    sim = simulate(TINY, s, (phase,))[phase]
    with LiveTensors() as live:
        run_phase(phase, TINY, s, fake=False)
    assert live.peak > 100_000
    assert sim.live_peak == pytest.approx(live.peak, rel=0.05)


def test_matmuls_run_in_the_dtypes_the_plan_says(cuda_run):
    s, p, sims = cuda_run
    policy = resolve("cuda")
    assert p.phase("block_ap").compute_dtype == dtype_name(policy.train_autocast) == "bfloat16"
    assert p.phase("e2e_qp").compute_dtype == dtype_name(policy.e2e_autocast) == "bfloat16"
    assert p.phase("ppl_eval").compute_dtype == dtype_name(policy.nograd_autocast)
    ap, e2e, ppl = (sims[k].matmul_dtypes for k in PHASES)
    assert ap["train"] == [p.phase("block_ap").compute_dtype]
    assert ap["quant update"] == [dtype_name(policy.nograd_autocast)] == ["bfloat16"]
    assert ap["fp update"] == [dtype_name(policy.teacher_autocast)] == ["float16"]  # the teacher, on fp16 streams
    assert e2e["step 2"] == [p.phase("e2e_qp").compute_dtype]  # packed matmuls and the lm_head
    assert ppl == {"blocks": [dtype_name(policy.nograd_autocast)], "head": ["float32"]}  # the fp32 head (ppl.py)
    assert p.precision == policy.to_json()


def test_planned_peaks_agree_with_the_simulation(cuda_run):
    _, p, sims = cuda_run
    for phase, sim in sims.items():
        assert [t.name for t in sim.cuda_terms][0] == "CUDA context + workspace"
        assert p.phase(phase).device_peak == pytest.approx(sim.peak, rel=0.10), phase


def test_cpu_plan_agrees_with_the_simulation():
    s = PlanSettings(**SMALL, device="cpu")
    sims = simulate(TINY, s, ("block_ap", "ppl_eval"))
    p = plan(TINY, s, ("block_ap", "ppl_eval"))
    for phase, sim in sims.items():
        assert sim.cuda_terms == []
        assert p.phase(phase).device_peak == pytest.approx(sim.peak, rel=0.10), phase
    assert sims["block_ap"].matmul_dtypes["train"] == ["float32"] == [p.phase("block_ap").compute_dtype]


def test_live_bytes_counts_storages_once_and_frees_them():
    with LiveBytes() as live:
        a = torch.ones(1000)  # 4000 B
        view = a[10:]  # a view: no new storage
        a.add_(1)  # in place: none either
        b = a * 2  # 4000 B
        del b
        live.transient(500)
    assert live.peak == 8000 and live.current == 4000
    del view, a


def test_plan_simulate_writes_both_peaks_to_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quant: {wbits: 8, group_size: 32}\ndata: {train_size: 8, val_size: 2, seqlen: 32}\n"
                      "block_ap: {batch_size: 2}\n"
                      "e2e_qp: {seqlen: 32, train_size: 8, batch_size: 2, grad_accum: 2, logits_chunk: 48}\n")
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tmp_path), "--recipe", str(recipe), "--gpu", "h100-80gb", "--disk-gbps",
                 "3", "--simulate", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["gpu"] == "h100-80gb" and doc["settings"]["disk_gbps"] == 3
    for ph in doc["phases"]:
        for key in ("compute_dtype", "device_peak", "simulated_peak", "seconds", "compute_seconds", "io_seconds"):
            assert key in ph, (ph["phase"], key)
        assert ph["simulated_peak"] == ph["simulation"]["simulated_peak"] > 0
    ap = next(ph for ph in doc["phases"] if ph["phase"] == "block_ap")
    assert {"seconds", "compute_seconds", "io_seconds", "stages", "io_bound_below_gbps"} <= set(ap["per_block"])
    assert "simulated peak" in capsys.readouterr().out


def test_deterministic_attention_is_planned_as_the_code_allocates_it():
    # --deterministic runs SDPA's math backend: [b, heads, L, L] fp32 tensors, in stages of their own. At L = 256
    # they outweigh the rest of this tiny model, as they do a 70B's at L = 2048-4096.
    s = PlanSettings(**{**SMALL, "seqlen": 256, "e2e_seqlen": 256}, device="cuda", cuda_reserve=0)
    det = dataclasses.replace(s, deterministic=True)
    base, p = plan(TINY, s), plan(TINY, det)
    sims = simulate(TINY, det)
    for phase, sim in sims.items():
        assert p.phase(phase).device_peak > base.phase(phase).device_peak
        assert p.phase(phase).device_peak == pytest.approx(sim.peak, rel=0.10), phase
    assert any(t.name == "math attention backward (deterministic)" for t in p.phase("e2e_qp").device_terms)
    steps = p.phase("e2e_qp").once_stages[1]
    assert "float32" in steps.flops  # the math backend computes 16-bit inputs in fp32
