"""The real code paths at the real shapes on fake tensors: what a phase allocates, without the data or the compute.

``frugal-qat plan --simulate`` checks the planner's formulas by running the code itself. Under torch's
``FakeTensorMode`` every tensor has a shape, a dtype and strides but no storage, and every op only computes its
output's metadata, so one Block-AP block, one E2E-QP step over all 80 blocks of a 70B model, and the perplexity
pass run in seconds on a CPU. A dispatch mode (:class:`LiveBytes`) counts the bytes of every storage an op creates
and uncounts it when freed, which gives the peak bytes of live tensors: what the run's ``torch.cuda`` allocator
would hold at its peak (``max_memory_allocated``), without allocator rounding or fragmentation.

What runs (the same functions the runs call, in the order the runs call them):

- **Block-AP, one block** (``block_ap/run.py``): ``arch.build_block`` with fp32 weights -> the fp stream update
  forward (no grad, the policy's no-grad context) -> ``wrap_linears`` -> ``make_optimizer`` -> the validation
  forward -> ``train_step`` (with its AdamW step) twice, so the second has the optimizer states -> validation ->
  ``freeze_block`` -> the quant stream update -> ``QuantLinear.pack``. The micro-batches the read-ahead thread
  keeps on the device (``prefetch(depth=2)``: two steps ahead of the one in use) are allocated beside them, since
  the read-ahead thread itself does not run here.
- **E2E-QP, one optimizer step over the whole model** (``e2e_qp/run.py``): ``assemble_packed_model`` fed fake
  packed tensors of the real shapes, ``make_optimizer`` (bitsandbytes' 8-bit AdamW: its step runs on fake tensors,
  being a torch custom op with a fake kernel in bitsandbytes 0.50), activation checkpointing on, then
  ``e2e_step`` (chunked loss, clipping, the optimizer step) twice, with two micro-batches each, so that the second
  step runs with the optimizer states and the gradients accumulated over a micro-batch.
- **Perplexity**: one block's no-grad forward on an evaluation micro-batch, then the final norm, the fp32 lm_head
  and one chunk of logits with its cross-entropy (as ``eval/ppl.py`` does for each window).

The CUDA policy on a CPU: fake CUDA tensors crash autograd in a CPU-only torch build, so the simulation runs fake
CPU tensors under the CUDA precision policy (``precision.resolve("cpu", policy="cuda")``: bf16 autocast, a bf16
E2E-QP model), and differs from a GPU run in what only CUDA does, which comes from the planner instead:

- the CUDA context, cuBLAS workspace and allocator reserve (``PlanSettings.cuda_reserve``), and flash
  attention's fp32 gradient accumulator for the queries (allocated inside the kernel, invisible to a dispatch
  mode): the phase's "CUDA only" terms, added to the simulated peak;
- the packed matmuls: the CPU torch path of ``PackedLinear`` is not the one CUDA takes, so under the CUDA policy
  the simulation replaces it by a stand-in that makes the same outputs (y, dL/dx, dL/ds) and counts, while it
  runs, the dequantization transients of the CUDA path (:func:`frugal_qat.quantizer.packed.packed_matmul_transients`);
- AdamW: torch picks its multi-tensor ("foreach") implementation for CUDA parameters and the single-tensor one for
  CPU parameters; the simulation sets ``foreach=True``, as a GPU run gets, so its temporaries are counted.

Checks of values (``torch.equal`` of ``g_idx`` in ``PackedLinear.from_packed`` and of the re-quantized weight in
``QuantLinear.pack``, the positive-scale check of ``QuantLinear.freeze_``, the code-range check of ``pack_rows``)
cannot run without values; the simulation answers them as passing (:class:`LiveBytes`). transformers takes a fake
tensor for a sign of ``torch.compile`` and would build a 4-D causal mask a real run does not; it is told it is not
tracing. CPU autocast's op lists differ from CUDA's; the dtypes that matter here are set explicitly by the code
(``.float()`` before the losses, fp32 norms). The perplexity head repeats ``eval/ppl.py``'s loop, which is not a
function there.

The same phase functions run on real tensors (:func:`run_phase` with ``fake=False``: zeros, valid packed codes),
which is how the simulation is checked: on a small model its peak equals the live-tensor peak of the real run
measured by the profiler's ``LiveTensors`` (``tests/planner/test_simulate.py``, ``tools/bench_simulate.py``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from frugal_qat.planner.estimate import (
    BATCHES_AHEAD,
    PHASES,
    PlanSettings,
    Term,
    cuda_only_terms,
    model_shape,
)
from frugal_qat.precision import frozen

log = logging.getLogger(__name__)


# ---- the live-bytes tracker -------------------------------------------------------------------------------------


def _tensors(tree) -> list[torch.Tensor]:
    """The dense tensors of an op's arguments or results, except those on the meta device (a model built on meta
    holds no memory; a fake tensor reports the device it stands for)."""
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor) and not t.is_sparse
            and t.device.type != "meta"]


_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created by torch ops inside this mode and still alive, their peak, and the
    peak per stage.

    A storage is keyed by its identity (the StorageImpl, ``UntypedStorage._cdata``), not by its address: fake
    storages have no data. Views and in-place results share an input's storage and are not counted again; a
    storage is uncounted when torch frees it. Works on real and fake tensors alike. ``transient(n)``: an
    allocation of ``n`` bytes made and freed inside a kernel (seen by the CUDA allocator, not by this mode).
    ``answer_checks``: answer value checks as passing without running them (fake tensors have no values):
    ``torch.equal`` and the truth of a boolean tensor (``if (s > 0).all():``) are True, an integer read
    (``int(codes.max())``) is 0; a float read still fails, as it would change what the code computes.
    ``matmul_dtypes``: per stage, the dtypes the matrix multiplications received (what ran on tensor cores).
    """

    def __init__(self, answer_checks: bool = False, describe: bool = False) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.stages: dict[str, int] = {}
        self.at_peak: list[tuple[str, int]] = []  # with describe=True: (what, bytes) live at the peak, largest first
        self.matmul_dtypes: dict[str, set[str]] = {}  # stage -> dtypes of the matmuls' inputs seen in it
        self._stage: str | None = None
        self._stage_peak = 0
        self._live: dict[int, int] = {}
        self._what: dict[int, str] = {}
        self._answer_checks = answer_checks
        self._describe = describe

    def _bump(self, nbytes: int = 0, what: str = "") -> None:
        level = self.current + nbytes
        if level > self.peak and self._describe:
            self.at_peak = sorted([(self._what[k], self._live[k]) for k in self._live]
                                  + ([(f"transient: {what}", nbytes)] if nbytes else []), key=lambda e: -e[1])
        self.peak = max(self.peak, level)
        self._stage_peak = max(self._stage_peak, level)

    def transient(self, nbytes: int, what: str = "") -> None:
        self._bump(nbytes, what)

    def saw_matmul(self, dtype: torch.dtype) -> None:
        if self._stage is not None:
            self.matmul_dtypes.setdefault(self._stage, set()).add(str(dtype).removeprefix("torch."))

    def stage(self, name: str | None) -> None:
        """Close the open stage (its peak goes to ``stages``, the larger if the name repeats) and open ``name``."""
        if self._stage is not None:
            self.stages[self._stage] = max(self.stages.get(self._stage, 0), self._stage_peak)
        self._stage, self._stage_peak = name, self.current

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
        self._what.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._answer_checks:
            if func is torch.ops.aten.equal.default:
                return True
            if func is torch.ops.aten._local_scalar_dense.default and not args[0].is_floating_point():
                return True if args[0].dtype == torch.bool else 0
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS:
            self.saw_matmul(args[0].dtype)
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            if nbytes == 0 or key in self._live or key in inputs:
                continue
            self._live[key] = nbytes
            if self._describe:
                self._what[key] = f"{func.__name__} -> {str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
            self.current += nbytes
            self._bump()
            # A storage keeps its Python object while torch holds it, so this runs when torch frees it.
            weakref.finalize(storage, self._free, key)
        return out


