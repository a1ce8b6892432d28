"""Block-AP over a whole model, streamed: the story of a run, top to bottom.

    validate inputs (nothing written yet) -> open or resume the run directory -> check the disk
    -> plan memory and disk for this machine -> open the two activation streams (fp teacher, quantized student) -> embed the calibration windows
    -> for each block: load (next one prefetched) -> fp stream <- block(fp stream)        [targets]
                       -> wrap linears in fake-quant layers -> train on (quant stream, fp stream)
                       -> freeze -> quant stream <- qblock(quant stream) -> pack + save -> commit
    -> write embeddings/norm/lm_head, config, tokenizer, index -> summary

Every stage boundary is recorded in the manifest (see checkpoint/state.py); a killed run started again with the
same command continues at the first unfinished stage and ends with bit-identical results.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from frugal_qat.block_ap.train_block import (
    TrainResult,
    freeze_block,
    linear_input_importance,
    make_optimizer,
    train_block,
    wrap_linears,
)
from frugal_qat.checkpoint.run_dir import (
    clear_dir,
    extra_tensors,
    hold_run_dirs,
    is_run_dir,
    model_bytes,
    save_block,
    write_model_files,
)
from frugal_qat.checkpoint.state import (
    RESULT_KEYS,
    Manifest,
    Progress,
    diff_settings,
    load_manifest,
    load_train_checkpoint,
    save_manifest,
    save_train_checkpoint,
)
from frugal_qat.checkpoint.store import (
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    kill_point,
    load_tensors,
    read_json,
    remove_partials,
)
from frugal_qat.config import RunConfig
from frugal_qat.distributed import (
    agreed,
    barrier,
    check_launch,
    local_device,
    on_rank0,
    rank_world,
    shard_rows,
    sum_floats,
)
from frugal_qat.errors import ConfigError, Interrupted, ResumeMismatch, TrainingDiverged
from frugal_qat.offload.activations import ActivationStream, StreamFile, StreamGeometry, chunk_samples
from frugal_qat.offload.aio import open_stream
from frugal_qat.offload.blocks import ModelSource
from frugal_qat.offload.prefetch import WaitClock, prefetch
from frugal_qat.planner.check import machine_limits, require_fit, settings_from_config
from frugal_qat.planner.profile import Mark, no_mark, peak_rss, return_large_frees_to_os
from frugal_qat.precision import Precision, dtype_name, frozen
from frugal_qat.precision import resolve as resolve_precision
from frugal_qat.quantizer import kquant, resolve_group_size

log = logging.getLogger(__name__)


# ---- set-up helpers ---------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``. A CUDA device becomes the current one, once, here: kernels
    launched on the current device (Triton's), ``torch.cuda.memory_allocated()`` and the profiler then all mean
    the run's GPU, not GPU 0."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but no CUDA device is visible; use --device cpu or auto")
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                              f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def run_precision(cfg: RunConfig, device: torch.device, src: ModelSource) -> Precision:
    """The precision policy of this run (``frugal_qat/precision.py``): the device's, or the one forced by
    ``offload.precision``; bf16 streams where the architecture's activations overflow fp16."""
    o = cfg.offload
    return resolve_precision(device, o.precision, o.stream_dtype, needs_bf16_streams=src.arch.bf16_activations)


