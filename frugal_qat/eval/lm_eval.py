"""Zero-shot accuracy with lm-eval (EleutherAI's lm-evaluation-harness) on a run directory, like the paper.

    run_lm_eval(RUN_OR_DIR, ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande"])

The run is loaded as a transformers model (``frugal_qat.export.hf_model.load_quantized_model``: dequantized, fp32,
dense in memory) and handed to lm-eval's ``HFLM`` through its Python API, so the paper's protocol (notes §5: the
mean of ``acc`` over the five tasks) runs on exactly frugal-qat's forward. The paper's tasks download their data
sets from the Hugging Face hub; offline, a task of one's own is a YAML in a folder passed as ``include_path``
(lm-eval's ``--include_path``), e.g. a multiple-choice task over a local jsonl file (``dataset_path: json``).

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

from frugal_qat.errors import ConfigError

log = logging.getLogger(__name__)

PAPER_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")


def run_lm_eval(
    model_dir: str | Path,
    tasks: Sequence[str] | str,
    limit: int | float | None = None,
    include_path: str | Path | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    num_fewshot: int | None = None,
    bootstrap_iters: int = 0,
) -> dict[str, Any]:
    """Evaluate ``model_dir`` (a run directory or a dense checkpoint) on lm-eval ``tasks``.

    Args:
        tasks: task names, or one comma-separated string ("piqa,arc_easy").
        limit: at most this many examples per task (a float in (0, 1) is a fraction), for quick checks.
        include_path: a folder of extra task YAMLs, searched besides lm-eval's own tasks.
        bootstrap_iters: lm-eval's bootstrap resamples for standard errors; 0 (default) skips them.

    Returns:
        ``{"tasks": {task: {metric: value}}, "mean_acc": mean of each task's "acc", "limit", "seconds",
        "lm_eval_version"}``; metric names drop lm-eval's ",none" filter suffix.

    Raises:
        ConfigError: lm-eval is not installed, or a task name is unknown (the nearest names are suggested).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("lm-eval is not installed; run `pip install lm-eval` (it leaves torch as it is)") from None
    from transformers import AutoTokenizer

    from frugal_qat.export.hf_model import load_quantized_model

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    if not names or not all(names):
        raise ConfigError(f"no task given (tasks={tasks!r}); e.g. --tasks {','.join(PAPER_TASKS)}")
    t0 = time.time()
    manager = _task_manager(TaskManager, include_path, names)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        raise ConfigError(
            f"unknown lm-eval task(s) {unknown}; nearest: {hints}"
            + ("" if include_path else "; pass include_path for a folder of task YAMLs")
        )

    model = load_quantized_model(model_dir).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
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

