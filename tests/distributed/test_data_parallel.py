"""Data parallel on 2 CPU processes (gloo, DeepSpeed's comm init): E2E-QP on DeepSpeed ZeRO-2 and Block-AP match
the single-process runs with the same global batch, and resume after a kill.

The runs are tiny (2 layers, hidden 128) but sized so every scale tensor fills whole 256-element blocks of
bitsandbytes' 8-bit state: ZeRO then quantizes the optimizer state in the same blocks as the single process,
and the expected difference is zero. Each process runs on one thread (so do the single-process references:
the thread count can change the float summation order of a matmul)."""

import json
import os
import socket
import time
from contextlib import contextmanager

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from frugal_qat.config import resolve
from frugal_qat.distributed import loopback_ifname
from tests.conftest import save_tiny_model

pytestmark = pytest.mark.slow

WORLD = 2


def _bap_cfg():
    # grad_accum 2: each rank computes one of the two micro-batches of a step. chunk_mb 0.02: 6 chunks of 2
    # samples, so each rank updates 3 chunks of each stream.
    return resolve(None, {"quant.wbits": 2, "quant.group_size": 32, "data.train_size": 8, "data.val_size": 4,
                          "data.seqlen": 32, "block_ap.epochs": 2, "block_ap.batch_size": 2, "block_ap.grad_accum": 2,
                          "block_ap.quant_lr": 5e-3, "block_ap.weight_lr": 1e-3, "offload.device": "cpu",
                          "offload.chunk_mb": 0.02})


def _e2e_cfg():
    return resolve(None, {"e2e_qp.seqlen": 32, "e2e_qp.train_size": 8, "e2e_qp.batch_size": 2, "e2e_qp.grad_accum": 2,
                          "e2e_qp.epochs": 2, "e2e_qp.lr": 1e-3, "e2e_qp.ckpt_every_steps": 1,
                          "e2e_qp.logits_chunk": 16, "offload.device": "cpu"})


def _windows():
    return torch.randint(0, 128, (12, 32), generator=torch.Generator().manual_seed(0))


def _e2e_data():
    ids = torch.randint(0, 16, (8, 32), generator=torch.Generator().manual_seed(3))
    return ids, ids


def _block_ap(model, out):
    from frugal_qat.block_ap.run import run_block_ap

    return run_block_ap(model, out, _bap_cfg(), _windows(), keep_work=True, show_progress=False)


def _e2e(run, out, ds_config=None):
    from frugal_qat.e2e_qp.run import run_e2e_qp

    return run_e2e_qp(run, out, _e2e_cfg(), _e2e_data(), device=torch.device("cpu"), show_progress=False,
                      ds_config=ds_config)


def _both(model, run, bap_out, e2e_out):
    _block_ap(model, bap_out)
    _e2e(run, e2e_out, ds_config=True)


def _worker(rank, port, job, args, env):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME=loopback_ifname(), **env)
    torch.set_num_threads(1)
    from frugal_qat.distributed import init_from_env

    # a rank that dies or a network that does not route fails the test in minutes instead of hanging CI
    assert init_from_env(timeout_s=300) == (rank, WORLD)
    job(*args)


