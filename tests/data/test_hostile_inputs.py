"""Hostile inputs (hypothesis): random schemas, nulls, empty and very long strings, control characters, invalid
UTF-8, odd Arrow types (large_string, dictionary, binary, nested), duplicate ids, chat variants.

Every generated file either curates with full row accounting, or fails with DpselInputError naming the file
(exit 2 in the CLI) — never another exception (a traceback), never a half-written output folder. The example
count is bounded so the suite stays fast on CI.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dpsel.curation import curate
from dpsel.errors import DpselInputError
from dpsel.outputs import verify_run

MAX_EXAMPLES = 20

texts = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x9F), max_size=20),  # control characters
    st.just(""), st.just("   "), st.just("x" * 5000), st.just("\x1b[31m<script>|\n#"),
)
maybe_texts = st.one_of(st.none(), texts)
sane = st.from_regex(r"[A-Za-z][A-Za-z0-9 ,.?]{2,25}", fullmatch=True)
mostly_sane = st.one_of(sane, sane, sane, maybe_texts)  # most rows usable, some hostile


def _text_array(values: list, kind: str) -> pa.Array:
    """The same values as one of the Arrow string-like types a real file may hold."""
    if kind == "large_string":
        return pa.array(values, pa.large_string())
    if kind == "dictionary":
        return pa.array(values, pa.string()).dictionary_encode()
    if kind == "binary":
        return pa.array([None if v is None else v.encode("utf-8", "surrogatepass") for v in values], pa.binary())
    if kind == "invalid_utf8":  # string type, bytes that are not UTF-8 (a writer that skipped validation)
        raw = pa.array([None if v is None else b"\xff\xfe" + v.encode("utf-8", "surrogatepass") for v in values],
                       pa.binary())
        return raw.view(pa.string())
    return pa.array(values, pa.string())


string_kinds = st.sampled_from(["string", "large_string", "dictionary", "binary", "invalid_utf8"])
sane_chat = st.tuples(sane, mostly_sane).map(lambda qa: [{"role": "user", "content": qa[0]},
                                                         {"role": "assistant", "content": qa[1]}])
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", ""]),
                           "content": maybe_texts}),
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"])})), max_size=4)


@st.composite
def hostile_tables(draw) -> pa.Table:
    n = draw(st.integers(min_value=0, max_value=12))
    columns: dict[str, pa.Array] = {}
    shape = draw(st.sampled_from(["alpaca", "chat", "any columns"]))
    if shape == "chat":
        columns["messages"] = pa.array([draw(st.one_of(sane_chat, sane_chat, st.none(), messages))
                                        for _ in range(n)])
    elif shape == "alpaca":
        for name in ("instruction", "output") + (("input",) if draw(st.booleans()) else ()):
            columns[name] = _text_array([draw(mostly_sane) for _ in range(n)],
                                        draw(st.sampled_from(["string", "string", "large_string", "dictionary"])))
    else:
        for name in draw(st.lists(st.sampled_from(["instruction", "output", "input"]), unique=True, max_size=3)):
            columns[name] = _text_array([draw(maybe_texts) for _ in range(n)], draw(string_kinds))
    if draw(st.booleans()):
        columns["task"] = _text_array([draw(maybe_texts) for _ in range(n)], draw(string_kinds))
    extra = draw(st.sampled_from([None, "int", "nested", "struct", "dpsel_id"]))
    if extra == "int":
        columns["count"] = pa.array([draw(st.one_of(st.none(), st.integers(-5, 5))) for _ in range(n)], pa.int64())
    elif extra == "nested":
        columns["tags"] = pa.array([draw(st.lists(st.text(max_size=3), max_size=2)) for _ in range(n)])
    elif extra == "struct":
        columns["meta_info"] = pa.array([{"a": i, "b": str(i)} for i in range(n)])
    elif extra == "dpsel_id":  # a column named like dpsel's own, with duplicates
        columns["dpsel_id"] = pa.array(["same"] * n)
    table = pa.table(columns) if columns else pa.table({"unrelated": pa.array(range(n))})
    if n and draw(st.booleans()):  # exact duplicate rows
        table = pa.concat_tables([table, table.slice(0, 1)])
    return table


@pytest.fixture(scope="module")
def meta_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("meta") / "meta.parquet"
    pq.write_table(pa.table({"instruction": [f"Say {i}." for i in range(6)], "output": [str(i) for i in range(6)]}),
                   path)
    return path


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(table=hostile_tables())
def test_hostile_file_curates_with_accounting_or_fails_cleanly(table, meta_file):
    root = Path(tempfile.mkdtemp(prefix="dpsel-hostile-"))
    try:
        train = root / "train.parquet"
        pq.write_table(table, train)
        before = train.read_bytes()
        out = root / "run"
        try:
            result = curate(train, meta_file, out, method="random", budget=0.5)
        except DpselInputError as error:
            event("refused")
            assert str(train) in str(error) or "train" in str(error), str(error)
            assert not out.exists(), "a refused run left an output folder"
        else:
            event("curated")
            counts = result.counts
            assert counts["input_rows"] == table.num_rows == counts["kept_rows"] + counts["dropped_rows"]
            assert pq.read_metadata(out / "scores.parquet").num_rows == table.num_rows
            assert verify_run(out) == []
            json.loads((out / "manifest.json").read_text())
            assert "\x1b" not in (out / "report.md").read_text()
        assert train.read_bytes() == before, "the input was modified"
        # no temp or staging folder left (the lock file `.run.lock` stays: see dpsel.runlock)
        assert [p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".run.lock"] == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
