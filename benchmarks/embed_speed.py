"""Embedding cost: rows/s of the packaged MiniLM and of the static embedder distilled from it (dpsel.models.distil),
on one torch thread, on the real-text set's rows (benchmarks/realtext.py: a question and a docstring answer per
row, two texts per row, as the bads prior embeds them). Not a test; writes results/embed_speed.{json,md}.

    python benchmarks/embed_speed.py --static DIR     # DIR: `dpsel embedder distil --out DIR` (made here if absent)

Each embedder encodes the same rows `--repeats` times through `Embedder.encode` (no cache); the figure is rows/s,
mean ± sample sd over the repeats. The distillation itself is timed when this script makes DIR.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stats import mean_sd, pm, ratio, table, write_report  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def realtext_rows(n: int, seed: int = 0) -> list:
    from realtext import build

    from dpsel.data import alpaca_to_messages
    train = build(rows=n, noise=0.0, meta_rows=0, test_rows=0, seed=seed)[0]
    return [alpaca_to_messages(r["instruction"], r["output"], r["input"]) for r in train]


def rows_per_second(embedder, rows: list, repeats: int) -> dict:
    from dpsel.select.consistency import answer_text
    from dpsel.select.semantic import question_text
    questions, answers = [question_text(m) for m in rows], [answer_text(m) for m in rows]
    embedder.encode(questions[:8])  # warm-up: first-call allocations out of the timing
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        embedder.encode(questions)
        embedder.encode(answers)
        rates.append(len(rows) / (time.perf_counter() - started))
    return {"rows": len(rows), "repeats": repeats, "rows_per_second": mean_sd(rates)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--static", required=True, type=Path, help="static embedder folder (distilled if absent)")
    parser.add_argument("--rows", type=int, default=300, help="rows MiniLM encodes per repeat")
    parser.add_argument("--static-rows", type=int, default=1500, help="rows the static embedder encodes per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(1)
    from dpsel.models.distil import distil_static
    from dpsel.models.embedder import load_embedder

    distil_seconds = None
    if not args.static.exists():
        started = time.perf_counter()
        distil_static(args.static)
        distil_seconds = time.perf_counter() - started
    rows = realtext_rows(max(args.rows, args.static_rows))
    report = {"threads": 1, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "distil_seconds": distil_seconds, "embedders": {}}
    for spec, n in (("default", args.rows), (str(args.static), args.static_rows)):
        embedder = load_embedder(spec)
        entry = rows_per_second(embedder, rows[:n], args.repeats)
        entry.update(name=embedder.name, sha=embedder.sha, dims=int(embedder.encode(["x"]).shape[1]),
                     distilled_from=embedder.distilled_from)
        report["embedders"]["static" if embedder.distilled_from else "minilm"] = entry
        print(f"{embedder.name}: {entry['rows_per_second']['mean']:.1f} rows/s", flush=True)
    speeds = {k: e["rows_per_second"]["mean"] for k, e in report["embedders"].items()}
    report["speedup"] = ratio(speeds["static"], speeds["minilm"])
    write_report(args.out / "embed_speed", report, markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = ["# Embedding cost", "",
             f"Real-text rows (question + docstring answer, 2 texts a row), one torch thread, {report['cpus']} CPUs "
             "on the machine shared with other jobs; rows/s mean ± sd over repeats "
             "(`python benchmarks/embed_speed.py --static DIR`).", "",
             *table(["embedder", "dims", "rows timed", "rows/s", "hours for 1M rows"],
                    [[f"{key} ({e['name']})", e["dims"], f"{e['rows']} × {e['repeats']}", pm(e["rows_per_second"], 1),
                      f"{1e6 / e['rows_per_second']['mean'] / 3600:.2f}"] for key, e in report["embedders"].items()])]
    lines += ["", f"Static / MiniLM: {report['speedup']:.0f}× the rows per second."]
    if report["distil_seconds"] is not None:
        lines.append(f"Distillation (`dpsel embedder distil`, one thread): {report['distil_seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
