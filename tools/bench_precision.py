"""Precision of the no-grad forwards: the error each CUDA compute mode adds to a block's output, against fp32.

    python tools/make_smollm2_checkpoint.py --out /tmp/smollm2
    frugal-qat block-ap --model /tmp/smollm2 --out /tmp/prec-run-w4 --recipe recipes/smollm2_135m_w4g64.yaml \\
        --train-size 32 --val-size 8 --seqlen 256 --device cpu --io mmap        (and w3g64 into /tmp/prec-run-w3)
    FRUGAL_QAT_CACHE=/tmp/fqcache python tools/bench_precision.py --model /tmp/smollm2 \\
        --student w4=/tmp/prec-run-w4 --student w3=/tmp/prec-run-w3 [--json out.json]

The stream updates (the fp teacher stream, whose outputs are the training targets, and the quant stream) and the
validation run without gradient; on CUDA they run in one 16-bit or TF32 mode (``frugal_qat/precision.py``). This
benchmark measures, on SmolLM2-135M's real blocks and calibration windows (the ``demo`` source, the first
``--windows`` training windows of the Block-AP run's draw), what each mode adds to a block's output ``y``:

* ``fp32``: the reference, ``y_ref = block(x)`` with fp32 weights and input.
* ``bf16``: ``torch.autocast("cpu", torch.bfloat16)``, exactly the CUDA policy's no-grad context
  (``precision.resolve("cpu", policy="cuda").nograd``): linears and SDPA get bf16 operands, the norms and the residual
  adds stay fp32 (transformers' RMSNorm upcasts; fp32 residual + bf16 update promotes to fp32).
* ``bf16-emu``: the same mode emulated as CUDA kernels compute it, as a cross-check that the CPU's bf16 kernels are
  representative: every linear's input, weight and bias rounded to bf16, fp32 product and accumulation, output
  rounded to bf16 (cuBLAS bf16 GEMM with fp32 accumulate); attention as FlashAttention-2 computes it: q, k, v in
  bf16, scores and softmax in fp32, the probabilities rounded to bf16 before ``P @ V`` (fp32 accumulate), output bf16.
* ``tf32``: fp32 compute where every matmul operand (linear input and weight; attention q, k, and v and the
  softmax probabilities P) has its mantissa rounded to 10 bits, round-to-nearest-even of the low 13 bits, as TF32
  tensor cores read fp32 inputs; products exact and accumulated in fp32; bias, softmax, norms, SiLU and residual in
  fp32. The rotary angles are an elementwise product in transformers 5 (no matmul), so TF32 does not touch them.
* ``tf32-trunc``: the same with the low 13 bits truncated (what "only the first 10 bits of the input mantissa are
  read", PyTorch's numerical-accuracy note, describes); public sources disagree on which one the hardware does.
* ``fp16``: ``torch.autocast("cpu", torch.float16)``, for completeness, and ``fp16-emu``, its emulation as
  ``bf16-emu`` (fp16 operands, fp32 accumulation, fp16 outputs).
* ``tf32-cuda`` (only with ``--device cuda``): the real kernels, fp32 inputs with TF32 allowed
  (``torch.backends.cuda.matmul.fp32_precision = "tf32"``), against the same forward with ``"ieee"``. On a GPU every
  other mode runs there too (autocast on CUDA; the emulations with TF32 off), which is the check the CPU cannot do.

Per measured block (``--blocks``; the fp32 stream walks through every block so each gets its real input ``x``):
relative RMS error of the output ``||y - y_ref|| / ||y_ref||``, max |error|, the relative RMS error of the block's
update ``u = y - x`` (the same absolute error over ``||u_ref||``), and the MSE ``mean((y - y_ref)^2)`` against
(a) the error the fp16 stream storage already adds, ``fp16(y_ref) - y_ref``, and (b) the validation MSE a Block-AP
student leaves on that block (``val_mse[-1]`` of ``--student NAME=RUN_DIR``'s summary.json).

Then the drift a whole run's teacher stream accumulates (``--no-chain`` skips it): for each mode, every block runs
in that mode on the previous block's output stored in fp16 (as a run's fp stream does), compared with the exact
fp32 walk; the ``fp32`` chain is the CPU policy (fp32 compute, fp16 storage).

By default everything computes on the CPU; the mode is emulated or autocast. bf16/fp16 autocast is slow on this
CPU but SmolLM2's blocks are small: the default (16 x 256 tokens, all 30 blocks chained) takes about 15 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from frugal_qat.config import load_recipe
from frugal_qat.config import resolve as resolve_config
from frugal_qat.data.windows import build_calibration
from frugal_qat.offload.blocks import ModelSource
from frugal_qat.precision import resolve as resolve_precision

REPO = Path(__file__).resolve().parents[1]

# ---- operand rounding ---------------------------------------------------------------------------------------------

_LOW13 = (1 << 13) - 1


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest value with a 10-bit mantissa (ties to even), returned as fp32.

    On the bit pattern b (int32): add 0xFFF plus bit 13 (the kept mantissa's last bit: ties go to even), then clear
    the low 13 bits. Two's-complement addition on the sign-magnitude pattern rounds the magnitude, and a carry out of
    the mantissa correctly bumps the exponent. Inf/NaN are not expected (the inputs are checked finite).
    """
    b = x.float().contiguous().view(torch.int32)
    b = (b + (_LOW13 >> 1) + ((b >> 13) & 1)) & ~_LOW13
    return b.view(torch.float32)