# ---- results ----------------------------------------------------------------------------------------------------


@dataclass
class Simulated:
    """One phase run on fake tensors. ``live_peak``: peak bytes of live tensors (the code's own allocations);
    ``cuda_terms``: what only a GPU adds (planner terms); ``stages``: live peak per stage; ``seconds``: wall time
    of the simulation."""

    phase: str
    live_peak: int
    cuda_terms: list[Term] = field(default_factory=list)
    stages: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    matmul_dtypes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return self.live_peak + sum(t.bytes for t in self.cuda_terms)

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "simulated_peak": self.peak, "live_peak": self.live_peak,
                "cuda_terms": [{"name": t.name, "bytes": t.bytes, "note": t.note} for t in self.cuda_terms],
                "stages": dict(self.stages), "seconds": round(self.seconds, 3),
                "matmul_dtypes": {k: list(v) for k, v in self.matmul_dtypes.items()}}


# ---- set-up -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSource:
    """What ``assemble_packed_model`` reads of a ``ModelSource``, from a config alone (no files)."""

    arch: Any
    hf: Any
    tied: bool
    n_layers: int

    def rotary(self) -> torch.nn.Module:
        from frugal_qat.arch import rotary

        return rotary(self.hf, self.arch)

    def fill_buffers(self, model: torch.nn.Module, device: torch.device | str = "cpu") -> None:
        from frugal_qat.arch import fill_buffers

        fill_buffers(model, self.hf, self.arch, device)


