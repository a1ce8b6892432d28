"""Triton kernels under the CPU interpreter vs float64 references and the torch ops, with ragged shapes, guarded
memory and poisoned allocations.

The interpreter must be on (``TRITON_INTERPRET=1``) before ``import triton``: triton's own ``@triton.jit`` helpers
(e.g. the combine function of ``tl.sum``) are built at its import, and ours at the import of ``triton_kernels``.
Another test module may import triton earlier in the same pytest process (transformers, bitsandbytes and torch can
pull it in), so unless the variable was set when this process started, the kernel tests are run by
``test_kernels_in_interpreter_subprocess`` in a fresh interpreter process with the variable set.

The kernels take bf16 inputs (``kernel_configs.DTYPES``). Under the interpreter their ``tl.dot`` runs in fp32 (its
bf16 dot is broken) on the unrounded fp32 weights, so the fp32 partial sums match a float64 reference to fp32
rounding; and the interpreter truncates fp32 -> bf16 casts where a GPU rounds to nearest even.
"""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from frugal_qat.quantizer import kernel_configs as kc
from frugal_qat.quantizer import packed
from frugal_qat.quantizer.packed import PackedLinear
from frugal_qat.quantizer.packing import pack_linear

if importlib.util.find_spec("triton") is None:  # checked without importing it, which would fix its mode
    pytest.skip("triton is not installed", allow_module_level=True)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in test_kernels_in_interpreter_subprocess")
if INTERPRETED:
    from frugal_qat.quantizer import triton_kernels as tk


