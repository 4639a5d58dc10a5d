"""report.md shows what the stages dropped: per stage and reason the first five dropped rows in input order,
each beside what it matched (the row kept in its place, the eval text), escaped for Markdown and cut — for
curate, the held filter and the streamed filter alike; the Prefect report artifact carries the same section."""
from __future__ import annotations

import re

import pytest

import dpsel.curation.stream as stream
from builders import dropped_rows_inputs
from dpsel.curation import curate, filter_rows
from dpsel.curation.examples import PER_REASON, SECTION_TITLE, TEXT_CHARS, report_section
from dpsel.stages.options import StagesConfig


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dropped")
    paths = dropped_rows_inputs(folder)
    result = curate(paths["train"], paths["meta"], folder / "run", method="all",
                    stages=StagesConfig(decontaminate=[paths["eval"]]))
    return paths, result


def _cells(line: str) -> list[str]:
    """A Markdown table row's cells (an escaped `\\|` stays inside its cell)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _table(section: list[str], heading: str) -> list[list[str]]:
    start = section.index(heading)
    rows = []
    for line in section[start + 4:]:
        if not line.startswith("|"):
            break
        rows.append(_cells(line))
    return rows


def test_report_shows_each_stage_s_dropped_rows_beside_what_they_matched(planted):
    paths, result = planted
    section = report_section(result.paths["report"])
    assert section[0] == SECTION_TITLE
    for heading in ("### Stage exact", "### Stage near\\_dup", "### Stage decontaminate"):
        assert heading in section
    near = _table(section, "#### near\\_duplicate")
    assert [r[0] for r in near] == ["13"]
    assert near[0][3].startswith("input row 3: user: Question 3 about item 3")
    contaminated = _table(section, "#### contaminated")
    assert [r[0] for r in contaminated] == ["7"]
    assert contaminated[0][3].startswith(f"eval row 0 of {paths['eval']}: user: Question 7 about item 7")
    invalid = _table(section, "#### invalid")
    assert invalid == [["16", "empty instruction", "user:    assistant: no question", "-"]]


def test_report_shows_the_first_five_per_reason_in_input_order(planted):
    duplicates = _table(report_section(planted[1].paths["report"]), "#### duplicate")
    assert len(duplicates) == PER_REASON
    assert [r[0] for r in duplicates] == ["12", "15", "17", "18", "19"]
    assert duplicates[0][1] == "same content as input row 1"
    assert duplicates[0][3].startswith("input row 1: user: Question 1 about item 1")


def test_report_examples_are_escaped_and_cut(planted):
    section = report_section(planted[1].paths["report"])
    pipe_row = next(r for r in _table(section, "#### duplicate") if r[0] == "15")
    assert len(pipe_row) == 4                                  # `|` escaped: the table keeps its four columns
    assert pipe_row[2].startswith(r"user: left \| right second line long")   # the newline became a space
    assert pipe_row[2].endswith("…") and len(pipe_row[2].replace("\\", "")) == TEXT_CHARS
    assert pipe_row[3].startswith(r"input row 14: user: left \| right")


def test_streamed_filter_report_shows_dropped_rows_too(planted, tmp_path, monkeypatch):
    paths, _ = planted
    scorer = curate(paths["meta"], paths["meta"], tmp_path / "scorer-run", method="random").out_dir / "scorer"
    monkeypatch.setattr(stream, "BATCH_ROWS", 5)       # partners in earlier batches than their duplicates
    streamed = filter_rows(scorer, [paths["train"]], tmp_path / "filtered", threshold=0.0,
                           stages=StagesConfig(decontaminate=[paths["eval"]]))
    section = report_section(streamed.paths["report"])
    assert [r[0] for r in _table(section, "#### duplicate")] == ["12", "15", "17", "18", "19"]
    assert _table(section, "#### duplicate")[0][3].startswith("input row 1: user: Question 1 about item 1")
    assert _table(section, "#### near\\_duplicate")[0][3].startswith("input row 3: user: Question 3")
    assert _table(section, "#### contaminated")[0][3].startswith("eval row 0 of")


def test_report_artifact_carries_the_dropped_rows(planted):
    from flows.pipeline import curation_markdown
    from flows.tasks import curation_summary
    markdown = curation_markdown(curation_summary(planted[1]), "Curation (all)")
    assert "\n".join(report_section(planted[1].paths["report"])) in markdown


def test_a_row_dropped_for_pii_is_shown_masked(tmp_path):
    """`--pii drop` keeps the address out of curated.parquet; the report's example must not print it either."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"instruction": f"Question {i}", "input": "", "output": f"Answer number {i}."} for i in range(6)]
    rows[2]["output"] = "Write to jane.doe@example.com for the answer."
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "meta.parquet")
    result = curate(tmp_path / "train.parquet", tmp_path / "meta.parquet", tmp_path / "run", method="all",
                    stages=StagesConfig(pii="drop"))
    section = "\n".join(report_section(result.paths["report"]))
    assert "#### pii" in section and "\\[EMAIL\\]" in section   # masked, then escaped for Markdown
    assert "jane.doe@example.com" not in section
