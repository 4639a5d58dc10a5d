"""A reviewer's keep/drop labels (`curate --labels FILE`): read, checked against the run's rows, and applied.

A labels file is what `dpsel review` wrote, filled in: Parquet, CSV or JSON lines (by extension) with columns
`dpsel_id` and `label`, or a Label Studio JSON export of the tasks `dpsel review --format label-studio` wrote.
A label is `keep` or `drop` (any case); a blank one means "not reviewed" and is counted, not used. Anything
else, an id the training set does not have, two different labels for one id or a file without the columns is
an input error naming the file and row (exit 2).

What the labels do (docs/review.md):
- `drop`: the row is dropped as a curation stage would drop it (the pseudo-stage `review`, reason
  `reviewed_drop`, weight 0), but selection still scores it, as the known-bad example of the evidence's
  calibration (each source weighted by how well it separates the drops from the keeps and meta rows) with a
  prior mean at the floor (θ does not learn from it);
- `keep`: the row leaves the pool selection scores and joins the trusted meta rows (the evidence's calibration
  and the sampler's meta likelihood); it is kept with weight 1 (std 0): the reviewer's word, not the
  posterior's.
Rows a stage dropped keep the stage's verdict; their label is still recorded (`dpsel_label`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from dpsel.errors import DpselInputError

REASON_REVIEWED_DROP = "reviewed_drop"
KEEP, DROP = "keep", "drop"
LABELS = (KEEP, DROP)
REVIEW_STAGE = "review"


@dataclass
class Labels:
    """Labels by row id, and the file they came from (path, sha256)."""
    by_id: dict[str, str]
    path: str
    sha256: str
    blank_rows: int = 0
    row_labels: list = field(default_factory=list)   # per input row: keep | drop | None (set by `apply_drops`)

    def mask(self, ids: list[str], label: str) -> np.ndarray:
        return np.array([self.by_id.get(i) == label for i in ids], dtype=bool)

    def record(self) -> dict:
        """The manifest's `labels` entry."""
        values = list(self.by_id.values())
        return {"path": self.path, "sha256": self.sha256, "labelled_ids": len(values),
                "keep": values.count(KEEP), "drop": values.count(DROP), "blank_rows": self.blank_rows,
                "rows_labelled": sum(v is not None for v in self.row_labels)}


def read_labels(path, known_ids: set[str] | None = None) -> Labels:
    """The labels in `path`, checked (module docstring); `known_ids`: the training set's ids."""
    from dpsel.io import file_sha256
    path = Path(path)
    if not path.is_file():
        raise DpselInputError("labels file not found", file=str(path))
    ids, values = _columns(path)
    by_id, blank = {}, 0
    for row, (row_id, value) in enumerate(zip(ids, values)):
        label = "" if value is None else str(value).strip().lower()
        if not label:
            blank += 1
            continue
        if label not in LABELS:
            raise DpselInputError(f"label {value!r} is not keep or drop", file=str(path), column="label", row=row)
        if row_id is None or (known_ids is not None and str(row_id) not in known_ids):
            raise DpselInputError(f"dpsel_id {row_id!r} is not a row of the training set", file=str(path),
                                  column="dpsel_id", row=row)
        if by_id.setdefault(str(row_id), label) != label:
            raise DpselInputError(f"dpsel_id {row_id} is labelled both keep and drop", file=str(path), row=row)
    return Labels(by_id=by_id, path=str(path), sha256=file_sha256(path), blank_rows=blank)


