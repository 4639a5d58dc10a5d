"""report.md and its PNG plots for a curation run: headline numbers first, then where the weight went.

Plots (matplotlib, Agg backend — no display needed): the weight histogram of kept vs dropped rows, the
mean weight per `task`/`source` (where such a column exists), and the sampler traces the method recorded.
"""
from __future__ import annotations

import html
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers, CI and schedulers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dpsel.data import GROUP_COLUMNS  # noqa: E402
from dpsel.io import _write_atomic, write_text_atomic  # noqa: E402
from dpsel.numbers import format_figure  # noqa: E402

HIST_PLOT = "weights_hist.png"
TRACE_PLOT = "traces.png"
GROUP_PLOT = "weights_by_{column}.png"
EXAMPLES_SHOWN = 5
EXAMPLE_CHARS = 120


@dataclass
class ReportData:
    """What the report shows; built by `dpsel.curation` from the run's arrays and manifest."""
    title: str
    headline: dict                      # label -> value, shown first
    weights: np.ndarray                 # all input rows
    kept: np.ndarray
    usable: np.ndarray                  # rows the method scored (valid, first occurrence)
    groups: dict[str, np.ndarray] = field(default_factory=dict)   # column -> value per row
    diagnostics: dict[str, list[float]] = field(default_factory=dict)
    previews: list[str] = field(default_factory=list)             # one-line text per row
    tables: dict[str, list[dict]] = field(default_factory=dict)   # section title -> rows
    truth_kinds: np.ndarray | None = None                          # synth truth kind per row, when given
    config: dict = field(default_factory=dict)                     # the method's config (burn-in for traces)
    sections: list[str] = field(default_factory=list)             # Markdown lines shown after the tables


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


COLORS = {"kept": "#2a9d8f", "dropped": "#e76f51", "clean": "#2a9d8f"}
# Readable names for the traces the methods record (dpsel.select.*: Scores.diagnostics).
TRACE_LABELS = {
    "mean_weight": "mean weight, all rows",
    "meta_loss": "meta-set loss (NLL per token)",
    "train_loss": "training-batch loss (NLL per token)",
    "lr_theta": "model step size",
    "reference_heldout_loss": "reference fit: held-out meta loss",
}
WEIGHT_QUANTILES = ("weight_q10", "weight_q50", "weight_q90")


def plot_weight_histogram(data: ReportData, path: Path) -> Path:
    """Weights of the scored rows, kept vs dropped; with truth, a second panel split by truth kind."""
    weights = data.weights[data.usable]
    kept = data.kept[data.usable]
    bins = np.linspace(0.0, 1.0, 41)
    panels = 2 if data.truth_kinds is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    ax.hist([weights[kept], weights[~kept]], bins=bins, stacked=True, color=[COLORS["kept"], COLORS["dropped"]],
            label=[f"kept ({kept.sum():,})", f"dropped by weight ({(~kept).sum():,})"])
    ax.set_xlabel("posterior mean weight (higher = keep)")
    ax.set_ylabel("rows")
    if kept.any():
        cutoff = float(weights[kept].min())
        for panel in axes.flat:
            panel.axvline(cutoff, color="black", ls="--", lw=1, label=f"lowest kept weight {cutoff:.2f}")
    ax.set_title("Where the kept/dropped line falls", fontsize=11)
    ax.legend(fontsize=9)
    if data.truth_kinds is not None:
        _truth_histogram(axes[0, 1], weights, np.asarray(data.truth_kinds)[data.usable], bins)
    fig.suptitle(f"Weights of the {len(weights):,} scored rows", fontsize=12)
    fig.tight_layout()
    return _save_figure(fig, path)


def _truth_histogram(ax, weights: np.ndarray, kinds: np.ndarray, bins: np.ndarray) -> None:
    """Clean rows filled, each corruption kind as an outline: does the method push junk down?"""
    names = ["clean"] + sorted(set(kinds.tolist()) - {"clean"})
    palette = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        values = weights[kinds == name]
        if len(values) == 0:
            continue
        label = f"{name} ({len(values):,}, mean {values.mean():.2f})"
        if name == "clean":
            ax.hist(values, bins=bins, color=COLORS["clean"], alpha=0.35, label=label)
        else:
            ax.hist(values, bins=bins, histtype="step", lw=1.6, color=palette((i + 1) % 10), label=label)
    ax.set_xlabel("posterior mean weight")
    ax.set_ylabel("rows")
    ax.set_title("By truth: clean rows should sit right of the corrupted ones", fontsize=11)
    ax.legend(fontsize=8, title="truth kind (rows, mean weight)", title_fontsize=8)


