"""The planner's simulation (``frugal-qat plan --simulate``) checked two ways; results and commands in docs/MEMORY.md.

    python tools/bench_simulate.py validate   # simulated vs measured live-tensor peak, same code, on this CPU
    python tools/bench_simulate.py plan70b    # the 70B plans with --simulate: planned vs simulated, and how long

validate: each phase's code paths (``planner.simulate.run_phase``) run twice on the same settings: on fake tensors
          (the simulation, counted by its LiveBytes) and on real ones (zeros, counted by the profiler's
          LiveTensors, an independent tracker keyed by data pointers). Models: a tiny Llama (hidden 64) and
          SmolLM2-135M's shipped config, under the CPU policy and the CUDA policy forced on the CPU.
plan70b:  ``frugal-qat plan --model M --recipe R --gpu-mem 80GiB --simulate --json OUT`` for Llama-2-70B,
          Llama-3-70B and Qwen2.5-72B, each in a fresh process; its wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MiB, GiB = 2**20, 2**30
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 128,
        "tie_word_embeddings": False}
MODELS_70B = [("llama-2-70b", "recipes/llama2_70b_w2g64.yaml"), ("llama-3-70b", "recipes/llama3_70b_w2g64.yaml"),
              ("qwen2.5-72b", "recipes/llama2_70b_w2g64.yaml")]  # no Qwen recipe: the paper's 70B settings


def validate(args) -> None:
    from frugal_qat.planner import PHASES, PlanSettings, load_model_config
    from frugal_qat.planner.profile import LiveTensors
    from frugal_qat.planner.simulate import run_phase, simulate

    rows = []
    models = {"tiny": (TINY, 32), "smollm2-135m": (load_model_config("smollm2-135m"), 64)}
    for name in args.models:
        config, group = models[name]
        for policy in args.policies:
            s = PlanSettings(wbits=args.wbits, group_size=group, device="cpu", precision_policy=policy,
                             seqlen=args.seqlen, e2e_seqlen=args.seqlen, batch_size=2, block_ap_grad_accum=2,
                             e2e_batch_size=2, grad_accum=args.e2e_accum, train_size=8, val_size=2,
                             logits_chunk=args.seqlen, eval_batch_size=2)
            for phase in args.phases or PHASES:
                t0 = time.time()
                sim = simulate(config, s, (phase,), packed_kernels="torch")[phase]
                t1 = time.time()
                with LiveTensors() as live:
                    run_phase(phase, config, s, fake=False)
                t2 = time.time()
                row = {"model": name, "policy": policy, "phase": phase, "simulated": sim.live_peak,
                       "measured": live.peak, "ratio": sim.live_peak / live.peak, "simulate_seconds": t1 - t0,
                       "real_seconds": t2 - t1}
                rows.append(row)
                print(f"{name:<14}{policy:<6}{phase:<10}simulated {sim.live_peak / MiB:10.2f} MiB   measured "
                      f"{live.peak / MiB:10.2f} MiB   ratio {row['ratio']:.4f}   ({t1 - t0:.0f} s fake, "
                      f"{t2 - t1:.0f} s real)", flush=True)
    _write(args.json, {"seqlen": args.seqlen, "wbits": args.wbits, "rows": rows})


def plan70b(args) -> None:
    rows = []
    for model, recipe in MODELS_70B:
        out = Path(args.out) / f"plan_{model}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "frugal_qat", "plan", "--model", model, "--recipe", recipe, "--gpu-mem",
               "80GiB", "--simulate", "--json", str(out)]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
        wall = time.time() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        doc = json.loads(out.read_text())
        for ph in doc["phases"]:
            row = {"model": model, "phase": ph["phase"], "planned": ph["device_peak"],
                   "simulated": ph["simulated_peak"], "ratio": ph["device_peak"] / ph["simulated_peak"],
                   "simulation_seconds": ph["simulation"]["seconds"]}
            rows.append(row)
            print(f"{model:<13}{ph['phase']:<10}planned {row['planned'] / GiB:7.2f} GiB   simulated "
                  f"{row['simulated'] / GiB:7.2f} GiB   planned/simulated {row['ratio']:.3f}   "
                  f"({row['simulation_seconds']:.0f} s)", flush=True)
        print(f"{model}: whole command {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
        rows.append({"model": model, "command": " ".join(cmd[2:]), "wall_seconds": wall, "cpu_seconds": cpu})
    _write(args.json, {"rows": rows})


def _write(path: str, doc: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"written {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("validate")
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m"])
    p.add_argument("--policies", nargs="+", default=["cpu", "cuda"])
    p.add_argument("--phases", nargs="+", help="default: all three")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--wbits", type=int, default=2)
    p.add_argument("--e2e-accum", type=int, default=1, help="E2E-QP micro-batches per step")
    p.add_argument("--json", default="/tmp/bench_simulate/validate.json")
    p.set_defaults(fn=validate)
    p = sub.add_parser("plan70b")
    p.add_argument("--out", default="/tmp/bench_simulate")
    p.add_argument("--json", default="/tmp/bench_simulate/plan70b.json")
    p.set_defaults(fn=plan70b)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
