"""``require_fit``: the one refusal the runs call before building anything."""

import logging

import pytest

from frugal_qat.errors import OutOfSpace
from frugal_qat.planner import PlanSettings, load_model_config, require_fit

W2G64 = dict(wbits=2, group_size=64)


def test_a_run_that_cannot_fit_is_refused_with_the_verdict_and_settings_that_fit():
    config = load_model_config("llama-2-7b")
    with pytest.raises(OutOfSpace) as e:
        require_fit(config, PlanSettings(**W2G64, gpu_mem="10GiB", cpu_mem="512GiB"), ("e2e_qp",))
    msg = str(e.value)
    assert "\n" not in msg
    assert "E2E-QP: GPU peak" in msg and "> 10.0 GiB" in msg
    # the mildest fix keeps the global batch (4 x 8 -> 2 x 16), and was planned again
    assert "e2e_batch_size 4 -> 2, grad_accum 8 -> 16" in msg and "same results" in msg


def test_a_hopeless_run_says_what_to_get_instead():
    with pytest.raises(OutOfSpace, match="larger disk|more memory"):
        require_fit(load_model_config("llama-2-70b"), PlanSettings(**W2G64, gpu_mem="1GiB"), ("block_ap",))


def test_a_run_that_fits_returns_its_plan_and_logs_the_peak(caplog):
    config = load_model_config("llama-2-70b")
    with caplog.at_level(logging.INFO, logger="frugal_qat.planner.check"):
        p = require_fit(config, PlanSettings(**W2G64), ("block_ap", "e2e_qp"))
    assert p.fits and [ph.phase for ph in p.phases] == ["block_ap", "e2e_qp"]
    text = caplog.text
    assert "Block-AP (per block) peak GPU" in text and "E2E-QP peak GPU" in text and "bfloat16" in text
    assert f"{p.phase('e2e_qp').device_peak / 2**30:.2f} GiB" in text


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.export import make_run

    return make_run(tmp_path_factory.mktemp("fit"), 3, 32)


def test_e2e_qp_and_perplexity_refuse_before_building_anything(tiny_run, tmp_path, monkeypatch):
    """Both plan first, exactly like Block-AP: on a machine too small (RAM monkeypatched to 1 MiB) they stop with
    the planner's verdict before the model is assembled, a stream is created or the output folder exists."""
    import torch

    import frugal_qat.e2e_qp.run as e2e
    import frugal_qat.eval.ppl as ppl
    from frugal_qat.config import resolve

    tiny = {"gpu_mem": None, "cpu_mem": 2**20, "disk_free": 2**40}
    monkeypatch.setattr(e2e, "machine_limits", lambda *a, **k: dict(tiny))
    monkeypatch.setattr(ppl, "machine_limits", lambda *a, **k: dict(tiny))
    monkeypatch.setattr(e2e, "build_packed_model", lambda *a, **k: pytest.fail("built before planning"))
    cfg = resolve(None, {"e2e_qp.seqlen": 16, "e2e_qp.train_size": 2, "e2e_qp.batch_size": 1,
                         "e2e_qp.grad_accum": 2, "offload.device": "cpu"})
    ids = torch.randint(0, 128, (2, 16))
    with pytest.raises(OutOfSpace, match="E2E-QP: host RAM peak"):
        e2e.run_e2e_qp(tiny_run, tmp_path / "out", cfg, (ids, ids), device=torch.device("cpu"), show_progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(ppl, "new_stream", lambda *a, **k: pytest.fail("a stream was created before planning"))
    with pytest.raises(OutOfSpace, match="perplexity evaluation: host RAM peak"):
        ppl.perplexity(tiny_run, ids, show_progress=False)
