"""What a run really uses: memory over time with phase, block and stage marks, beside the planner's prediction.

    with Profiler("prof.json", "prof.png", prediction=predicted_peaks(plan)) as prof:
        prof.mark("phase", "block_ap")
        for i in range(n_layers):
            prof.mark("block", i)
            prof.mark("stage", "train")
            ...

A background thread samples, every ``interval`` seconds, the process's resident set size (psutil), and on CUDA
``torch.cuda.memory_allocated``; with ``track_tensors=True`` also the bytes of live CPU tensors (:class:`LiveTensors`).
The samples draw the timeline. The peaks are exact, not sampled: at every mark the profiler reads and resets the
kernel's RSS high-water mark (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``; Linux only, else the
sampled maximum is used), ``torch.cuda.max_memory_allocated`` and the live-tensor peak. So the time between two
consecutive marks (an *interval*) has an exact peak, and every segment is a union of intervals.

Segments: a mark of kind k opens a segment of that kind which lasts until the next mark of kind k, of a kind
ranked above k (``KINDS``: phase > block > stage; other kinds rank last), ``end(k)``, or the end. Each segment
reports its seconds, peaks, and the bytes the process read from and wrote to the disk (``/proc`` I/O counters, which count
page-cache misses of memory maps too). Blocks and stages inherit the prediction of the phase they lie in, since
the planner's per-block figures are the peak of any block.

The prediction is compared with RSS on CPU (the planner's ``ram_peak``: RSS includes Python and torch) and with
``max_memory_allocated`` on CUDA (the planner's ``device_peak``; its "CUDA context" term is not seen by the
allocator's counters, so expect the measurement a little under the plan there).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import resource
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

log = logging.getLogger(__name__)

Mark = Callable[[str, "str | int | None"], None]
"""Where a run is: ``mark("block", 3)``, ``mark("stage", "train")``; value None closes that kind. The run loops
take one (``Profiler.mark`` under ``--profile``, else :func:`no_mark`), so they need not know about profiling."""


def no_mark(kind: str, value: str | int | None) -> None:
    """The :data:`Mark` of a run that is not profiled."""

GiB = 2**30
KINDS = ("phase", "block", "stage")  # a mark closes the open segments of its own kind and of every kind below it
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


# ---- the allocator ------------------------------------------------------------------------------------------------

MMAP_THRESHOLD = 2**20  # bytes: host allocations this large get their own mapping, returned to the OS when freed


def return_large_frees_to_os() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD`, so every freed block of 1 MiB or more leaves the RSS.

    glibc raises its threshold to the size of each mapped block that is freed (up to 32 MiB); after a few such frees
    the tile temporaries of the packed matmul and the activations of a step come from the heap, which they fragment,
    and the freed pages stay resident. SmolLM2 E2E-QP (3 steps, one thread) peaked at 1.65-1.73 GB RSS with the
    default and at 1.09 GB with the threshold fixed at 1 MiB, in the same CPU time (51-55 s; 16 MiB: 1.65 GB again);
    docs/PERFORMANCE.md. Results are unchanged: only where freed memory goes. Blocks over 32 MiB (a 64 MiB stream
    chunk) are mapped either way, so the extra page faults fall on 1-32 MiB temporaries. Nothing is done when the
    user set ``MALLOC_MMAP_THRESHOLD_`` or off glibc. Returns whether the threshold was set.
    """
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3  # <malloc.h>
        done = bool(libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    log.debug("glibc mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD, done)
    return done


# ---- exact peaks ------------------------------------------------------------------------------------------------


# The kernel's VmHWM is per process and reset_rss_hwm() (the profiler, at every mark) clears it; the peak seen
# before each reset is folded in here so that peak_rss() stays the process's peak since it started. It mirrors
# kernel state of this process, which is why it is module-level.
_peak_before_resets = 0


def peak_rss() -> int:
    """Peak resident set size of this process's own memory since it started, in bytes.

    ``VmHWM`` (plus the peaks before any :func:`reset_rss_hwm`), not getrusage's ``ru_maxrss``: Linux carries
    ``ru_maxrss`` over ``execve`` from the process that spawned us, so a run launched by a Python holding 1.6 GiB
    (the demo, a notebook) would report at least 1.6 GiB whatever it used. ``ru_maxrss`` only off Linux.
    """
    hwm = read_rss_hwm()
    if hwm is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return max(hwm, _peak_before_resets)


def read_rss_hwm() -> int | None:
    """The kernel's high-water mark of this process's RSS in bytes (``VmHWM``), or None off Linux."""
    try:
        m = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def reset_rss_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    global _peak_before_resets
    _peak_before_resets = max(_peak_before_resets, read_rss_hwm() or 0)
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _cpu_tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor) and t.device.type == "cpu"
            and not t.is_sparse]