def _spawn(job, *args, env=None) -> float:
    """Run ``job(*args)`` on WORLD processes; returns the wall time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.time()
    mp.start_processes(_worker, args=(port, job, args, env or {}), nprocs=WORLD, start_method="spawn")
    return time.time() - t


@contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _max_diff(a_dir, b_dir, key_part="") -> dict[str, float]:
    """Max |a - b| per tensor kind over the block files of two run directories."""
    out: dict[str, float] = {}
    for f in sorted((a_dir / "blocks").iterdir()):
        a, b = load_file(f), load_file(b_dir / "blocks" / f.name)
        assert a.keys() == b.keys()
        for k in a:
            kind = k.rsplit(".", 1)[1]
            out[kind] = max(out.get(kind, 0.0), (a[k].double() - b[k].double()).abs().max().item())
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    model = save_tiny_model(root / "model", layers=2, hidden=128, intermediate=256)
    t = {}
    with _one_thread():
        t0 = time.time()
        _block_ap(model, root / "bap-1")
        t["block_ap_1proc"] = time.time() - t0
        t0 = time.time()
        _e2e(root / "bap-1", root / "e2e-1")
        t["e2e_1proc"] = time.time() - t0
    # Both data-parallel runs in one launch; E2E-QP starts from the single-process Block-AP run, like e2e-1.
    t["both_2proc"] = _spawn(_both, model, root / "bap-1", root / "bap-2", root / "e2e-2")
    print(f"\nwall times (s): {json.dumps({k: round(v, 1) for k, v in t.items()})}")
    return root


def test_e2e_qp_on_deepspeed_matches_single_process(runs):
    one = json.loads((runs / "e2e-1" / "summary.json").read_text())
    two = json.loads((runs / "e2e-2" / "summary.json").read_text())
    assert two["deepspeed"] == {"world_size": 2, "zero_stage": 2}
    assert len(one["losses"]) == 4 and one["losses"][-1] < one["losses"][0]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-6, abs=0)
    diff = _max_diff(runs / "e2e-1", runs / "e2e-2")
    print(f"\nE2E-QP 2 processes vs 1, max |diff|: {diff}")
    assert diff["qweight"] == 0 and diff["qzeros"] == 0
    assert diff["scales"] <= 1e-6  # measured: 0 (fp16 scales ~1e-2, one fp16 ulp there is ~1e-5)
    before = load_file(runs / "bap-1" / "blocks" / "block_00000.safetensors")
    after = load_file(runs / "e2e-2" / "blocks" / "block_00000.safetensors")
    key = "model.layers.0.mlp.up_proj.scales"
    assert not torch.equal(before[key], after[key]), "the scales trained"
    ds = json.loads((runs / "e2e-2" / "deepspeed_config.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 0.3
    assert not (runs / "e2e-2" / "ds_checkpoint").exists(), "a finished run keeps no engine checkpoint"


def test_block_ap_data_parallel_matches_single_process(runs):
    one = json.loads((runs / "bap-1" / "summary.json").read_text())
    two = json.loads((runs / "bap-2" / "summary.json").read_text())
    assert two["world_size"] == 2
    for a, b in zip(one["blocks"], two["blocks"]):
        assert b["val_mse"] == pytest.approx(a["val_mse"], rel=1e-9)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
        assert a["val_mse"][-1] < a["val_mse"][0], "training improved on RTN"
    diff = _max_diff(runs / "bap-1", runs / "bap-2")
    print(f"\nBlock-AP 2 processes vs 1, max |diff|: {diff}")
    assert all(v == 0 for v in diff.values()), diff  # one micro-batch per rank and step: g0 + g1 exactly
    for name in ("fp_stream.bin", "quant_stream.bin"):
        assert (runs / "bap-1" / "work" / name).read_bytes() == (runs / "bap-2" / "work" / name).read_bytes()


def _killed(job, *args, point):
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        _spawn(job, *args, env={"FRUGAL_QAT_KILL_AT": point})


def test_e2e_qp_on_deepspeed_resumes_after_a_kill(runs, tmp_path):
    out = tmp_path / "e2e"
    # manifest@3: rank 0 dies after every rank wrote the step-2 engine checkpoint, before the manifest names it.
    _killed(_e2e, runs / "bap-1", out, True, point="manifest@3")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["deepspeed_tag"] == "step1" and (out / "ds_checkpoint" / "step2").is_dir()
    # An engine checkpoint is the scales and their optimizer state, not a copy of the frozen model.
    states = torch.load(out / "ds_checkpoint" / "step1" / "mp_rank_00_model_states.pt", weights_only=False)
    assert len(states["module"]) == 14 and all(k.endswith(".scales") for k in states["module"])
    assert states["frozen_param_fragments"] is None
    t = _spawn(_e2e, runs / "bap-1", out, True)
    print(f"\nresumed E2E-QP in {t:.1f} s")
    for f in sorted((runs / "e2e-2" / "blocks").iterdir()):
        assert f.read_bytes() == (out / "blocks" / f.name).read_bytes(), f.name
    assert json.loads((out / "summary.json").read_text())["losses"] == \
        json.loads((runs / "e2e-2" / "summary.json").read_text())["losses"]


def test_block_ap_data_parallel_resumes_after_a_kill(runs, tmp_path):
    out = tmp_path / "bap"
    # stream_update@5: each rank dies inside its share of block 0's quant-stream update (its own journal).
    _killed(_block_ap, runs / "model", out, point="stream_update@5")
    assert json.loads((out / "manifest.json").read_text())["progress"] == {"block": 0, "stage": "q_update"}
    _spawn(_block_ap, runs / "model", out)
    for f in sorted((runs / "bap-2" / "blocks").iterdir()):
        assert f.read_bytes() == (out / "blocks" / f.name).read_bytes(), f.name
