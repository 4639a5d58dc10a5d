"""What a flow run shows in the Prefect UI: a table (row accounting, per-task mean weights), a Markdown
report (headline figures, plots linked by path) and a progress bar that moves while the sampler runs.

Artifacts are a view, never the record (the record is the run's files), so a failure to create one is
logged and the run goes on.
"""
from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.logging import get_run_logger

from dpsel.numbers import format_figure
from dpsel.report import escape

PROGRESS_EVERY_S = 2.0  # at most one API call per this many seconds from the sampler's callback


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower())).strip("-")


def _log_failure(what: str, error: Exception) -> None:
    try:
        get_run_logger().warning("could not create the %s artifact: %s", what, error)
    except Exception:  # noqa: BLE001 - no run context: nothing to log to
        pass


def flat_counts(counts: dict) -> dict:
    """{"kept_rows": 7, "dropped_by_reason": {"duplicate": 1}} -> {"kept_rows": 7, "dropped (duplicate)": 1};
    per curation stage: "stage near_dup: dropped" (and its rows in; its seconds are in the manifest's timings)."""
    flat = {}
    for name, value in counts.items():
        if name == "dropped_by_stage":
            continue          # the same figures as "stages", below
        if name == "stages":
            for st in value:
                flat.update({f"stage {st['stage']}: {what}": st[key] for what, key in
                             (("rows in", "rows_in"), ("dropped", "dropped"))})
        elif isinstance(value, dict):
            flat.update({f"dropped ({reason})": n for reason, n in value.items()})
        else:
            flat[name] = value
    return flat


def progress_artifact_sink(key: str, every_s: float = PROGRESS_EVERY_S) -> Callable[[Any], None]:
    """A `dpsel.progress` sink: creates a progress artifact on the first event and updates it at most every
    `every_s` seconds (always on a phase's last step) with the event's text (phase, count, rate, ETA)."""
    state: dict[str, Any] = {"id": None, "last": 0.0, "broken": False}

    def sink(event) -> None:
        if state["broken"]:
            return
        now = time.monotonic()
        last_step = event.finished or event.step >= event.total
        if state["id"] is not None and not last_step and now - state["last"] < every_s:
            return
        try:
            if state["id"] is None:
                state["id"] = create_progress_artifact(100.0 * event.fraction, key=key, description=event.text())
            else:
                update_progress_artifact(state["id"], 100.0 * event.fraction, description=event.text())
        except Exception as error:  # noqa: BLE001 - the sampler must not die for a UI widget
            state["broken"] = True
            _log_failure("progress", error)
        state["last"] = now

    return sink


def throttled_progress(key: str, description: str,
                       every_s: float = PROGRESS_EVERY_S) -> Callable[[int, int, dict], None]:
    """A `progress(step, total, diag)` callback feeding only the Prefect progress artifact."""
    from dpsel.progress import Progress

    return Progress(description, [progress_artifact_sink(key, every_s)])


def curation_table(summary: dict, key: str) -> None:
    """Row accounting (input = kept + dropped, by reason) and per-task mean weights as one table."""
    rows = [{"section": "rows", "name": name, "value": format_figure(value), "kept": "", "mean_weight": ""}
            for name, value in flat_counts(summary["counts"]).items()]
    for group in summary.get("groups", []):
        rows.append({"section": f"per {group['column']}", "name": escape(group["group"]),
                     "value": format_figure(group["rows"]), "kept": format_figure(group["kept"]),
                     "mean_weight": format_figure(group["mean_weight"])})
    try:
        create_table_artifact(rows, key=key, description=f"Row accounting and mean weights: {summary['out_dir']}")
    except Exception as error:  # noqa: BLE001
        _log_failure("table", error)


def markdown_report(markdown: str, key: str, description: str) -> None:
    try:
        create_markdown_artifact(markdown, key=key, description=description)
    except Exception as error:  # noqa: BLE001
        _log_failure("markdown", error)


def table(rows: list[dict], key: str, description: str) -> None:
    try:
        create_table_artifact(rows, key=key, description=description)
    except Exception as error:  # noqa: BLE001
        _log_failure("table", error)


EMBED_LIMIT_BYTES = 2_000_000  # a larger PNG is linked by path rather than embedded


def plot_links(out_dir: str | Path, relative_to: str | Path | None = None) -> list[str]:
    """The run folder's PNG plots as Markdown images embedded as data URIs (the Prefect UI cannot open
    local `file://` links), each with its path; a PNG over EMBED_LIMIT_BYTES is named by path only.
    With `relative_to` (a Markdown file's folder) the images are linked relative to it instead."""
    lines = []
    for png in sorted(Path(out_dir).glob("*.png")):
        if relative_to is not None:
            lines += [f"![{png.stem}]({os.path.relpath(png, relative_to)})", ""]
            continue
        data = png.read_bytes()
        if len(data) > EMBED_LIMIT_BYTES:
            lines.append(f"- `{png.resolve()}` ({len(data):,} bytes: too large to embed)")
            continue
        lines += [f"**{png.name}** — `{png.resolve()}`", "",
                  f"![{png.stem}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})", ""]
    return lines
