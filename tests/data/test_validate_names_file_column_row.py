"""dpsel.data.validate_paths: the summary, and every bad-input case naming file, column and row."""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpsel.data import MAX_MESSAGE_CHARS, read_instruction_set, validate_paths
from dpsel.errors import DpselInputError

MSG_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def write(path: Path, columns: dict, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def good_shard(path: Path, n: int = 3, start: int = 0) -> Path:
    return write(path, {"instruction": [f"q{i}" for i in range(start, start + n)],
                        "output": [f"a{i}" for i in range(start, start + n)]})


def raises_input_error(call, *args) -> DpselInputError:
    with pytest.raises(DpselInputError) as info:
        call(*args)
    return info.value


# ------------------------------------------------------------------ the summary
def test_summary_counts_lengths_duplicates_and_groups(tmp_path):
    write(tmp_path / "d" / "part-0.parquet", {
        "instruction": ["abcd", "ab", "abcd"], "input": ["xy", None, "xy"], "output": ["1", "12", "1"],
        "task": ["qa", "math", "qa"], "source": ["web", "web", "book"], "note": ["", None, "n"]})
    write(tmp_path / "d" / "part-1.parquet", {
        "instruction": ["a" * 10], "input": [""], "output": ["r" * 100],
        "task": ["qa"], "source": ["web"], "note": [None]})
    summary = validate_paths(tmp_path / "d")
    assert summary.rows == 4 and summary.shape == "alpaca" and len(summary.files) == 2
    assert [rows for _, rows in summary.files] == [3, 1]
    assert summary.null_counts == {"instruction": 0, "input": 1, "output": 0, "task": 0, "source": 0, "note": 2}
    assert summary.empty_counts["input"] == 1 and summary.empty_counts["note"] == 1
    # prompt chars: "abcd\n\nxy" = 8, "ab" = 2, 8, 10 ; response chars: 1, 2, 1, 100
    assert summary.prompt_chars["max"] == 10 and summary.prompt_chars["p50"] == 8
    assert summary.response_chars["max"] == 100 and summary.response_chars["p50"] == 1
    assert summary.response_chars["p90"] == 70   # numpy linear interpolation between 2 and 100
    assert summary.duplicates == 1
    assert summary.groups == {"task": {"qa": 3, "math": 1}, "source": {"web": 3, "book": 1}}
    text = summary.render()
    for expected in ("rows: 4", "shape: alpaca", "files: 2", "duplicates: 1", "note: 2 / 1", "tasks: 2",
                     "qa: 3", "response chars: p50 1, p90 70, p99 97, max 100"):
        assert expected in text


def test_summary_for_chat_shape(tmp_path):
    rows = [[{"role": "system", "content": "ss"}, {"role": "user", "content": "uuu"},
             {"role": "assistant", "content": "aaaa"}]]
    summary = validate_paths(write(tmp_path / "c.parquet", {"messages": pa.array(rows, MSG_TYPE)}))
    assert summary.shape == "chat" and summary.rows == 1
    assert summary.prompt_chars["max"] == 5 and summary.response_chars["max"] == 4
    assert summary.groups == {} and "tasks" not in summary.render()


# ------------------------------------------------------------------ structural errors (always raise)
@pytest.mark.parametrize("reader", [validate_paths, read_instruction_set])
def test_missing_paths(tmp_path, reader):
    err = raises_input_error(reader, tmp_path / "nope.parquet")
    assert "file not found" in str(err) and err.file.endswith("nope.parquet")
    (tmp_path / "empty").mkdir()
    assert "no .parquet files" in str(raises_input_error(reader, tmp_path / "empty"))
    assert "no files match" in str(raises_input_error(reader, str(tmp_path / "x-*.parquet")))


@pytest.mark.parametrize("reader", [validate_paths, read_instruction_set])
def test_corrupt_parquet_files(tmp_path, reader):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all" * 10)
    err = raises_input_error(reader, garbage)
    assert "not a readable Parquet file" in str(err) and err.file == str(garbage)
    good = good_shard(tmp_path / "good.parquet", n=200)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert raises_input_error(reader, truncated).file == str(truncated)


def test_corrupt_row_group_data_names_the_file(tmp_path):
    good = good_shard(tmp_path / "good.parquet", n=2000)
    data = bytearray(good.read_bytes())
    data[100:1100] = b"\x07" * 1000    # page data clobbered, footer intact
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(bytes(data))
    err = raises_input_error(validate_paths, broken)
    assert err.file == str(broken)


@pytest.mark.parametrize("reader", [validate_paths, read_instruction_set])
@pytest.mark.parametrize("columns, column, words", [
    ({"prompt": ["q"], "answer": ["a"]}, None, "no recognised columns"),
    ({"instruction": ["q"], "output": [1]}, "output", "int64; expected string"),
    ({"instruction": [b"q"], "output": ["a"]}, "instruction", "binary"),
    ({"instruction": ["q"], "output": ["a"], "input": [3.5]}, "input", "double"),
    ({"messages": ["user: hi"]}, "messages", "expected list<struct"),
    ({"messages": pa.array([[1, 2]], pa.list_(pa.int64()))}, "messages", "items have type int64"),
    ({"messages": pa.array([[{"role": "user"}]], pa.list_(pa.struct([("role", pa.string())])))},
     "messages", "lack the field 'content'"),
    ({"messages": pa.array([[{"role": "user", "content": b"x"}]],
                           pa.list_(pa.struct([("role", pa.string()), ("content", pa.binary())])))},
     "messages", "binary"),
    ({"instruction": ["q"], "output": ["a"], "dpsel_id": [7]}, "dpsel_id", "expected string"),
    ({"instruction": ["q"], "output": ["a"], "dpsel_reason": [""]}, "dpsel_reason", "dpsel adds itself"),
])
def test_wrong_columns_and_types(tmp_path, reader, columns, column, words):
    path = write(tmp_path / "bad.parquet", columns)
    err = raises_input_error(reader, path)
    assert words in str(err) and err.file == str(path) and err.column == column


@pytest.mark.parametrize("reader", [validate_paths, read_instruction_set])
def test_invalid_utf8_names_column_and_row(tmp_path, reader):
    good_shard(tmp_path / "d" / "a.parquet", n=3)
    raw = pa.array([b"fine", b"also fine", b"\xff\xfe bad"], pa.binary()).view(pa.string())
    bad = write(tmp_path / "d" / "b.parquet", {"instruction": ["x", "y", "z"], "output": raw})
    err = raises_input_error(reader, tmp_path / "d")
    assert (err.file, err.column, err.row) == (str(bad), "output", 5)
    assert "invalid UTF-8" in str(err) and "row 2 of this file" in str(err)


@pytest.mark.parametrize("reader", [validate_paths, read_instruction_set])
def test_mixed_shapes_across_shards(tmp_path, reader):
    good_shard(tmp_path / "d" / "a.parquet")
    chat = write(tmp_path / "d" / "b.parquet", {"messages": pa.array(
        [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]], MSG_TYPE)})
    err = raises_input_error(reader, tmp_path / "d")
    assert "mixed shapes" in str(err) and err.file == str(chat)


