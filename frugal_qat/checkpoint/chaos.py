"""Random-kill testing: run a command, SIGKILL it at a random moment, run the same command again, and repeat
until it completes; then compare its result with an uninterrupted run's, bit for bit.

    ref = run_to_completion(cmd, env)                               # the uninterrupted run, with its stage log
    report = chaos(cmd, env, events=ref.events, kills=8, seed=3)     # the same command, killed 8 times
    assert report.completed and result_files(out) == result_files(ref_out)

Where a run is comes from its stage log: with ``FRUGAL_QAT_STAGE_FILE`` set, every run loop appends a line
``block/stage`` as it moves (``frugal_qat.checkpoint.store.stage_log``). The uninterrupted run's log is the list of
events, with how long each lasted. Each kill aims at an event not before the last one seen (so it lands in work
the run still has to do), within a stride that spreads the kills left over the rest of the run: the first event
there of a stage no kill has landed in yet, else a random one; it fires a random delay after that event appears,
drawn within half the event's duration in the uninterrupted run (capped by ``max_delay``), so short stages are hit
too; a stage a kill aimed at but overshot (the process had already moved on) is aimed at with no delay next time,
and so is the last occurrence of a stage not hit yet (embed and finalize happen once), so a loaded machine cannot
make a short stage unhittable. Every choice comes from ``random.Random(seed)`` and is
printed, so a failing sequence can be replayed. The report says which stage each kill landed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)


@dataclass
class Kill:
    attempt: int
    target: str  # the event (block/stage) the kill aimed at
    delay: float  # seconds after the target appeared
    landed: str  # the last event the process had logged when it died
    returncode: int


@dataclass
class ChaosReport:
    seed: int
    kills: list[Kill] = field(default_factory=list)
    completed: bool = False
    final: subprocess.CompletedProcess | None = None

    @property
    def stages_hit(self) -> set[str]:
        return {stage_of(k.landed) for k in self.kills if k.returncode == -signal.SIGKILL}

    def table(self) -> str:
        rows = [f"{'#':>3}  {'aimed at':<22} {'delay s':>8}  {'landed in':<22} rc"]
        rows += [f"{k.attempt:>3}  {k.target:<22} {k.delay:>8.3f}  {k.landed:<22} {k.returncode}" for k in self.kills]
        return "\n".join(rows)


def stage_of(event: str) -> str:
    """The kind of stage of an event ``block/stage``: ``"0/train"`` -> ``"train"``, ``"-/step 7"`` -> ``"step"``."""
    return event.split("/", 1)[1].rstrip("0123456789 ")


def _log(stage_file: Path) -> list[tuple[str, float]]:
    try:
        lines = [line.split("\t") for line in stage_file.read_text().splitlines() if line]
    except FileNotFoundError:
        return []
    return [(parts[0], float(parts[1])) for parts in lines if len(parts) == 2]


def _events(stage_file: Path) -> list[str]:
    return [e for e, _ in _log(stage_file)]


class Events(list):
    """A stage log: the events in order (a list of ``block/stage`` strings) and each one's seconds."""

    def __init__(self, items=(), seconds: dict[str, float] | None = None):
        super().__init__(items)
        self.seconds = seconds or {}


def run_to_completion(cmd: list[str], env: dict[str, str], timeout: float = 900) -> tuple[subprocess.CompletedProcess,
                                                                                         Events]:
    """Run ``cmd`` once, uninterrupted; return the process and its stage log with every event's duration."""
    with tempfile.TemporaryDirectory(prefix="frugal-chaos-") as d:
        stage_file = Path(d) / "stages"
        proc = subprocess.run(cmd, env={**env, "FRUGAL_QAT_STAGE_FILE": str(stage_file)}, capture_output=True,
                              text=True, timeout=timeout)
        log_ = _log(stage_file)
        end = time.time()
        events = Events(e for e, _ in log_)
        for (e, t), nxt in zip(log_, [t for _, t in log_[1:]] + [end]):
            events.seconds.setdefault(e, nxt - t)
        return proc, events


