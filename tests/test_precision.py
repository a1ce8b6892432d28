"""The precision policy decides every dtype; forced on this CPU, the CUDA policy really feeds 16-bit inputs to the
linears and packed matmuls of a Block-AP step, a stream update and an E2E-QP step."""

import contextlib
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from frugal_qat.block_ap.train_block import make_optimizer, train_step, wrap_linears
from frugal_qat.e2e_qp.run import build_packed_model, e2e_step, named_scales
from frugal_qat.e2e_qp.run import make_optimizer as e2e_optimizer
from frugal_qat.offload.blocks import ModelSource
from frugal_qat.precision import resolve
from frugal_qat.quantizer import packed

MATMULS = {"mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu", "linear"}


class MatmulDtypes(TorchDispatchMode):
    """Records the floating dtypes of every matmul-like op's tensor inputs."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set[torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS:
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.seen.setdefault(name, set()).update(dtypes)
        return func(*args, **(kwargs or {}))


def test_policies():
    cpu, cuda = resolve("cpu"), resolve("cuda")
    assert cpu.train_autocast is None and cpu.e2e_dtype == torch.float32 and cpu.stream_dtype == torch.float16
    assert cuda.train_autocast == torch.bfloat16 and cuda.nograd_autocast == torch.bfloat16
    assert cuda.e2e_dtype == cuda.e2e_autocast == torch.bfloat16 and cuda.master == torch.float32
    assert resolve("cpu", policy="cuda") == cuda  # forced: the GPU's dtypes on a CPU
    assert resolve("cuda:1").name == "cuda"
    assert resolve("cpu", needs_bf16_streams=True).stream_dtype == torch.bfloat16
    # The teacher stream: fp16 where the streams are fp16, TF32 where they must be bf16 (docs/PRECISION.md)
    assert cuda.teacher_autocast == torch.float16 and not cuda.teacher_tf32
    bf16_streams = resolve("cuda", needs_bf16_streams=True)
    assert bf16_streams.teacher_autocast is None and bf16_streams.teacher_tf32
    assert bf16_streams.to_json()["block_ap_teacher"] == "tf32" and cuda.to_json()["block_ap_teacher"] == "float16"
    before = torch.get_float32_matmul_precision()
    with bf16_streams.teacher("cuda"):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before, "TF32 is switched on for the teacher update only"
    assert resolve("cpu", stream_dtype="float16", needs_bf16_streams=True).stream_dtype == torch.float16
    assert cuda.to_json()["e2e_qp_model"] == "bfloat16" and cpu.to_json()["block_ap_train"] == "float32"
    with pytest.raises(ValueError, match="choose one of auto, cpu, cuda"):
        resolve("cpu", policy="tpu")


@pytest.mark.parametrize("policy,expected", [("cuda", torch.bfloat16), ("cpu", torch.float32)])
def test_block_ap_step_and_stream_update_compute_in_the_policy_dtype(tiny_llama, policy, expected):
    precision = resolve("cpu", policy=policy)
    src = ModelSource(tiny_llama)
    block, runner = src.block(0), src.runner()
    linears = wrap_linears(block, 2, 32, name="layers.0")
    optimizer = make_optimizer(block, linears, 1e-3, 1e-3)
    x = torch.randn(2, 16, 64)
    spy = MatmulDtypes()
    with spy:
        train_step(block, lambda m, t: runner(m, 0, t), [(x, x)], optimizer, precision, torch.device("cpu"))
    assert spy.seen["mm"] == {expected}, "every linear (forward and backward) ran in the policy's dtype"
    assert spy.seen["_scaled_dot_product_flash_attention_for_cpu"] == {expected}
    masters = {p.dtype for p in block.parameters()}
    assert masters == {torch.float32}, "trainable masters stay fp32 under every policy"

    spy = MatmulDtypes()
    with spy, torch.no_grad(), precision.nograd("cpu"):
        y = runner(block, 0, x)
    assert spy.seen["mm"] == {expected} and y.dtype == torch.float32  # the residual stream stays fp32
    spy = MatmulDtypes()
    with spy, torch.no_grad(), precision.teacher("cpu"):
        y = runner(block, 0, x)
    teacher = torch.float16 if policy == "cuda" else torch.float32
    assert spy.seen["mm"] == {teacher} and y.dtype == torch.float32


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    from frugal_qat.block_ap.run import run_block_ap
    from frugal_qat.config import resolve as resolve_config
    from tests.conftest import save_tiny_model

    root = tmp_path_factory.mktemp("prec")
    model = save_tiny_model(root / "model")
    cfg = resolve_config(None, {"quant.wbits": 3, "quant.group_size": 32, "data.train_size": 2, "data.val_size": 0,
                                "data.seqlen": 16, "block_ap.epochs": 0, "offload.device": "cpu"})
    run_block_ap(model, root / "run", cfg, torch.randint(0, 128, (2, 16)), show_progress=False)
    return root / "run"


@pytest.mark.parametrize("policy,expected", [("cuda", torch.bfloat16), ("cpu", torch.float32)])
def test_e2e_step_feeds_the_packed_matmuls_the_policy_dtype(packed_run, policy, expected, monkeypatch):
    precision = resolve("cpu", policy=policy)
    model, _ = build_packed_model(packed_run, torch.device("cpu"), precision.e2e_dtype)
    assert model.model.embed_tokens.weight.dtype == expected and model.lm_head.weight.dtype == expected
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32, "RoPE frequencies stay fp32"
    scales = named_scales(model)
    assert {p.dtype for p in scales.values()} == {torch.float32} and all(p.requires_grad for p in scales.values())
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    seen = []
    real = packed._PackedLinearFunction.forward
    monkeypatch.setattr(packed._PackedLinearFunction, "forward",
                        staticmethod(lambda ctx, x2, *a: (seen.append(x2.dtype), real(ctx, x2, *a))[1]))
    ids = torch.randint(0, 128, (2, 16))
    opt = e2e_optimizer(list(scales.values()), "adamw8bit", 1e-3, torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in scales.items()}
    tokens = e2e_step(model, [(ids, ids)], opt, list(scales.values()), precision, torch.device("cpu"), grad_accum=1,
                      logits_chunk=8, max_grad_norm=1.0)
    assert tokens.item() == 2 * 15
    assert set(seen) == {expected}, "every packed matmul (forward and recompute) got the policy's input dtype"
    assert any(not torch.equal(before[n], p) for n, p in scales.items()), "the scales trained"


class LiveCasts(TorchDispatchMode):
    """Weak references to every 16-bit copy made of a tensor with one of ``shapes`` (autocast's weight casts)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.refs = set(shapes), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == "_to_copy" and out.dtype == torch.bfloat16 and tuple(out.shape) in self.shapes:
            self.refs.append(weakref.ref(out))
        return out

    def alive(self) -> int:
        return sum(r() is not None for r in self.refs)


@pytest.mark.parametrize("freeze", [False, True])
def test_no_grad_forward_under_frozen_keeps_no_weight_copies(freeze):
    """Autocast caches its cast of every leaf that requires grad until the region ends: a freshly built block's
    whole weight set in 16 bits (1.6 GiB at 70B). ``precision.frozen`` (used by every no-grad forward of the runs)
    leaves each cast to die with its matmul, as the planner's ``_cast_cache`` term assumes."""
    from frugal_qat.precision import frozen

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    casts = LiveCasts({(32, 16), (8, 32)})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with casts, (frozen(model) if freeze else contextlib.nullcontext()):
            out = model(torch.randn(4, 16))
        assert out.dtype == torch.bfloat16 and len(casts.refs) == 2
        assert casts.alive() == (0 if freeze else 2)
    assert all(p.requires_grad for p in model.parameters()), "frozen restores the flags"