def group_summary(values: np.ndarray, weights: np.ndarray, kept: np.ndarray,
                  usable: np.ndarray) -> list[dict]:
    """Per group: rows, scored rows, mean weight (of scored rows) with its 95% interval (normal approx.),
    kept rows and kept fraction."""
    rows = []
    for value in sorted(set(values.tolist()), key=str):
        in_group = values == value
        scored = in_group & usable
        group_weights = weights[scored]
        half = 1.96 * group_weights.std(ddof=1) / math.sqrt(len(group_weights)) if len(group_weights) > 1 else 0.0
        rows.append({"group": str(value), "rows": int(in_group.sum()), "scored": int(scored.sum()),
                     "mean_weight": float(group_weights.mean()) if scored.any() else float("nan"),
                     "ci95": float(half),
                     "kept": int((in_group & kept).sum()),
                     "kept_fraction": float((in_group & kept).sum() / in_group.sum())})
    return rows


def plot_group_weights(column: str, summary: list[dict], path: Path, overall: float | None = None) -> Path:
    """Mean weight per group as dots with 95% intervals (the axis is zoomed to the data, so no bars), the
    row count under each name and the overall mean as a line."""
    names = [f"{plot_label(r['group'])}\n(n={r['scored']:,})" for r in summary]
    means = np.array([r["mean_weight"] for r in summary])
    half = np.array([r.get("ci95", 0.0) for r in summary])
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names) + 2.5), 4.2))
    x = np.arange(len(names))
    ax.errorbar(x, means, yerr=half, fmt="o", color="#264653", ecolor="#8aa1b1", capsize=4, label="group mean ± 95% CI")
    if overall is not None:
        ax.axhline(overall, color="#e76f51", ls="--", lw=1.2, label=f"all scored rows: {overall:.3f}")
    crowded = len(names) > 14  # beyond this the two-line labels no longer fit side by side
    ax.set_xticks(x, names, rotation=45 if crowded else 0, ha="right" if crowded else "center", fontsize=8)
    finite = np.isfinite(means)
    if finite.any():
        low, high = float(np.min((means - half)[finite])), float(np.max((means + half)[finite]))
        if overall is not None:
            low, high = min(low, overall), max(high, overall)
        pad = max(0.02, 0.15 * (high - low))
        ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
    ax.set_ylabel("mean posterior weight")
    ax.set_title(f"Mean weight per {column}: groups below the line lose share when curated", fontsize=11)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save_figure(fig, path)


# ---- sampler traces and their convergence ------------------------------------------------------------

def burn_in_step(data: "ReportData") -> float | None:
    """The step where averaging began (bads: burn_in × steps, from the run's config)."""
    bads = (data.config or {}).get("bads") or {}
    steps = bads.get("steps") or (data.config or {}).get("steps")
    if isinstance(bads.get("burn_in"), (int, float)) and steps:
        return float(int(bads["burn_in"] * steps))
    return None


def convergence(trace: list[float], steps: list[float] | None, burn_in: float | None) -> dict | None:
    """Split-R̂ and effective sample size (pyro.ops.stats) of a trace after burn-in, with a verdict in words.
    One chain split in two halves: R̂ near 1 means the two halves agree (no drift)."""
    import torch
    from pyro.ops.stats import effective_sample_size, split_gelman_rubin

    values = np.asarray(trace, dtype=float)
    if steps is not None and burn_in is not None and len(steps) >= len(values):
        values = values[np.asarray(steps[: len(values)]) >= burn_in]
    if len(values) < 8 or np.ptp(values) == 0:
        return None
    chain = torch.as_tensor(values, dtype=torch.float64)[None, :]
    rhat = float(split_gelman_rubin(chain, chain_dim=0, sample_dim=1))
    ess = float(effective_sample_size(chain, chain_dim=0, sample_dim=1))
    ok = rhat < 1.05
    return {"draws": len(values), "split_rhat": rhat, "ess": ess, "converged": ok}


def convergence_words(name: str, check: dict | None) -> str:
    if check is None:
        return f"{name}: too few recorded draws after burn-in to judge convergence."
    verdict = ("stable: the two halves after burn-in agree" if check["converged"]
               else "NOT stable: the two halves after burn-in differ — run more --steps")
    return (f"{name}: split-R̂ {check['split_rhat']:.3f} (below 1.05 is stable), effective sample size "
            f"{check['ess']:.0f} of {check['draws']} recorded draws — {verdict}.")


