"""One number format (dpsel.numbers.format_figure) for the report, the flows' summaries and artifacts, and the
demo's headline: the same figure reads the same everywhere."""
from __future__ import annotations

import numpy as np
import pytest

from dpsel.numbers import format_figure

AUROC = 0.8333333
SECONDS = 123456.7


@pytest.mark.parametrize("value, text", [
    (None, "n/a"), (float("nan"), "n/a"), (np.nan, "n/a"), (AUROC, "0.8333"), (0.7, "0.7"), (12.345678, "12.35"),
    (SECONDS, "123457"), (np.float32(0.5), "0.5"), (7, "7"), (np.int64(3), "3"), ("bads", "bads"),
])
def test_format_figure(value, text):
    assert format_figure(value) == text


def _summary() -> dict:
    return {"out_dir": "/runs/x", "method": "bads", "paths": {},
            "counts": {"input_rows": 10, "usable_rows": 9, "kept_rows": 7, "dropped_by_reason": {"duplicate": 1}},
            "auroc": {"overall": AUROC}, "timings": {"select_s": SECONDS},
            "groups": [{"column": "task", "group": "qa", "rows": 10, "kept": 7, "mean_weight": AUROC}]}


def test_the_report_the_flows_the_artifacts_and_the_demo_write_a_figure_alike(monkeypatch):
    import flows.artifacts as artifacts
    from dpsel import demo
    from dpsel.report import markdown_cell, markdown_table
    from flows.pipeline import curation_markdown, describe

    summary = _summary()
    assert markdown_cell(AUROC) == "0.8333" and "| 0.8333 |" in markdown_table([{"w": AUROC}])[2]
    assert "- **selection AUROC**: 0.8333" in curation_markdown(summary, "t")
    assert "selection AUROC: 0.8333" in describe("curate", {"curate": summary})
    assert "selection seconds: 123457" in describe("curate", {"curate": summary})  # never 1.235e+05
    tables = []
    monkeypatch.setattr(artifacts, "create_table_artifact", lambda rows, **_: tables.append(rows))
    artifacts.curation_table(summary, "k")
    assert tables[0][-1]["mean_weight"] == "0.8333" and tables[0][0]["value"] == "10"
    head = {"selection AUROC": AUROC, "kept rows": 7, "input rows": 10, "usable rows": 9,
            "kept fraction (of input rows)": 0.7}
    lines = demo.headline({"report": "r.md", "headline": head})
    assert lines[1].endswith(" 0.8333") and "(0.7; 9 usable)" in lines[2]
