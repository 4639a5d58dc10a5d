"""The thread policy on a shared machine (on demand): one LoRA training step on the tiny model, wall time,
with and without a concurrent CPU-bound process beside it, under three settings:

- `torch default`: one thread per core (2 here), the OpenMP runtime's default wait policy (idle threads spin);
- `policy`: `dpsel.threads.configure_threads()` (cores this process may use, passive waiting);
- `1 thread`.

    python benchmarks/threads.py [--steps 8]

Each setting runs in a fresh interpreter (the OpenMP runtime reads its settings when torch is loaded).
Writes benchmarks/results/threads.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from stats import table, write_report

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = {"torch default": {}, "policy": {"DPSEL_POLICY": "1"}, "1 thread": {"OMP_NUM_THREADS": "1"}}


def child(steps: int) -> None:
    if os.environ.get("DPSEL_POLICY"):
        from dpsel.threads import configure_threads
        configure_threads()
    import torch
    from peft_train.adapters import build_adapter
    from peft_train.models import load_model
    torch.manual_seed(0)
    model, _ = load_model("tiny")
    model = build_adapter(model, "lora", r=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokens = torch.randint(3, 259, (16, 128))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    print(json.dumps({"median_step_s": statistics.median(times[1:]), "threads": torch.get_num_threads(),
                      "wait_policy": os.environ.get("OMP_WAIT_POLICY", "runtime default")}))


def run_setting(extra_env: dict, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                             "OMP_WAIT_POLICY", "DPSEL_THREADS")}
    env.update(extra_env, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, __file__, "--child", "--steps", str(steps)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def busy_process() -> subprocess.Popen:
    """A CPU-bound neighbour (a pure-Python loop), as a CI job or another worker would be."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    if args.child:
        child(args.steps)
        return
    rows = []
    for neighbour in (False, True):
        busy = busy_process() if neighbour else None
        try:
            for name, env in SETTINGS.items():
                result = run_setting(env, args.steps)
                rows.append({"setting": name, "busy_neighbour": neighbour, **result})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at end",
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    write_report(args.out / "threads", report, markdown(report))
    print(markdown(report), end="")


def markdown(report: dict) -> str:
    rows = []
    for name in SETTINGS:
        quiet, busy = (next(r for r in report["rows"] if r["setting"] == name and r["busy_neighbour"] == b)
                       for b in (False, True))
        rows.append([name, quiet["threads"], quiet["wait_policy"], f"{quiet['median_step_s']:.3f}",
                     f"{busy['median_step_s']:.3f}"])
    lines = ["# Thread policy: one LoRA step (tiny model, batch 16×128), median wall seconds", "",
             f"Machine: {report['machine']}; {report['when']}.", "",
             *table(["setting", "threads", "wait policy", "no extra neighbour (machine already shared)",
                     "with one more busy process"], rows, align="lrlrr")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