def trunc_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> its first 10 mantissa bits (the low 13 cleared: rounds toward zero), returned as fp32."""
    return (x.float().contiguous().view(torch.int32) & ~_LOW13).view(torch.float32)


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def round_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


# ---- emulated matmul modes ------------------------------------------------------------------------------------------


@dataclass
class MatmulCount:
    linear: int = 0
    attention: int = 0
    other: list[str] = field(default_factory=list)


class RoundedMatmuls(TorchFunctionMode):
    """fp32 compute in which every matmul operand is first passed through ``rnd`` (exact products, fp32
    accumulation), and each linear/attention output is cast to ``out_dtype`` when given (bf16 kernels write bf16).

    Handles ``F.linear`` and ``F.scaled_dot_product_attention`` (a block's only matmuls: the count is kept and checked);
    any other matmul entry point seen is recorded in ``count.other`` so the caller can refuse the result.
    """

    OTHER = {torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.einsum, torch.Tensor.matmul,
             torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm}

    def __init__(self, rnd: Callable[[torch.Tensor], torch.Tensor], out_dtype: torch.dtype | None = None):
        super().__init__()
        self.rnd, self.out_dtype = rnd, out_dtype
        self.count = MatmulCount()

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.out_dtype is None else y.to(self.out_dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            self.count.linear += 1
            x, w, *rest = args
            b = rest[0] if rest else kwargs.get("bias")
            y = F.linear(self.rnd(x.float()), self.rnd(w.float()))
            if b is not None:
                y = y + (self.rnd(b.float()) if self.out_dtype is not None else b.float())  # bf16 kernels: bf16 bias
            return self._out(y)
        if func is F.scaled_dot_product_attention:
            self.count.attention += 1
            return self._out(self._attention(*args, **kwargs))
        if func in self.OTHER:
            self.count.other.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)

    def _attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        """softmax(rnd(q) rnd(k)^T * scale + mask) -> rnd(P) @ rnd(v), scores and softmax in fp32."""
        if dropout_p:
            raise ValueError("attention dropout in an eval forward: the emulation assumes none")
        q, k, v = (self.rnd(t.float()) for t in (q, k, v))
        if k.shape[-3] != q.shape[-3]:  # grouped-query attention: each kv head serves q.heads / kv.heads q heads
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        s = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
        L, S = s.shape[-2:]
        if is_causal:
            s = s.masked_fill(torch.ones(L, S, dtype=torch.bool, device=s.device).triu(S - L + 1), float("-inf"))
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.float()
        return self.rnd(torch.softmax(s, dim=-1)) @ v


class OperandCheck(TorchDispatchMode):
    """Sees every aten matmul under an emulated mode and counts operands that ``rnd`` would still change."""

    MATMULS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten._scaled_dot_product")

    def __init__(self, rnd: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.rnd, self.seen, self.unrounded = rnd, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.MATMULS):
            self.seen += 1
            for a in args:
                if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() >= 2:
                    self.unrounded += int(not torch.equal(self.rnd(a), a.float()))
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Mode:
    name: str
    context: Callable[[], contextlib.AbstractContextManager]
    rnd: Callable[[torch.Tensor], torch.Tensor] | None = None  # emulated modes: the operand rounding
    what: str = ""


@contextlib.contextmanager
def cuda_matmul_precision(precision: str):
    """fp32 matmuls on CUDA in ``"tf32"`` or ``"ieee"`` (true fp32), restored after: torch's flag is global."""
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = precision
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = old


def modes(device: torch.device) -> list[Mode]:
    """The compute modes compared with fp32 (the module docstring says exactly what each emulates). On a CUDA
    device, ``tf32-cuda`` adds the real thing: cuBLAS and SDPA on fp32 inputs with TF32 allowed."""
    cuda = resolve_precision(device, policy="cuda")  # the CUDA policy's dtypes, on whatever device computes
    found = [
        Mode("bf16", lambda: cuda.nograd(device), what="the policy's nograd context (bf16 autocast)"),
        Mode("bf16-emu", lambda: RoundedMatmuls(round_bf16, torch.bfloat16), round_bf16,
             "bf16 operands, fp32 accumulate, bf16 outputs (cuBLAS / FlashAttention-2 numerics)"),
        Mode("tf32", lambda: RoundedMatmuls(round_tf32), round_tf32, "operands rounded to 10 mantissa bits (RNE)"),
        Mode("tf32-trunc", lambda: RoundedMatmuls(trunc_tf32), trunc_tf32, "operands truncated to 10 mantissa bits"),
        Mode("fp16", lambda: torch.autocast(device.type, dtype=torch.float16), what="fp16 autocast"),
        Mode("fp16-emu", lambda: RoundedMatmuls(round_fp16, torch.float16), round_fp16,
             "fp16 operands, fp32 accumulate, fp16 outputs"),
    ]
    if device.type == "cuda":
        found.append(Mode("tf32-cuda", lambda: cuda_matmul_precision("tf32"), what="TF32 allowed for fp32 matmuls"))
    return found


# ---- measurement ----------------------------------------------------------------------------------------------------


def exact(device: torch.device) -> contextlib.AbstractContextManager:
    """True fp32 matmuls: on CUDA, TF32 off whatever the process default (the reference and the emulations)."""
    return cuda_matmul_precision("ieee") if device.type == "cuda" else contextlib.nullcontext()


def forward(runner, block, i: int, x: torch.Tensor, mode: Mode | None, micro: int) -> torch.Tensor:
    """Block i on x [n, L, H] (fp32) in ``mode`` (None: plain fp32), in micro-batches; fp32 out."""
    outs = []
    with torch.no_grad(), exact(x.device):
        for xb in x.split(micro):
            with mode.context() if mode else contextlib.nullcontext():
                outs.append(runner(block, i, xb).float())
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)  # the caller times this call
    return torch.cat(outs)