def _columns(path: Path) -> tuple[list, list]:
    """(dpsel_id, label) per row of a Parquet/CSV/JSON-lines file or a Label Studio export."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _label_studio_export(path)
    try:
        table = _read_table(path, suffix)
    except (pa.ArrowInvalid, OSError, ValueError) as error:
        raise DpselInputError(f"cannot read the labels file ({error})", file=str(path)) from None
    missing = [c for c in ("dpsel_id", "label") if c not in table.column_names]
    if missing:
        raise DpselInputError(f"a labels file needs columns dpsel_id and label; missing {', '.join(missing)}",
                              file=str(path), column=missing[0])
    return table.column("dpsel_id").to_pylist(), table.column("label").to_pylist()


def _read_table(path: Path, suffix: str) -> pa.Table:
    if suffix == ".csv":
        from pyarrow import csv
        # ids and labels as text: an id of digits stays a string and an empty label stays empty
        return csv.read_csv(path, convert_options=csv.ConvertOptions(
            column_types={"dpsel_id": pa.string(), "label": pa.string()}))
    if suffix in (".jsonl", ".ndjson"):
        from pyarrow import json as pa_json
        return pa_json.read_json(path)
    import pyarrow.parquet as pq
    return pq.read_table(path)


def _label_studio_export(path: Path) -> tuple[list, list]:
    """A Label Studio JSON export: per task its `data.dpsel_id` and the first annotation's choice (blank if
    none)."""
    try:
        tasks = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DpselInputError(f"not a Label Studio JSON export ({error})", file=str(path)) from None
    if not isinstance(tasks, list):
        raise DpselInputError("a Label Studio export is a JSON list of tasks", file=str(path))
    ids, values = [], []
    for row, task in enumerate(tasks):
        data = task.get("data") if isinstance(task, dict) else None
        if not isinstance(data, dict) or "dpsel_id" not in data:
            raise DpselInputError("task without data.dpsel_id (not exported from dpsel review's tasks?)",
                                  file=str(path), column="dpsel_id", row=row)
        ids.append(data["dpsel_id"])
        values.append(_choice(task))
    return ids, values


def _choice(task: dict):
    for annotation in task.get("annotations") or []:
        for result in annotation.get("result") or []:
            choices = (result.get("value") or {}).get("choices") or []
            if choices:
                return choices[0]
    return None


def apply_drops(rows, labels: Labels) -> None:
    """Record the labels on the run's rows (`RunRows`): drop-labelled usable rows leave selection with reason
    `reviewed_drop`, counted as the pseudo-stage `review` after the curation stages."""
    labels.row_labels = [labels.by_id.get(i) for i in rows.ids]
    dropped = rows.usable & labels.mask(rows.ids, DROP)
    for i in np.flatnonzero(dropped).tolist():
        rows.reasons[i] = REASON_REVIEWED_DROP
        rows.details[i] = f"labelled drop in {Path(labels.path).name}"
    rows_in = int(rows.usable.sum())
    rows.usable = rows.usable & ~dropped
    count = int(dropped.sum())
    rows.stage_stats = [*rows.stage_stats, {"stage": REVIEW_STAGE, "rows_in": rows_in, "dropped": count,
                                            "by_reason": {REASON_REVIEWED_DROP: count} if count else {},
                                            "seconds": 0.0}]


def kept_by_review(rows, labels: Labels) -> np.ndarray:
    """Usable rows labelled keep (the rows that join the meta evidence)."""
    return rows.usable & labels.mask(rows.ids, KEEP)


def reviewed_drops(rows) -> np.ndarray:
    """Rows `apply_drops` took out of selection for their label."""
    return np.array([r == REASON_REVIEWED_DROP for r in rows.reasons], dtype=bool)


def selection_pool(rows, labels: Labels | None) -> np.ndarray:
    """The rows selection scores: the usable ones less those labelled keep, plus those labelled drop. A
    keep-labelled row joins the meta rows instead: were it in both, the evidence's calibration would score it in
    sample as a trusted row (the pool's own fit predicts it), and its weight is fixed at 1 anyway. A drop-labelled
    row stays in the pool so that its evidence is scored as a pool row's: it is the calibration's known-bad
    example (`dpsel.select.bads.calibration.reviewed_rows`); its weight is fixed at 0 whatever it is scored."""
    if labels is None:
        return rows.usable
    pool = rows.usable & ~kept_by_review(rows, labels)
    if not pool.any():
        raise DpselInputError("every usable training row is labelled keep: nothing is left to select from",
                              file=labels.path)
    return pool | reviewed_drops(rows)


def with_reviewed_keeps(usable: np.ndarray, pool: np.ndarray, scores) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per usable row from the selection `scores` of the `pool` rows (reviewed drops, in the pool but
    not usable, left out); the reviewed keeps (usable, not in the pool) at weight 1, std 0."""
    mean, std = np.ones(len(usable)), np.zeros(len(usable))
    mean[pool], std[pool] = scores.weight_mean, scores.weight_std
    return mean[usable], std[usable]


def reviewed_in_selection(rows, labels: Labels | None, pool: np.ndarray, n_meta: int):
    """(drop over the pool rows, keep over the meta rows selection sees: the meta set, then the reviewed keeps)
    for `calibration.reviewed_rows`; None without labels."""
    if labels is None:
        return None
    keeps = int(kept_by_review(rows, labels).sum())
    return reviewed_drops(rows)[pool], np.r_[np.zeros(n_meta, dtype=bool), np.ones(keeps, dtype=bool)]


def label_column(labels: Labels | None, n: int) -> pa.Array:
    """scores.parquet's `dpsel_label`: keep | drop where a reviewer said so, else null."""
    return pa.array(labels.row_labels if labels is not None else [None] * n, pa.string())
