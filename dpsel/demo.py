"""`python -m dpsel.demo` (what `make demo` runs; `--quick` is `make demo-quick`): the whole job on embedded
defaults, with live progress.

Generates a noisy synthetic instruction set (known truth), runs the `curate-then-tune` Prefect flow with
`compare` on the built-in tiny model — Bayesian data-point selection, then fine-tuning on the curated rows and,
for comparison, on all rows with the same steps — then tunes both sets again with two more seeds, and prints
curated vs uncurated eval loss with the margin and its spread over the tuning seeds. The settings are those of
configs/demo.yaml (the same run through `dpsel flow`); `--quick` shrinks the data and the steps so the demo
finishes in about a minute on 2 cores. Runs are recorded by Prefect's embedded server under ./.prefect.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dpsel.config import RunConfig
from dpsel.errors import DpselInputError

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TUNING_SEEDS = 3


@dataclass(frozen=True)
class DemoSize:
    """Data and steps of one demo size; `minutes`: its measured CPU time (user + sys, one torch thread, Prefect's
    server included), which is about the wall time when 2 cores are free for it."""
    rows: int
    noise: float
    meta_rows: int
    test_rows: int
    overrides: dict           # RunConfig overrides on top of configs/demo.yaml
    minutes: float


# Measured: 318 s CPU (311 s user + 7 s sys); wall 26.7 min with a load average of 14-25 from other jobs on 2 cores.
FULL = DemoSize(rows=3000, noise=0.3, meta_rows=200, test_rows=300, overrides={}, minutes=5.3)
# --quick: a fifth of the rows and fewer steps; same method and models, so the same code runs.
# Measured: 92 s CPU (89 s user + 3 s sys); wall 10.3 min with a load average of 10-13 from other jobs on 2 cores.
QUICK = DemoSize(rows=600, noise=0.3, meta_rows=100, test_rows=60, minutes=1.5, overrides={
    "curate.steps": 60, "tune.steps": 60, "curate.select.max_length": 96, "tune.max_length": 96,
    "curate.select.extra": {"ref_patience": 2, "ref_steps": 100}})


def demo_config(out: Path, device: str = "auto", seed: int = 0, size: DemoSize = FULL) -> RunConfig:
    """configs/demo.yaml with its data under OUT/data, its output in OUT, and the size's overrides."""
    if not CONFIG_FILE.exists():
        raise DpselInputError("the demo's settings file is missing (run the demo from a dpsel checkout)",
                              file=str(CONFIG_FILE))
    data = out / "data"
    return RunConfig.load(CONFIG_FILE, {
        "train": str(data / "train.parquet"), "meta": str(data / "meta.parquet"),
        "eval": str(data / "test.parquet"), "truth": str(data / "truth.parquet"),
        "out": str(out), "device": device, "seed": seed, **size.overrides})


