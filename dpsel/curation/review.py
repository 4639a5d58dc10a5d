"""`dpsel review RUN --rows K --out FILE`: the K rows of a finished run whose keep/drop decision is most
uncertain under the posterior, for a person to label keep or drop (then `dpsel curate ... --labels FILE`).

The rule (docs/review.md). Each row the selection decided (kept, or dropped as `low_weight`; first copies only,
not rows already labelled) has a posterior mean weight m and standard deviation s; the run's cut c is its
threshold, or the lowest kept weight of a budget run. Read the posterior as Normal(m, s²): the probability
that the row's weight lies on the other side of the cut is

    P(flip) = Φ(−|m − c| / s)        (0.5 on the cut, 0 for a certain row: s = 0)

and the rows with the highest P(flip) are the ones a label changes most. To not hand a reviewer K near-copies
of one cluster, the `POOL_FACTOR`·K most uncertain rows are clustered (k-means of word uni- and bigram hashing
vectors of the conversation, ⌈K/`ROWS_PER_CLUSTER`⌉ clusters) and picked greedily by P(flip) with at most
⌈2K/clusters⌉ rows from one cluster and no row within cosine `NEAR_COPY` of one already picked; a short pick
is filled up by P(flip) alone.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dpsel.curation.examples import conversation_text, read_file_rows, require_file
from dpsel.curation.inspection import run_files
from dpsel.data import REASON_LOW_WEIGHT
from dpsel.errors import DpselInputError
from dpsel.io import write_json_atomic, write_parquet_atomic, write_text_atomic
from dpsel.outputs import MANIFEST_FILE

FORMATS = ("parquet", "csv", "jsonl", "label-studio")
POOL_FACTOR = 10          # candidates clustered for diversity: the 10·K most uncertain rows
ROWS_PER_CLUSTER = 3      # k = ceil(K / 3) clusters
NEAR_COPY = 0.9           # cosine of word-hash vectors above which two rows count as copies
_SCORE_COLUMNS = ("dpsel_id", "dpsel_weight", "dpsel_weight_std", "dpsel_reason", "dpsel_file", "dpsel_file_row",
                  "dpsel_dup_of", "dpsel_label")
LABEL_STUDIO_CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Header value="weight $dpsel_weight (std $dpsel_weight_std), P(other side of the cut) $flip_probability"/>
  <Choices name="label" toName="text" choice="single" required="true">
    <Choice value="keep"/>
    <Choice value="drop"/>
  </Choices>
</View>
"""