class LiveTensors(TorchDispatchMode):
    """Bytes of CPU tensor storages created by torch ops inside this mode and still alive, and their peak.

    Counts what the project allocates through torch in the thread that entered the mode (dispatch modes are
    thread-local: tensors made by read-ahead threads, and tensors made outside torch ops such as
    ``torch.from_numpy``, are not seen). Views share their storage and are counted once. Unlike RSS it excludes
    Python, libraries and allocator slack, so it is the figure to hold against the planner's compute terms.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, tuple[int, object]] = {}  # data_ptr -> (bytes, token of this registration)

    def reset_peak(self) -> int:
        """Return the peak since the last reset, and start a new one from the current bytes."""
        peak, self.peak = self.peak, self.current
        return peak

    def _free(self, key: int, token: object) -> None:
        entry = self._live.get(key)
        if entry is not None and entry[1] is token:  # the address may already belong to a newer storage
            del self._live[key]
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: not an allocation, even when that input was
        # made before the mode was entered.
        inputs = {t.untyped_storage().data_ptr() for t in _cpu_tensors((args, kwargs))}
        for t in _cpu_tensors(out):
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._live or key in inputs:
                continue
            token = object()
            self._live[key] = (nbytes, token)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key, token)  # storages keep their Python object while alive
        return out


# ---- the profiler -----------------------------------------------------------------------------------------------


def predicted_peaks(plan) -> dict[str, int]:
    """``{phase: bytes}`` from a :class:`frugal_qat.planner.Plan`: RAM peak on CPU, device peak on CUDA."""
    return {p.phase: (p.device_peak if p.device == "cuda" else p.ram_peak) for p in plan.phases}


def _io_counters(proc: psutil.Process) -> tuple[int, int] | None:
    try:
        c = proc.io_counters()
    except (psutil.AccessDenied, AttributeError, NotImplementedError):  # not on every platform
        return None
    return c.read_bytes, c.write_bytes


class Profiler:
    """Sample memory in the background, split the run by ``mark`` calls, write JSON and a PNG timeline on exit.

    Args:
        out_json, out_png: where to write the result and the figure (None: not written).
        prediction: ``{phase name: predicted peak bytes}``, e.g. :func:`predicted_peaks` of a plan.
        interval: seconds between samples.
        track_tensors: also count live CPU tensors made in this thread (:class:`LiveTensors`; adds a few
            microseconds to every torch op).
        title: the figure's title.
    """

    def __init__(self, out_json: str | Path | None = None, out_png: str | Path | None = None, *,
                 prediction: dict[str, int] | None = None, interval: float = 0.05, track_tensors: bool = False,
                 title: str = "") -> None:
        if interval <= 0:
            raise ValueError(f"interval {interval} must be positive, e.g. 0.05 (seconds)")
        self.out_json = Path(out_json) if out_json else None
        self.out_png = Path(out_png) if out_png else None
        self.prediction = dict(prediction or {})
        self.interval = interval
        self.title = title
        self.cuda = torch.cuda.is_available()
        self.live = LiveTensors() if track_tensors else None
        self._proc = psutil.Process()
        self._samples: list[tuple[float, int, int | None, int | None]] = []
        self._marks: list[dict[str, Any]] = []
        self._intervals: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._exact_rss = False
        self.result: dict[str, Any] | None = None

    # -- context ------------------------------------------------------------------------------------------------

    def __enter__(self) -> Profiler:
        self._t0 = time.perf_counter()
        self._exact_rss = reset_rss_hwm() and read_rss_hwm() is not None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        if self.live is not None:
            self.live.__enter__()
        self._open_interval()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="frugal-profiler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._close_interval()
        if self.live is not None:
            self.live.__exit__(exc_type, exc, tb)
        # Written even when the run failed: the timeline of a run that ran out of memory is the one to look at.
        self.result = self.save()
        if self.out_png:
            plot_timeline(self.result, self.out_png)
        log.info("profile: peak RSS %.2f GiB over %.1f s%s", self.result["peak_rss"] / GiB, self.result["seconds"],
                 f"; written to {self.out_json}" if self.out_json else "")

    def mark(self, kind: str, value: str | int | None) -> None:
        """Start a segment: ``mark("phase", "block_ap")``, ``mark("block", 3)``, ``mark("stage", "train")``."""
        self._sample()
        self._close_interval()
        self._marks.append({"t": self._now(), "kind": str(kind), "value": value})
        self._open_interval()

    def save(self) -> dict[str, Any]:
        """The result so far (peaks up to the last mark), written to ``out_json`` while the run goes on, so that a
        run the OOM killer ends (SIGKILL: no ``__exit__``) still leaves its measurements."""
        result = self._build()
        if self.out_json:
            self.out_json.parent.mkdir(parents=True, exist_ok=True)
            self.out_json.write_text(json.dumps(result, indent=1) + "\n")
        return result

    def end(self, kind: str) -> None:
        """Close the open segment of ``kind`` (and of the kinds below it) without opening another."""
        self.mark(kind, None)

    # -- sampling -----------------------------------------------------------------------------------------------

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        cuda = torch.cuda.memory_allocated() if self.cuda else None
        live = self.live.current if self.live is not None else None
        self._samples.append((self._now(), rss, cuda, live))

    def _open_interval(self) -> None:
        self._interval = {"start": self._now(), "io": _io_counters(self._proc)}

    def _close_interval(self) -> None:
        now, start = self._now(), self._interval["start"]
        sampled = [s for s in self._samples if start <= s[0] <= now] or self._samples[-1:]
        rss = max(s[1] for s in sampled)
        if self._exact_rss:
            rss = max(rss, read_rss_hwm() or 0)
            reset_rss_hwm()
        cuda = None
        if self.cuda:
            cuda = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        live = self.live.reset_peak() if self.live is not None else None
        io0, io1 = self._interval["io"], _io_counters(self._proc)
        read, written = (io1[0] - io0[0], io1[1] - io0[1]) if io0 and io1 else (None, None)
        self._intervals.append({"start": start, "end": now, "peak_rss": rss, "peak_cuda": cuda, "peak_live": live,
                                "read_bytes": read, "write_bytes": written})

    # -- result -------------------------------------------------------------------------------------------------

    def _build(self) -> dict[str, Any]:
        end = self._now()
        segments = build_segments(self._marks, self._intervals, end, self.prediction, self.cuda)
        ts, rss, cuda, live = (list(col) for col in zip(*self._samples))
        return {
            "title": self.title,
            "seconds": round(end, 3),
            "interval": self.interval,
            "exact_rss_peaks": self._exact_rss,
            "compare": "cuda" if self.cuda else "rss",
            "peak_rss": max(i["peak_rss"] for i in self._intervals),
            "peak_cuda": max(i["peak_cuda"] for i in self._intervals) if self.cuda else None,
            "peak_live": max(i["peak_live"] for i in self._intervals) if self.live is not None else None,
            "prediction": self.prediction,
            "segments": segments,
            "marks": self._marks,
            "samples": {"t": [round(t, 4) for t in ts], "rss": rss, "cuda": cuda if self.cuda else None,
                        "live": live if self.live is not None else None},
        }


def _rank(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)


def build_segments(marks: list[dict], intervals: list[dict], end: float, prediction: dict[str, int],
                   cuda: bool = False) -> list[dict[str, Any]]:
    """Segments from marks (see the module docstring), each with the peaks and I/O of the intervals inside it."""
    segments = []
    for k, m in enumerate(marks):
        if m["value"] is None:  # Profiler.end: only closes segments
            continue
        stop = next((n["t"] for n in marks[k + 1:] if _rank(n["kind"]) <= _rank(m["kind"])), end)
        inside = [i for i in intervals if i["start"] >= m["t"] and i["end"] <= stop]

        def peak(key: str) -> int | None:
            vals = [i[key] for i in inside if i[key] is not None]
            return max(vals) if vals else None

        def total(key: str) -> int | None:
            vals = [i[key] for i in inside if i[key] is not None]
            return sum(vals) if vals else None

        segments.append({"kind": m["kind"], "value": m["value"], "start": round(m["t"], 4), "end": round(stop, 4),
                         "seconds": round(stop - m["t"], 4), "peak_rss": peak("peak_rss"), "peak_cuda": peak("peak_cuda"),
                         "peak_live": peak("peak_live"), "read_bytes": total("read_bytes"),
                         "write_bytes": total("write_bytes"), "predicted": None})
    phases = [s for s in segments if s["kind"] == "phase"]
    for s in segments:
        owner = s if s["kind"] == "phase" else next(
            (p for p in phases if p["start"] <= s["start"] and s["end"] <= p["end"]), None)
        if owner is not None and str(owner["value"]) in prediction:
            s["predicted"] = int(prediction[str(owner["value"])])
            measured = s["peak_cuda"] if cuda else s["peak_rss"]
            s["measured_over_predicted"] = round(measured / s["predicted"], 4) if measured and s["predicted"] else None
    return segments


def format_profile(result: dict[str, Any], kinds: tuple[str, ...] = ("phase", "block")) -> str:
    """A table of the segments of ``kinds``: seconds, measured peak, planned peak and their ratio, disk I/O."""
    key = "peak_cuda" if result["compare"] == "cuda" else "peak_rss"
    label = "peak CUDA" if key == "peak_cuda" else "peak RSS"
    head = f"{'segment':<22}{'seconds':>9}{label + ' GiB':>15}{'planned GiB':>13}{'meas/plan':>11}{'read MB':>10}{'written MB':>12}"
    lines = [head, "-" * len(head)]
    for s in result["segments"]:
        if s["kind"] not in kinds:
            continue
        name = ("  " * min(_rank(s["kind"]), 2) + f"{s['kind']} {s['value']}")[:21]
        planned = f"{s['predicted'] / GiB:13.3f}" if s["predicted"] else f"{'-':>13}"
        ratio = s.get("measured_over_predicted")
        mb = [f"{v / 1e6:.1f}" if v is not None else "-" for v in (s["read_bytes"], s["write_bytes"])]
        lines.append(f"{name:<22}{s['seconds']:9.1f}{(s[key] or 0) / GiB:15.3f}{planned}"
                     f"{(f'{ratio:.3f}' if ratio else '-'):>11}{mb[0]:>10}{mb[1]:>12}")
    lines.append(f"whole run: {result['seconds']:.1f} s, {label} {(result[key] or 0) / GiB:.3f} GiB"
                 + ("" if result["exact_rss_peaks"] or key == "peak_cuda" else " (sampled, not exact)"))
    return "\n".join(lines)


# ---- the figure -------------------------------------------------------------------------------------------------


def plot_timeline(result: dict[str, Any], png: str | Path) -> None:
    """Memory against time; shaded stages, dashed block and solid phase boundaries; per phase the planned peak
    (dashed red) beside the measured one (dot and label)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(12, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    smp = result["samples"]
    ax.plot(smp["t"], [v / GiB for v in smp["rss"]], color="tab:blue", lw=1.2, label="RSS (psutil)")
    if smp.get("cuda"):
        ax.plot(smp["t"], [v / GiB for v in smp["cuda"]], color="tab:orange", lw=1.2, label="CUDA allocated")
    if smp.get("live"):
        ax.plot(smp["t"], [v / GiB for v in smp["live"]], color="tab:green", lw=1.0, label="live tensors")
    segs = result["segments"]
    stage_colors: dict[str, Any] = {}
    palette = ["#cfe2f3", "#fce5cd", "#d9ead3", "#ead1dc", "#fff2cc", "#d0e0e3"]
    for s in segs:
        if s["kind"] == "stage":
            new = str(s["value"]) not in stage_colors
            color = stage_colors.setdefault(str(s["value"]), palette[len(stage_colors) % len(palette)])
            ax.axvspan(s["start"], s["end"], color=color, lw=0, zorder=0, label=f"stage: {s['value']}" if new else None)
    top = max([v / GiB for v in smp["rss"]] + [(s["predicted"] or 0) / GiB for s in segs]) * 1.12 or 1.0
    blocks = [s for s in segs if s["kind"] == "block"]
    for s in blocks:
        ax.axvline(s["start"], color="gray", lw=0.6, ls="--", zorder=1)
        if len(blocks) <= 40:
            ax.text(s["start"], top * 0.985, str(s["value"]), fontsize=7, color="gray", va="top", ha="left")
    key = "peak_cuda" if result["compare"] == "cuda" else "peak_rss"
    for k, s in enumerate(s for s in segs if s["kind"] == "phase"):
        ax.axvline(s["start"], color="black", lw=1.2, zorder=2)
        ax.text(s["start"], top * (0.94 - 0.05 * (k % 2)), f" {s['value']}", fontsize=9, va="top", ha="left",
                weight="bold")  # staggered: short phases would print their names on top of each other
        measured = (s[key] or 0) / GiB
        # the sampled instant nearest the exact peak, to place the dot
        inside = [(v, t) for t, v in zip(smp["t"], smp["cuda"] if key == "peak_cuda" else smp["rss"])
                  if s["start"] <= t <= s["end"]]
        t_peak = max(inside)[1] if inside else s["start"]
        ax.plot([t_peak], [measured], "o", color="tab:red", ms=5, zorder=4)
        text = f"measured {measured:.2f} GiB"
        if s["predicted"]:
            planned = s["predicted"] / GiB
            ax.hlines(planned, s["start"], s["end"], colors="tab:red", linestyles="--", lw=1.2, zorder=3)
            text += f"\nplanned {planned:.2f} GiB ({(measured / planned - 1) * 100:+.1f} %)"
        right = t_peak > 0.6 * result["seconds"]  # labels near the right edge go to the left of their dot
        ax.annotate(text, (t_peak, measured), xytext=(-6 if right else 6, 8), textcoords="offset points", fontsize=8,
                    color="tab:red", ha="right" if right else "left", zorder=5)
    ax.set_ylim(0, top)
    ax.set_xlim(0, result["seconds"])
    ax.set_xlabel("seconds")
    ax.set_ylabel("GiB")
    ax.set_title(result.get("title") or "memory timeline")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(png))