def check_finite(x: torch.Tensor, block: int, stream: str, precision: Precision) -> None:
    """A stream chunk must be finite before it is stored: an overflow found here names its block, instead of
    surfacing blocks later as a diverged training."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        hint = ("store the streams in bf16: --stream-dtype bfloat16" if precision.stream_dtype == torch.float16
                else "check the source weights of this block")
        raise TrainingDiverged(f"block {block} produced {bad} non-finite values in the {stream} stream "
                               f"({dtype_name(precision.stream_dtype)}); {hint}")


def check_paths(model_dir: Path, out: Path) -> None:
    """The source is never written to: refuse an output inside it (or around it), or a foreign directory."""
    if out == model_dir or model_dir in out.parents or out in model_dir.parents:
        raise ConfigError(f"--out {out} overlaps the source model {model_dir}; choose a separate run directory")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()) and not is_run_dir(out):
        raise ConfigError(f"--out {out} is a non-empty directory that is not a frugal-qat run; choose an empty or new one")


def check_layers(src: ModelSource, cfg: RunConfig) -> dict[str, str] | None:
    """Every quantized layer's width must admit the group size (a GGUF grid: some ggml block): refuse now, not
    inside block 17's training. Returns, for a run in a GGUF grid, each linear's type (the type asked for, or its
    legacy fallback where a row is not a multiple of 256; ``kquant.layer_type``)."""
    types = {}
    for lin in src.linear_shapes():
        try:
            if cfg.quant.gguf:
                types[lin.name] = kquant.layer_type(cfg.quant.gguf, lin.in_features)
            else:
                resolve_group_size(cfg.quant.group_size, lin.in_features, cfg.quant.wbits,
                                   name=f"layers.*.{lin.name}")
        except ValueError as e:
            raise ConfigError(f"layers.*.{lin.name}: {e}" if cfg.quant.gguf else str(e)) from None
    fallbacks = {name: t for name, t in types.items() if t != cfg.quant.gguf}
    if fallbacks:
        log.warning("GGUF %s: %s train in %s (rows not a multiple of 256, docs/GGUF.md)", cfg.quant.gguf,
                    ", ".join(fallbacks), ", ".join(sorted(set(fallbacks.values()))))
    return types or None


def check_plan(src: ModelSource, cfg: RunConfig, device: torch.device, work: Path, out: Path) -> None:
    """Run the memory planner for this machine before anything heavy starts, and stop with its advice when the
    run cannot fit (GPU memory, RAM, or the disk still to be written)."""
    limits = machine_limits(device, (work, out))
    require_fit(src.config, settings_from_config(cfg, device.type, **limits), ("block_ap",))


def existing_run(out: Path, cfg: RunConfig, src: ModelSource, data_fp: str) -> Manifest | None:
    """The manifest of the run already in ``out`` if it is this run (same model, data and result settings),
    None if ``out`` holds no run; a different run is refused with the differences. Writes nothing."""
    if not is_run_dir(out):
        return None
    m = load_manifest(out)
    if m.command != "block-ap":
        raise ResumeMismatch(f"{out} holds a {m.command} run, not a block-ap run; choose another --out")
    diffs = diff_settings({k: m.config.get(k) for k in RESULT_KEYS}, {k: cfg.to_dict()[k] for k in RESULT_KEYS})
    if m.model["fingerprint"] != src.store.fingerprint():
        diffs.append(f"model: run was made from {m.model['path']}, whose files differ from {src.dir}")
    if m.data["windows_sha256"] != data_fp:
        diffs.append(f"data: the calibration windows differ from the run's ({m.data['calib']} -> {cfg.data.calib})")
    if diffs:
        raise ResumeMismatch(
            f"{out} holds a different run ({'; '.join(diffs)}); use the same settings to resume, another --out, or --restart"
        )
    return m


def open_run(out: Path, cfg: RunConfig, src: ModelSource, windows: torch.Tensor, data_fp: str, restart: bool,
             streams: dict) -> Manifest:
    """A new run directory, or the existing one if it is the same run (refusing with the differences otherwise).
    ``streams``: the activation streams' layout of a new run (spare rows, bases, dtype), kept in the manifest."""
    if is_run_dir(out) and restart:
        log.warning("--restart: deleting the previous run in %s", out)
        clear_dir(out)
    m = existing_run(out, cfg, src, data_fp)
    if m is not None:
        harmless = diff_settings(m.config.get("offload", {}), cfg.to_dict()["offload"], "offload.")
        for d in harmless:
            log.warning("setting changed on resume (the new value wins): %s", d)
        m.config = cfg.to_dict()
        remove_partials(out)
        log.info("resuming %s at block %d, stage %s", out, m.progress.block, m.progress.stage)
        return m
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(out / "calib.safetensors", {"windows": windows.to(torch.int32)})
    model = {"path": str(src.dir), "fingerprint": src.store.fingerprint()}
    data = {"calib": cfg.data.calib, "windows_sha256": data_fp, "shape": list(windows.shape)}
    m = Manifest(command="block-ap", config=cfg.to_dict(), model=model, data=data,
                 extra={"blocks": [], "streams": streams})
    save_manifest(out, m)
    return m


