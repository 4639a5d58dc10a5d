"""Benchmark of the fine-tuning methods: LoRA (r=1, 8), SURM, C3A, LoKr, full, and their 4-bit variants.

Protocol. Adapters on a random-init base learn little, so a base is pretrained first: the tiny model, fully
trained for `--pretrain-seconds` on some synth task families plus generic text, cached under
benchmarks/cache/ and reused. Each method then adapts that base to *other* families it has not seen. The
learning rate of each method is picked on a validation split (one seed) from a small grid; the chosen lr is
then run with `--seeds` seeds and scored on a separate held-out test split (eval loss per task; greedy
exact match, reported only where it discriminates). The 4-bit variants reuse the lr their 16-bit twin won.
Step time is a ratio to LoRA r=8's, measured in this process with the methods interleaved.
Also measured: FFT product vs materialising ΔW for the SURM layer classes at d = 1024, 2048, 4096, and the
base-weight memory of a 4-bit model vs fp16.

  python benchmarks/tune.py                   # the full run (~10 min on 2 cores)
  python benchmarks/tune.py --quick           # a smoke run (~2 min)
  python benchmarks/tune.py --device cuda --model-size 100m   # QLoRA vs 16-bit LoRA timing on a GPU

Writes benchmarks/results/tune.json and tune.md (or tune-100m.* for the timing mode).

Modules: tune_data.py (specs, splits, the pretrained base), tune_run.py (sweeps, seeds, timings), tune_summary.py
(mean ± sd over seeds, verdicts), tune_render.py (Markdown), and benchmarks/stats.py (shared by every benchmark).
`--render-only results/tune.json` re-renders the Markdown of a saved JSON without running anything.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stats import read_json, write_report  # noqa: E402
from tune_data import (ADAPT_TASKS, BATCH_SIZE, MAX_LENGTH, PRETRAIN_TASKS, SPECS, adaptation_data, log,  # noqa: E402
                       pretrained_base)
from tune_render import render_100m, render_markdown  # noqa: E402
from tune_run import (extra_seeds_for_best_surm, fft_vs_dense, four_bit_memory, step_time_ratios,  # noqa: E402
                      sweep_and_seed, timing_100m)
from tune_summary import verdicts  # noqa: E402


def _short(value):
    return round(value, 4) if isinstance(value, float) else str(value)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one lr per method, fewer steps and rows")
    parser.add_argument("--seeds", type=int, default=None, help="seeds for the main methods (default 2, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="adaptation steps (default 150, quick 100; 100m mode 30)")
    parser.add_argument("--pretrain-seconds", type=float, default=None, help="base pretraining (default 120, quick 40)")
    parser.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=None,
                        help="comma-separated labels (e.g. lora-r8,surm-circulant); default all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny matrices: 1 is fastest)")
    parser.add_argument("--model-size", choices=["tiny", "100m"], default="tiny")
    parser.add_argument("--no-extras", action="store_true", help="skip the FFT and 4-bit memory measurements")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "cache")
    parser.add_argument("--render-only", type=Path, default=None, metavar="JSON",
                        help="re-render the Markdown of a saved tune JSON into --out (same file name), run nothing")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 2)
    default_steps = 30 if args.model_size == "100m" else (100 if args.quick else 150)
    args.steps = args.steps or default_steps
    args.pretrain_seconds = args.pretrain_seconds or (40 if args.quick else 120)
    return args



def _write(out: Path, stem: str, report: dict, markdown: str) -> None:
    json_path, md_path = write_report(out / stem, report, markdown, default=_short)
    log(f"wrote {json_path} and {md_path}")


def render_only(path: Path, out: Path) -> int:
    """The Markdown of a saved tune JSON (a tune report or the 100M timing mode's), as --out/<its name>.md."""
    report = read_json(path)
    out.mkdir(parents=True, exist_ok=True)
    target = (out / path.name).with_suffix(".md")
    target.write_text(render_100m(report) if "runs" in report else render_markdown(report))
    log(f"wrote {target}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_only:
        return render_only(args.render_only, args.out)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.model_size == "100m":
        report = timing_100m(args)
        report["seconds"] = time.perf_counter() - started
        _write(args.out, "tune-100m", report, render_100m(report))
        return 0

    specs = [s for s in SPECS if args.methods is None or s.label in args.methods]
    unknown = set(args.methods or []) - {s.label for s in SPECS}
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; choose from {', '.join(s.label for s in SPECS)}")
    n_train, n_val, n_test = (400, 48, 80) if args.quick else (800, 96, 160)
    data = adaptation_data(n_train, n_val, n_test)
    base_dir, base_info = pretrained_base(args.cache, args.pretrain_seconds, args.device)
    config = {"steps": args.steps, "seeds": args.seeds, "quick": args.quick, "device": args.device,
              "threads": args.threads, "n_train": n_train, "n_val": n_val, "n_test": n_test,
              "batch_size": BATCH_SIZE, "max_length": MAX_LENGTH, "pretrain_tasks": PRETRAIN_TASKS,
              "adapt_tasks": ADAPT_TASKS, "python": platform.python_version(), "torch": torch.__version__}

    def write_partial(results: dict) -> None:  # an interrupted run still leaves what it measured
        partial = {"config": config, "base": base_info, "methods": results, "partial": True,
                   "seconds": time.perf_counter() - started}
        _write(args.out, "tune", partial, render_markdown(partial))

    results = sweep_and_seed(specs, args, base_dir, data, on_result=write_partial)
    best_surm = extra_seeds_for_best_surm(results, args, base_dir, data)
    report = {
        "config": config,
        "base": base_info,
        "methods": results,
        "step_time": step_time_ratios(specs, args, base_dir, data),
        "verdicts": verdicts(results, best_surm),
    }
    if not args.no_extras:
        report["fft_vs_dense"] = fft_vs_dense()
        report["four_bit_memory"] = four_bit_memory(base_dir)
    report["seconds"] = time.perf_counter() - started
    _write(args.out, "tune", report, render_markdown(report))
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
