"""`python -m dpsel.demo` (what `make demo` runs; `--quick` is `make demo-quick`): the whole job on embedded
defaults, with live progress: curate, then tune with adapters.

Generates a noisy synthetic instruction set (known truth) of four task families and pretrains the built-in
tiny model briefly on clean rows of the other six (dpsel.demo_base; saved under OUT/base/ and reused by a
second run), so the adapters have new tasks to learn. Then it runs the `curate-then-tune` Prefect flow with
`compare` — Bayesian data-point selection (`bads` with the random-init tiny model), then QLoRA (4-bit NF4
base) on the curated rows and, for comparison, on all rows with the same steps — tunes both sets with a SURM
adapter too, each method with three seeds, and prints curated vs uncurated eval loss per method with the
margin, its spread over the seeds, the trainable parameters and the peak memory. The settings are those of
configs/demo.yaml (the same run through `dpsel flow`); `--quick` shrinks the data and the steps. The up-front
estimate multiplies step times that a short probe measures at start (dpsel.demo_estimate) by the planned
steps. Runs are recorded by Prefect's embedded server under ./.prefect.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpsel.config import RunConfig
from dpsel.demo_base import PRETRAIN_TASKS, BaseSettings
from dpsel.errors import DpselInputError
from dpsel.numbers import format_figure
from dpsel.synth import TASK_FAMILIES

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TUNING_SEEDS = 3
# The demo's rows: the task families its base was not pretrained on (compare, next, convert, digits).
DEMO_TASKS = tuple(task for task in TASK_FAMILIES if task not in PRETRAIN_TASKS)
# The adapter compared with configs/demo.yaml's (qlora): the SURM structure that measured best in
# benchmarks/results/tune.md (surm-ldr at displacement rank 1, 6,656 parameters on the tiny model). It gets
# its own step count (DemoSize.surm_steps): at QLoRA's 150 its margin over seeds was within the spread
# (+0.079 ± 0.080); at 250 it was +0.115 ± 0.017.
SURM = {"tune.method": "surm-ldr", "tune.r": 1, "tune.lr": 1e-2}


@dataclass(frozen=True)
class DemoSize:
    """Data, steps and base pretraining of one demo size."""
    rows: int
    noise: float
    meta_rows: int
    test_rows: int
    base: BaseSettings
    surm_steps: int = 250                            # tuning steps of the SURM runs
    overrides: dict = field(default_factory=dict)   # RunConfig overrides on top of configs/demo.yaml


FULL = DemoSize(rows=3000, noise=0.3, meta_rows=200, test_rows=300, base=BaseSettings(steps=300))
# --quick: a fifth of the rows and fewer steps; same methods and models, so the same code runs.
QUICK = DemoSize(rows=600, noise=0.3, meta_rows=100, test_rows=60, base=BaseSettings(steps=150), surm_steps=60,
                 overrides={"curate.steps": 60, "tune.steps": 60, "curate.select.max_length": 96,
                            "tune.max_length": 96, "curate.select.extra": {"ref_patience": 2, "ref_steps": 100}})


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


def method_configs(config: RunConfig, size: DemoSize) -> dict[str, RunConfig]:
    """The tuning runs compared, by label: configs/demo.yaml's method (qlora) and the SURM structure."""
    surm = config.with_overrides({**SURM, "tune.steps": size.surm_steps})
    return {config.tune.method: config, surm.tune.method: surm}


def _selection_model(config: RunConfig) -> str:
    """What bads samples θ in on this machine (dpsel.select.bads: the embedder when it is installed and the
    model is the built-in tiny one)."""
    from dpsel.models.embedder import EmbedderUnavailable, packaged_folder
    if config.curate.method == "bads" and config.model == "tiny":
        try:
            packaged_folder()
            return ("θ a question→answer map in the packaged sentence embedder's space, prior from its "
                    "label-free evidence")
        except EmbedderUnavailable:
            pass
    return "θ the random-init tiny model, after a reference fit on the meta set"


