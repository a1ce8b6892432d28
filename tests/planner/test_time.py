"""The time plan: overlapped stages take the longer of compute and disk, not their sum; each phase is priced in the
dtype of the precision policy; the GPU presets and overrides; the disk bandwidth below which a block waits on disk."""

import dataclasses

import pytest

from frugal_qat.planner import GPUS, PlanSettings, StageTime, load_model_config, plan

W2G64 = dict(wbits=2, group_size=64)


def test_overlapped_stages_take_the_longer_of_compute_and_io_others_the_sum():
    overlapped = StageTime("update", compute_seconds=3.0, io_seconds=5.0, io_bytes=5e9, overlapped=True)
    waiting = dataclasses.replace(overlapped, overlapped=False)
    assert overlapped.seconds == 5.0 and overlapped.bound == "disk"
    assert waiting.seconds == 8.0
    assert dataclasses.replace(overlapped, repeat=3).seconds == 15.0
    assert overlapped.io_bound_below_gbps == pytest.approx(5e9 / 3.0 / 1e9)


def test_a_faster_disk_shortens_a_block_only_while_the_disk_bounds_it():
    config = load_model_config("llama-2-70b")
    base = PlanSettings(**W2G64)
    threshold = plan(config, base, ("block_ap",)).phase("block_ap").io_bound_below_gbps
    assert 1 < threshold < 20  # the stream updates: ~560 GB per block against a minute of compute
    fast, faster = (plan(config, dataclasses.replace(base, disk_gbps=k * threshold), ("block_ap",)).phase("block_ap")
                    for k in (1.01, 4.0))
    assert all(st.bound == "compute" for st in fast.time_stages if st.overlapped)
    assert fast.block_seconds == pytest.approx(faster.block_seconds, rel=0.01)  # only the checkpoints still wait
    slow = plan(config, dataclasses.replace(base, disk_gbps=threshold / 2), ("block_ap",)).phase("block_ap")
    assert any(st.bound == "disk" for st in slow.time_stages)
    assert slow.block_seconds > fast.block_seconds
    # overlap, not sum: the phase takes less than its compute plus its I/O
    assert slow.seconds < slow.compute_seconds + slow.io_seconds


def test_each_phase_is_priced_in_the_dtype_of_the_policy():
    config = load_model_config("llama-2-7b")
    gpu = plan(config, PlanSettings(**W2G64))
    forced_fp32 = plan(config, PlanSettings(**W2G64, precision_policy="cpu"))  # the CPU policy on a GPU
    for p, dtype in ((gpu, "bfloat16"), (forced_fp32, "float32")):
        for ph in p.phases:
            assert ph.compute_dtype == dtype
            train = next(st for st in ph.time_stages + ph.once_stages
                         if st.flops and st.name in ("training", "steps", "block"))
            assert set(train.flops) == {dtype}
    # The fp (teacher) stream update: fp16 autocast on fp16 streams, TF32 for models whose streams are bf16
    teacher = {st.name: st for st in gpu.phase("block_ap").time_stages}["fp update"]
    assert set(teacher.flops) == {"float16"}
    gemma = plan(load_model_config("gemma-3-27b"), PlanSettings(**W2G64), ("block_ap",)).phase("block_ap")
    assert set({st.name: st for st in gemma.time_stages}["fp update"].flops) == {"tf32"}
    # fp32 runs on the CUDA cores (TF32 stays off): 16x slower matmuls on an A100
    a, b = gpu.phase("e2e_qp"), forced_fp32.phase("e2e_qp")
    assert b.compute_seconds > 10 * a.compute_seconds
    assert "float32" in gpu.phase("ppl_eval").once_stages[0].flops  # perplexity's fp32 lm_head


def test_gpu_presets_and_overrides():
    config = load_model_config("llama-2-70b")
    a100, h100 = (plan(config, PlanSettings(**W2G64, gpu=g), ("e2e_qp",)).phase("e2e_qp")
                  for g in ("a100-80gb", "h100-80gb"))
    assert 2 < a100.compute_seconds / h100.compute_seconds < 4
    assert PlanSettings(**W2G64, gpu="h200").gpu_mem == GPUS["h200"].memory
    s = PlanSettings(**W2G64, gpu_util=0.5, gpu_tflops=624)
    assert s.matmul_flops_per_second("bfloat16") == pytest.approx(624e12 * 0.5)
    assert s.matmul_flops_per_second("float32") == pytest.approx(19.5e12 * 2 * 0.5)  # scaled with the 16-bit peak
    with pytest.raises(Exception, match="gpu='v100'"):
        PlanSettings(**W2G64, gpu="v100")


def test_block_ap_time_counts_the_elementwise_work():
    p = plan(load_model_config("llama-2-70b"), PlanSettings(**W2G64), ("block_ap",)).phase("block_ap")
    train = next(st for st in p.time_stages if st.name == "training")
    # fake-quant forward + backward per weight and micro-batch, AdamW per parameter and step: terabytes per block
    assert train.elementwise_bytes > 1e14
    matmul = sum(v / PlanSettings(**W2G64).matmul_flops_per_second(k) for k, v in train.flops.items())
    assert train.compute_seconds > 1.5 * matmul
