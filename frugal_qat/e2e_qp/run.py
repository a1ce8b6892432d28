"""E2E-QP: train only the quantization step sizes, end to end on the language-model loss, over packed weights.

    open the Block-AP run -> assemble the model with PackedLinear layers (never dequantized as a whole; a run
    trained in a GGUF grid: GGUFPackedLinear over its ggml blocks, the grid's scales trained in the grid)
    -> token data (pretraining windows or Alpaca prompts) -> 8-bit AdamW on the scales
    -> for each step: micro-batches through the checkpointed blocks, chunked lm_head + loss, clip, step,
       checkpoint every K steps -> write the run directory with the new scales

Paper (EfficientQAT §3.3): weights and zero points frozen, scales trained with AdamW (8-bit, paged on GPU),
cosine schedule with 3 % warmup, gradient clipping 0.3, gradient checkpointing. Dtypes are the precision policy's
(``frugal_qat/precision.py``): on CUDA a bf16 model (embeddings, norms, lm_head, so the residual stream and the
checkpointed block inputs are bf16) under bf16 autocast, with fp32 scale masters; on CPU everything fp32. On CPU
bitsandbytes' 8-bit AdamW runs without paging (its CPU build says paged optimizers are CUDA-only).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from frugal_qat.arch import EMBED_KEY, LM_HEAD_KEY, NORM_KEY, logit_softcap, softcap
from frugal_qat.checkpoint.run_dir import (
    EXTRA_FILE,
    INDEX_FILE,
    TOKENIZER_FILES,
    clear_dir,
    hold_run_dirs,
    model_bytes,
    read_quant_config,
    save_block,
)
from frugal_qat.checkpoint.state import (
    Manifest,
    Progress,
    diff_settings,
    load_manifest,
    load_train_checkpoint,
    save_manifest,
    save_train_checkpoint,
)
from frugal_qat.checkpoint.store import atomic_copy, atomic_write_json, kill_point, read_json, remove_partials
from frugal_qat.config import RunConfig
from frugal_qat.distributed import (
    DS_CONFIG_FILE,
    agreed,
    barrier,
    check_launch,
    init_from_env,
    local_device,
    on_rank0,
    resolve_ds_config,
    sum_floats,
)
from frugal_qat.errors import ConfigError, CorruptCheckpoint, Interrupted, ResumeMismatch, TrainingDiverged
from frugal_qat.offload.blocks import ModelSource
from frugal_qat.offload.weights import read_config
from frugal_qat.planner import PlanSettings
from frugal_qat.planner.check import machine_limits, planner_grid, require_fit, settings_from_config
from frugal_qat.planner.profile import Mark, no_mark, peak_rss, return_large_frees_to_os
from frugal_qat.precision import Precision
from frugal_qat.precision import resolve as resolve_precision
from frugal_qat.quantizer.kquant import GGUFPackedLinear
from frugal_qat.quantizer.packed import PackedLinear
from frugal_qat.quantizer.primitives import SCALE_MIN

log = logging.getLogger(__name__)


# ---- the model over packed weights --------------------------------------------------------------------------------


PACKED_KEYS = ("qweight", "qzeros", "scales", "g_idx")


def assemble_packed_model(src: ModelSource, block_tensors: Callable[[int], dict[str, torch.Tensor]],
                          extra: Callable[[str], torch.Tensor], bits: int, group: int, device: torch.device,
                          dtype: torch.dtype, gguf_types: dict[str, str] | None = None) -> nn.Module:
    """A transformers causal LM whose linears are PackedLinear (int32 codes; fp32 trainable scales), built on the
    meta device and filled block by block: ``block_tensors(i)`` gives block i's packed tensors (keys relative to
    the block), ``extra(key)`` the embeddings, final norm and lm_head. Frozen tensors (embeddings, norms, lm_head,
    biases) are stored in ``dtype`` (the policy's ``e2e_dtype``). Everything but the scales is frozen.

    A run trained in a GGUF grid (``gguf_types``: each linear's ggml type) gets GGUFPackedLinear layers over its
    ``<linear>.ggml`` blocks instead: the codes and zero points frozen, the grid's scales trained in the grid.

    The run (:func:`build_packed_model`) fills it from the run's files; the planner's simulation from fake tensors
    of the same shapes, so both measure the same model.
    """
    with torch.device("meta"):
        model = src.arch.causal_lm_cls(src.hf)
    for i, layer in enumerate(model.model.layers):
        raw = block_tensors(i)
        for name in src.arch.linears:
            lin = layer.get_submodule(name)
            bias = raw[f"{name}.bias"].to(device, dtype) if f"{name}.bias" in raw else None
            if gguf_types is not None:
                new = GGUFPackedLinear.from_blocks(raw[f"{name}.ggml"].to(device), gguf_types[name], lin.in_features,
                                                   lin.out_features, bias)
            else:
                packed = {k: raw[f"{name}.{k}"].to(device) for k in PACKED_KEYS}
                if bias is not None:
                    packed["bias"] = bias
                new = PackedLinear.from_packed(packed, bits, group, lin.in_features, lin.out_features)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child, new)
        others = {k: v.to(device, dtype) for k, v in raw.items() if k.rsplit(".", 1)[0] not in src.arch.linears}
        _assign_frozen(layer, others, f"block {i}")
    _assign_frozen(model, {EMBED_KEY: extra(EMBED_KEY).to(device, dtype), NORM_KEY: extra(NORM_KEY).to(device, dtype)},
                   "embeddings")
    if src.tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        _assign_frozen(model, {LM_HEAD_KEY: extra(LM_HEAD_KEY).to(device, dtype)}, "lm_head")
    fresh_rotary(model, src, device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ConfigError(f"could not fill {leftover[:3]} of the packed model")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in named_scales(model).values():
        p.requires_grad_(True)
    return model


def _assign_frozen(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ConfigError(f"{what}: tensors {result.unexpected_keys[:3]} do not belong to the model")


def fresh_rotary(model: nn.Module, src: ModelSource, device: torch.device) -> None:
    """Give the model a rotary module computed anew in fp32 (and Gemma's ``embed_scale``). Its ``inv_freq`` is a
    buffer: built on meta it has no values, and DeepSpeed's bf16 mode casts every floating buffer to bf16, which
    moves the RoPE angles at position 4000 by radians. Called after building the model and again after
    ``deepspeed.initialize``."""
    src.fill_buffers(model, device)


def build_packed_model(run_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, ModelSource]:
    """The packed model of the Block-AP run ``run_dir``, read one block at a time (:func:`assemble_packed_model`)."""
    src = ModelSource(run_dir)
    if src.quant is None:
        raise ConfigError(f"{run_dir} is not a quantized frugal-qat run; run `frugal-qat block-ap` first")
    model = assemble_packed_model(src, lambda i: src.store.block_state(i, dtype=None),
                                  lambda key: src.lm_head_weight() if key == LM_HEAD_KEY else src.store.get(key),
                                  src.quant["bits"], src.quant["group_size"], device, dtype,
                                  src.quant.get("gguf_types") if src.quant.get("gguf") else None)
    return model, src


def named_scales(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters of the packed model, in module order: each PackedLinear's ``scales``; each
    GGUFPackedLinear's grid scales (``quant_parameters()``: super_scale, scale and, q4_k/q2_k, super_min). Codes and
    zero points stay frozen."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            out[f"{name}.scales"] = m.scales
        elif isinstance(m, GGUFPackedLinear):
            out.update({f"{name}.{k}": getattr(m, k) for k in m.quant_names})
    return out


@torch.no_grad()
def keep_scales_in_range(model: nn.Module, params: list[torch.Tensor]) -> None:
    """After a step: every PackedLinear scale (and DeepSpeed fp32 master) clamped to at least ``SCALE_MIN`` (the
    paper's clamp at 1e-4, notes §1; a step size must stay positive); every GGUFPackedLinear's grid parameters put
    back into their ranges by ``project_()`` (their scales may be signed, so the clamp must not touch them)."""
    grid = [m for m in model.modules() if isinstance(m, GGUFPackedLinear)]
    in_grid = {id(p) for m in grid for p in m.parameters()}
    for m in grid:
        m.project_()
    for p in params:
        if id(p) not in in_grid:
            p.clamp_(min=SCALE_MIN)


# ---- loss ---------------------------------------------------------------------------------------------------------


def _ce_sum(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, cap: float | None = None) -> torch.Tensor:
    logits = softcap((h @ weight.T).float(), cap)  # cap: Gemma 2's final logit soft-capping
    return torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum")


def chunked_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                    chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy and the token count (both 0-d tensors). The lm_head runs over ``chunk``
    tokens at a time under activation checkpointing, so [tokens, vocab] logits exist for one chunk only, forward
    and backward."""
    hidden = model.model(input_ids=input_ids).last_hidden_state
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    cap = logit_softcap(model.config)
    total = hidden.new_zeros((), dtype=torch.float32)
    for a in range(0, h.shape[0], chunk):
        total = total + checkpoint(_ce_sum, h[a : a + chunk], model.lm_head.weight, y[a : a + chunk], cap,
                                   use_reentrant=False)
    return total, (y != -100).sum()


def e2e_step(model: nn.Module, micro: list[tuple[torch.Tensor, torch.Tensor]], optimizer: torch.optim.Optimizer,
             scales: list[nn.Parameter], precision: Precision, device: torch.device, *, grad_accum: int,
             logits_chunk: int, max_grad_norm: float, engine=None,
             before_step: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """One E2E-QP optimizer step on this process's micro-batches ``micro`` [(input_ids, labels)].

    Each micro-batch's mean token loss, divided by ``grad_accum``, is back-propagated under the policy's dtypes;
    then ``before_step(step_loss)`` (the finite check), clipping, the optimizer step and the scale clamp. Under
    DeepSpeed (``engine``) the engine does the accumulation, the reduction across ranks and the clipping.
    Returns the token count as a 0-d tensor (no ``.item()``: the planner's simulation runs this on fake tensors).
    """
    if engine is None:
        optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), dtype=torch.float64, device=device)  # float64: sums as exactly as Python floats
    tokens = torch.zeros((), dtype=torch.long, device=device)
    for j, (x, y) in enumerate(micro):
        with precision.e2e(device):
            loss_sum, count = chunked_lm_loss(model, x, y, logits_chunk) if engine is None else engine(x, y)
        mean = loss_sum / count.clamp(min=1)
        if engine is None:
            (mean / grad_accum).backward()
        else:
            # DeepSpeed divides by its accumulation steps (grad_accum / N) and averages over the N ranks:
            # the same 1/grad_accum per micro-batch as the single process.
            engine.backward(mean)
            if j < len(micro) - 1:
                engine.step()  # a micro-step: counts toward DeepSpeed's accumulation boundary, updates nothing
        step_loss += (mean.detach() / grad_accum).double()
        tokens += count
    if before_step is not None:
        before_step(step_loss)
    if engine is None:
        torch.nn.utils.clip_grad_norm_(scales, max_grad_norm)
        optimizer.step()
    else:
        engine.step()  # the boundary: gradients reduced across ranks, clipped, optimizer step
    keep_scales_in_range(model, [*scales, *(fp32_masters(engine.optimizer) if engine is not None else [])])
    return tokens


def warmup_cosine(step: int, total: int, lr: float, warmup_ratio: float) -> float:
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine to 0 (the HF schedule the paper used)."""
    warm = math.ceil(total * warmup_ratio)
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(params: list[nn.Parameter], kind: str, lr: float, device: torch.device) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    if kind == "auto":
        kind = "paged_adamw8bit" if device.type == "cuda" else "adamw8bit"
    if kind == "paged_adamw8bit" and device.type != "cuda":
        log.warning("paged 8-bit AdamW needs CUDA; using bitsandbytes' (non-paged) 8-bit AdamW on %s", device)
        kind = "adamw8bit"
    # min_8bit_size: bitsandbytes keeps tensors under 4096 elements in fp32; a scale tensor of a small layer
    # (e.g. [2, 64]) is under it, and 8-bit state is what we want for every scale.
    if kind == "adamw8bit":
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0, min_8bit_size=1)
    if kind == "paged_adamw8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=0.0, min_8bit_size=1)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


# ---- data parallel on DeepSpeed ------------------------------------------------------------------------------------


class ScalesLoss(nn.Module):
    """What DeepSpeed's engine wraps: the packed model's LM loss (sum, token count), whose only trainable
    parameters are the scales. Its state dict holds only the scales: the packed weights and every frozen tensor
    are the input run's files, so an engine checkpoint is the scales and their optimizer state, not the model."""

    def __init__(self, model: nn.Module, chunk: int):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return chunked_lm_loss(self.model, input_ids, labels, self.chunk)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {f"model.{n}": p.detach() for n, p in named_scales(self.model).items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        scales = named_scales(self.model)
        missing = [n for n in scales if f"model.{n}" not in state]
        if missing and strict:
            raise ResumeMismatch(f"the DeepSpeed checkpoint lacks {missing[:3]}: it is another model's")
        for n, p in scales.items():
            if f"model.{n}" in state:
                p.copy_(state[f"model.{n}"])
        return nn.modules.module._IncompatibleKeys(missing, [])


def fp32_masters(optimizer) -> list[torch.Tensor]:
    """The fp32 master partitions a DeepSpeed optimizer wrapper keeps next to the model's parameters (ZeRO 1/2:
    ``single_partition_of_fp32_groups``; bf16 without ZeRO: ``fp32_groups_flat_partition``); none for a plain
    optimizer, which updates the parameters themselves."""
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(optimizer, attr):
            return list(getattr(optimizer, attr))
    return []


def full_fp32(p: nn.Parameter) -> torch.Tensor:
    """A trained scale at full precision: the fp32 master under DeepSpeed (a collective), else the parameter."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p)
    return p.detach() if full is None else full


# ---- the run ------------------------------------------------------------------------------------------------------


def plan_settings(cfg: RunConfig, run_dir: Path, device: torch.device, **limits) -> PlanSettings:
    """The planner's view of an E2E-QP run on the Block-AP run ``run_dir`` (its own bits and group size)."""
    quant = read_quant_config(run_dir)
    wbits, group_size = planner_grid(quant["bits"], quant["group_size"], quant.get("gguf"))
    return settings_from_config(cfg, device.type, wbits=wbits, group_size=group_size, **limits)


def run_e2e_qp(
    run_dir: str | Path,
    out: str | Path,
    cfg: RunConfig,
    data: tuple[torch.Tensor, torch.Tensor],
    *,
    device: torch.device,
    restart: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    show_progress: bool = True,
    ds_config: str | Path | dict | bool | None = None,
    mark: Mark = no_mark,
) -> dict:
    """Train the scales of the Block-AP run ``run_dir`` on ``data`` = (input_ids, labels) [N, L]; write ``out``.

    ``ds_config`` (None or False: off): train data parallel on DeepSpeed, on the processes a launcher started (or on
    this one): True for the config made from ``cfg`` (:func:`frugal_qat.distributed.default_ds_config`), a JSON
    file or dict to merge over it. Each rank computes micro-batches r, r+N, ... of every step, so the global
    batch is the single-process one; rank 0 alone writes ``out``; the resolved config is in
    ``out/deepspeed_config.json``. ``mark``: where the run is, for the profiler (as in
    :func:`frugal_qat.block_ap.run.run_block_ap`): stages "build model", "step k", "write".

    ``out`` is held for the run and ``run_dir`` shared (:func:`frugal_qat.checkpoint.run_dir.hold_run_dir`): a
    second command writing either is refused while this one runs.
    """
    return_large_frees_to_os()  # as the CLI does: the memory a library caller gets is the one measured
    run_dir, out = Path(run_dir).resolve(), Path(out).resolve()
    ds_config = None if ds_config is False else ds_config
    rank, world = init_from_env(required=True) if ds_config is not None else (0, 1)
    if out == run_dir:
        raise ConfigError(f"--out {out} is the input run; E2E-QP writes a new run directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise ConfigError(f"--out {out} is a non-empty directory that is not a frugal-qat run; choose another")
    check_launch()  # before the holds: launched without --deepspeed, every process would take itself for rank 0
    with hold_run_dirs(read=(run_dir,), write=(out,)):
        return _run(run_dir, out, cfg, data, device=device, restart=restart, should_stop=should_stop,
                    show_progress=show_progress, ds_config=ds_config, rank=rank, world=world, mark=mark)


def _run(run_dir: Path, out: Path, cfg: RunConfig, data: tuple[torch.Tensor, torch.Tensor], *, device: torch.device,
         restart: bool, should_stop: Callable[[], bool], show_progress: bool, ds_config: str | Path | dict | bool | None,
         rank: int, world: int, mark: Mark) -> dict:
    """:func:`run_e2e_qp` once its paths are checked and held."""
    t_start = time.time()
    e = cfg.e2e_qp
    device = local_device(device)
    should_stop = agreed(should_stop)
    ds_cfg = None
    if ds_config is not None:
        ds_cfg = resolve_ds_config(None if ds_config is True else ds_config, cfg, world, device.type)
    ids, labels = data
    input_src = ModelSource(run_dir)
    grid = (input_src.quant or {}).get("gguf")
    if grid and ds_cfg is not None:
        # project_() keeps each layer's grid parameters in range; DeepSpeed steps flat fp32 masters of all of them,
        # which no per-layer projection reaches.
        raise ConfigError(f"{run_dir} was trained in the {grid} grid; E2E-QP of a GGUF-grid run runs in one "
                          f"process: drop --deepspeed")
    source = {"path": str(run_dir), "fingerprint": input_src.store.fingerprint()}
    ckpt = out / "e2e_checkpoint.safetensors"  # single process: scales + optimizer state, one file
    ds_dir = out / "ds_checkpoint"  # DeepSpeed: one engine checkpoint per tag, the manifest names the valid one
    ds_run = None if ds_cfg is None else {"world_size": world, "zero_stage": ds_cfg["zero_optimization"].get("stage", 0)}
    from frugal_qat.data.windows import fingerprint_windows

    data_fp = {"windows_sha256": fingerprint_windows(torch.cat([ids, labels]))}

    def same_run() -> Manifest | None:
        """The output run already in ``out`` if it is this one; another run is refused with the differences."""
        if not (out / "manifest.json").is_file():
            return None
        m = load_manifest(out)
        diffs = diff_settings({"e2e_qp": m.config.get("e2e_qp")}, {"e2e_qp": cfg.to_dict()["e2e_qp"]})
        if m.model["fingerprint"] != source["fingerprint"]:
            diffs.append(f"input run: was {m.model['path']}, whose files differ")
        if m.data != data_fp:
            diffs.append("data: the training sequences differ")
        if (m.extra.get("deepspeed_tag") or ckpt.is_file()) and m.extra.get("deepspeed") != ds_run:
            diffs.append(f"data parallel: checkpointed with DeepSpeed {m.extra.get('deepspeed')}, now {ds_run}")
        if diffs:
            raise ResumeMismatch(f"{out} holds a different E2E-QP run ({'; '.join(diffs)}); use another --out or --restart")
        return m

    if not restart:  # a finished run started again with the same command: say so, touch nothing
        finished = on_rank0(same_run)
        if finished is not None and finished.progress.stage == "done":
            def noop() -> dict:
                ckpt.unlink(missing_ok=True)  # left only by a kill between 'done' and its removal
                shutil.rmtree(ds_dir, ignore_errors=True)
                summary = read_json(out / "summary.json")
                log.info("%s is already complete (E2E-QP, %d steps); nothing to do", out, summary["steps"])
                return {**summary, "already_complete": True}

            return on_rank0(noop)

    # Refuse a run that cannot fit before the model is built (its packed weights alone may be tens of GiB).
    on_rank0(lambda: require_fit(read_config(run_dir), plan_settings(cfg, run_dir, device,
                                                                     **machine_limits(device, (out.parent,))),
                                 ("e2e_qp",)))
    mark("stage", "build model")
    precision = resolve_precision(device, cfg.offload.precision)
    model, src = build_packed_model(run_dir, device, precision.e2e_dtype)

    # Open or resume the output run (the same checks as Block-AP: other settings or data are refused).
    def open_out() -> Manifest:
        if (out / "manifest.json").is_file() and restart:
            clear_dir(out)
        m = same_run()
        if m is not None:
            remove_partials(out)
        else:
            out.mkdir(parents=True, exist_ok=True)
            m = Manifest(command="e2e-qp", config=cfg.to_dict(), model=source, data=data_fp,
                         progress=Progress(block=0, stage="train"), extra={"losses": []})
            save_manifest(out, m)
        if ds_cfg is not None:
            m.extra["deepspeed"] = ds_run
            atomic_write_json(out / DS_CONFIG_FILE, ds_cfg)
        return m

    m = on_rank0(open_out)

    scales = named_scales(model)
    optimizer = make_optimizer(list(scales.values()), e.optimizer, e.resolved_lr(src.quant["bits"]), device)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})  # per block
    model.train()
    engine = None
    if ds_cfg is not None:
        import deepspeed

        # The optimizer stays ours: DeepSpeed partitions its state and steps it; lr is still set on its groups.
        engine, *_ = deepspeed.initialize(model=ScalesLoss(model, e.logits_chunk), optimizer=optimizer, config=ds_cfg)
        fresh_rotary(model, src, device)  # DeepSpeed's bf16 mode cast inv_freq to bf16
        sizes = [p.numel() for p in scales.values()]
        if ds_run["zero_stage"] and "8bit" in type(optimizer).__name__ and (
                any(n % 256 for n in sizes) or sum(sizes) % (256 * world)):
            log.info("ZeRO-%d flattens the scales, and some do not fill whole 256-element blocks of the 8-bit "
                     "optimizer state: its rounding differs slightly from a single process's; ZeRO stage 0 "
                     "reproduces the single-process run exactly", ds_run["zero_stage"])

    per_step = e.batch_size * e.grad_accum
    steps_per_epoch = e.train_size // per_step
    total = steps_per_epoch * e.epochs
    lr = e.resolved_lr(src.quant["bits"])
    step = 0
    tag = m.extra.get("deepspeed_tag")
    if engine is not None and tag and m.progress.stage != "done":
        path, client = engine.load_checkpoint(str(ds_dir), tag=tag, load_lr_scheduler_states=False)
        if path is None:
            raise CorruptCheckpoint(f"DeepSpeed checkpoint {ds_dir / tag} is missing; start over with --restart")
        step = client["step"]
        log.info("resuming E2E-QP at step %d of %d (DeepSpeed tag %s)", step, total, tag)
    elif ckpt.is_file():
        step, _, trained = load_train_checkpoint(ckpt, optimizer)
        with torch.no_grad():
            for k, v in trained.items():
                scales[k].copy_(v)
        log.info("resuming E2E-QP at step %d of %d", step, total)

    def order(epoch: int) -> torch.Tensor:  # a pure function of (seed, epoch): the data position is just the step
        return torch.randperm(e.train_size, generator=torch.Generator().manual_seed(e.seed * 1000 + epoch))

    def diverged(loss: float) -> TrainingDiverged:
        return TrainingDiverged(f"E2E-QP step {step}: loss is {loss}; lower --lr")

    bar = tqdm(total=total, initial=step, desc="e2e-qp", unit="step", disable=not show_progress or rank != 0)
    t_train, tokens_seen = time.time(), 0
    while step < total and m.progress.stage == "train":
        epoch, k = divmod(step, steps_per_epoch)
        mark("stage", f"step {step + 1}")
        rows = order(epoch)[k * per_step : (k + 1) * per_step]
        for g in optimizer.param_groups:
            g["lr"] = warmup_cosine(step, total, lr, e.warmup_ratio)
        mine = rows.split(e.batch_size)[rank::world]  # this rank's micro-batches: r, r+N, ...
        micro = [(ids[r].to(device), labels[r].to(device)) for r in mine]
        losses: list[float] = []

        def before_step(loss: torch.Tensor) -> None:
            """Refuse a non-finite loss before any scale moves (summed over the ranks, so every rank stops alike)."""
            value = loss.item()
            if engine is not None:
                (value,) = sum_floats(value)
            if not math.isfinite(value):
                raise diverged(value)
            losses.append(value)

        step_tokens = e2e_step(model, micro, optimizer, list(scales.values()), precision, device,
                               grad_accum=e.grad_accum, logits_chunk=e.logits_chunk, max_grad_norm=e.max_grad_norm,
                               engine=engine, before_step=before_step)
        step_loss, step_tokens = losses[0], step_tokens.item()
        if engine is not None:
            (step_tokens,) = sum_floats(step_tokens)
            step_tokens = int(step_tokens)
        step += 1
        tokens_seen += step_tokens
        m.extra["losses"].append(round(step_loss, 6))
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens_seen / max(time.time() - t_train, 1e-9):.0f}")
        if step % e.ckpt_every_steps == 0 or step == total or should_stop():
            kill_point("e2e_checkpoint")
            if engine is None:
                save_train_checkpoint(ckpt, {k: v for k, v in scales.items()}, optimizer, step)
            else:
                # Every rank writes its partition under a new tag; the manifest names the tag only once all are
                # written, so a kill mid-save leaves the previous tag the valid one.
                m.extra["deepspeed_tag"] = f"step{step}"
                # exclude_frozen_parameters: the embeddings, norms and lm_head are the input run's, not state
                engine.save_checkpoint(str(ds_dir), tag=m.extra["deepspeed_tag"], client_state={"step": step},
                                       save_latest=False, exclude_frozen_parameters=True)
                barrier()
            m.progress = Progress(block=step, stage="train" if step < total else "finalize")
            if rank == 0:
                save_manifest(out, m)
                for old in ds_dir.iterdir() if engine is not None else ():
                    if old.name != m.extra["deepspeed_tag"]:
                        shutil.rmtree(old, ignore_errors=True)
            if should_stop() and step < total:
                raise Interrupted(f"stopped at E2E-QP step {step}; run the same command again to resume")
    bar.close()

    # Write the new run: the input's files, with every block's scales replaced.
    final = {n: (p.detach() if engine is None else full_fp32(p)) for n, p in scales.items()}  # a collective

    def finish() -> dict:
        mark("stage", "write")
        for i in range(src.n_layers):
            tensors = {k: v for k, v in src.store.block_state(i, dtype=None).items()}
            for name in src.arch.linears:
                if grid:  # the frozen codes with the trained grid, as exact ggml blocks
                    tensors[f"{name}.ggml"] = model.model.layers[i].get_submodule(name).to_blocks().cpu()
                else:
                    tensors[f"{name}.scales"] = final[f"model.layers.{i}.{name}.scales"].to("cpu", torch.float16)
            save_block(out, i, tensors)
        for name in (*TOKENIZER_FILES, EXTRA_FILE, INDEX_FILE, "config.json", "calib.safetensors"):
            if (run_dir / name).is_file():
                atomic_copy(run_dir / name, out / name)
        summary = {"command": "e2e-qp", "steps": total, "losses": m.extra["losses"],
                   "seconds": round(time.time() - t_start, 3), "optimizer": type(optimizer).__name__,
                   "device": str(device), "precision": precision.to_json(), "output_bytes": model_bytes(out),
                   "peak_rss_bytes": peak_rss()}
        if ds_run is not None:
            summary["deepspeed"] = ds_run
        atomic_write_json(out / "summary.json", summary)
        m.progress.stage = "done"
        save_manifest(out, m)  # the commit: every file above is durable; a re-run is a no-op from here
        kill_point("after_done")
        ckpt.unlink(missing_ok=True)
        shutil.rmtree(ds_dir, ignore_errors=True)
        return summary

    return on_rank0(finish)