def plan(config: RunConfig, size: DemoSize) -> list[str]:
    """What the demo is about to do, and how long that should take here."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cores = os.cpu_count() or 1
    # The demo uses about 2 cores; other work competing for them stretches it roughly in proportion.
    slowdown = max(1.0, (load + 2.0) / min(cores, 2)) if cores <= 2 else max(1.0, (load + 2.0) / cores)
    return [
        f"dpsel demo: {size.rows:,} synthetic rows ({size.noise:.0%} corrupted), {size.meta_rows} trusted meta rows, "
        f"{size.test_rows} clean test rows, model {config.model!r}, device {config.device}",
        f"  1. select rows with {config.curate.method} ({config.curate.steps} sampler steps after a reference "
        f"fit on the meta set), keep {config.curate.budget:.0%}",
        f"  2. fine-tune ({config.tune.method}, {config.tune.steps} steps) on the curated rows and on all rows, "
        f"with {TUNING_SEEDS} seeds each",
        f"  3. compare eval loss on the test rows: the margin and its spread over the seeds",
        f"estimate: about {size.minutes:.1f} min on 2 free cores; this machine's load is {load:.1f} on {cores} "
        f"core(s), so expect about {size.minutes * slowdown:.1f} min",
    ]


def _tune_seed(config: RunConfig, data: str, out: Path, seed: int, weights_column: str | None) -> dict:
    from flows import run_flow

    run = config.with_overrides({"train": data, "out": str(out), "seed": seed})
    run = run.model_copy(update={"tune": run.tune.model_copy(update={"weights_column": weights_column})})
    return run_flow("tune", run, echo=False)["tune"]["metrics"]


def run_demo(out: Path, *, device: str = "auto", seed: int = 0, size: DemoSize = FULL,
             seeds: int = TUNING_SEEDS) -> dict:
    from dpsel.synth import generate
    from flows import run_flow

    started = time.perf_counter()
    config = demo_config(out, device, seed, size)
    generate(out / "data", rows=size.rows, noise=size.noise, seed=seed, meta_rows=size.meta_rows,
             test_rows=size.test_rows)
    summary = run_flow("curate_then_tune", config, compare=True, echo=False)
    losses = {name: [summary["tune"][name]["metrics"].get("eval_loss")] for name in ("curated", "uncurated")}
    data = {"curated": summary["curate"]["paths"]["curated"], "uncurated": config.data.train}
    for extra_seed in range(seed + 1, seed + seeds):
        for name in ("curated", "uncurated"):
            weights = config.tune.weights_column if name == "curated" else None
            metrics = _tune_seed(config, data[name], out / f"tune-{name}-seed{extra_seed}", extra_seed, weights)
            losses[name].append(metrics.get("eval_loss"))
    summary["eval_loss_by_seed"] = {"seeds": list(range(seed, seed + seeds)), **losses}
    summary["seconds"] = time.perf_counter() - started
    return summary


def margins(losses: dict) -> list[float]:
    """Uncurated minus curated eval loss per tuning seed (> 0: curation helped)."""
    return [u - c for c, u in zip(losses["curated"], losses["uncurated"])]


def _fmt(value) -> str:
    return "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def headline(summary: dict) -> list[str]:
    """The lines the demo ends with: report path, AUROC, kept fraction, curated vs uncurated per seed and
    the margin with its spread."""
    head = summary["headline"]
    lines = [f"report:            {summary['report']}",
             f"selection AUROC:   {_fmt(head.get('selection AUROC'))}",
             f"kept:              {head.get('kept rows')} of {head.get('input rows')} input rows "
             f"({_fmt(head.get('kept fraction (of input rows)'))}; {head.get('usable rows')} usable)"]
    by_seed = summary.get("eval_loss_by_seed")
    if not by_seed:
        return lines
    lines.append("eval loss          " + "  ".join(f"seed {s:<4}" for s in by_seed["seeds"]))
    for name in ("curated", "uncurated"):
        lines.append(f"  {name:<16} " + "  ".join(f"{v:<9.4f}" for v in by_seed[name]))
    gaps = margins(by_seed)
    mean = statistics.fmean(gaps)
    spread = statistics.stdev(gaps) if len(gaps) > 1 else float("nan")
    wins = sum(g > 0 for g in gaps)
    lines.append(f"margin (uncurated - curated): {mean:+.4f} (std {spread:.4f} over {len(gaps)} tuning seeds, "
                 f"range {min(gaps):+.4f} .. {max(gaps):+.4f}); curated better on {wins} of {len(gaps)} seeds")
    beyond = len(gaps) > 1 and mean > 0 and mean > 2 * spread / len(gaps) ** 0.5
    lines.append("curated beats uncurated beyond the seed spread: " + ("yes" if beyond else "no"))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpsel.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/demo, runs/demo-quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK.rows} rows and fewer steps: about {QUICK.minutes:.1f} min on 2 free cores")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where models run")
    parser.add_argument("--seed", type=int, default=0, help="data, selection and first tuning seed")
    parser.add_argument("--seeds", type=int, default=TUNING_SEEDS, help="tuning seeds per training set (spread)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show library logs and warnings")
    args = parser.parse_args(argv)
    from dpsel.progress import announce, set_verbosity
    from dpsel.threads import configure_threads

    configure_threads()   # before torch loads: threads from the cores this process may use, waiting passively
    set_verbosity(args.verbose)
    size = QUICK if args.quick else FULL
    out = args.out or Path("runs/demo-quick" if args.quick else "runs/demo")
    try:
        print("\n".join(plan(demo_config(out, args.device, args.seed, size), size)), flush=True)
        announce("starting (progress below; Prefect records the runs under ./.prefect)")
        summary = run_demo(out, device=args.device, seed=args.seed, size=size, seeds=max(1, args.seeds))
    except DpselInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(headline(summary)))
    print(f"done in {summary['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
