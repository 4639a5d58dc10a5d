"""What `validate` reports about a clean set: per-column nulls and empties, length percentiles, duplicates and
group sizes, all gathered per batch in memory flat in the number of rows."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpsel.data.schema import Shape, is_binary, is_text

PERCENTILES = (50, 90, 99)


def length_stats(counts: Counter[int]) -> dict[str, int]:
    """p50/p90/p99/max of a multiset of lengths given as value -> count, exactly as `np.percentile`
    (linear interpolation) on the expanded values would give them, in memory flat in the number of rows."""
    if not counts:
        return {f"p{q}": 0 for q in PERCENTILES} | {"max": 0}
    values = np.array(sorted(counts))
    ends = np.cumsum([counts[v] for v in values])           # sorted position k lies in the first run with end > k
    n = int(ends[-1])

    def at(position: int) -> float:
        return float(values[np.searchsorted(ends, position, side="right")])
    stats = {}
    for q in PERCENTILES:
        virtual = (n - 1) * (q / 100)
        below = math.floor(virtual)
        t = virtual - below
        a, b = at(below), at(min(below + 1, n - 1))
        # numpy's _lerp, including its switch to the upper end for t >= 0.5
        stats[f"p{q}"] = int(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)
    return stats | {"max": int(values[-1])}


def empty_count(column: pa.ChunkedArray | pa.Array) -> int:
    """Empty strings / empty lists (nulls are counted separately); 0 for other types."""
    dtype = column.type
    if pa.types.is_dictionary(dtype):
        column = column.cast(dtype.value_type)
        dtype = dtype.value_type
    if is_text(dtype) or is_binary(dtype):
        return int(pc.sum(pc.equal(pc.binary_length(column), 0)).as_py() or 0)
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return int(pc.sum(pc.equal(pc.list_value_length(column), 0)).as_py() or 0)
    return 0


def group_counts(column: pa.Array) -> Counter[str]:
    """Rows per value, keyed by `str(value)` (None for nulls), counted by Arrow."""
    counted: Counter[str] = Counter()
    try:
        pairs = pc.value_counts(column)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):   # e.g. nested types: count in Python
        counted.update(str(v) for v in column.to_pylist())
        return counted
    for value, count in zip(pairs.field("values").to_pylist(), pairs.field("counts").to_pylist()):
        counted[str(value)] += count
    return counted


def value_counts(values: np.ndarray) -> Counter[int]:
    distinct, counts = np.unique(values, return_counts=True)
    return Counter(dict(zip(distinct.tolist(), counts.tolist())))


@dataclass
class ValidationSummary:
    rows: int
    shape: Shape
    files: list[tuple[str, int]]                       # (url, rows)
    null_counts: dict[str, int]
    empty_counts: dict[str, int]
    prompt_chars: dict[str, int]                       # p50/p90/p99/max over rows
    response_chars: dict[str, int]
    duplicates: int
    groups: dict[str, dict[str, int]]                  # task/source column -> value -> rows
    skipped: list[str] = field(default_factory=list)   # known non-instruction files in a folder (truth, scores)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def render(self) -> str:
        lines = [f"rows: {self.rows}", f"shape: {self.shape}", f"files: {len(self.files)}"]
        lines += [f"  {url}: {rows} rows" for url, rows in self.files]
        lines += [f"  skipped {what}" for what in self.skipped]
        lines.append("columns (nulls / empty):")
        lines += [f"  {c}: {self.null_counts[c]} / {self.empty_counts[c]}" for c in self.null_counts]
        for name, stats in (("prompt chars", self.prompt_chars), ("response chars", self.response_chars)):
            lines.append(f"{name}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
        lines.append(f"duplicates: {self.duplicates}")
        for column, counts in self.groups.items():
            lines.append(f"{column}s: {len(counts)}")
            lines += [f"  {value}: {n}" for value, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        return "\n".join(lines)