# ------------------------------------------------------------------ row-level problems: strict in validate
@pytest.mark.parametrize("instruction, output, column, words", [
    (None, "a", "instruction", "null instruction"),
    ("   ", "a", "instruction", "empty instruction"),
    ("q", None, "output", "null output"),
    ("q", "", "output", "empty output"),
    ("q", "x" * (MAX_MESSAGE_CHARS + 1), "output", "100001 chars (limit 100000)"),
    ("x" * (MAX_MESSAGE_CHARS + 1), "a", "instruction", "limit 100000"),
])
def test_bad_alpaca_rows_fail_validate_naming_global_and_file_row(tmp_path, instruction, output, column, words):
    good_shard(tmp_path / "d" / "part-0.parquet", n=4)
    bad = write(tmp_path / "d" / "part-1.parquet", {"instruction": ["ok", instruction, "ok"],
                                                   "output": ["fine", output, None]})
    err = raises_input_error(validate_paths, tmp_path / "d")
    assert (err.file, err.column, err.row) == (str(bad), column, 5)
    message = str(err)
    assert words in message and "part-1.parquet" in message and f"column '{column}'" in message
    assert re.search(r"input row 5\b", message) and "row 1 of this file" in message
    # the same rows are only marked during curation
    data = read_instruction_set(tmp_path / "d")
    assert data.frame["dpsel_reason"].tolist() == [""] * 5 + ["invalid"] * 2


@pytest.mark.parametrize("messages, words", [
    ([{"role": "user", "content": "q"}], "not the assistant"),
    ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "role 'bot'"),
    ([{"role": "assistant", "content": "a"}], "no user message"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "empty output"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "y" * (MAX_MESSAGE_CHARS + 5)}],
     "limit 100000"),
    (None, "messages is null"),
])
def test_bad_chat_rows_fail_validate(tmp_path, messages, words):
    ok = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path = write(tmp_path / "c.parquet", {"messages": pa.array([ok, ok, messages], MSG_TYPE)})
    err = raises_input_error(validate_paths, path)
    assert (err.file, err.column, err.row) == (str(path), "messages", 2) and words in str(err)
    assert read_instruction_set(path).counts() == {"input_rows": 3, "usable": 1, "invalid": 1, "duplicate": 1}


def test_all_null_text_column_is_rows_invalid_not_a_type_error(tmp_path):
    path = write(tmp_path / "n.parquet", {"instruction": ["q", "r"], "output": pa.nulls(2)})
    assert read_instruction_set(path).frame["dpsel_detail"].tolist() == ["null output", "null output"]
    assert raises_input_error(validate_paths, path).row == 0


@pytest.mark.parametrize("reader", [validate_paths, read_instruction_set])
def test_shards_with_incompatible_carried_columns(tmp_path, reader):
    write(tmp_path / "d" / "a.parquet", {"instruction": ["q"], "output": ["a"], "task": ["qa"]})
    bad = write(tmp_path / "d" / "b.parquet", {"instruction": ["r"], "output": ["b"],
                                               "task": pa.array([[1]], pa.list_(pa.int64()))})
    err = raises_input_error(reader, tmp_path / "d")
    assert "do not match the earlier shards" in str(err) and err.file == str(bad)


def test_shards_with_compatible_carried_columns_are_concatenated(tmp_path):
    write(tmp_path / "d" / "a.parquet", {"instruction": ["q"], "output": ["a"], "n": pa.array([1], pa.int32())})
    write(tmp_path / "d" / "b.parquet", {"instruction": ["r"], "output": ["b"], "n": pa.array([2], pa.int64()),
                                         "extra": ["e"]})
    data = read_instruction_set(tmp_path / "d")
    assert data.table.column("n").to_pylist() == [1, 2]
    assert data.table.column("extra").to_pylist() == [None, "e"]
    assert validate_paths(tmp_path / "d").null_counts["extra"] == 0
