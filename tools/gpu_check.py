"""The GPU acceptance check: everything about the CUDA path that this project's CPU machines cannot show, in one
command that takes under 10 minutes on one GPU and prints one table.

    bash tools/gpu_check.sh                 # from a set-up checkout (make setup, with a CUDA torch in .venv)
    python tools/gpu_check.py --dry-run     # what it would run, anywhere

Steps (each a row of the table, PASS / FAIL / SKIP with its figures):

1. the CUDA-marked tests (``pytest -m cuda``: compiled Triton kernels against the torch reference on the GPU,
   the precision policy's dtypes on real CUDA tensors, RoPE buffers after DeepSpeed's bf16 cast, ``--device cuda:N``);
2. SmolLM2-135M Block-AP on CUDA (recipes/demo.yaml, 8 x 256 windows): measured peak (``max_memory_allocated``)
   against the planner's, and the simulated peak (``plan --simulate``) when this frugal-qat has it;
3. E2E-QP on that run, the same figures;
4. one kill and resume on CUDA with ``--deterministic``: the result must equal the uninterrupted run bit for bit;
   the same without ``--deterministic`` is reported (flash attention's backward uses atomics), not required.

On a machine without CUDA it prints the steps and exits 0. Exit status: 0 when every step that ran passed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
STEPS = [
    ("cuda tests", "pytest -m cuda -q tests"),
    ("block-ap on cuda", "frugal-qat block-ap --model SMOLLM2 --recipe recipes/demo.yaml --train-size 8 --val-size 4 "
                         "--device cuda --profile P   (+ frugal-qat plan --simulate)"),
    ("e2e-qp on cuda", "frugal-qat e2e-qp --run RUN --recipe recipes/demo.yaml --train-size 16 --device cuda --profile P"),
    ("kill + resume, deterministic", "block-ap --deterministic killed at stream_update@3, then again; == uninterrupted"),
    ("kill + resume, default", "the same without --deterministic (reported, not required)"),
]


def cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frugal_qat", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def phase_peaks(profile: Path) -> tuple[int, int]:
    """(measured CUDA peak, planned peak) of the profiled phase."""
    result = json.loads(profile.read_text())
    phase = next(s for s in result["segments"] if s["kind"] == "phase")
    return int(result["peak_cuda"] or 0), int(phase["predicted"] or 0)


def simulated_peak(model: Path, phase: str, extra: list[str]) -> str:
    out = Path(tempfile.mkdtemp()) / "plan.json"
    r = cli("plan", "--model", str(model), "--recipe", "recipes/demo.yaml", "--simulate", "--json", str(out), *extra)
    if not out.is_file():
        return "n/a (" + (r.stderr.strip().splitlines() or ["plan --simulate unavailable"])[-1][:60] + ")"
    for p in json.loads(out.read_text()).get("phases", []):
        if p.get("phase") == phase and p.get("simulated_peak"):
            return f"{p['simulated_peak'] / GiB:.2f} GiB"
    return "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    import torch

    if args.dry_run or not torch.cuda.is_available():
        why = "--dry-run" if args.dry_run else "no CUDA device is visible here"
        print(f"gpu_check: {why}; on a GPU it runs:")
        for name, what in STEPS:
            print(f"  {name:<30} {what}")
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    rows: list[tuple[str, str, str]] = []
    t_all = time.time()
    print(f"gpu_check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, work dir {work}", flush=True)

    r = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    rows.append(("cuda tests", "PASS" if r.returncode == 0 else "FAIL", last))

    model = work / "smollm2"
    subprocess.run([sys.executable, "tools/make_smollm2_checkpoint.py", "--out", str(model)], cwd=ROOT, check=True,
                   capture_output=True)
    small = ["--recipe", "recipes/demo.yaml", "--train-size", "8", "--val-size", "4", "--device", "cuda"]
    run, prof = work / "run", work / "block_ap"
    r = cli("block-ap", "--model", str(model), "--out", str(run), *small, "--profile", str(prof))
    if r.returncode == 0:
        measured, planned = phase_peaks(prof.with_suffix(".json"))
        sim = simulated_peak(model, "block_ap", small[2:6])
        rows.append(("block-ap on cuda", "PASS" if measured <= planned else "FAIL",
                     f"peak {measured / GiB:.2f} GiB, plan {planned / GiB:.2f} GiB, simulated {sim}"))
    else:
        rows.append(("block-ap on cuda", "FAIL", r.stderr.strip().splitlines()[-1][:100]))

    e2e, prof = work / "run-e2e", work / "e2e_qp"
    r = cli("e2e-qp", "--run", str(run), "--out", str(e2e), "--recipe", "recipes/demo.yaml", "--train-size", "16",
            "--device", "cuda", "--profile", str(prof))
    if r.returncode == 0:
        measured, planned = phase_peaks(prof.with_suffix(".json"))
        rows.append(("e2e-qp on cuda", "PASS" if measured <= planned else "FAIL",
                     f"peak {measured / GiB:.2f} GiB, plan {planned / GiB:.2f} GiB"))
    else:
        rows.append(("e2e-qp on cuda", "FAIL", r.stderr.strip().splitlines()[-1][:100]))

    from frugal_qat.checkpoint.chaos import result_files

    for name, flags in (("kill + resume, deterministic", ["--deterministic"]), ("kill + resume, default", [])):
        ref, out = work / f"ref{len(flags)}", work / f"killed{len(flags)}"
        a = cli("block-ap", "--model", str(model), "--out", str(ref), *small, *flags)
        b = cli("block-ap", "--model", str(model), "--out", str(out), *small, *flags,
                env={"FRUGAL_QAT_KILL_AT": "stream_update@3"})
        c = cli("block-ap", "--model", str(model), "--out", str(out), *small, *flags)
        ok = a.returncode == 0 and b.returncode == -signal.SIGKILL and c.returncode == 0
        same = ok and result_files(ref) == result_files(out)
        status = ("PASS" if same else "FAIL") if flags else ("bit-identical" if same else "differs (expected)")
        rows.append((name, status, f"killed rc {b.returncode}, resumed rc {c.returncode}"))

    print(f"\n{'check':<30} {'result':<20} detail")
    for row in rows:
        print(f"{row[0]:<30} {row[1]:<20} {row[2]}")
    print(f"\n{time.time() - t_all:.0f} s")
    return 0 if all(s in ("PASS", "bit-identical", "differs (expected)") for _, s, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