def chaos(cmd: list[str], env: dict[str, str], events: list[str], *, kills: int, seed: int, max_delay: float = 1.0,
          timeout: float = 900) -> ChaosReport:
    """Run ``cmd`` under ``kills`` random SIGKILLs (see the module docstring), then once more to completion.

    ``events``: the stage log of an uninterrupted run of the same command (:func:`run_to_completion`). Returns
    the report; ``completed`` is whether the last run exited 0.
    """
    seconds = getattr(events, "seconds", {})
    rng = random.Random(seed)
    report = ChaosReport(seed)
    timeline = list(events)  # every line, a block's first ("0/-") included: where a run is
    targets = [i for i, e in enumerate(timeline) if not e.endswith("/-")]  # kills aim at stages, not block starts
    uncovered = {stage_of(timeline[i]) for i in targets}
    overshot: set[str] = set()  # uncovered stages a delayed kill went past: aim at them with no delay
    position = 0  # index in `timeline` of the furthest event seen so far
    with tempfile.TemporaryDirectory(prefix="frugal-chaos-") as d:
        stage_file = Path(d) / "stages"
        for attempt in range(kills):
            later = [i for i in targets if i >= position] or targets[-1:]
            stride = max(1, len(later) // max(1, kills - attempt))  # the kills left, spread over what is left
            window = later[: stride + 1]
            wanted = [i for i in window if stage_of(timeline[i]) in uncovered]
            index = wanted[0] if wanted else window[rng.randrange(min(1, len(window) - 1), len(window))]
            target = timeline[index]
            # a resumed run may start beyond the target (it was finished before the last kill): any event only
            # found after the target means the target will not come, so the kill fires at once
            beyond = set(timeline[index + 1:]) - set(timeline[: index + 1])
            delay = rng.uniform(0, min(max_delay, seconds.get(target, max_delay)) / 2)
            later_same = any(stage_of(timeline[k]) == stage_of(target) for k in targets if k > index)
            if stage_of(target) in overshot or (stage_of(target) in uncovered and not later_same):
                delay = 0.0  # missed once already, or its last occurrence (embed, finalize): no delay to outlive it
            stage_file.unlink(missing_ok=True)
            proc = subprocess.Popen(cmd, env={**env, "FRUGAL_QAT_STAGE_FILE": str(stage_file)},
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                seen = _events(stage_file)
                if target in seen or beyond.intersection(seen):
                    break
                time.sleep(0.002)
            if proc.poll() is None:
                if target in seen:
                    time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate()
            seen = _events(stage_file)
            landed = seen[-1] if seen else "-/start"
            kill = Kill(attempt, target, round(delay, 3), landed, proc.returncode)
            report.kills.append(kill)
            log.info("chaos seed %d, kill %d: aimed at %s + %.3f s, landed in %s (rc %d)", seed, attempt, target,
                     delay, landed, proc.returncode)
            if proc.returncode != -signal.SIGKILL:  # it finished (or failed) before the kill
                report.final = subprocess.CompletedProcess(cmd, proc.returncode, "", err)
                report.completed = proc.returncode == 0
                return report
            uncovered.discard(stage_of(landed))
            if stage_of(target) in uncovered:
                overshot.add(stage_of(target))
            if landed in timeline[position:]:
                position = timeline.index(landed, position)
        report.final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        report.completed = report.final.returncode == 0
    return report


def result_files(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """A digest of every result a run directory holds, for bit-for-bit comparison: each tensor of every
    ``*.safetensors`` file (dtype, shape, bytes) and every JSON file that describes the model (``config.json``,
    ``*.index.json``, ``quantize_config.json``...). Work files, logs, summaries and manifests (times, paths, RSS)
    are left out, and so are names in ``skip``."""
    out: dict[str, str] = {}
    directory = Path(directory)
    volatile = {"manifest.json", "summary.json", "metrics.jsonl", "frugal_qat_export.json", *skip}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if not path.is_file() or path.name in volatile or rel.split("/", 1)[0] == "work" or path.name in skip:
            continue
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    digest = hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
                    out[f"{rel}:{key}"] = f"{t.dtype}{tuple(t.shape)}:{digest}"
        elif path.suffix == ".json":
            out[rel] = hashlib.sha256(json.dumps(json.loads(path.read_text()), sort_keys=True).encode()).hexdigest()
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file below ``directory``: a re-run that touches nothing leaves it unchanged."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def env_without_faults(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment minus every fault-injection variable (so a chaos run is only killed by the harness)."""
    env = dict(os.environ if base is None else base)
    return {k: v for k, v in env.items() if not k.startswith(("FRUGAL_QAT_KILL", "_FRUGAL_QAT", "FRUGAL_QAT_ENOSPC"))}