def plan(config: RunConfig, size: DemoSize, rates=None, seeds: int = TUNING_SEEDS) -> list[str]:
    """What the demo is about to do, and how long that should take here: the planned steps times the step
    times `rates` (dpsel.demo_estimate.Rates; measured now by a short probe when not given)."""
    from dpsel.demo_estimate import phase_seconds, probe

    methods = method_configs(config, size)
    if rates is None:
        rates = probe({c.tune.method: c.tune.r for c in methods.values()}, config.tune.batch_size or 16,
                      config.tune.max_length or 128, config.device, list(DEMO_TASKS))
    phases = phase_seconds(rates, pretrain_steps=size.base.steps, selection_steps=config.curate.steps or 0,
                           tune_steps={name: c.tune.steps or 0 for name, c in methods.items()},
                           runs_per_method=2 * seeds, eval_rows=size.test_rows)
    tuned = ", ".join(f"{name} (r={c.tune.r}, lr {c.tune.lr:g}, {c.tune.steps} steps)" for name, c in methods.items())
    step_times = ", ".join(f"{name} {s * 1000:.0f} ms" for name, s in
                           [("full", rates.full_step), *rates.adapter_step.items()])
    return [
        f"dpsel demo: {size.rows:,} synthetic rows ({size.noise:.0%} corrupted), {size.meta_rows} trusted meta rows, "
        f"{size.test_rows} clean test rows of {', '.join(DEMO_TASKS)}; model {config.model!r}, device {config.device}",
        f"  1. pretrain the tiny model {size.base.steps} steps on {size.base.rows:,} clean rows of other tasks "
        f"({', '.join(size.base.tasks)}; saved under OUT/base/, reused next time)",
        f"  2. select rows with {config.curate.method}: {_selection_model(config)} ({config.curate.steps} "
        f"sampler steps), keep {config.curate.budget:.0%}",
        f"  3. tune the pretrained base with adapters, {tuned}, on the curated rows "
        f"and on all rows, {seeds} seeds each",
        "  4. compare eval loss on the test rows per method: the margin and its spread over the seeds",
        f"estimate: about {sum(phases.values()) / 60:.1f} min here: planned steps times the step times a probe "
        f"measured just now at this machine's load ({step_times} per step, {rates.eval_row * 1000:.0f} ms "
        f"per evaluated row)",
    ]


def _tune_seed(config: RunConfig, data: str, out: Path, seed: int, base: str, weights_column: str | None) -> dict:
    from flows import run_flow

    run = config.with_overrides({"train": data, "out": str(out), "seed": seed, "model": base})
    run = run.model_copy(update={"tune": run.tune.model_copy(update={"weights_column": weights_column})})
    return run_flow("tune", run, echo=False)["tune"]["metrics"]


def _by_seed(runs: dict[str, list[dict]], seeds: list[int]) -> dict:
    """One method's eval losses per seed and its size figures (peak memory: the largest of its runs)."""
    every = runs["curated"] + runs["uncurated"]
    return {"seeds": seeds, **{name: [m.get("eval_loss") for m in runs[name]] for name in runs},
            "trainable_params": every[0]["trainable_params"], "total_params": every[0]["total_params"],
            "peak_memory_bytes": max(m["peak_memory_bytes"] for m in every)}


def run_demo(out: Path, *, device: str = "auto", seed: int = 0, size: DemoSize = FULL,
             seeds: int = TUNING_SEEDS) -> dict:
    from dpsel.demo_base import pretrained_base
    from dpsel.progress import announce
    from dpsel.synth import generate
    from flows import run_flow

    started = time.perf_counter()
    config = demo_config(out, device, seed, size)
    generate(out / "data", rows=size.rows, noise=size.noise, seed=seed, tasks=list(DEMO_TASKS),
             meta_rows=size.meta_rows, test_rows=size.test_rows)
    base, base_info = pretrained_base(out / "base", out / "data", size.base, device)
    announce(f"base {base}: {'reused' if base_info['reused'] else 'pretrained'}, loss "
             f"{base_info['first_loss']:.3f} -> {base_info['final_loss']:.3f} over {base_info['steps']} steps")
    summary = run_flow("curate_then_tune", config, compare=True, tune_model=base, echo=False)
    data = {"curated": summary["curate"]["paths"]["curated"], "uncurated": config.data.train}
    weights = {"curated": config.tune.weights_column, "uncurated": None}
    by_method = {}
    for label, run in method_configs(config, size).items():
        runs = {name: [] for name in data}
        for tuning_seed in range(seed, seed + seeds):
            for name in data:
                if run is config and tuning_seed == seed:   # the flow's own pair
                    runs[name].append(summary["tune"][name]["metrics"])
                    continue
                folder = out / f"tune-{label}-{name}-seed{tuning_seed}"
                runs[name].append(_tune_seed(run, data[name], folder, tuning_seed, base, weights[name]))
        by_method[label] = _by_seed(runs, list(range(seed, seed + seeds)))
    summary["base"] = {"path": base, **base_info}
    summary["eval_loss_by_seed"] = by_method
    summary["seconds"] = time.perf_counter() - started
    return summary