@pytest.mark.skipif(INTERPRETED, reason="already in an interpreter process")
def test_kernels_in_interpreter_subprocess(request):
    marks = request.config.getoption("-m")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, *(["-m", marks] if marks else [])]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(cmd, env=env, cwd=request.config.rootpath, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


BITS = (2, 3, 4, 8)
BF16 = torch.bfloat16


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """Every torch.empty during a test is filled with NaN (floats) or -1 (ints): a kernel that leaves part of a
    buffer unwritten, or a gather that reads such a part, spoils the result."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.device.type == "cpu" and t.numel():
            t.fill_(float("nan") if t.is_floating_point() else -1)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def guarded(t, fill):
    """``t`` as a strided view into a larger buffer filled with ``fill`` around it: an unmasked read past any
    edge picks up NaN (floats) or garbage words (ints) and spoils the result."""
    rows, cols = t.shape
    buf = torch.full((rows + 3, cols + 5), fill, dtype=t.dtype)
    buf[1 : rows + 1, 2 : cols + 2] = t
    return buf[1 : rows + 1, 2 : cols + 2]


def make_case(bits, group_size, M, K, N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = K if group_size == -1 else group_size
    codes = torch.randint(0, 2**bits, (N, K), generator=gen, dtype=torch.uint8)
    scale = torch.rand(N, K // g, generator=gen) * 0.05 + 0.005
    zero = torch.randint(0, 2**bits, (N, K // g), generator=gen).float()
    p = pack_linear(codes, scale, zero, bits, group_size)
    scales = p["scales"].float()
    # Reference quantities in float64 from the unpacked integers (independent of any packing code).
    q_minus_z = codes.t().double() - zero.t().double().repeat_interleave(g, 0)  # [K, N]
    w = q_minus_z * scales.double().repeat_interleave(g, 0)
    x = torch.randn(M, K, generator=gen).to(BF16)
    grad_y = torch.randn(M, N, generator=gen).to(BF16)
    tensors = {
        "x": guarded(x, float("nan")),
        "grad_y": guarded(grad_y, float("nan")),
        "qweight": guarded(p["qweight"], -1),
        "qzeros": guarded(p["qzeros"], -1),
        "scales": guarded(scales, float("nan")),
    }
    return tensors, x.double(), grad_y.double(), q_minus_z, w


def assert_close(actual, expected, rel):
    assert not actual.isnan().any()
    err = (actual.double() - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item(), err


# (group_size, M, K, N): ragged M and N against the blocks (16/64 rows, 64 columns); the 16-row and the 64-row
# configuration (M <= 16, M > 16); a per-row group (-1); groups of 32 (two per grad-scales block of 64 rows), 64
# and 128 (cut by the blocks).
CASES = [
    (32, 7, 96, 40),
    (64, 33, 128, 72),
    (-1, 5, 160, 40),
    (128, 2, 256, 24),
]


def split_in_two(plan: kc.LaunchPlan, length: int) -> kc.LaunchPlan:
    """``plan`` with its reduction loop (``length`` rows, in steps of the block) cut into two programs."""
    step = plan.config.block_k if plan.kernel == "matmul" else plan.config.block_n
    chunk = kc.cdiv(kc.cdiv(length, step), 2) * step
    return dataclasses.replace(plan, grid=(*plan.grid[:2], kc.cdiv(length, chunk)), split=kc.cdiv(length, chunk),
                               chunk=chunk)


@needs_interpreter
@pytest.mark.parametrize("case", CASES, ids=lambda c: "g{}-M{}-K{}-N{}".format(*c))
@pytest.mark.parametrize("bits", BITS)
def test_fused_kernels_match_reference(bits, case):
    group_size, M, K, N = case
    t, x, grad_y, q_minus_z, w = make_case(bits, group_size, M, K, N, seed=bits)
    g = K if group_size == -1 else group_size

    y = tk.dequant_matmul(t["x"], t["qweight"], t["qzeros"], t["scales"], bits, group_size)
    assert y.shape == (M, N) and y.dtype == BF16
    assert_close(y, x @ w, 8e-3)  # one bf16 rounding of the output
    grad_x = tk.dequant_matmul_grad_input(t["grad_y"], t["qweight"], t["qzeros"], t["scales"], bits, group_size, K)
    assert grad_x.shape == (M, K) and grad_x.dtype == BF16
    assert_close(grad_x, grad_y @ w.t(), 8e-3)
    grad_s = tk.dequant_matmul_grad_scales(t["x"], t["grad_y"], t["qweight"], t["qzeros"], bits, group_size)
    expected = (q_minus_z * (x.t() @ grad_y)).reshape(K // g, g, N).sum(1)
    assert grad_s.shape == (K // g, N) and grad_s.dtype == torch.float32
    assert_close(grad_s, expected, 1e-5)

    # The fp32 partial sums before the final bf16 cast (fp32 accuracy), with the reduction loop split in two
    # programs (split-K, split-N) as generation-sized launches do.
    scales, qw, qz = t["scales"], t["qweight"], t["qzeros"]
    plan = split_in_two(kc.plan_matmul(M, N, K), K)
    part = torch.empty(plan.partial_shape(M, N, K))
    tk.matmul_launch(t["x"], qw, qz, scales, part, bits, g, plan)(part)
    assert_close(part.sum(0), x @ w, 1e-5)
    plan = split_in_two(kc.plan_grad_input(M, N, K), N)
    part = torch.empty(plan.partial_shape(M, N, K))
    tk.grad_input_launch(t["grad_y"], qw, qz, scales, part, bits, g, K, plan)(part)
    assert_close(part.sum(0), grad_y @ w.t(), 1e-5)


def test_launch_plans_split_generation_calls():
    """Few output blocks (generation): the reduction loop is cut so that about TARGET_PROGRAMS programs run."""
    mm = kc.plan_matmul(1, 1024, 8192)  # k_proj of Llama-2-70B at one token: 16 column blocks
    assert mm.split > 1 and mm.grid[2] == mm.split and mm.chunk * (mm.split - 1) < 8192 <= mm.chunk * mm.split
    assert mm.grid[0] * mm.grid[1] * mm.split <= kc.TARGET_PROGRAMS
    assert kc.plan_matmul(4096, 8192, 8192).split == 1  # enough blocks already
    gi = kc.plan_grad_input(2, 1100, 128)
    assert gi.split == 2 and gi.chunk % gi.config.block_n == 0


@needs_interpreter
@pytest.mark.parametrize("bits", (3, 4))
@pytest.mark.parametrize("group_size, K", [(20, 100), (96, 192)])
def test_grad_scales_any_group_size(bits, group_size, K):
    """Groups cut by the 64-row blocks (20, 40, 96: several partial sums per group) and K not a multiple of 64."""
    t, x, grad_y, q_minus_z, _ = make_case(bits, group_size, 5, K, 24, seed=group_size)
    grad_s = tk.dequant_matmul_grad_scales(t["x"], t["grad_y"], t["qweight"], t["qzeros"], bits, group_size)
    expected = (q_minus_z * (x.t() @ grad_y)).reshape(K // group_size, group_size, 24).sum(1)
    assert_close(grad_s, expected, 1e-5)


def rounded_either_way(actual_bf16, exact_fp32):
    """``actual`` is ``exact`` rounded to bf16 to nearest even (GPU) or truncated (the interpreter's cast)."""
    nearest = exact_fp32.to(BF16)
    truncated = (exact_fp32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(BF16)
    return bool(((actual_bf16 == nearest) | (actual_bf16 == truncated)).all())


@needs_interpreter
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", (32, -1))
def test_dequantize_tile_equals_torch_ops(bits, group_size):
    """The helper's W tile is the torch ops' fp32 ``(q - z) * s`` rounded once: bit for bit before the rounding."""
    K, N = 192, 72
    t, *_ = make_case(bits, group_size, 1, K, N, seed=bits)
    g = K if group_size == -1 else group_size
    spec = packed._Spec(bits, g, None, "torch", torch.float32, False)
    for k0, k1, n0, n1 in ((0, K, 0, N), (64, 128, 32, 72)):  # the whole layer; a tile of whole groups / columns
        got = tk.dequantize_tile(t["qweight"], t["qzeros"], t["scales"], bits, g, k0, k1, n0, n1, BF16)
        exact = packed._dequantize(t["qweight"], t["qzeros"], t["scales"], spec, k0, k1, n0, n1, torch.float32)
        assert got.shape == (k1 - k0, n1 - n0) and got.dtype == BF16
        assert rounded_either_way(got, exact)


@needs_interpreter
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size, tile_rows", [(32, 64), (128, 64), (-1, 96)])
def test_reduce_scale_grad_equals_torch_ops(bits, group_size, tile_rows):
    """Tiles of two whole groups, of part of a group, and ragged parts of a per-row group."""
    K, N = 256, 72
    t, *_ = make_case(bits, group_size, 1, K, N, seed=bits)
    g = K if group_size == -1 else group_size
    spec = packed._Spec(bits, g, None, "torch", torch.float32, False)
    got = torch.zeros(K // g, N)
    expected = torch.zeros(K // g, N)
    for k0, k1 in packed._tile_bounds(K, g, tile_rows):
        grad_w = torch.randn(k1 - k0, N).to(BF16)
        tk.reduce_scale_grad(got, grad_w, t["qweight"], t["qzeros"], bits, g, k0, k1)
        packed._reduce_scale_grad_(expected, grad_w, t["qweight"], t["qzeros"], spec, k0, k1)
    assert_close(got, expected.double(), 1e-5)


@needs_interpreter
@pytest.mark.parametrize("bits", (3, 8))
def test_tiled_path_with_helpers_matches_torch_ops(bits):
    """The CUDA tiled path (bf16 tiles from the helper kernels, then matmuls) against the same path with torch ops,
    forward and both gradients, with tiles that cut the layer in both directions."""
    K, N, M, g = 256, 96, 6, 64
    t, *_ = make_case(bits, g, M, K, N, seed=bits)
    x = torch.randn(M, K).to(BF16)
    results = []
    for helpers in (True, False):
        spec = packed._Spec(bits, g, 64, "torch", BF16, helpers)
        scales = t["scales"].contiguous().requires_grad_()
        xb = x.clone().requires_grad_()
        y = packed._PackedLinearFunction.apply(xb, t["qweight"], t["qzeros"], scales, spec)
        y.backward(torch.ones_like(y))
        results.append((y.detach().float(), xb.grad.float(), scales.grad))
    for got, ref in zip(*results):
        assert_close(got, ref.double(), 2e-2)  # the interpreter truncates the helper's bf16 W; torch rounds


@needs_interpreter
@pytest.mark.parametrize("bits", (2, 3))
def test_layer_fused_backend_matches_tiled_backend(bits):
    """The autograd function routes to the fused kernels: output and both gradients agree with the tiled path."""
    t, *_ = make_case(bits, 32, 5, 96, 40)
    tensors = {k: t[k].contiguous() for k in ("qweight", "qzeros")}
    tensors["scales"] = t["scales"].half()
    x = torch.randn(2, 3, 96).to(BF16)
    results = []
    for backend in ("torch", "triton"):
        layer = PackedLinear.from_packed(tensors, bits, 32, 96, 40, backend=backend)
        xb = x.clone().requires_grad_()
        y = layer(xb)
        y.backward(torch.ones_like(y))
        results.append((y.detach().float(), xb.grad.float(), layer.scales.grad))
    for ref, got in zip(*results):
        assert_close(got, ref.double(), 1e-2)


@needs_interpreter
def test_rejects_bad_inputs():
    t, *_ = make_case(4, 32, 3, 64, 16)
    with pytest.raises(ValueError, match="bfloat16"):
        tk.dequant_matmul(t["x"].float(), t["qweight"], t["qzeros"], t["scales"], 4, 32)
    with pytest.raises(ValueError, match="does not divide"):
        tk.dequant_matmul(t["x"], t["qweight"], t["qzeros"], t["scales"], 4, 48)
    t20, *_ = make_case(4, 16, 3, 64, 16)
    with pytest.raises(ValueError, match="multiples of 32"):
        tk.dequant_matmul(t20["x"], t20["qweight"], t20["qzeros"], t20["scales"], 4, 16)
    with pytest.raises(ValueError, match="power of two"):
        kc.KernelConfig(8, 64, 32)


def meta_layer(K, N, bits, g):
    meta = dict(device="meta")
    return (torch.empty(K * bits // 32, N, dtype=torch.int32, **meta),
            torch.empty(K // g, N * bits // 32, dtype=torch.int32, **meta), torch.empty(K // g, N, **meta))


@needs_interpreter
def test_offsets_past_2_31_on_meta_tensors():
    """Token-indexed offsets use 64-bit bases, so 80000 tokens x 28672 (more than 2^31 elements) pass the launch
    checks; a weight that 32-bit offsets cannot span is refused with a clear error before any launch."""
    K, N, g = 28672, 8192, 64
    qweight, qzeros, scales = meta_layer(K, N, 2, g)
    x = torch.empty(80000, K, dtype=BF16, device="meta")
    grad_y = torch.empty(80000, N, dtype=BF16, device="meta")
    assert x.numel() > 2**31
    for block_rows in (16, 32, 64):
        tk._check_offsets(block_rows, {"x": x, "grad_y": grad_y}, {"qweight": qweight, "qzeros": qzeros,
                                                                    "scales": scales})
    plan = kc.plan_grad_scales(80000, N, K, g)
    launch = tk.grad_scales_launch(x, grad_y, qweight, qzeros, torch.empty(plan.partial_shape(80000, N, K),
                                                                           device="meta"), 2, g, plan)
    assert launch.args[5] == 80000 and launch.grid == (K // 64, N // 64, 1)

    K = N = 2**17  # 8-bit words: 2^15 x 2^17 = 2^32 elements
    qweight, qzeros, scales = meta_layer(K, N, 8, K)
    x = torch.empty(1, K, dtype=BF16, device="meta")
    with pytest.raises(ValueError, match="2\\^31"):
        tk.dequant_matmul(x, qweight, qzeros, scales, 8, -1)
    with pytest.raises(ValueError, match="2\\^31"):
        tk.dequantize_tile(qweight, qzeros, scales, 8, K, 0, 32, 0, N, BF16)


@needs_interpreter
def test_launch_configs_come_from_the_table():
    for M in (1, 16, 17, 64, 1000):
        assert kc.plan_matmul(M, 40, 96).config == kc.fused_config("matmul", M)
        assert kc.plan_matmul(M, 40, 96).config in kc.all_configs("matmul")
    assert kc.fused_config("matmul", 16).block_m == 16 and kc.fused_config("matmul", 17).block_m == 64
    forced = dataclasses.replace(kc.plan_matmul(1, 40, 96), config=kc.all_configs("matmul")[-1])
    assert forced.config.block_m == 64
