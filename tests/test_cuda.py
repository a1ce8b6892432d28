"""What only a GPU can show: compiled kernels and the CUDA path on real CUDA tensors. Marked `cuda`, skipped without
CUDA; `tools/gpu_check.sh` runs them (`pytest -m cuda`) with the rest of the GPU acceptance check."""

import pytest
import torch

from frugal_qat.block_ap.run import pick_device
from frugal_qat.errors import ConfigError
from frugal_qat.precision import resolve
from frugal_qat.quantizer import init_qparams, pack_linear, quantize
from frugal_qat.quantizer.packed import choose_backend, packed_linear

pytestmark = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu_check.sh)")


def _layer(k: int, n: int, bits: int, g: int, device: str):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits)) * 0.05
    scale, zero = init_qparams(w, bits, g)
    p = pack_linear(quantize(w, scale, zero, bits, g), scale, zero, bits, g)
    return {k_: v.to(device) for k_, v in p.items()}


def test_cuda_device_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        pick_device("cuda:1")


@needs_cuda
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("tokens", [1, 16, 64, 4096])
def test_auto_path_on_the_gpu_equals_the_torch_reference(bits, tokens):
    """Fused Triton (few tokens) or tiled cuBLAS (many), compiled for this GPU, against the torch-op reference:
    forward, grad of x and grad of the scales, bf16 inputs as the precision policy gives them."""
    p = _layer(1024, 768, bits, 64, "cuda")
    scales = p["scales"].float().requires_grad_(True)
    x = (torch.randn(tokens, 1024, device="cuda") * 0.5).bfloat16().requires_grad_(True)
    ref_s = scales.detach().clone().requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    y = packed_linear(x, p["qweight"], p["qzeros"], scales, bits, 64, backend="auto")
    ref = packed_linear(ref_x, p["qweight"], p["qzeros"], ref_s, bits, 64, backend="torch")
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert choose_backend(tokens, "cuda", torch.bfloat16, 64) == ("triton" if tokens <= 64 else "torch")
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.float(), ref_x.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(scales.grad, ref_s.grad, rtol=3e-2, atol=1e-2)


@needs_cuda
def test_device_index_becomes_the_current_device():
    last = torch.cuda.device_count() - 1
    d = pick_device(f"cuda:{last}")
    assert d == torch.device("cuda", last) and torch.cuda.current_device() == last
    with pytest.raises(ConfigError, match="cuda:0 to"):
        pick_device(f"cuda:{last + 1}")


@needs_cuda
def test_block_step_on_cuda_runs_in_bf16_over_fp32_masters(tiny_llama):
    from frugal_qat.block_ap.train_block import make_optimizer, train_step, wrap_linears
    from frugal_qat.offload.blocks import ModelSource
    from tests.test_precision import MatmulDtypes

    src = ModelSource(tiny_llama)
    block, runner = src.block(0).cuda(), src.runner("cuda")
    linears = wrap_linears(block, 2, 32, name="layers.0")
    block.cuda()
    optimizer = make_optimizer(block, linears, 1e-3, 1e-3)
    x = torch.randn(2, 16, 64, device="cuda")
    spy = MatmulDtypes()
    with spy:
        train_step(block, lambda m, t: runner(m, 0, t), [(x, x)], optimizer, resolve("cuda"), torch.device("cuda"))
    assert spy.seen["mm"] == {torch.bfloat16}
    assert {p.dtype for p in block.parameters()} == {torch.float32}


def test_gpu_check_without_cuda_says_what_it_would_run():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tools" / "gpu_check.py"), "--dry-run"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0
    for step in ("cuda tests", "block-ap on cuda", "e2e-qp on cuda", "kill + resume, deterministic"):
        assert step in r.stdout