def flip_probability(weights: np.ndarray, stds: np.ndarray, cut: float) -> np.ndarray:
    """Φ(−|m − c| / s) per row: the posterior probability that the weight lies on the other side of `cut`."""
    from scipy.special import ndtr
    gap = np.abs(np.asarray(weights, np.float64) - cut)
    stds = np.asarray(stds, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = ndtr(-gap / stds)
    return np.where(stds > 0, p, np.where(gap == 0, 0.5, 0.0))


def run_cut(manifest: dict, folder: Path) -> float:
    """The run's cut: its threshold, else the lowest kept weight (what `filter` takes as the threshold)."""
    selection = manifest.get("selection") or {}
    cut = selection.get("threshold")
    cut = selection.get("effective_threshold") if cut is None else cut
    if cut is None:
        raise DpselInputError("the run kept no row, so it has no cut to review around",
                              file=str(folder / MANIFEST_FILE))
    return float(cut)


def diverse_pick(order: np.ndarray, vectors, k: int) -> list[int]:
    """Positions (into `order`, most uncertain first) of k rows: greedy by uncertainty, at most ⌈2k/clusters⌉
    per k-means cluster of `vectors` (rows aligned with `order`) and no near-copy of a picked row."""
    n = len(order)
    if n <= k:
        return list(range(n))
    clusters = max(1, min(n, math.ceil(k / ROWS_PER_CLUSTER)))
    cap = math.ceil(2 * k / clusters)
    from sklearn.cluster import KMeans
    labels = KMeans(n_clusters=clusters, n_init=3, random_state=0).fit_predict(vectors) if clusters > 1 \
        else np.zeros(n, int)
    picked, per_cluster = [], np.zeros(clusters, int)
    for j in range(n):
        if len(picked) == k:
            break
        if per_cluster[labels[j]] >= cap:
            continue
        if picked and (vectors[picked] @ vectors[j].T).max() >= NEAR_COPY:
            continue
        picked.append(j)
        per_cluster[labels[j]] += 1
    chosen = set(picked)
    picked += [j for j in range(n) if j not in chosen][:k - len(picked)]   # short: fill up by uncertainty
    return picked


def most_uncertain(weights: np.ndarray, stds: np.ndarray, cut: float, texts_of, k: int) -> np.ndarray:
    """Indices of the k rows to review among rows with these posterior `weights` and `stds` (the module's rule);
    `texts_of(indices)`: the rows' conversation texts (read only for the 10·k most uncertain)."""
    p = flip_probability(weights, stds, cut)
    pool = np.argsort(-p, kind="stable")[:POOL_FACTOR * k]
    return pool[diverse_pick(pool, _text_vectors(texts_of(pool)), k)]


def _text_vectors(texts: list[str]):
    """L2-normalised word uni- and bigram hashing vectors (sparse): cheap, and enough to tell copies apart."""
    from sklearn.feature_extraction.text import HashingVectorizer
    return HashingVectorizer(n_features=2 ** 18, ngram_range=(1, 2), alternate_sign=False, norm="l2").transform(texts)


def review_rows(run, rows: int) -> pa.Table:
    """The `rows` rows of the finished run in folder `run` to review (module docstring), most uncertain first:
    dpsel_id, messages, dpsel_weight, dpsel_weight_std, dpsel_reason, flip_probability, dpsel_file,
    dpsel_file_row and an empty `label`."""
    if rows < 1:
        raise DpselInputError(f"--rows must be at least 1, got {rows}")
    scores_path, manifest = run_files(Path(run))
    parquet = pq.ParquetFile(scores_path)
    scores = parquet.read(columns=[c for c in _SCORE_COLUMNS if c in parquet.schema_arrow.names]).to_pydict()
    reasons = np.asarray(scores["dpsel_reason"], dtype=object)
    decided = np.isin(reasons, ["", REASON_LOW_WEIGHT]) & np.array([d is None for d in scores["dpsel_dup_of"]])
    if "dpsel_label" in scores:
        decided &= np.array([label is None for label in scores["dpsel_label"]])
    candidates = np.flatnonzero(decided)
    if not len(candidates):
        raise DpselInputError("the run has no row whose keep/drop the selection decided (and no reviewer has "
                              "labelled yet)", file=str(scores_path))
    weights, stds = np.asarray(scores["dpsel_weight"]), np.asarray(scores["dpsel_weight_std"])
    read: dict[int, list[dict]] = {}

    def texts_of(positions: np.ndarray) -> list[str]:
        read.update(zip(candidates[positions].tolist(), _messages(scores, candidates[positions], manifest)))
        return [conversation_text(read[i]) for i in candidates[positions].tolist()]
    cut = run_cut(manifest, Path(run))
    chosen = candidates[most_uncertain(weights[candidates], stds[candidates], cut, texts_of, rows)].tolist()
    flip = flip_probability(weights[chosen], stds[chosen], cut)
    return pa.table({
        "dpsel_id": pa.array([scores["dpsel_id"][i] for i in chosen], pa.string()),
        "messages": pa.array([read[i] for i in chosen],
                             pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        **{c: pa.array([scores[c][i] for i in chosen]) for c in ("dpsel_weight", "dpsel_weight_std", "dpsel_reason")},
        "flip_probability": pa.array(flip, pa.float64()),
        "dpsel_file": pa.array([scores["dpsel_file"][i] for i in chosen], pa.string()),
        "dpsel_file_row": pa.array([scores["dpsel_file_row"][i] for i in chosen], pa.int64()),
        "label": pa.array([""] * len(chosen), pa.string()),
    })


def _messages(scores: dict, rows: np.ndarray, manifest: dict) -> list[list[dict]]:
    """The conversations of `rows` as read (normalised), from the input files the manifest names (checked
    against their recorded sha256)."""
    known = {f["path"]: f["sha256"] for entry in (manifest.get("inputs") or {}).values()
             if isinstance(entry, dict) for f in entry.get("files") or []}
    wanted: dict[str, list[int]] = {}
    for i in rows.tolist():
        wanted.setdefault(scores["dpsel_file"][i], []).append(int(scores["dpsel_file_row"][i]))
    found = {}
    for url, file_rows in wanted.items():
        require_file(url, known)
        found.update({(url, r): m for r, m in read_file_rows(url, file_rows, render=_plain).items()})
    return [found[(scores["dpsel_file"][i], int(scores["dpsel_file_row"][i]))] for i in rows.tolist()]


def _plain(messages) -> list[dict]:
    return [{"role": m.get("role"), "content": m.get("content")} for m in messages or []]


def review_format(out, fmt: str | None) -> str:
    """The review file's format: `fmt` if given (checked), else by the extension of `out` (Parquet otherwise)."""
    fmt = fmt or {".csv": "csv", ".jsonl": "jsonl"}.get(Path(out).suffix.lower(), "parquet")
    if fmt not in FORMATS:
        raise DpselInputError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt


def write_review(table: pa.Table, out, fmt: str | None = None) -> list[Path]:
    """Write the review rows to `out`: Parquet, or CSV / JSON lines by extension or `fmt`; `label-studio`: a
    JSON list of Label Studio tasks and, beside it, the labelling config (keep/drop). Returns the files."""
    out, fmt = Path(out), review_format(out, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = table.to_pylist()
    if fmt == "parquet":
        return [write_parquet_atomic(table, out)]
    if fmt == "csv":
        import pandas as pd
        frame = pd.DataFrame([{**r, "messages": json.dumps(r["messages"], ensure_ascii=False)} for r in records])
        return [write_text_atomic(frame.to_csv(index=False), out)]
    if fmt == "jsonl":
        return [write_text_atomic("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), out)]
    tasks = [{"data": {**{k: v for k, v in r.items() if k not in ("messages", "label")},
                       "text": conversation_text(r["messages"])}} for r in records]
    config = out.with_name(out.stem + ".label_config.xml")
    return [write_json_atomic(tasks, out), write_text_atomic(LABEL_STUDIO_CONFIG, config)]


def review(run, rows: int, out, fmt: str | None = None) -> tuple[pa.Table, list[Path]]:
    """`dpsel review`: pick the rows (`review_rows`) and write them (`write_review`); the rows and the files."""
    review_format(out, fmt)   # a bad --format fails before the work
    table = review_rows(run, rows)
    return table, write_review(table, out, fmt)


def answered(table: pa.Table, answers: dict[str, str]) -> pa.Table:
    """The review rows with `label` filled from `answers` ({dpsel_id: keep | drop}; any other answer, e.g. the
    form's `skip`, leaves it blank): what `curate --labels` reads."""
    labels = [answers.get(i) if answers.get(i) in ("keep", "drop") else "" for i in table.column("dpsel_id").to_pylist()]
    return table.set_column(table.column_names.index("label"), "label", pa.array(labels, pa.string()))