def open_run_stream(run_dir: str | Path, name: str) -> ActivationStream:
    """Stream ``name`` ("fp" or "quant") of a run directory as its manifest places it (kept with ``keep_work``)."""
    m = load_manifest(Path(run_dir))
    layout, shape = m.extra["streams"], m.data["shape"]
    work = Path(m.config["offload"]["work_dir"] or Path(run_dir) / "work")
    hidden = ModelSource(m.model["path"]).hidden
    file = StreamFile(work / f"{name}_stream.bin", (shape[0] + layout["spare"], shape[1], hidden),
                      dtype=getattr(torch, layout["dtype"]))
    return ActivationStream(file, StreamGeometry(shape[0], layout["spare"], layout[name]))


def finished_summary(out: Path, m: Manifest) -> dict:
    """The summary of a finished run, re-run with the same command: nothing to do, nothing touched. A work
    folder that a kill left behind after the run was marked done (its streams are only needed to resume) is
    removed."""
    work = Path(m.config["offload"]["work_dir"] or out / "work")
    if work.is_dir() and not m.extra.get("keep_work"):
        log.info("removing %s, left by a kill after the run finished", work)
        shutil.rmtree(work, ignore_errors=True)
    summary = read_json(out / "summary.json")
    summary["already_complete"] = True
    log.info("%s is already complete (block-ap finished %d blocks); nothing to do", out, len(summary["blocks"]))
    return summary


def _rss() -> int:
    return psutil.Process().memory_info().rss


@functools.cache
def _libc_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def release_free_heap() -> None:
    """Give the heap pages freed by the last block back to the OS.

    glibc keeps freed small and medium allocations in its arenas; over a run that is about 8 MB per block of RSS
    that nothing uses (measured on SmolLM2-width models, docs/MEMORY.md), which would grow with depth. One
    ``malloc_trim(0)`` per block, a few milliseconds, keeps RSS flat.
    """
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


# ---- the run ------------------------------------------------------------------------------------------------------


def run_block_ap(
    model_dir: str | Path,
    out: str | Path,
    cfg: RunConfig,
    windows: torch.Tensor,
    *,
    restart: bool = False,
    keep_work: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    show_progress: bool = True,
    mark: Mark = no_mark,
) -> dict:
    """Quantize ``model_dir`` into the run directory ``out``. ``windows`` [train+val, L]: calibration token ids.

    Data parallel when the process group has N > 1 ranks (:func:`frugal_qat.distributed.init_from_env`): each
    rank trains on its share of every step's micro-batches (r, r+N, ...; it reads only those rows of the
    streams) and the gradients are summed across ranks, so every rank takes the single-process run's step; the
    stream updates are split by whole chunks; rank 0 alone writes the run directory.

    ``mark(kind, value)`` is told where the run is (``"block", i`` and ``"stage", name``; value None closes the
    kind): :class:`frugal_qat.planner.profile.Profiler.mark` splits its memory timeline there (``--profile``).

    ``out`` is held for the whole run (:func:`frugal_qat.checkpoint.run_dir.hold_run_dir`): a second command on it
    is refused while this one runs.
    """
    return_large_frees_to_os()  # as the CLI does: the memory a library caller gets is the one measured
    model_dir, out = Path(model_dir).resolve(), Path(out).resolve()
    check_paths(model_dir, out)  # before the hold creates ``out``: nothing is ever written into the source
    check_launch()  # before the hold: launched without --deepspeed, every process would take itself for rank 0
    with hold_run_dirs(write=(out,)):
        return _run(model_dir, out, cfg, windows, restart=restart, keep_work=keep_work, should_stop=should_stop,
                    show_progress=show_progress, mark=mark)