def plot_traces(data: "ReportData", path: Path) -> Path | None:
    """One panel per quantity on its own step axis: sampler panels mark burn-in, the reference fit is drawn
    on its own axis (its steps are optimiser steps on the meta set, not sampler steps)."""
    diagnostics = data.diagnostics
    panels = [(k, TRACE_LABELS.get(k, k.replace("_", " "))) for k, v in diagnostics.items()
              if k not in ("step", *WEIGHT_QUANTILES) and len(v) > 0]
    if all(q in diagnostics and len(diagnostics[q]) for q in WEIGHT_QUANTILES):
        panels.insert(0, ("weight_quantiles", "row weights: 10th / 50th / 90th percentile"))
    if not panels:
        return None
    steps = diagnostics.get("step")
    burn_in = burn_in_step(data)
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (name, label) in zip(axes.flat, panels):
        if name == "weight_quantiles":
            for q, style in zip(WEIGHT_QUANTILES, (":", "-", "--")):
                trace = np.asarray(diagnostics[q], dtype=float)
                ax.plot(_trace_x(steps, trace), trace, ls=style, lw=1.2, color="#264653", label=q[-3:].replace("q", "p"))
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7, loc="lower right")
        else:
            trace = np.asarray(diagnostics[name], dtype=float)
            ax.plot(_trace_x(steps, trace) if name != "reference_heldout_loss" else np.arange(1, len(trace) + 1),
                    trace, lw=1.2, color="#264653")
            _readable_ylim(ax, trace)
        if name == "reference_heldout_loss":
            ax.set_xlabel("reference-fit evaluation (on held-out meta rows)", fontsize=8)
        else:
            ax.set_xlabel("sampler step" + (f" (dashed: burn-in ends at {burn_in:.0f})" if burn_in is not None else ""),
                          fontsize=8)
            if burn_in is not None:
                ax.axvline(burn_in, color="#e76f51", ls="--", lw=1)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Sampler traces: the weights are averaged after burn-in (dashed line)", fontsize=11)
    fig.tight_layout()
    return _save_figure(fig, path)


_ANSI_SEQUENCE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|.)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~#])")


def escape(text) -> str:
    """A user value (a task name, a prompt) made safe for one line of Markdown that may be rendered as HTML:
    terminal escape sequences and control characters removed (newlines and tabs become spaces), HTML
    special characters as entities, Markdown punctuation backslash-escaped. Hand-written: no library does
    all three for inline Markdown."""
    text = _ANSI_SEQUENCE.sub("", str(text))
    text = _CONTROL.sub(lambda m: " " if m.group() in "\t\n\r\u2028\u2029" else "", text)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def terminal_safe(text) -> str:
    """A user value safe to print on a terminal: escape sequences and control characters removed, line breaks
    kept as newlines, tabs as spaces."""
    text = _ANSI_SEQUENCE.sub("", str(text))
    return _CONTROL.sub(lambda m: "\n" if m.group() in "\n\u2028\u2029" else " " if m.group() == "\t" else "", text)


def plot_label(text, limit: int = 40) -> str:
    """A user value as a plot label: control characters out, at most `limit` characters (a 5,000-character
    task name once made one bar plot take two minutes and 4 GB), `$` literal (no mathtext)."""
    text = _CONTROL.sub(" ", _ANSI_SEQUENCE.sub("", str(text))).replace("$", r"\$")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _trace_x(steps, trace: np.ndarray) -> np.ndarray:
    if steps is not None and len(steps) >= len(trace):
        return np.asarray(steps[: len(trace)], dtype=float)
    return np.arange(len(trace), dtype=float)


def _readable_ylim(ax, trace: np.ndarray) -> None:
    """Do not zoom into noise: show at least ±5% of the level (or ±0.05) around the trace."""
    finite = trace[np.isfinite(trace)]
    if len(finite) == 0:
        return
    low, high = float(finite.min()), float(finite.max())
    centre = (low + high) / 2
    half = max((high - low) / 2 * 1.15, 0.05 * abs(centre)) or 1.0
    ax.set_ylim(centre - half, centre + half)


def read_truth_kinds(path, n_rows: int) -> np.ndarray | None:
    """Truth kind per input row (synth truth.parquet, checked against the run by `dpsel.curation.truth`)."""
    import pandas as pd

    truth = pd.read_parquet(path, columns=["row", "kind"]).sort_values("row", kind="stable")
    return truth["kind"].astype(str).to_numpy() if len(truth) == n_rows else None


def markdown_cell(value) -> str:
    """A value as safe Markdown text: a figure in the one number format (dpsel.numbers), user text escaped."""
    return escape(format_figure(value))


