"""One block of Block-AP: wrap its linears in fake-quant layers, train to match the teacher, freeze.

Paper (EfficientQAT §3.2): every linear weight, the RMSNorm weights and the per-group scales and zero points of
the block train together; loss = MSE(qblock(x_quant), block_fp(x_fp)); AdamW without weight decay, two learning
rates (weights and norms: ``weight_lr``; scales and zeros: ``quant_lr``), cosine from lr to lr/20 with no warmup,
a new optimizer for every block, samples in a fixed order.

Departures (also in docs/METHOD.md): the dtypes are the precision policy's (``frugal_qat/precision.py``): fp32 on
CPU (bf16 matmuls are pathologically slow on these CPUs), bf16 autocast over fp32 masters on CUDA, which needs no
loss scaling. Gradient clipping is applied when ``max_grad_norm > 0`` (the reference has the flag and ignores it).
Non-finite losses stop the run with an error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from frugal_qat.distributed import all_reduce_sum_, rank_world, sum_floats
from frugal_qat.errors import TrainingDiverged
from frugal_qat.precision import Precision
from frugal_qat.quantizer import QuantLinear
from frugal_qat.quantizer.kquant import GGUFQuantLinear
from frugal_qat.quantizer.primitives import SCALE_MIN

log = logging.getLogger(__name__)

# The fake-quantized layers Block-AP trains: the uniform grid, or a GGUF (llama.cpp) type's grid (docs/GGUF.md).
QUANT_LAYERS = (QuantLinear, GGUFQuantLinear)


def wrap_linears(block: nn.Module, bits: int, group_size: int, name: str, gguf: str | None = None,
                 importance: dict[str, torch.Tensor] | None = None) -> dict[str, QuantLinear | GGUFQuantLinear]:
    """Replace every nn.Linear of the block with a QuantLinear (weights copied to fp32, min-max qparams), or with
    ``gguf`` a GGUFQuantLinear in that type's grid, initialised by ``kquant.init_grid`` weighted by
    ``importance[path]`` (the mean squared input of each column, :func:`linear_input_importance`) where given."""
    wrapped = {}
    for path, mod in list(block.named_modules()):
        if isinstance(mod, nn.Linear):
            parent_path, _, child = path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            if gguf is None:
                q = QuantLinear.from_linear(mod, bits, group_size, name=f"{name}.{path}")
            else:
                h = None if importance is None else importance.get(path)
                q = GGUFQuantLinear.from_linear(mod, gguf, name=f"{name}.{path}", importance=h)
            setattr(parent, child, q)
            wrapped[path] = q
    return wrapped


@torch.no_grad()
def linear_input_importance(block: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                            inputs: Iterable[torch.Tensor], precision: Precision, device: torch.device,
                            world: int = 1) -> dict[str, torch.Tensor]:
    """Per nn.Linear of ``block`` (by path), ``h_j = mean over tokens of x_j^2`` of its input ``x`` [.., in], fp32
    [in], over the block run on ``inputs`` (the block's training inputs): llama.cpp's importance matrix, which
    weights the GGUF grid's initial fit (``kquant.init_grid``). Under data parallelism each rank sees its share
    of the inputs and the sums are added across the ``world`` ranks, so every rank gets the same values.

    The inputs of the inner linears (o_proj, down_proj) exist only inside the block's forward: a forward pre-hook
    on each linear, registered here and removed before returning, reads them.
    """
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64, device=device)
    hooks = []
    for path, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            def accumulate(_mod, args, path=path):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                s = x.square().sum(0, dtype=torch.float64)
                sums[path] = s if path not in sums else sums[path] + s
            hooks.append(mod.register_forward_pre_hook(accumulate))
    try:
        for x in inputs:
            with precision.nograd(device):
                forward(block, x)
            count += x.shape[:-1].numel()
    finally:
        for h in hooks:
            h.remove()
    if world > 1:
        all_reduce_sum_([*sums.values(), count])
    return {path: (s / count).float() for path, s in sums.items()}


def other_trainables(block: nn.Module) -> list[nn.Parameter]:
    """Norm weights (and any parameter that is not inside a quantized layer): trained at weight_lr."""
    inside = {id(p) for m in block.modules() if isinstance(m, QUANT_LAYERS) for p in m.parameters()}
    return [p for p in block.parameters() if id(p) not in inside]


def cosine_lr(step: int, total: int, lr: float, min_ratio: float) -> float:
    """Cosine from ``lr`` at step 0 to ``lr * min_ratio`` at the last step; a pure function of the step."""
    if total <= 1:
        return lr
    lo = lr * min_ratio
    return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * step / (total - 1)))


def keep_scales_in_range(block: nn.Module) -> None:
    """Clamp every QuantLinear scale to at least ``SCALE_MIN`` (1e-4, the bound of its initial value); put every
    GGUFQuantLinear's grid parameters back into their ranges (``project_()``: its scales may be signed, q3_k's
    sub-block scales and the legacy types' d, so the plain clamp must not touch them).

    A step size must stay positive; at large quant lrs (1e-3 at w4g64, where scales are small) a step can push one
    below 0, which fake-quant would train through and freezing would refuse. E2E-QP applies the same clamp.
    """
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, QuantLinear):
                m.scale.clamp_(min=SCALE_MIN)
            elif isinstance(m, GGUFQuantLinear):
                m.project_()


def make_optimizer(block: nn.Module, linears: dict[str, QuantLinear | GGUFQuantLinear], weight_lr: float,
                   quant_lr: float, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the quantizer's parameters (``quant_lr``) and the weights and other trainables (``weight_lr``).
    ``fused`` (the runs pass it on CUDA): one kernel updates each tensor in place, where torch's default for CUDA
    (foreach) makes a temporary of the whole weights group (``4*P``, 3.2 GiB for a 70B block; the planner's "AdamW
    temporaries"). CPU keeps the single-tensor path (bit-identical to every run made so far)."""
    weights = [p for q in linears.values() for p in q.weight_parameters()] + other_trainables(block)
    quant = [p for q in linears.values() for p in q.quant_parameters()]
    groups = [{"params": quant, "lr": quant_lr, "base_lr": quant_lr}]
    if weight_lr > 0:
        groups.append({"params": weights, "lr": weight_lr, "base_lr": weight_lr})
    else:  # weight_lr 0: only the quantizer trains (handy ablation); weights stay as loaded
        for p in weights:
            p.requires_grad_(False)
    return torch.optim.AdamW(groups, weight_decay=0.0, fused=True if fused else None)


@dataclass
class TrainResult:
    val_mse: list[float] = field(default_factory=list)  # [before training (RTN init), after epoch 1, ...]
    train_loss: list[float] = field(default_factory=list)  # mean per epoch
    steps: int = 0


def train_step(
    block: nn.Module,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    micro: list[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    device: torch.device,
    *,
    lr: Callable[[float], float] | None = None,
    world: int = 1,
    before_step: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """One optimizer step on the micro-batches ``micro`` [(input, target)]: MSE under the policy's training dtype,
    gradients accumulated over the micro-batches (their mean equals the full batch's loss), then
    ``before_step(loss)`` (summing across ranks, the finite check, clipping), the AdamW step and the scale clamp.

    Returns the step's loss as a 0-d tensor (no ``.item()`` here: the planner's simulation runs this function on
    fake tensors, which have no values). ``lr(base_lr)``: each param group's lr for this step.
    """
    if lr is not None:
        for g in optimizer.param_groups:
            g["lr"] = lr(g["base_lr"])
    optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), dtype=torch.float64, device=device)  # float64: sums as exactly as Python floats
    for x, y in micro:
        with precision.train(device):
            out = forward(block, x)
        # Data parallel: each of the N ranks holds len(micro) of the step's len(micro) * N micro-batches.
        loss = torch.nn.functional.mse_loss(out.float(), y.float()) / (len(micro) * world)
        loss.backward()
        step_loss += loss.detach().double()
    if before_step is not None:
        before_step(step_loss)
    optimizer.step()
    keep_scales_in_range(block)
    return step_loss


def train_block(
    block: nn.Module,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    validate: Callable[[], float],
    optimizer: torch.optim.AdamW,
    *,
    precision: Precision,
    epochs: int,
    steps_per_epoch: int,
    min_lr_ratio: float,
    max_grad_norm: float,
    start_step: int,
    checkpoint: Callable[[int], None],
    ckpt_every: int,
    block_idx: int,
    device: torch.device,
    on_step: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    result: TrainResult | None = None,
) -> TrainResult:
    """The training loop of one block, resumable at ``start_step``.

    ``batches(first_step)`` yields, for each step from that step of the epoch on, the list of its (input, target)
    micro-batches (data parallel: this rank's share of them; the gradients are summed across ranks before the
    step, so every rank takes the same step); ``checkpoint(step)``
    persists the state after ``step`` optimizer steps (called at every epoch end and every ``ckpt_every`` steps).
    """
    total = epochs * steps_per_epoch
    res = result or TrainResult()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    world = rank_world()[1]
    step = start_step
    block.train()
    while step < total:
        epoch, first = divmod(step, steps_per_epoch)
        loss_sum, n = 0.0, 0
        for micro in batches(first):
            losses: list[float] = []

            def before_step(step_loss: torch.Tensor) -> None:
                """Sum across ranks, refuse a non-finite loss (before any weight moves, on every rank alike), clip."""
                loss = step_loss.item()
                if world > 1:  # the sum over ranks of the 1/(len(micro) * N)-scaled gradients: the full batch's
                    all_reduce_sum_([p.grad for p in params if p.grad is not None])
                    (loss,) = sum_floats(loss)
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"block {block_idx}, step {step}: loss is {loss}; lower --weight-lr/--quant-lr "
                        "or check the source weights (a bf16 model run in fp16 overflows)"
                    )
                if max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                losses.append(loss)

            train_step(block, forward, micro, optimizer, precision, device,
                       lr=lambda base: cosine_lr(step, total, base, min_lr_ratio), world=world, before_step=before_step)
            step_loss = losses[0]
            step += 1
            loss_sum += step_loss
            n += 1
            if on_step is not None:
                on_step(step_loss)
            if step % steps_per_epoch == 0:
                break
            if (ckpt_every and step % ckpt_every == 0) or should_stop():
                checkpoint(step)
                if should_stop():
                    return res
        res.train_loss.append(loss_sum / max(n, 1))
        res.val_mse.append(validate())
        log.info("block %d epoch %d: train mse %.3e, val mse %.3e", block_idx, epoch + 1, res.train_loss[-1], res.val_mse[-1])
        checkpoint(step)  # every epoch end, after its metrics, so a resume reports them too
        if should_stop():
            return res
    res.steps = step
    block.eval()
    return res


@torch.no_grad()
def freeze_block(block: nn.Module) -> None:
    """Round every trained tensor to what the run directory stores, so the propagated quant stream and any
    model rebuilt from the saved files compute exactly the same thing."""
    for m in block.modules():
        if isinstance(m, QUANT_LAYERS):
            m.freeze_()
            if m.bias is not None:  # stored as fp16 next to the packed weight
                m.bias.copy_(m.bias.half().float())
                m.bias.requires_grad_(False)
    for p in other_trainables(block):
        p.copy_(p.half().float())
        p.requires_grad_(False)
    block.eval()