def _run(model_dir: Path, out: Path, cfg: RunConfig, windows: torch.Tensor, *, restart: bool, keep_work: bool,
         should_stop: Callable[[], bool], show_progress: bool, mark: Mark) -> dict:
    """:func:`run_block_ap` once its paths are checked and ``out`` is held."""
    from frugal_qat.data.windows import fingerprint_windows

    t_start = time.time()
    q, d, b = cfg.quant, cfg.data, cfg.block_ap

    # 1. Validate everything that can be validated before a byte is written.
    src = ModelSource(model_dir, seqlen=d.seqlen)
    gguf_types = check_layers(src, cfg)
    if tuple(windows.shape) != (d.train_size + d.val_size, d.seqlen):
        raise ConfigError(f"calibration windows have shape {tuple(windows.shape)}, expected {(d.train_size + d.val_size, d.seqlen)}")
    rank, world = rank_world()
    if b.grad_accum % world:
        raise ConfigError(f"block_ap.grad_accum={b.grad_accum} is not a multiple of the {world} processes; each "
                          f"process takes grad_accum/world micro-batches per step: use a multiple of {world}")
    device = local_device(pick_device(cfg.offload.device))
    precision = run_precision(cfg, device, src)
    should_stop = agreed(should_stop)
    n_all, H, L = d.train_size + d.val_size, src.hidden, d.seqlen
    data_fp = fingerprint_windows(windows)

    # A finished run, started again with the same command: say so and touch nothing.
    if not restart:
        done = on_rank0(lambda: existing_run(out, cfg, src, data_fp))
        if done is not None and done.progress.stage == "done":
            return on_rank0(lambda: finished_summary(out, done))

    work = Path(cfg.offload.work_dir).resolve() if cfg.offload.work_dir else out / "work"
    check_plan(src, cfg, device, work, out)

    # 2. Open or resume the run. A new run's streams: one chunk of spare rows each (see offload/activations.py).
    chunk = chunk_samples((n_all, L, H), cfg.offload.chunk_mb, precision.stream_bytes)
    new_layout = {"spare": chunk, "fp": chunk, "quant": chunk, "dtype": dtype_name(precision.stream_dtype)}
    m = on_rank0(lambda: open_run(out, cfg, src, windows, data_fp, restart, new_layout))
    if m.progress.stage in ("fp_update", "q_update") and m.extra.get("world_size", 1) != world:
        raise ResumeMismatch(f"{out} stopped during a stream update on {m.extra.get('world_size', 1)} processes, "
                             f"whose progress only that split can continue; resume it on that many, not {world}")
    if world > 1:
        m.extra["world_size"] = world
    else:
        m.extra.pop("world_size", None)
    layout = m.extra["streams"]
    stream_dtype = getattr(torch, layout["dtype"])  # the run's files decide, whatever the settings say now
    (work / "ckpt").mkdir(parents=True, exist_ok=True)

    def commit() -> None:
        """Record ``m`` once every rank has finished the stage it closes; no rank starts the next one before."""
        barrier()
        on_rank0(lambda: save_manifest(out, m))

    # 3. The two activation streams: rows [0, train) train, rows [train, train+val) validate. Every file the
    # manifest will name is made durable before the manifest names it (a power cut then loses no committed stage).
    names = {"fp": work / "fp_stream.bin", "quant": work / "quant_stream.bin"}
    file_shape = (n_all + layout["spare"], L, H)
    if m.progress.stage == "embed":  # (re)created whole: a kill during creation or embedding leaves nothing to keep
        on_rank0(lambda: [StreamFile(p, file_shape, create=True, dtype=stream_dtype).close() for p in names.values()])
    fp, qs = (ActivationStream(open_stream(names[k], file_shape, dtype=stream_dtype, io=cfg.offload.io),
                               StreamGeometry(n_all, layout["spare"], layout[k])) for k in ("fp", "quant"))
    # Each rank updates its own whole chunks of a stream, recording its progress in its own file.
    suffix = "" if world == 1 else f".rank{rank}"
    progress, journal = work / f"stream_progress{suffix}.json", work / f"stream_journal{suffix}.safetensors"
    rows = shard_rows(n_all, layout["spare"], rank, world) if world > 1 else None
    wait = WaitClock()

    def update(stream: ActivationStream, name: str, fn) -> None:
        """The shifted in-place update of one stream (this rank's rows); the new base is recorded at the commit."""
        mine = (rows[1] - rows[0]) if rows is not None else n_all
        with tqdm(total=mine, desc=f"block {i} {name} stream", unit="sample", leave=False,
                  disable=not show_progress or rank != 0) as bar:
            geometry = stream.update(fn, progress=progress, tag=f"block{i}-{name}", rows=rows, journal=journal,
                                     before_writes=barrier, clock=wait, on_chunk=bar.update)
        m.extra["streams"][name] = geometry.base

    if m.progress.stage == "embed":
        mark("stage", "embed")

        def embed() -> None:
            emb = src.embed_weight()
            for s in range(0, n_all, layout["spare"]):
                x = src.embed(windows[s : s + layout["spare"]], emb).to(stream_dtype)
                check_finite(x, 0, "embedding", precision)
                fp.write(s, x)
                qs.write(s, x)
            fp.sync()
            qs.sync()

        on_rank0(embed)
        m.progress = Progress(block=0, stage="fp_update")
        commit()

    # 4. Block by block. Block i+1's tensors are read from the shards while block i trains.
    runner = src.runner(device)
    weight_lr = b.resolved_weight_lr(q.bits)
    steps_per_epoch = d.train_size // b.batch_size
    first = m.progress.block if m.progress.stage not in ("finalize", "done") else src.n_layers
    outer = tqdm(total=src.n_layers, initial=first, desc="block-ap", unit="block", disable=not show_progress or rank != 0)
    pin = device.type == "cuda"

    def to_device(x: torch.Tensor) -> torch.Tensor:
        return (x.pin_memory() if pin else x).to(device, torch.float32, non_blocking=pin)

    for i, state in prefetch(src.block_state, range(first, src.n_layers), depth=1, clock=wait):
        t_block = time.time()
        mark("block", i)
        block = src.block(i, state).to(device)
        del state  # the prefetcher already reads block i+1; drop our copy of block i's raw tensors

        def run(mod, xs: torch.Tensor, what: str) -> torch.Tensor:
            """A stream chunk through block i (no grad; the policy's teacher dtype for the fp stream, its no-grad
            dtype for the quant stream), checked before it is stored."""
            with torch.no_grad(), frozen(mod), (precision.teacher(device) if what == "fp" else precision.nograd(device)):
                ys = torch.cat([runner(mod, i, to_device(xb)).to("cpu", stream_dtype)
                                for xb in xs.split(b.micro_batch)])
            check_finite(ys, i, what, precision)
            return ys

        # 4a. Targets: the full-precision block applied to the fp stream, in place.
        if m.progress.stage == "fp_update":
            mark("stage", "fp update")
            update(fp, "fp", lambda x: run(block, x, "fp"))
            kill_point("after_fp_update")
            m.progress.stage = "train"
            commit()

        # 4b. Train the fake-quantized block (or restore it from its in-block checkpoint).
        ckpt = work / "ckpt" / f"block_{i:05d}.safetensors"

        def batches(first_step: int, lo: int = 0, hi: int = d.train_size):
            """Per step, its micro-batches of (quant-stream input, fp-stream target), read ahead in order."""
            def load(j: int):
                a, z = lo + j * b.batch_size, min(hi, lo + (j + 1) * b.batch_size)
                mine = [(s, min(z, s + b.micro_batch)) for s in range(a, z, b.micro_batch)][rank::world]
                return [(to_device(qs.read(s, t)), to_device(fp.read(s, t))) for s, t in mine]

            steps = -(-(hi - lo) // b.batch_size)
            for _, micro in prefetch(load, range(first_step, steps), depth=2, clock=wait):
                yield micro

        # A GGUF grid starts from a fit weighted by each column's mean squared input on the training windows
        # (llama.cpp's importance matrix). It is kept with the in-block checkpoints: a resume after the quant
        # stream update has begun could not compute it again (the update overwrites the inputs it read).
        importance = None
        if q.gguf and not ckpt.is_file():
            imp_file = work / "ckpt" / f"importance_{i:05d}.safetensors"
            if imp_file.is_file():
                importance = load_tensors(imp_file)
            else:
                importance = linear_input_importance(
                    block, lambda mod, x: runner(mod, i, x), (x for micro in batches(0) for x, _ in micro),
                    precision, device, world)
                on_rank0(lambda: atomic_save_tensors(imp_file, importance))
        linears = wrap_linears(block, q.wbits, q.group_size, name=f"layers.{i}", gguf=q.gguf, importance=importance)
        block.to(device)
        optimizer = make_optimizer(block, linears, weight_lr, b.quant_lr, fused=device.type == "cuda")
        result = TrainResult()
        start_step = 0
        if ckpt.is_file():
            start_step, metrics, trained = load_train_checkpoint(ckpt, optimizer)
            block.load_state_dict(trained, strict=True)
            result = TrainResult(**metrics)  # metrics of the epochs done before the kill ride along

        def validate() -> float:
            if d.val_size == 0:
                return float("nan")
            total, n = 0.0, 0
            with torch.no_grad(), frozen(block), precision.nograd(device):
                for micro in batches(0, lo=d.train_size, hi=n_all):
                    for x, y in micro:
                        out_ = runner(block, i, x)
                        total += torch.nn.functional.mse_loss(out_.float(), y, reduction="sum").item()
                        n += y.numel()
            total, n = sum_floats(total, n)
            return total / n

        def checkpoint(step: int) -> None:  # every rank holds the same state: rank 0 writes it
            on_rank0(lambda: save_train_checkpoint(ckpt, block.state_dict(), optimizer, step, metrics=asdict(result)))

        if m.progress.stage == "train":
            mark("stage", "train")
            if start_step == 0:
                result.val_mse.append(validate())  # the RTN starting point, to show what training bought
            total_steps = b.epochs * steps_per_epoch
            inner = tqdm(total=total_steps, initial=start_step, desc=f"block {i}", unit="step", leave=False,
                         disable=not show_progress or rank != 0)
            tokens_per_step = b.batch_size * L
            t_train = time.time()

            def on_step(loss: float) -> None:
                inner.update(1)
                rate = tokens_per_step * (inner.n - start_step) / max(time.time() - t_train, 1e-9)
                inner.set_postfix(loss=f"{loss:.3e}", tok_s=f"{rate:.0f}", refresh=False)

            train_block(
                block, lambda mod, x: runner(mod, i, x), batches, validate, optimizer,
                precision=precision, epochs=b.epochs, steps_per_epoch=steps_per_epoch, min_lr_ratio=b.min_lr_ratio,
                max_grad_norm=b.max_grad_norm, start_step=start_step, checkpoint=checkpoint,
                ckpt_every=b.ckpt_every_steps, block_idx=i, device=device, on_step=on_step,
                should_stop=should_stop, result=result,
            )
            inner.close()
            if should_stop():
                raise Interrupted(f"stopped during block {i} at a checkpoint; resume with: frugal-qat resume {out}")
            m.progress.stage = "q_update"
            commit()

        # 4c. Freeze to exactly what is saved, and move the quant stream through the quantized block.
        freeze_block(block)
        if m.progress.stage == "q_update":
            mark("stage", "quant update")
            update(qs, "quant", lambda x: run(block, x, "quant"))
            kill_point("after_q_update")
            m.progress.stage = "save"
            commit()

        # 4d. Pack and save, then commit the block: from here on a resume starts at block i+1.
        def save() -> Manifest:
            mark("stage", "save")
            packed = {}
            for name, lin in linears.items():
                packed.update({f"{name}.{k}": v for k, v in lin.pack().items()})
            for name, p in block.named_parameters():
                if not any(name.startswith(ln + ".") for ln in linears):
                    packed[name] = p.detach().half()
            kill_point("save_block")
            save_block(out, i, packed)
            blocks_meta = [x for x in m.extra.get("blocks", []) if x["block"] != i]
            blocks_meta.append({
                "block": i,
                "val_mse": result.val_mse,
                "train_loss": result.train_loss,
                "seconds": round(time.time() - t_block, 3),
                "rss_bytes": _rss(),
                "peak_rss_bytes": peak_rss(),
            })
            m.extra["blocks"] = blocks_meta
            m.progress = Progress(block=i + 1, stage="fp_update" if i + 1 < src.n_layers else "finalize")
            save_manifest(out, m)
            ckpt.unlink(missing_ok=True)
            (work / "ckpt" / f"importance_{i:05d}.safetensors").unlink(missing_ok=True)
            return m

        m = on_rank0(save)
        block = linears = optimizer = None  # free block i now (not `del`: the closures above share these names)
        release_free_heap()
        outer.set_postfix(val_mse=f"{result.val_mse[-1]:.3e}" if result.val_mse else "-", rss=f"{_rss() / 2**30:.2f}G")
        outer.update(1)
        if should_stop():
            raise Interrupted(f"stopped after block {i}; resume with: frugal-qat resume {out}")
    outer.close()
    mark("block", None)

    # 5. Everything but the blocks, then the summary.
    fp.close()
    qs.close()
    barrier()  # every rank has let go of the streams before rank 0 deletes them

    def finish() -> dict:
        mark("stage", "finalize")
        extra = extra_tensors(src.store.get, src.store.has, src.tied)
        group_size = kquant.TYPES[q.gguf].sub if q.gguf else q.group_size
        write_model_files(out, src.dir, src.config, extra, src.n_layers, q.bits, group_size, src.arch.linears,
                          gguf_types, q.gguf)
        summary = {
            "command": "block-ap",
            "wbits": q.bits,
            "group_size": group_size,
            "blocks": m.extra.get("blocks", []),
            "seconds": round(time.time() - t_start, 3),
            "io_wait_seconds": round(wait.waited, 3),
            "peak_rss_bytes": max([x.get("peak_rss_bytes", 0) for x in m.extra.get("blocks", [])] + [peak_rss()]),
            "output_bytes": model_bytes(out),
            "device": str(device),
            "precision": precision.to_json(),
        }
        if q.gguf:
            summary["gguf"] = q.gguf
        if world > 1:
            summary["world_size"] = world
        atomic_write_bytes(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in summary["blocks"]).encode())
        atomic_write_json(out / "summary.json", summary)
        m.progress.stage = "done"
        m.extra["keep_work"] = keep_work
        save_manifest(out, m)  # the commit: every file above is durable, and a re-run is a no-op from here
        kill_point("after_done")
        if not keep_work:  # the streams, checkpoints and progress files are only needed to resume
            shutil.rmtree(work, ignore_errors=True)
        return summary

    return on_rank0(finish)