def check_emulation(runner, block, i: int, x: torch.Tensor) -> dict:
    """The emulation's plumbing, checked once: with no rounding it reproduces the fp32 forward (up to summation
    order), it sees a block's 7 linears and 1 attention and no other matmul entry point, and under each emulated mode
    every aten matmul operand is already rounded."""
    with torch.no_grad(), exact(x.device):
        ref = runner(block, i, x)
        ident = RoundedMatmuls(lambda t: t)
        with ident:
            y = runner(block, i, x)
    out = {"identity_rel_err": (rel(y.float() - ref, ref)), "linears": ident.count.linear,
           "attentions": ident.count.attention, "other": ident.count.other}
    if ident.count.other or ident.count.linear != 7 or ident.count.attention != 1:
        raise RuntimeError(f"the emulation does not see the block's matmuls as expected: {out}")
    for m in modes(x.device):
        if m.rnd is None:
            continue
        check = OperandCheck(m.rnd)
        with torch.no_grad(), exact(x.device), m.context(), check:
            runner(block, i, x)
        out[f"{m.name}_matmuls_seen"], out[f"{m.name}_unrounded_operands"] = check.seen, check.unrounded
        if check.unrounded:
            raise RuntimeError(f"{m.name}: {check.unrounded} matmul operands were not rounded ({out})")
    return out


