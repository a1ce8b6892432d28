"""Triton kernels under the CPU interpreter vs the torch reference, with ragged shapes and guarded memory.

The interpreter must be on (``TRITON_INTERPRET=1``) before ``import triton``: triton's own ``@triton.jit`` helpers
(e.g. the combine function of ``tl.sum``) are built at its import, and ours at the import of ``triton_kernels``.
Another test module may import triton earlier in the same pytest process (transformers, bitsandbytes and torch can
pull it in), so unless the variable was set when this process started, the kernel tests are run by
``test_kernels_in_interpreter_subprocess`` in a fresh interpreter process with the variable set.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from frugal_qat.quantizer.packed import PackedLinear
from frugal_qat.quantizer.packing import pack_linear

if importlib.util.find_spec("triton") is None:  # checked without importing it, which would fix its mode
    pytest.skip("triton is not installed", allow_module_level=True)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in test_kernels_in_interpreter_subprocess")
if INTERPRETED:
    from frugal_qat.quantizer import triton_kernels as tk

    BLOCKS = tk.KernelBlocks(m=32, n=32, k=64)


@pytest.mark.skipif(INTERPRETED, reason="already in an interpreter process")
def test_kernels_in_interpreter_subprocess(request):
    marks = request.config.getoption("-m")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, *(["-m", marks] if marks else [])]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(cmd, env=env, cwd=request.config.rootpath, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


BITS = (2, 3, 4, 8)
F16, F32 = torch.float16, torch.float32


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# (group_size, M, K, N, dtype): ragged against BLOCKS (M vs 32, K vs 64, N vs 32), groups smaller than, equal to and
# larger than BLOCK_K, a group size that is no power of two, K that does not fill the last packed word; each group
# size with both input dtypes.
CASES = [
    (32, 7, 96, 40, F32),
    (32, 33, 160, 72, F16),
    (64, 1, 64, 8, F16),
    (64, 33, 192, 40, F32),
    (-1, 7, 160, 72, F16),
    (-1, 1, 100, 24, F32),
    (20, 5, 100, 24, F16),
]
# Error bound relative to the largest reference value: fp32 accumulation order, or the 16-bit rounding of
# W and of the output.
TOLERANCE = {F32: 1e-5, F16: 4e-3, torch.bfloat16: 3e-2}


def guarded(t, fill):
    """``t`` as a strided view into a larger buffer filled with ``fill`` around it: an unmasked read past any
    edge picks up NaN (floats) or garbage words (ints) and spoils the result."""
    rows, cols = t.shape
    buf = torch.full((rows + 3, cols + 5), fill, dtype=t.dtype)
    buf[1 : rows + 1, 2 : cols + 2] = t
    return buf[1 : rows + 1, 2 : cols + 2]


def make_case(bits, group_size, M, K, N, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = K if group_size == -1 else group_size
    codes = torch.randint(0, 2**bits, (N, K), generator=gen, dtype=torch.uint8)
    scale = torch.rand(N, K // g, generator=gen) * 0.05 + 0.005
    zero = torch.randint(0, 2**bits, (N, K // g), generator=gen).float()
    packed = pack_linear(codes, scale, zero, bits, group_size)
    scales = packed["scales"].float()
    # Reference quantities in float64 from the unpacked integers (independent of any packing code).
    q_minus_z = codes.t().double() - zero.t().double().repeat_interleave(g, 0)  # [K, N]
    w = q_minus_z * scales.double().repeat_interleave(g, 0)
    x = torch.randn(M, K, generator=gen).to(dtype)
    grad_y = torch.randn(M, N, generator=gen).to(dtype)
    tensors = {
        "x": guarded(x, float("nan")),
        "grad_y": guarded(grad_y, float("nan")),
        "qweight": guarded(packed["qweight"], -1),
        "qzeros": guarded(packed["qzeros"], -1),
        "scales": guarded(scales, float("nan")),
    }
    return tensors, x.double(), grad_y.double(), q_minus_z, w


def assert_matches(actual, expected, dtype):
    assert not actual.isnan().any()
    err = (actual.double() - expected).abs().max().item()
    assert err <= TOLERANCE[dtype] * expected.abs().max().item(), err


@needs_interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: "g{}-M{}-K{}-N{}-{}".format(*c[:4], str(c[4])[6:]))
@pytest.mark.parametrize("bits", BITS)
def test_kernels_match_reference(bits, case):
    group_size, M, K, N, dtype = case
    t, x, grad_y, q_minus_z, w = make_case(bits, group_size, M, K, N, dtype, seed=bits)

    y = tk.dequant_matmul(t["x"], t["qweight"], t["qzeros"], t["scales"], bits, group_size, BLOCKS)
    assert y.shape == (M, N) and y.dtype == dtype
    assert_matches(y, x @ w, dtype)

    grad_x = tk.dequant_matmul_grad_input(t["grad_y"], t["qweight"], t["qzeros"], t["scales"], bits, group_size, K,
                                          BLOCKS)
    assert grad_x.shape == (M, K) and grad_x.dtype == dtype
    assert_matches(grad_x, grad_y @ w.t(), dtype)

    grad_s = tk.dequant_matmul_grad_scales(t["x"], t["grad_y"], t["qweight"], t["qzeros"], bits, group_size, BLOCKS)
    g = K if group_size == -1 else group_size
    expected = (q_minus_z * (x.t() @ grad_y)).reshape(K // g, g, N).sum(1)
    assert grad_s.shape == (K // g, N) and grad_s.dtype == torch.float32
    # The products x * grad_y are exact in fp32 for 16-bit inputs: only the accumulation order differs.
    assert_matches(grad_s, expected, torch.float32)


@needs_interpreter
@pytest.mark.parametrize("bits", BITS)
def test_bf16_inputs(bits):
    t, x, grad_y, q_minus_z, w = make_case(bits, 32, 7, 96, 40, torch.bfloat16)
    y = tk.dequant_matmul(t["x"], t["qweight"], t["qzeros"], t["scales"], bits, 32, BLOCKS)
    assert y.dtype == torch.bfloat16
    assert_matches(y, x @ w, torch.bfloat16)
    grad_s = tk.dequant_matmul_grad_scales(t["x"], t["grad_y"], t["qweight"], t["qzeros"], bits, 32, BLOCKS)
    assert_matches(grad_s, (q_minus_z * (x.t() @ grad_y)).reshape(3, 32, 40).sum(1), torch.float32)


@needs_interpreter
@pytest.mark.parametrize("bits", (2, 3))
def test_layer_triton_backend_matches_torch_backend(bits):
    """The autograd function routes to the kernels: outputs and both gradients agree with the torch path."""
    t, *_ = make_case(bits, 32, 5, 96, 40, torch.float32)
    tensors = {k: t[k].contiguous() for k in ("qweight", "qzeros")}
    tensors["scales"] = t["scales"].half()
    x = torch.randn(2, 3, 96)
    results = []
    for backend in ("torch", "triton"):
        layer = PackedLinear.from_packed(tensors, bits, 32, 96, 40, backend=backend)
        xb = x.clone().requires_grad_()
        y = layer(xb)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xb.grad, layer.scales.grad))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_interpreter
def test_rejects_bad_inputs():
    t, *_ = make_case(4, 32, 3, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="float64"):
        tk.dequant_matmul(t["x"].double(), t["qweight"], t["qzeros"], t["scales"], 4, 32, BLOCKS)
    with pytest.raises(ValueError, match="does not divide"):
        tk.dequant_matmul(t["x"], t["qweight"], t["qzeros"], t["scales"], 4, 48, BLOCKS)
    with pytest.raises(ValueError, match="power of two"):
        tk.KernelBlocks(m=8)


@needs_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("bits", (3, 4))
def test_larger_layer_default_blocks(bits):
    t, x, grad_y, q_minus_z, w = make_case(bits, 128, 64, 1024, 200, torch.float16)
    y = tk.dequant_matmul(t["x"], t["qweight"], t["qzeros"], t["scales"], bits, 128)
    assert_matches(y, x @ w, torch.float16)
    grad_x = tk.dequant_matmul_grad_input(t["grad_y"], t["qweight"], t["qzeros"], t["scales"], bits, 128, 1024)
    assert_matches(grad_x, grad_y @ w.t(), torch.float16)
    grad_s = tk.dequant_matmul_grad_scales(t["x"], t["grad_y"], t["qweight"], t["qzeros"], bits, 128)
    assert_matches(grad_s, (q_minus_z * (x.t() @ grad_y)).reshape(8, 128, 200).sum(1), torch.float32)
