"""Truth (synth): how well weights separate clean rows from planted corruptions — AUROC, clean = positive,
higher weight = cleaner. The one home of that figure: runs with `--truth` and the benchmarks use it."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from dpsel.curation.rows import RunRows
from dpsel.errors import DpselInputError


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """AUROC of `scores` for the positive `labels`; None with one class only (AUROC undefined)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, scores))


def auroc_by_kind(kind: np.ndarray, weights: np.ndarray, kinds: Iterable[str] | None = None) -> dict:
    """{"overall": clean vs every other kind, name: clean vs that kind} for each of `kinds` (default: every
    corruption kind present); a kind whose AUROC is undefined (no such row) is left out."""
    kind = np.asarray(kind)
    clean = kind == "clean"
    result = {"overall": auroc(clean, weights)}
    for name in kinds if kinds is not None else sorted(set(kind.tolist()) - {"clean"}):
        mask = clean | (kind == name)
        value = auroc(clean[mask], weights[mask])
        if value is not None:
            result[name] = value
    return result


def load_truth(truth_path, rows: RunRows) -> tuple[str, np.ndarray]:
    """Read and check a truth file against the training rows (before the work starts): its path and the
    corruption kind of every row, in row order."""
    import pandas as pd

    path = str(truth_path)
    try:
        truth = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise DpselInputError(f"cannot read truth file ({exc})", file=path) from exc
    for column in ("row", "dpsel_id", "kind"):
        if column not in truth.columns:
            raise DpselInputError("truth file lacks this column", file=path, column=column)
    truth = truth.sort_values("row", kind="stable")
    if len(truth) != rows.n or not np.array_equal(truth["row"].to_numpy(), np.arange(rows.n)):
        raise DpselInputError(f"truth has {len(truth)} rows numbered {truth['row'].min()}..{truth['row'].max()}; "
                              f"the training input has {rows.n}", file=path, column="row")
    mismatch = np.flatnonzero(truth["dpsel_id"].astype(str).to_numpy() != np.asarray(rows.ids, dtype=object))
    if len(mismatch):
        raise DpselInputError("truth dpsel_id differs from the training row's id (another data set?)",
                              file=path, column="dpsel_id", row=int(mismatch[0]))
    return path, truth["kind"].astype(str).to_numpy()


def truth_auroc(truth_path, rows: RunRows, weights: np.ndarray, keep: np.ndarray) -> dict:
    """AUROC of the mean weight for clean vs corrupted rows, overall and per corruption kind, over the rows
    the method scored (duplicates are never scored, so they get no AUROC; their kept fraction still shows);
    plus the kept fraction of every kind over all rows."""
    path, kind = load_truth(truth_path, rows)
    names = sorted(set(kind.tolist()))
    return {"path": path, "auroc": auroc_by_kind(kind[rows.usable], weights[rows.usable]),
            "kept_fraction_by_kind": {name: float(keep[kind == name].mean()) for name in names},
            "rows_by_kind": {name: int((kind == name).sum()) for name in names}}