def rel(e: torch.Tensor, ref: torch.Tensor) -> float:
    return (e.double().norm() / ref.double().norm()).item()


def mse(e: torch.Tensor) -> float:
    return e.double().pow(2).mean().item()


def errors(y: torch.Tensor, y_ref: torch.Tensor, x: torch.Tensor) -> dict:
    e = y.float() - y_ref
    return {"rel_out": rel(e, y_ref), "max_abs": e.abs().max().item(), "rel_update": rel(e, y_ref - x), "mse": mse(e)}


def student_mse(run_dir: Path) -> dict[int, float]:
    """Per block: the last validation MSE of a Block-AP run (summary.json ``blocks[].val_mse[-1]``)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {int(b["block"]): float(b["val_mse"][-1]) for b in summary["blocks"] if b.get("val_mse")}


def calibration(model: Path, recipe: Path, n: int) -> torch.Tensor:
    """The first ``n`` training windows of the Block-AP run's draw (same recipe, seed and sizes)."""
    from frugal_qat.cli.main import cache_dir, load_tokenizer

    cfg = resolve_config(load_recipe(recipe), {"data.train_size": 32, "data.val_size": 8, "data.seqlen": 256})
    d = cfg.data
    train, _ = build_calibration(load_tokenizer(model), d.calib, d.train_size, d.val_size, d.seqlen, d.seed,
                                 cache_dir() / "tokens")
    if n > len(train):
        raise SystemExit(f"--windows {n}: the run's draw has {len(train)} training windows")
    return train[:n]


def measure(args) -> dict:
    torch.manual_seed(0)
    src = ModelSource(args.model, seqlen=256)
    device = torch.device(args.device)
    runner = src.runner(device)
    windows = calibration(args.model, args.recipe, args.windows)
    students = {name: student_mse(Path(path)) for name, path in args.student}
    blocks = sorted(set(args.blocks or range(src.n_layers)) & set(range(src.n_layers)))
    all_modes = [m for m in modes(device) if args.modes is None or m.name in args.modes]
    chain_modes = [m for m in all_modes if m.name in args.chain_modes] if args.chain else []

    x = src.embed(windows).to(device, torch.float32)  # the exact fp32 walk (the fp16 embeddings are exact in fp32)
    # each chain: a run's fp16 fp stream, every block in one mode ("fp32": the CPU policy)
    chains = ({"fp32": x.half()} | {m.name: x.half() for m in chain_modes}) if args.chain else {}
    result = {"model": str(args.model), "device": str(device), "windows": list(windows.shape), "blocks": {},
              "chain": {}, "students": {k: {str(b): v for b, v in s.items()} for k, s in students.items()},
              "seconds": {}}
    for i in tqdm(range(blocks[-1] + 1), desc="blocks", unit="block"):  # nothing after the last measured block
        block = src.block(i).to(device)
        t = time.perf_counter()
        y_ref = forward(runner, block, i, x, None, args.micro)
        result["seconds"]["fp32"] = result["seconds"].get("fp32", 0) + time.perf_counter() - t
        if not torch.isfinite(y_ref).all():
            raise SystemExit(f"block {i}: the fp32 forward is not finite")
        if i == blocks[0]:
            result["emulation_check"] = check_emulation(runner, block, i, x[:2])
        if i in blocks:
            row = {"rms_y": y_ref.pow(2).mean().sqrt().item(), "rms_update": (y_ref - x).pow(2).mean().sqrt().item(),
                   "fp16_store": errors(y_ref.half(), y_ref, x), "modes": {}}
            for m in all_modes:
                t = time.perf_counter()
                y = forward(runner, block, i, x, m, args.micro)
                result["seconds"][m.name] = result["seconds"].get(m.name, 0) + time.perf_counter() - t
                row["modes"][m.name] = errors(y, y_ref, x)
                # what a run stores: this mode's output rounded to the fp16 stream
                row["modes"][m.name]["mse_stored"] = mse(y.half().float() - y_ref)
            result["blocks"][str(i)] = row
        for name in list(chains):
            mode = next((m for m in chain_modes if m.name == name), None)
            chains[name] = forward(runner, block, i, chains[name].float(), mode, args.micro).half()
        if i in blocks and chains:
            result["chain"][str(i)] = {name: mse(c.float() - y_ref) for name, c in chains.items()}
        x = y_ref
        del block
    return result


