"""Zero-shot accuracy with lm-eval (EleutherAI's lm-evaluation-harness) on a run directory, like the paper.

    run_lm_eval(RUN_OR_DIR, ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande"])

A run directory is evaluated through its packed model (``frugal_qat.eval.model``: E2E-QP's model, weights packed on
the device and dequantized tile by tile inside each matmul, built one block at a time), a dense checkpoint through
its fp32 model; either is checked against the memory available before anything is loaded, and refused with the
size it needs and the commands that work. The model object goes to lm-eval's ``HFLM`` through its Python API, so
the paper's protocol (notes §5: the mean of ``acc`` over the five tasks) runs on exactly frugal-qat's forward. The
paper's tasks download their data sets from the Hugging Face hub; offline, a task of one's own is a YAML in a folder
passed as ``include_path`` (lm-eval's ``--include_path``), e.g. a multiple-choice task over a local jsonl file
(``dataset_path: json``).

Needs ``pip install lm-eval`` (pure Python; it does not change torch).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from frugal_qat.errors import ConfigError
from frugal_qat.eval.model import DEFAULT_MAX_LENGTH
from frugal_qat.precision import resolve as resolve_precision

log = logging.getLogger(__name__)

PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")


def run_lm_eval(
    model_dir: str | Path,
    tasks: Sequence[str] | str,
    limit: int | float | None = None,
    include_path: str | Path | None = None,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    num_fewshot: int | None = None,
    bootstrap_iters: int = 0,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` (a run directory or a dense checkpoint) on lm-eval ``tasks``.

    Args:
        tasks: task names, or one comma-separated string ("piqa,arc_easy").
        limit: at most this many examples per task (a float in (0, 1) is a fraction), for quick checks.
        include_path: a folder of extra task YAMLs, searched besides lm-eval's own tasks.
        bootstrap_iters: lm-eval's bootstrap resamples for standard errors; 0 (default) skips them.
        max_length: the longest sequence lm-eval feeds the model (longer contexts are cut from the left, as
            lm-eval does at any length); the memory check sizes the forward for ``batch_size`` of them. Default:
            the model's context, at most ``DEFAULT_MAX_LENGTH`` (lm-eval's own fallback, 2048).

    Returns:
        ``{"tasks": {task: {metric: value}}, "mean_acc": mean of each task's "acc", "limit", "seconds",
        "lm_eval_version", "packed", "max_length"}``; metric names drop lm-eval's ",none" filter suffix.

    Raises:
        ConfigError: lm-eval is not installed, or a task name is unknown (the nearest names are suggested).
        OutOfSpace: the model and its forward do not fit the device or host RAM (checked before loading).
    """
    from frugal_qat.checkpoint.run_dir import read_quant_config
    from frugal_qat.eval.model import check_fits, eval_memory_need
    from frugal_qat.offload.weights import read_config

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    if not names or not all(names):
        raise ConfigError(f"no task given (tasks={tasks!r}); e.g. --tasks {','.join(PAPER_TASKS)}")
    if batch_size < 1 or (max_length is not None and max_length < 2):
        raise ConfigError(f"batch_size {batch_size} / max_length {max_length}: give a batch size >= 1 and a "
                          f"max length >= 2")
    t0 = time.time()
    model_dir, device = Path(model_dir), torch.device(device)
    # Sized from config.json alone, before lm-eval is imported or a tensor is read.
    config, quant = read_config(model_dir), read_quant_config(model_dir)
    context = int(config.get("max_position_embeddings") or DEFAULT_MAX_LENGTH)
    max_length = min(context, max_length or DEFAULT_MAX_LENGTH)
    need = eval_memory_need(config, quant, device.type, batch_size, max_length)
    smaller = [(flags, eval_memory_need(config, quant, device.type, 1, length)) for flags, length in
               [("--batch-size 1", max_length), ("--batch-size 1 --max-length 512 (longer contexts are cut from the "
                                                 "left)", min(max_length, 512))]]
    check_fits(model_dir, need, device, batch_size, max_length, smaller)

    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("lm-eval is not installed; run `pip install lm-eval` (it leaves torch as it is)") from None
    from transformers import AutoTokenizer

    from frugal_qat.eval.model import load_eval_model

    manager = _task_manager(TaskManager, include_path, names)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        raise ConfigError(
            f"unknown lm-eval task(s) {unknown}; nearest: {hints}"
            + ("" if include_path else "; pass include_path for a folder of task YAMLs")
        )

    precision = resolve_precision(device)
    model = load_eval_model(model_dir, device, precision)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # HFLM wraps each forward in its own autocast (disabled unless mixed_precision_dtype is given), which would
    # switch off an outer one: the policy's no-grad dtype goes in through that argument. The log-softmax is fp32
    # whatever the logits' dtype.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              mixed_precision_dtype=precision.nograd_autocast, softmax_dtype=torch.float32)
    out = simple_evaluate(
        model=lm,
        tasks=names,
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=manager,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
    )
    per_task = {
        task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
        for task, metrics in out["results"].items()
    }
    accs = [m["acc"] for t, m in per_task.items() if t in names and "acc" in m]
    result = {
        "model": str(model_dir),
        "tasks": per_task,
        "mean_acc": sum(accs) / len(accs) if accs else None,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "packed": quant is not None,
        "max_length": max_length,
        "seconds": round(time.time() - t0, 1),
        "lm_eval_version": importlib.metadata.version("lm-eval"),
    }
    log.info("lm-eval on %s: %s", model_dir, {t: m.get("acc") for t, m in per_task.items()})
    return result


def _task_manager(task_manager_cls: type, include_path: str | Path | None, names: list[str]) -> Any:
    """lm-eval's task index; when ``include_path`` alone has every task, skip indexing lm-eval's ~15k own task
    YAMLs (about 25 s on our CPUs)."""
    if include_path is not None:
        local = task_manager_cls(include_path=str(include_path), include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    return task_manager_cls(include_path=str(include_path) if include_path is not None else None)