def margins(losses: dict) -> list[float]:
    """Uncurated minus curated eval loss per tuning seed (> 0: curation helped)."""
    return [u - c for c, u in zip(losses["curated"], losses["uncurated"])]


def _size_note(by_seed: dict) -> str:
    if "trainable_params" not in by_seed:
        return ""
    trainable, total = by_seed["trainable_params"], by_seed["total_params"]
    return (f" ({trainable:,} trainable of {total:,} parameters, {trainable / total:.1%}; peak memory "
            f"{by_seed['peak_memory_bytes'] / 2 ** 20:.1f} MiB)")


def method_lines(label: str, by_seed: dict) -> list[str]:
    """One method's block: its size, eval loss per seed, and the margin with its spread."""
    lines = [f"{label}{_size_note(by_seed)}",
             "  eval loss        " + "  ".join(f"seed {s:<4}" for s in by_seed["seeds"])]
    for name in ("curated", "uncurated"):
        lines.append(f"    {name:<14} " + "  ".join(f"{v:<9.4f}" for v in by_seed[name]))
    gaps = margins(by_seed)
    mean = statistics.fmean(gaps)
    spread = statistics.stdev(gaps) if len(gaps) > 1 else float("nan")
    wins = sum(g > 0 for g in gaps)
    lines.append(f"  margin (uncurated - curated): {mean:+.4f} (std {spread:.4f} over {len(gaps)} tuning seeds, "
                 f"range {min(gaps):+.4f} .. {max(gaps):+.4f}); curated better on {wins} of {len(gaps)} seeds")
    beyond = len(gaps) > 1 and mean > 0 and mean > 2 * spread / len(gaps) ** 0.5
    lines.append(f"  {label}: curated beats uncurated beyond the seed spread: " + ("yes" if beyond else "no"))
    return lines


def headline(summary: dict) -> list[str]:
    """The lines the demo ends with: report path, AUROC, kept fraction, then per tuning method its size,
    curated vs uncurated per seed and the margin with its spread."""
    head = summary["headline"]
    lines = [f"report:            {summary['report']}",
             f"selection AUROC:   {format_figure(head.get('selection AUROC'))}",
             f"kept:              {head.get('kept rows')} of {head.get('input rows')} input rows "
             f"({format_figure(head.get('kept fraction (of input rows)'))}; {head.get('usable rows')} usable)"]
    for label, by_seed in (summary.get("eval_loss_by_seed") or {}).items():
        lines += method_lines(label, by_seed)
    return lines


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (Prefect's server)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpsel.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/demo, runs/demo-quick)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.rows} rows and fewer steps")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where models run")
    parser.add_argument("--seed", type=int, default=0, help="data, selection and first tuning seed")
    parser.add_argument("--seeds", type=int, default=TUNING_SEEDS, help="tuning seeds per training set (spread)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show library logs and warnings")
    args = parser.parse_args(argv)
    from dpsel.data.arrays import lean_memory_pool
    lean_memory_pool()   # as the command line does
    from dpsel.progress import announce, set_verbosity
    from dpsel.threads import configure_threads

    configure_threads()   # before torch loads: threads from the cores this process may use, waiting passively
    set_verbosity(args.verbose)
    size = QUICK if args.quick else FULL
    out = args.out or Path("runs/demo-quick" if args.quick else "runs/demo")
    try:
        announce("measuring step times for the estimate (a few seconds)")
        print("\n".join(plan(demo_config(out, args.device, args.seed, size), size, seeds=max(1, args.seeds))),
              flush=True)
        announce("starting (progress below; Prefect records the runs under ./.prefect)")
        summary = run_demo(out, device=args.device, seed=args.seed, size=size, seeds=max(1, args.seeds))
    except DpselInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(headline(summary)))
    print(f"done in {summary['seconds'] / 60:.1f} min wall, {cpu_seconds() / 60:.1f} min CPU (user + sys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