# ---- report ---------------------------------------------------------------------------------------------------------


def md_row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def pct(a: float, b: float | None) -> str:
    return "-" if not b else f"{100 * a / b:.3g} %"


def summary(result: dict) -> list[str]:
    """Per mode, over every measured block: the worst ratios the decision rule (docs/PRECISION.md) tests."""
    students = {k: {int(b): v for b, v in s.items()} for k, s in result["students"].items()}
    rows = result["blocks"]
    names = list(next(iter(rows.values()))["modes"])
    head = md_row(["mode", "max MSE / fp16-storage (block)", "median",
                   *(f"max MSE / {k} student (block)" for k in students), "max chain drift / w4 student (block)"])
    lines = [f"Over all {len(rows)} measured blocks:", "", head, "|" + "---|" * (head.count(" | ") + 1)]

    def worst(ratios: dict[str, float]) -> str:
        if not ratios:
            return "-"
        b = max(ratios, key=ratios.get)
        return f"{ratios[b]:.3g} ({b})"

    w4 = students.get("w4", {})
    for name in names:
        store = {b: r["modes"][name]["mse"] / r["fp16_store"]["mse"] for b, r in rows.items()}
        cells = [worst(store), f"{sorted(store.values())[len(store) // 2]:.3g}"]
        for s in students.values():
            cells.append(worst({b: 100 * r["modes"][name]["mse"] / s[int(b)] for b, r in rows.items() if int(b) in s})
                         .replace(" (", " % ("))
        drift = {b: 100 * c[name] / w4[int(b)] for b, c in result["chain"].items() if name in c and int(b) in w4}
        cells.append(worst(drift).replace(" (", " % ("))
        lines.append(md_row([name, *cells]))
    if result["chain"]:
        drift = {b: 100 * c["fp32"] / w4[int(b)] for b, c in result["chain"].items() if int(b) in w4}
        lines.append(md_row(["fp32 (CPU policy: fp32 compute, fp16 storage)", "-", "-", *("-" for _ in students),
                             worst(drift).replace(" (", " % (")]))
    return lines