def markdown_table(rows: list[dict], cell: Callable[[Any], str] = markdown_cell) -> list[str]:
    """Rows of one shape as a Markdown table (the first row's keys are the header) and a blank line; `cell`
    turns a value into safe cell text (default: `markdown_cell`)."""
    if not rows:
        return []
    head = list(rows[0])
    lines = ["| " + " | ".join(escape(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in head) + " |" for r in rows]
    return lines + [""]


def example_rows(weights: np.ndarray, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows the report shows: the `EXAMPLES_SHOWN` highest-weight scored rows (ties: earlier first) and
    the lowest (ties: later first)."""
    scored = np.flatnonzero(usable)
    order = scored[np.argsort(-weights[scored], kind="stable")]
    return order[:EXAMPLES_SHOWN], order[::-1][:EXAMPLES_SHOWN]


def _examples(data: ReportData) -> list[str]:
    """Highest- and lowest-weight scored rows, so a reader can see what the method kept and dropped."""
    if not data.previews:
        return []
    highest, lowest = example_rows(data.weights, data.usable)
    if len(highest) == 0:
        return []
    lines = []
    for title, picks in (("Highest weight", highest), ("Lowest weight", lowest)):
        lines += [f"### {title}", "", "| row | weight | kept | text |", "|---|---|---|---|"]
        for i in picks:
            text = escape(data.previews[i][:EXAMPLE_CHARS])
            lines.append(f"| {i} | {data.weights[i]:.3f} | {bool(data.kept[i])} | {text} |")
        lines.append("")
    return lines


CONVERGENCE_TRACES = {"mean_weight": "mean weight", "meta_loss": "meta-set loss"}


def convergence_lines(data: ReportData) -> list[str]:
    """The convergence check of the sampler's traces, in words (empty for methods without a sampler)."""
    steps = data.diagnostics.get("step")
    burn_in = burn_in_step(data)
    lines = [f"- {convergence_words(label, convergence(data.diagnostics[name], steps, burn_in))}"
             for name, label in CONVERGENCE_TRACES.items() if len(data.diagnostics.get(name) or []) > 0]
    return ["## Did the sampler converge?", "", *lines, ""] if lines else []


def write_report(out_dir: Path, data: ReportData) -> dict[str, Path]:
    """Write report.md and its plots into `out_dir`; returns their paths. Stale plots of an earlier run
    in the same directory (e.g. a trace plot this method does not produce) are removed."""
    out_dir = Path(out_dir)
    paths: dict[str, Path] = {"plot_hist": plot_weight_histogram(data, out_dir / HIST_PLOT)}
    plots = [(HIST_PLOT, "posterior mean weight of the scored rows, kept vs dropped"
              + (", and split by truth kind" if data.truth_kinds is not None else ""))]
    sections: list[str] = []
    scored = data.weights[data.usable]
    overall = float(scored.mean()) if len(scored) else None
    for column in GROUP_COLUMNS:
        plot_path = out_dir / GROUP_PLOT.format(column=column)
        if column not in data.groups:
            plot_path.unlink(missing_ok=True)
            continue
        summary = group_summary(data.groups[column], data.weights, data.kept, data.usable)
        paths[f"plot_{column}"] = plot_group_weights(column, summary, plot_path, overall)
        plots.append((plot_path.name, f"mean weight per {column} with 95% intervals, counts and the overall mean"))
        sections += [f"## Mean weight per {column}", "", f"![mean weight per {column}]({plot_path.name})", ""]
        sections += markdown_table([{column: r["group"], **{k: v for k, v in r.items() if k != "group"}}
                                     for r in summary])
    trace_path = plot_traces(data, out_dir / TRACE_PLOT)
    if trace_path is None:
        (out_dir / TRACE_PLOT).unlink(missing_ok=True)
    else:
        paths["plot_traces"] = trace_path
        plots.append((TRACE_PLOT, "sampler traces with the end of burn-in marked"))
        sections += ["## Sampler traces", "", f"![sampler traces]({TRACE_PLOT})", ""] + convergence_lines(data)

    lines = [f"# {data.title}", ""]
    lines += [f"- **{label}**: {markdown_cell(value)}" for label, value in data.headline.items()] + [""]
    lines += ["## Weights", "", f"![weight histogram]({HIST_PLOT})", ""]
    lines += sections
    for title, rows in data.tables.items():
        lines += [f"## {title}", ""] + markdown_table(rows)
    lines += _examples(data)
    lines += data.sections
    lines += ["## Plots in this folder", ""] + [f"- `{name}`: {what}" for name, what in plots] + [""]
    paths["report"] = write_text_atomic("\n".join(lines).rstrip() + "\n", out_dir / "report.md")
    return paths
