"""The data-parallel helpers in one process: row shards, the DeepSpeed config frugal-qat writes, the guards."""

import json

import pytest
import torch

from frugal_qat.config import resolve
from frugal_qat.distributed import (
    agreed,
    check_launch,
    default_ds_config,
    on_rank0,
    resolve_ds_config,
    shard_rows,
    sum_floats,
)
from frugal_qat.errors import ConfigError


@pytest.mark.parametrize("n,chunk", [(12, 2), (11, 4), (3, 1), (5, 8), (1000, 7)])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_are_disjoint_whole_chunks_covering_the_stream(n, chunk, world):
    shards = [shard_rows(n, chunk, r, world) for r in range(world)]
    covered = [i for lo, hi in shards for i in range(lo, hi)]
    assert covered == list(range(n)), "every row exactly once, in rank order"
    for lo, hi in shards:
        assert lo % chunk == 0 and (hi == n or hi % chunk == 0), "a chunk is never split between ranks"
    sizes = [-(-(hi - lo) // chunk) for lo, hi in shards]
    assert max(sizes) - min(sizes) <= 1, "chunks are dealt evenly"


def _cfg(**over):
    base = {"e2e_qp.batch_size": 4, "e2e_qp.grad_accum": 8, "e2e_qp.train_size": 64}
    base.update(over)
    return resolve(None, base)


def test_default_config_keeps_the_single_process_global_batch():
    ds = default_ds_config(_cfg(), world=4, device_type="cuda")
    assert ds["train_batch_size"] == 32 == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 4
    assert ds["gradient_clipping"] == 0.3 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_allow_untested_optimizer"]
    assert "offload_optimizer" not in ds["zero_optimization"]
    cpu = default_ds_config(_cfg(), world=2, device_type="cpu", offload_optimizer=True)
    assert not cpu["bf16"]["enabled"] and cpu["gradient_accumulation_steps"] == 4
    assert cpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(ConfigError, match="grad_accum=8 is not a multiple of the 3 processes"):
        default_ds_config(_cfg(), world=3, device_type="cpu")


def test_a_users_json_merges_over_the_default(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}},
                                "wall_clock_breakdown": True}))
    ds = resolve_ds_config(user, _cfg(), world=2, device_type="cpu")
    assert ds["zero_optimization"]["stage"] == 1 and ds["zero_optimization"]["contiguous_gradients"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and ds["wall_clock_breakdown"]
    assert ds["train_batch_size"] == 32
    assert resolve_ds_config(None, _cfg(), 2, "cpu") == default_ds_config(_cfg(), 2, "cpu")


@pytest.mark.parametrize("user,match", [
    ({"optimizer": {"type": "Adam"}}, "'optimizer': frugal-qat sets its own"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler'"),
    ({"zero_optimization": {"stage": 3}}, "stage=3"),
    ({"fp16": {"enabled": True}}, "fp16 is not supported"),
    ({"train_batch_size": 64}, "train_batch_size=64 but the run's batch needs 32"),
])
def test_configs_that_change_the_run_are_refused(user, match):
    with pytest.raises(ConfigError, match=match):
        resolve_ds_config(user, _cfg(), world=2, device_type="cpu")


def test_unreadable_config_is_named(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="ds.json: not a readable JSON file"):
        resolve_ds_config(bad, _cfg(), world=1, device_type="cpu")


def test_single_process_helpers_are_plain_calls():
    assert on_rank0(lambda: 41 + 1) == 42
    with pytest.raises(ValueError, match="boom"):
        on_rank0(lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert sum_floats(1.5, 2) == [1.5, 2.0]
    flag = lambda: True  # noqa: E731
    assert agreed(flag) is flag


def test_launched_processes_without_a_group_are_refused(monkeypatch):
    check_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="launched on 2 processes but not data parallel; pass --deepspeed"):
        check_launch()


def test_engine_checkpoints_hold_only_the_scales(tmp_path):
    from frugal_qat.block_ap.run import run_block_ap
    from frugal_qat.e2e_qp.run import ScalesLoss, build_packed_model, fp32_masters, make_optimizer, named_scales
    from tests.conftest import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", layers=1)
    cfg = resolve(None, {"quant.wbits": 4, "quant.group_size": 32, "data.train_size": 2, "data.val_size": 0,
                         "data.seqlen": 16, "block_ap.epochs": 0, "offload.device": "cpu"})
    run_block_ap(model_dir, tmp_path / "run", cfg, torch.randint(0, 128, (2, 16)), show_progress=False)
    model, _ = build_packed_model(tmp_path / "run", torch.device("cpu"))
    wrapped = ScalesLoss(model, chunk=8)
    state = wrapped.state_dict()
    assert len(state) == 7 and all(k.startswith("model.model.layers.0.") and k.endswith(".scales") for k in state)
    doubled = {k: v * 2 for k, v in state.items()}
    wrapped.load_state_dict(doubled)
    assert all(torch.equal(p, doubled[f"model.{n}"]) for n, p in named_scales(model).items())
    with pytest.raises(Exception, match="lacks"):
        wrapped.load_state_dict({})
    opt = make_optimizer(list(named_scales(model).values()), "adamw8bit", 1e-3, torch.device("cpu"))
    assert fp32_masters(opt) == []
    loss, count = wrapped(torch.randint(0, 128, (1, 16)), torch.randint(0, 128, (1, 16)))
    assert count == 15 and torch.isfinite(loss)
