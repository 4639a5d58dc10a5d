"""report.md and its PNG plots for a curation run: headline numbers first, then where the weight went.

Plots (matplotlib, Agg backend — no display needed): the weight histogram of kept vs dropped rows, the
mean weight per `task`/`source` (where such a column exists), and the sampler traces the method recorded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers, CI and schedulers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dpsel.io import _write_atomic, write_text_atomic  # noqa: E402

HIST_PLOT = "weights_hist.png"
TRACE_PLOT = "traces.png"
GROUP_PLOT = "weights_by_{column}.png"
GROUP_COLUMNS = ("task", "source")
EXAMPLES_SHOWN = 5
EXAMPLE_CHARS = 120


@dataclass
class ReportData:
    """What the report shows; built by `dpsel.curate` from the run's arrays and manifest."""
    title: str
    headline: dict                      # label -> value, shown first
    weights: np.ndarray                 # all input rows
    kept: np.ndarray
    usable: np.ndarray                  # rows the method scored (valid, first occurrence)
    groups: dict[str, np.ndarray] = field(default_factory=dict)   # column -> value per row
    diagnostics: dict[str, list[float]] = field(default_factory=dict)
    previews: list[str] = field(default_factory=list)             # one-line text per row
    tables: dict[str, list[dict]] = field(default_factory=dict)   # section title -> rows


def kept_fraction(counts: dict) -> float:
    """THE kept fraction, everywhere (report, manifest, artifacts, demo): kept rows over input rows. Usable
    rows (valid, first occurrence) are shown beside it, so `kept / usable` can be read off too."""
    total = counts.get("input_rows") or 0
    return counts.get("kept_rows", 0) / total if total else float("nan")


def stage_seconds(timings: dict) -> float | None:
    """THE timing of a run's main work, everywhere: the selection (curate) or scoring (filter) seconds as the
    manifest's `timings` records them (reading and writing are listed there separately)."""
    for key in ("select_s", "score_s"):
        if isinstance(timings.get(key), (int, float)):
            return float(timings[key])
    return None


def _save_figure(fig, path: Path) -> Path:
    try:
        _write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def plot_weight_histogram(data: ReportData, path: Path) -> Path:
    weights = data.weights[data.usable]
    kept = data.kept[data.usable]
    bins = np.linspace(0.0, 1.0, 41)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist([weights[kept], weights[~kept]], bins=bins, stacked=True, color=["#2a9d8f", "#e76f51"],
            label=[f"kept ({kept.sum()})", f"dropped by weight ({(~kept).sum()})"])
    ax.set_xlabel("posterior mean weight")
    ax.set_ylabel("rows")
    ax.set_title("Weights of the scored rows")
    ax.legend()
    return _save_figure(fig, path)


def group_summary(values: np.ndarray, weights: np.ndarray, kept: np.ndarray,
                  usable: np.ndarray) -> list[dict]:
    """Per group: rows, scored rows, mean weight (of scored rows), kept rows and kept fraction."""
    rows = []
    for value in sorted(set(values.tolist()), key=str):
        in_group = values == value
        scored = in_group & usable
        rows.append({"group": str(value), "rows": int(in_group.sum()), "scored": int(scored.sum()),
                     "mean_weight": float(weights[scored].mean()) if scored.any() else float("nan"),
                     "kept": int((in_group & kept).sum()),
                     "kept_fraction": float((in_group & kept).sum() / in_group.sum())})
    return rows


def plot_group_weights(column: str, summary: list[dict], path: Path) -> Path:
    names = [r["group"] for r in summary]
    means = [r["mean_weight"] for r in summary]
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(names) + 2), 4))
    ax.bar(range(len(names)), means, color="#264653")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean weight")
    ax.set_title(f"Mean weight per {column}")
    return _save_figure(fig, path)


def plot_traces(diagnostics: dict[str, list[float]], path: Path) -> Path | None:
    names = [k for k, v in diagnostics.items() if k != "step" and len(v) > 0]
    if not names:
        return None
    steps = diagnostics.get("step")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        trace = np.asarray(diagnostics[name], dtype=float)
        x = np.asarray(steps[: len(trace)]) if steps is not None and len(steps) >= len(trace) else np.arange(len(trace))
        ax.plot(x, trace, lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Sampler traces")
    return _save_figure(fig, path)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _markdown_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")).replace("|", "\\|") for k in head) + " |" for r in rows]
    return lines + [""]


def _examples(data: ReportData) -> list[str]:
    """Highest- and lowest-weight scored rows, so a reader can see what the method kept and dropped."""
    if not data.previews:
        return []
    scored = np.flatnonzero(data.usable)
    if len(scored) == 0:
        return []
    order = scored[np.argsort(-data.weights[scored], kind="stable")]
    lines = []
    for title, picks in (("Highest weight", order[:EXAMPLES_SHOWN]), ("Lowest weight", order[::-1][:EXAMPLES_SHOWN])):
        lines += [f"### {title}", "", "| row | weight | kept | text |", "|---|---|---|---|"]
        for i in picks:
            text = data.previews[i].replace("|", "\\|").replace("\n", " ")[:EXAMPLE_CHARS]
            lines.append(f"| {i} | {data.weights[i]:.3f} | {bool(data.kept[i])} | {text} |")
        lines.append("")
    return lines


def write_report(out_dir: Path, data: ReportData) -> dict[str, Path]:
    """Write report.md and its plots into `out_dir`; returns their paths. Stale plots of an earlier run
    in the same directory (e.g. a trace plot this method does not produce) are removed."""
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {"plot_hist": plot_weight_histogram(data, out_dir / HIST_PLOT)}
    sections: list[str] = []
    for column in GROUP_COLUMNS:
        plot_path = out_dir / GROUP_PLOT.format(column=column)
        if column not in data.groups:
            plot_path.unlink(missing_ok=True)
            continue
        summary = group_summary(data.groups[column], data.weights, data.kept, data.usable)
        paths[f"plot_{column}"] = plot_group_weights(column, summary, plot_path)
        sections += [f"## Mean weight per {column}", "", f"![mean weight per {column}]({plot_path.name})", ""]
        sections += _markdown_table([{column: r["group"], **{k: v for k, v in r.items() if k != "group"}}
                                     for r in summary])
    trace_path = plot_traces(data.diagnostics, out_dir / TRACE_PLOT)
    if trace_path is None:
        (out_dir / TRACE_PLOT).unlink(missing_ok=True)
    else:
        paths["plot_traces"] = trace_path
        sections += ["## Sampler traces", "", f"![sampler traces]({TRACE_PLOT})", ""]

    lines = [f"# {data.title}", ""]
    lines += [f"- **{label}**: {_fmt(value)}" for label, value in data.headline.items()] + [""]
    lines += ["## Weights", "", f"![weight histogram]({HIST_PLOT})", ""]
    lines += sections
    for title, rows in data.tables.items():
        lines += [f"## {title}", ""] + _markdown_table(rows)
    lines += _examples(data)
    paths["report"] = write_text_atomic("\n".join(lines).rstrip() + "\n", out_dir / "report.md")
    return paths