def _source(config: dict[str, Any], seqlen: int | None) -> ShapeSource:
    from frugal_qat.arch import arch_for, hf_config

    arch, hf = arch_for(config), hf_config(config, seqlen)
    return ShapeSource(arch, hf, bool(getattr(hf, "tie_word_embeddings", False)), int(hf.num_hidden_layers))


def _layer_shapes(src: ShapeSource) -> dict[str, torch.Size]:
    """Block 0's state-dict shapes (keys relative to the block), from the layer built on the meta device."""
    with torch.device("meta"):
        layer = src.arch.layer_cls(src.hf, layer_idx=0)
    return {k: v.shape for k, v in layer.state_dict().items()}


@dataclass
class _Env:
    """How a phase runs: on fake tensors (the simulation) or real ones (to check the simulation against a real
    run on a small model), with ``stage`` told where it is."""

    fake: bool
    cuda: bool
    stage: Callable[[str | None], None]

    def empty(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor to stand in for data read from disk: no values when fake, zeros when real."""
        return torch.empty(*shape, dtype=dtype) if self.fake else torch.zeros(*shape, dtype=dtype)

    @contextlib.contextmanager
    def tensors(self) -> Iterator[None]:
        """Fake tensors when ``fake``. transformers takes a fake tensor for a sign of tracing (torch.compile,
        export) and then builds a 4-D causal mask that a real run does not (it relies on SDPA's ``is_causal``),
        which also makes attention repeat k and v for GQA; the simulation tells it that it is not tracing."""
        if not self.fake:
            yield
            return
        from torch._subclasses.fake_tensor import FakeTensorMode
        from transformers.utils import import_utils

        # allow_non_fake_inputs: small real tensors made outside the mode (bitsandbytes' maps) mix in.
        with (mock.patch.object(import_utils, "is_fake_tensor", lambda tensor: False),
              FakeTensorMode(allow_non_fake_inputs=True)):
            yield


@contextlib.contextmanager
def _real_values():
    """Leave fake mode for code that needs values and makes no large tensor (bitsandbytes' optimizer constructor
    builds its quantization map with ``.tolist()``)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


@contextlib.contextmanager
def _cuda_packed_kernels(tracker: LiveBytes) -> Iterator[None]:
    """Replace PackedLinear's CPU torch path by the CUDA path's footprint: the same outputs, and the CUDA path's
    dequantization transients counted on top of what is live while the kernel runs."""
    from frugal_qat.quantizer import packed
    from frugal_qat.quantizer.packed import packed_matmul_transients

    def forward(x2, qweight, qzeros, scales, spec):
        m, k = x2.shape
        n = qweight.shape[1]
        y = x2.new_empty(m, n)
        tracker.saw_matmul(x2.dtype)
        tracker.transient(packed_matmul_transients(k, n, m, x2.element_size(), "cuda")["forward"],
                          f"packed matmul forward {k}x{n}")
        return y

    def backward(x2, grad_y, qweight, qzeros, scales, spec, need_x, need_s):
        m, k = x2.shape
        grad_x = torch.empty_like(x2) if need_x else None
        grad_s = torch.zeros(scales.shape, dtype=torch.float32) if need_s else None
        tracker.transient(packed_matmul_transients(k, qweight.shape[1], m, x2.element_size(), "cuda")["backward"],
                          f"packed matmul backward {k}x{qweight.shape[1]}")
        return grad_x, grad_s

    with mock.patch.object(packed, "_tiled_forward", forward), mock.patch.object(packed, "_tiled_backward", backward):
        yield


def _precision(settings: PlanSettings, src: ShapeSource):
    return settings.precision(src.arch.bf16_activations, run_device="cpu")


# ---- the phases -------------------------------------------------------------------------------------------------


def simulate_block_ap(config: dict[str, Any], s: PlanSettings, env: _Env) -> None:
    """One Block-AP block, stage by stage, as ``run_block_ap`` runs it (module docstring)."""
    from frugal_qat.arch import BlockRunner, build_block
    from frugal_qat.block_ap.train_block import freeze_block, make_optimizer, train_step, wrap_linears

    src = _source(config, s.seqlen)
    prec = _precision(s, src)
    dev = torch.device("cpu")
    H, L, mb, ga = src.hf.hidden_size, s.seqlen, s.batch_size, s.block_ap_grad_accum
    shapes = _layer_shapes(src)
    runner = BlockRunner(src.hf, src.arch, dev)

    def pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:  # one step's micro-batches, as to_device() makes them
        return [(env.empty(mb, L, H), env.empty(mb, L, H)) for _ in range(ga)]

    def update(block: torch.nn.Module, teacher: bool = False) -> None:  # run(): a micro-batch of a chunk, no grad
        with torch.no_grad(), frozen(block), (prec.teacher(dev) if teacher else prec.nograd(dev)):
            out = runner(block, 0, env.empty(mb, L, H))
        del out

    def validate(block: torch.nn.Module) -> None:
        ahead = [pairs() for _ in range(BATCHES_AHEAD)]  # read ahead while this step's micro-batches run
        with torch.no_grad(), frozen(block), prec.nograd(dev):
            for x, y in pairs():
                out = runner(block, 0, x)
                torch.nn.functional.mse_loss(out.float(), y, reduction="sum")
                del out
        del ahead

    with env.tensors():
        env.stage("load")
        block = build_block(src.hf, src.arch, 0, {k: env.empty(*v) for k, v in shapes.items()})
        env.stage("fp update")
        update(block, teacher=True)
        env.stage("wrap")
        linears = wrap_linears(block, s.wbits, s.group_size, name="layers.0")
        optimizer = make_optimizer(block, linears, 1e-5, 1e-4, fused=env.cuda)
        if s.epochs > 0:
            env.stage("validate")
            validate(block)
            env.stage("train")
            for _ in range(2):  # the second step runs with the AdamW states made by the first
                ahead = [pairs() for _ in range(BATCHES_AHEAD)]
                micro = pairs()
                train_step(block, lambda m, x: runner(m, 0, x), micro, optimizer, prec, dev)
                del micro, ahead
            env.stage("validate")
            validate(block)
        env.stage("quant update")
        freeze_block(block)
        update(block)
        env.stage("save")
        packed = {name: lin.pack() for name, lin in linears.items()}
        env.stage(None)
        del packed, block, linears, optimizer


def _packed_block_tensors(env: _Env, src: ShapeSource, shapes: dict[str, torch.Size], bits: int,
                          group_size: int) -> dict[str, torch.Tensor]:
    """One block of a Block-AP run directory: GPTQ tensors per linear (int32 codes, fp16 scales), fp16 biases and
    norms (``run_dir.save_block``); valid values when real (zero codes, unit scales, ``g_idx = i // g``)."""
    from frugal_qat.quantizer.packing import packed_rows

    out, linears = {}, src.arch.linears
    for name in linears:
        out_f, in_f = shapes[f"{name}.weight"]
        g = in_f if group_size == -1 else group_size
        out[f"{name}.qweight"] = env.empty(packed_rows(in_f, bits), out_f, dtype=torch.int32)
        out[f"{name}.qzeros"] = env.empty(in_f // g, packed_rows(out_f, bits), dtype=torch.int32)
        out[f"{name}.scales"] = env.empty(in_f // g, out_f, dtype=torch.float16)
        out[f"{name}.g_idx"] = env.empty(in_f, dtype=torch.int32)
        if not env.fake:
            out[f"{name}.scales"].fill_(1e-2)
            out[f"{name}.g_idx"] = torch.arange(in_f, dtype=torch.int32) // g
        if f"{name}.bias" in shapes:
            out[f"{name}.bias"] = env.empty(out_f, dtype=torch.float16)
    for key, shape in shapes.items():
        if key.rsplit(".", 1)[0] not in linears:
            out[key] = env.empty(*shape, dtype=torch.float16)
    return out


def simulate_e2e_qp(config: dict[str, Any], s: PlanSettings, env: _Env) -> None:
    """Build the packed model, then two optimizer steps of (up to) two micro-batches each (module docstring)."""
    from frugal_qat.arch import EMBED_KEY, LM_HEAD_KEY
    from frugal_qat.e2e_qp.run import assemble_packed_model, e2e_step, make_optimizer, named_scales

    src = _source(config, s.e2e_seqlen)
    prec = _precision(s, src)
    dev = torch.device("cpu")
    shapes = _layer_shapes(src)
    V, H = src.hf.vocab_size, src.hf.hidden_size

    def extra(key: str) -> torch.Tensor:
        return env.empty(V, H, dtype=torch.float16) if key in (EMBED_KEY, LM_HEAD_KEY) else env.empty(
            H, dtype=torch.float16)

    with env.tensors():
        env.stage("build model")
        model = assemble_packed_model(src, lambda i: _packed_block_tensors(env, src, shapes, s.wbits, s.group_size),
                                      extra, s.wbits, s.group_size, dev, prec.e2e_dtype)
        scales = named_scales(model)
        with _real_values():
            optimizer = make_optimizer(list(scales.values()), "adamw8bit", 1e-5, dev)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for step in range(2):
            env.stage(f"step {step + 1}")
            ids = torch.zeros(s.e2e_batch_size, s.e2e_seqlen, dtype=torch.long)
            micro = [(ids, ids)] * min(s.grad_accum, 2)
            e2e_step(model, micro, optimizer, list(scales.values()), prec, dev, grad_accum=s.grad_accum,
                     logits_chunk=s.logits_chunk, max_grad_norm=0.3)
            del micro, ids
        env.stage(None)
        del model, optimizer, scales


def simulate_ppl_eval(config: dict[str, Any], s: PlanSettings, env: _Env) -> None:
    """One block's no-grad forward on an evaluation micro-batch, then the head on one window (``eval/ppl.py``)."""
    from frugal_qat.arch import BlockRunner, build_block

    src = _source(config, s.seqlen)
    prec = _precision(s, src)
    dev = torch.device("cpu")
    H, L, V = src.hf.hidden_size, s.seqlen, src.hf.vocab_size
    shapes = _layer_shapes(src)
    runner = BlockRunner(src.hf, src.arch, dev)
    with env.tensors(), torch.no_grad():
        env.stage("blocks")
        block = build_block(src.hf, src.arch, 0, {k: env.empty(*v) for k, v in shapes.items()})
        with frozen(block), prec.nograd(dev):
            out = runner(block, 0, env.empty(s.eval_batch_size, L, H))
        del out, block
        env.stage("head")
        # perplexity(): the final norm and the lm_head in fp32, one window, its logits a token chunk at a time
        from frugal_qat.eval.ppl import window_nll

        norm = src.arch.norm_cls(H, eps=src.hf.rms_norm_eps)
        window_nll(norm(env.empty(L, H)), torch.zeros(L - 1, dtype=torch.long), env.empty(V, H), s.logits_chunk)
        env.stage(None)


_SIMULATORS = {"block_ap": simulate_block_ap, "e2e_qp": simulate_e2e_qp, "ppl_eval": simulate_ppl_eval}


def simulate(config: dict[str, Any], settings: PlanSettings, phases: tuple[str, ...] = PHASES,
             packed_kernels: str = "auto") -> dict[str, Simulated]:
    """Run ``phases`` on fake tensors under the precision policy of ``settings`` (see the module docstring).

    ``packed_kernels``: "cuda" counts the CUDA path's transients in place of PackedLinear's torch path, "torch"
    runs the torch path itself (to compare with a real CPU run); "auto": "cuda" when ``settings.device`` is cuda.
    Returns ``{phase: Simulated}``; on CUDA each has the planner's CUDA-only terms.
    """
    cuda = settings.device == "cuda"
    if packed_kernels == "auto":
        packed_kernels = "cuda" if cuda else "torch"
    if packed_kernels not in ("cuda", "torch"):
        raise ValueError(f"packed_kernels={packed_kernels!r}; choose auto, cuda or torch")
    shape = model_shape(config)
    results = {}
    for phase in phases:
        t0 = time.perf_counter()
        tracker = LiveBytes(answer_checks=True)
        kernels = _cuda_packed_kernels(tracker) if packed_kernels == "cuda" else contextlib.nullcontext()
        with kernels, tracker:
            run_phase(phase, config, settings, fake=True, cuda=cuda, stage=tracker.stage)
        extra = cuda_only_terms(phase, shape, settings) if cuda else []
        dtypes = {k: sorted(v) for k, v in tracker.matmul_dtypes.items()}
        results[phase] = Simulated(phase, tracker.peak, extra, dict(tracker.stages), time.perf_counter() - t0,
                                   dtypes)
        log.info("simulated %s: live peak %.2f GiB in %.1f s", phase, tracker.peak / 2**30, results[phase].seconds)
    return results


def run_phase(phase: str, config: dict[str, Any], settings: PlanSettings, *, fake: bool, cuda: bool = False,
              stage: Callable[[str | None], None] = lambda name: None) -> None:
    """Run one phase's code paths (:func:`simulate_block_ap`, ...) on fake tensors, or on real ones (zeros; to
    measure a small model for real and compare with its simulation). ``cuda``: what torch does differently for
    CUDA parameters (AdamW's foreach implementation). Measure with a dispatch mode around the call."""
    from frugal_qat.precision import deterministic

    if phase not in _SIMULATORS:
        raise ValueError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    with deterministic(settings.deterministic):  # --deterministic: attention on SDPA's math backend
        _SIMULATORS[phase](config, settings, _Env(fake, cuda, stage))
