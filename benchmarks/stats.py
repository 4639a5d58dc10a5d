"""The benchmarks' one home for statistics over seeds and repeats, number formatting, Markdown tables and
writing a result's JSON + Markdown. Light on purpose (numpy only): the summarise and render steps of every
benchmark import it, and can run from a saved JSON without torch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DASH = "–"


# ----------------------------------------------------------------------------- statistics


def mean(values) -> float:
    return float(np.mean(np.asarray(list(values), dtype=float)))


def sd(values) -> float:
    """Sample standard deviation (ddof 1); 0.0 for a single value."""
    v = np.asarray(list(values), dtype=float)
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def mean_sd(values) -> dict:
    """{"mean", "sd" (sample), "values"} over seeds or repeats: the record every benchmark stores."""
    v = np.asarray(list(values), dtype=float)
    return {"mean": float(v.mean()), "sd": sd(v), "values": v.tolist()}


def ratio(numerator: float, denominator: float, digits: int | None = None) -> float:
    """numerator / denominator, rounded to `digits` when given."""
    value = numerator / denominator
    return value if digits is None else round(value, digits)


# ----------------------------------------------------------------------------- formatting


def fmt(value, digits: int = 3) -> str:
    """A float to `digits` decimals, None as a dash, anything else as str()."""
    return DASH if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def plus_minus(mean_value: float, sd_value: float, digits: int = 3) -> str:
    return f"{mean_value:.{digits}f} ± {sd_value:.{digits}f}"


def pm(entry: dict | None, digits: int = 3) -> str:
    """A `mean_sd` record as "mean ± sd"; a dash when absent."""
    return DASH if not entry else plus_minus(entry["mean"], entry["sd"], digits)


def mib(n_bytes: float, digits: int = 1) -> str:
    return f"{n_bytes / 2**20:.{digits}f}"


def table(header: list[str], rows: list, align: str | None = None) -> list[str]:
    """Markdown table lines: header, separator, then each row (a list of cells, or a ready-made line).

    `align`: None gives the compact separator `|---|---|`; otherwise one letter per column, `l` for `---`
    and `r` for `---:` (`| --- | ---: |`)."""
    if align is None:
        separator = "|" + "---|" * len(header)
    else:
        separator = "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |"
    lines = [row_line(header), separator]
    lines += [row if isinstance(row, str) else row_line(row) for row in rows]
    return lines


def row_line(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


# ----------------------------------------------------------------------------- writing


def write_json(path: Path, data, default=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=default) + "\n")


def write_report(stem: Path, report, markdown: str, default=None) -> tuple[Path, Path]:
    """`stem`.json (the report) and `stem`.md (its Markdown); returns both paths."""
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    write_json(json_path, report, default)
    md_path.write_text(markdown)
    return json_path, md_path


def read_json(path: Path):
    return json.loads(Path(path).read_text())