def table(result: dict, show: list[int]) -> str:
    students = {k: {int(b): v for b, v in s.items()} for k, s in result["students"].items()}
    w4 = students.get("w4", {})
    n, L = result["windows"]
    check = result.get("emulation_check", {})
    shown = [b for b in result["blocks"] if int(b) in show]
    lines = [f"SmolLM2-135M, {n} x {L} tokens (demo calibration windows); emulation check on the first measured block: "
             + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in check.items()), ""]

    head = md_row(["block", "rms y", "rms update", "fp16-storage MSE", *(f"{k} student val MSE" for k in students)])
    lines += [head, "|" + "---|" * (head.count(" | ") + 1)]
    for b in shown:
        row = result["blocks"][b]
        lines.append(md_row([b, f"{row['rms_y']:.3g}", f"{row['rms_update']:.3g}", f"{row['fp16_store']['mse']:.2e}",
                             *(f"{s[int(b)]:.3g}" if int(b) in s else "-" for s in students.values())]))

    head = md_row(["block", "mode", "out rel RMS", "max abs err", "update rel RMS", "MSE added", "/ fp16-storage MSE",
                   *(f"/ {k} student MSE" for k in students), "MSE after fp16 storage"])
    lines += ["", head, "|" + "---|" * (head.count(" | ") + 1)]
    for b in shown:
        row = result["blocks"][b]
        store = row["fp16_store"]["mse"]
        st = [s.get(int(b)) for s in students.values()]
        for name, e in [("fp16 storage", row["fp16_store"] | {"mse_stored": None}), *row["modes"].items()]:
            stored = "-" if e["mse_stored"] is None else f"{e['mse_stored']:.2e}"
            lines.append(md_row([b, name, f"{e['rel_out']:.2e}", f"{e['max_abs']:.2e}", f"{e['rel_update']:.2e}",
                                 f"{e['mse']:.2e}", f"{e['mse'] / store:.3g}", *(pct(e["mse"], v) for v in st),
                                 stored]))

    if result["chain"]:
        names = list(next(iter(result["chain"].values())))
        head = md_row(["block", *(f"{k} chain" for k in names), "w4 student val MSE"])
        lines += ["", "Accumulated drift of the teacher stream (every block in the mode, fp16 storage between blocks; "
                  "`fp32 chain` = the CPU policy): MSE against the exact fp32 walk (share of the w4 student's MSE)",
                  "", head, "|" + "---|" * (head.count(" | ") + 1)]
        for b in [b for b in result["chain"] if int(b) in show]:
            c, s = result["chain"][b], w4.get(int(b))
            lines.append(md_row([b, *(f"{v:.2e} ({pct(v, s)})" for v in c.values()), f"{s:.3g}" if s else "-"]))
    lines += ["", *summary(result)]
    lines += ["", "CPU seconds per mode, all its forwards (not GPU speed): "
              + ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items())]
    return "\n".join(lines)


def blocks_arg(s: str) -> list[int]:
    return [int(v) for v in s.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True,
                   help="the SmolLM2-135M checkpoint (tools/make_smollm2_checkpoint.py)")
    p.add_argument("--recipe", type=Path, default=REPO / "recipes" / "smollm2_135m_w4g64.yaml",
                   help="the Block-AP recipe whose calibration draw to use (train 32 + val 8 x 256 tokens)")
    p.add_argument("--student", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                   metavar="NAME=RUN_DIR",
                   help="a Block-AP run whose per-block val MSE to compare with (w4=..., w3=...)")
    p.add_argument("--windows", type=int, default=16, help="calibration windows of 256 tokens (default 16)")
    p.add_argument("--blocks", type=blocks_arg, default=None, help="blocks to measure (default: all)")
    p.add_argument("--show", type=blocks_arg, default=[0, 7, 11, 15, 23, 29],
                   help="measured blocks printed in full (11: where SmolLM2's massive activations appear)")
    p.add_argument("--micro", type=int, default=4, help="windows per forward")
    p.add_argument("--no-chain", dest="chain", action="store_false", help="skip the accumulated-drift walks")
    p.add_argument("--modes", type=lambda s: s.split(","), help="compare only these modes (default: all)")
    p.add_argument("--chain-modes", type=lambda s: s.split(","), default=["bf16", "tf32", "fp16"])
    p.add_argument("--device", default="cpu", help="cpu, or cuda[:N] to measure the real kernels on a GPU")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    p.add_argument("--table", type=Path, help="print the table of a stored --json file without measuring")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text()), args.show))
        return 0
    result = measure(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(table(result, args.show))
    return 0


if __name__ == "__main__":
    sys.exit(main())
