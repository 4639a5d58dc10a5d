"""dpsel.data reading/normalisation/accounting and dpsel.io atomic writers."""
from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpsel.data import (MAX_MESSAGE_CHARS, alpaca_to_messages, expand_paths, iter_batches, read_instruction_set,
                        row_id, validate_paths)
from dpsel.errors import DpselInputError
from dpsel.io import file_sha256, write_json_atomic, write_parquet_atomic, write_text_atomic

MSG_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def write(path: Path, columns: dict, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, **kwargs)
    return path


def alpaca_columns(n: int, start: int = 0) -> dict:
    return {"instruction": [f"Question {i}?" for i in range(start, start + n)],
            "output": [f"Answer {i}." for i in range(start, start + n)],
            "task": [f"t{i % 2}" for i in range(start, start + n)]}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    return write(tmp_path / "alpaca.parquet", {
        "instruction": ["Name a primary colour.", "Add 2 and 3.", "Name a primary colour."],
        "input": ["One word.", None, "One word."],
        "output": ["Red.", "5", "Red."],
        "source": ["web", "math", "web2"],
        "score": pa.array([1, None, 3], pa.int64()),
    })


@pytest.fixture
def chat_file(tmp_path) -> Path:
    messages = [
        [{"role": "user", "content": "Name a primary colour.\n\nOne word."}, {"role": "assistant", "content": "Red."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}],
    ]
    return write(tmp_path / "chat.parquet", {"messages": pa.array(messages, MSG_TYPE), "task": ["a", "b"]})


@pytest.fixture
def memory_url():
    root = f"memory://dpsel-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


# ------------------------------------------------------------------ shapes and normalisation
def test_alpaca_rows_become_messages_and_other_columns_carry_through(alpaca_file):
    data = read_instruction_set(alpaca_file)
    assert data.shape == "alpaca"
    assert data.original_columns == ["instruction", "input", "output", "source", "score"]
    assert data.messages()[0] == [{"role": "user", "content": "Name a primary colour.\n\nOne word."},
                                  {"role": "assistant", "content": "Red."}]
    assert data.messages()[1] == [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    assert data.frame["source"].tolist() == ["web", "math", "web2"]
    # the Arrow table keeps the original types exactly (int64 with a null stays int64)
    assert data.table.schema.field("score").type == pa.int64()
    assert data.table.column("score").to_pylist() == [1, None, 3]
    assert list(data.frame.columns[-5:]) == ["dpsel_id", "dpsel_messages", "dpsel_reason", "dpsel_detail",
                                             "dpsel_file"]
    assert set(data.frame["dpsel_file"]) == {str(alpaca_file)}


def test_chat_rows_are_read_with_roles_and_extra_struct_fields_ignored(tmp_path):
    item = pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string())])
    rows = [[{"role": "system", "content": "S", "name": None}, {"role": "user", "content": "U", "name": "bob"},
             {"role": "assistant", "content": "A", "name": None}]]
    path = write(tmp_path / "c.parquet", {"messages": pa.array(rows, pa.list_(item))})
    data = read_instruction_set(path)
    assert data.shape == "chat"
    assert data.messages() == [[{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                                {"role": "assistant", "content": "A"}]]
    assert data.counts() == {"input_rows": 1, "usable": 1, "invalid": 0, "duplicate": 0}


def test_same_content_gets_same_id_in_either_shape_and_the_id_is_pinned(alpaca_file, chat_file):
    alpaca = read_instruction_set(alpaca_file).frame
    chat = read_instruction_set(chat_file).frame
    assert alpaca["dpsel_id"][0] == chat["dpsel_id"][0] == "aa65957b57a6db4f8d5b"
    # row 2 differs from row 0 only in a carried column: same id, so it is a duplicate
    assert alpaca["dpsel_id"][2] == alpaca["dpsel_id"][0]
    assert alpaca["dpsel_id"][1] == row_id(alpaca_to_messages("Add 2 and 3.", "5"))
    assert read_instruction_set(alpaca_file).frame["dpsel_id"].tolist() == alpaca["dpsel_id"].tolist()


def test_an_existing_dpsel_id_column_is_kept_and_nulls_are_filled(tmp_path):
    path = write(tmp_path / "ids.parquet", {"instruction": ["a", "b"], "output": ["x", "y"],
                                            "dpsel_id": ["mine", None]})
    data = read_instruction_set(path)
    assert data.frame["dpsel_id"].tolist() == ["mine", row_id(alpaca_to_messages("b", "y"))]
    assert data.original_columns == ["instruction", "output", "dpsel_id"]
    assert list(data.frame.columns).count("dpsel_id") == 1


# ------------------------------------------------------------------ dedup, invalid rows, accounting
def test_duplicates_first_kept_later_marked_and_invalid_takes_precedence(alpaca_file, tmp_path):
    data = read_instruction_set(alpaca_file)
    assert data.frame["dpsel_reason"].tolist() == ["", "", "duplicate"]
    assert data.frame["dpsel_detail"][2] == "same content as input row 0"
    path = write(tmp_path / "inv.parquet", {"instruction": ["q", "q", "q"], "output": ["", "", "a"]})
    reasons = read_instruction_set(path).frame["dpsel_reason"].tolist()
    assert reasons == ["invalid", "invalid", ""]   # the valid row is not a duplicate of invalid ones


def test_bad_rows_are_kept_as_invalid_with_a_detail_during_curation(tmp_path):
    huge = "x" * (MAX_MESSAGE_CHARS + 1)
    alpaca = write(tmp_path / "a.parquet", {
        "instruction": ["ok", None, "  ", "ok", "ok", "ok"],
        "output": ["fine", "x", "x", None, "", huge]})
    frame = read_instruction_set(alpaca).frame
    assert frame["dpsel_reason"].tolist() == ["", "invalid", "invalid", "invalid", "invalid", "invalid"]
    assert frame["dpsel_detail"].tolist()[1:5] == ["null instruction", "empty instruction", "null output",
                                                   "empty output"]
    assert "limit 100000" in frame["dpsel_detail"][5]

    def chat(*pairs):
        return [None if p is None else {"role": p[0], "content": p[1]} for p in pairs]
    rows = [chat(("user", "q"), ("assistant", "a")), None, [], chat(("user", "q")),
            chat(("user", "q"), ("robot", "a")), chat(("user", "q"), ("assistant", None)),
            chat(("user", "q"), ("assistant", " ")), chat(("system", "s"), ("assistant", "a")),
            chat(("user", "q"), None)]
    frame = read_instruction_set(write(tmp_path / "c.parquet", {"messages": pa.array(rows, MSG_TYPE)})).frame
    assert frame["dpsel_reason"].tolist() == [""] + ["invalid"] * 8
    details = frame["dpsel_detail"].tolist()
    assert details[1] == "messages is null" and details[2] == "no messages"
    assert "not the assistant" in details[3] and "'robot'" in details[4]
    assert "null content" in details[5] and "empty output" in details[6]
    assert details[7] == "no user message" and "message 1 is null" in details[8]


def test_every_input_row_is_accounted_for(tmp_path):
    write(tmp_path / "s" / "part-0.parquet", {"instruction": ["a", "b", ""], "output": ["x", "y", "z"]})
    write(tmp_path / "s" / "part-1.parquet", {"instruction": ["a", "c"], "output": ["x", "w"]})
    data = read_instruction_set(tmp_path / "s")
    counts = data.counts()
    assert len(data.frame) == len(data) == counts["input_rows"] == 5
    assert counts == {"input_rows": 5, "usable": 3, "invalid": 1, "duplicate": 1}
    assert data.frame["dpsel_detail"][3] == "same content as input row 0"
    assert len(data.usable()) == 3
    mask = data.usable_mask()
    assert [m[0]["content"] for m in data.messages(mask)] == ["a", "b", "c"]


# ------------------------------------------------------------------ paths: folders, globs, fsspec
def test_folder_of_shards_is_read_in_sorted_order_skipping_hidden_files(tmp_path):
    folder = tmp_path / "shards"
    write(folder / "part-1.parquet", alpaca_columns(2, start=2))
    write(folder / "part-0.parquet", alpaca_columns(2))
    write(folder / "_tmp" / "junk.parquet", alpaca_columns(1, start=9))
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-2.parquet.tmp").write_text("half written")
    data = read_instruction_set(folder)
    assert [m[0]["content"] for m in data.messages()] == [f"Question {i}?" for i in range(4)]
    assert [(Path(f.path).name, f.rows) for f in data.files] == [("part-0.parquet", 2), ("part-1.parquet", 2)]
    assert data.files[0].sha256 == sha(folder / "part-0.parquet")
    assert data.frame["dpsel_file"].map(lambda p: Path(p).name).tolist() == ["part-0.parquet"] * 2 + [
        "part-1.parquet"] * 2


def test_glob_and_several_paths(tmp_path):
    for i in range(3):
        write(tmp_path / f"shard-{i}.parquet", alpaca_columns(2, start=2 * i))
    write(tmp_path / "other.parquet", alpaca_columns(1, start=100))
    globbed = expand_paths(str(tmp_path / "shard-*.parquet"))
    assert [Path(f.path).name for f in globbed] == [f"shard-{i}.parquet" for i in range(3)]
    data = read_instruction_set([str(tmp_path / "other.parquet"), str(tmp_path / "shard-[01].parquet")])
    assert len(data) == 5 and data.files[0].path.endswith("other.parquet")


def test_fsspec_memory_url(memory_url):
    for i in range(2):
        with fsspec.open(f"{memory_url}/ds/part-{i}.parquet", "wb") as handle:
            pq.write_table(pa.table(alpaca_columns(3, start=3 * i)), handle)
    data = read_instruction_set(f"{memory_url}/ds")
    assert len(data) == 6 and data.counts()["usable"] == 6
    assert data.files[0].path.startswith("memory://") and data.files[0].path.endswith("/ds/part-0.parquet")
    assert data.files[0].sha256 == hashlib.sha256(fsspec.open(data.files[0].path, "rb").open().read()).hexdigest()
    assert validate_paths(f"{memory_url}/ds/*.parquet").rows == 6
    with pytest.raises(DpselInputError, match="file not found"):
        read_instruction_set(f"{memory_url}/nope.parquet")


def test_file_url(tmp_path, alpaca_file):
    assert len(read_instruction_set(f"file://{alpaca_file}")) == 3


# ------------------------------------------------------------------ streaming and input safety
def test_iter_batches_streams_row_groups_with_continuous_row_numbers(tmp_path):
    write(tmp_path / "a.parquet", alpaca_columns(10), row_group_size=4)
    write(tmp_path / "b.parquet", alpaca_columns(3, start=10))
    batches = list(iter_batches(tmp_path, batch_rows=4))
    assert [b.num_rows for b in batches] == [4, 4, 2, 3]
    assert [b.start_row for b in batches] == [0, 4, 8, 10]
    assert [b.start_row_in_file for b in batches] == [0, 4, 8, 0]
    assert [b.messages[0][0]["content"] for b in batches] == ["Question 0?", "Question 4?", "Question 8?",
                                                              "Question 10?"]
    assert all(isinstance(b.batch, pa.RecordBatch) for b in batches)


def test_duplicates_are_found_across_batches_and_files(tmp_path):
    write(tmp_path / "a.parquet", alpaca_columns(4), row_group_size=2)
    write(tmp_path / "b.parquet", alpaca_columns(2, start=3))
    reasons = [r for b in iter_batches(tmp_path, batch_rows=2) for r in b.reasons]
    assert reasons == ["", "", "", "", "duplicate", ""]
    unmarked = [r for b in iter_batches(tmp_path, batch_rows=2, mark_duplicates=False) for r in b.reasons]
    assert unmarked == [""] * 6


def test_inputs_are_never_modified(alpaca_file, chat_file, tmp_path):
    bad = write(tmp_path / "bad.parquet", {"instruction": ["q"], "output": [""]})
    before = {p: (sha(p), p.stat().st_mtime_ns) for p in (alpaca_file, chat_file, bad)}
    read_instruction_set(alpaca_file)
    read_instruction_set(chat_file)
    read_instruction_set(bad)
    validate_paths(alpaca_file)
    with pytest.raises(DpselInputError):
        validate_paths(bad)
    assert {p: (sha(p), p.stat().st_mtime_ns) for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpaca.parquet", "bad.parquet", "chat.parquet"]


def test_empty_file_keeps_its_schema(tmp_path):
    path = write(tmp_path / "e.parquet", {"instruction": pa.array([], pa.string()),
                                          "output": pa.array([], pa.string()), "task": pa.array([], pa.string())})
    data = read_instruction_set(path)
    assert len(data) == 0 and data.original_columns == ["instruction", "output", "task"]
    assert data.files[0].rows == 0 and data.files[0].url == str(path) and data.counts()["input_rows"] == 0


# ------------------------------------------------------------------ dpsel.io
def test_atomic_writers_round_trip_and_leave_no_temp_files(tmp_path):
    df = pd.DataFrame({"a": [1, 2]}, index=[5, 6])
    out = write_parquet_atomic(df, tmp_path / "sub" / "x.parquet")
    assert pq.read_table(out).column_names == ["a"]          # index dropped
    write_parquet_atomic(pa.table({"b": ["z"]}), out)         # overwrite in place
    assert pq.read_table(out).to_pydict() == {"b": ["z"]}
    write_json_atomic({"n": np.int64(3), "f": np.float32(0.5), "arr": np.arange(2), "p": tmp_path},
                      tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"n": 3, "f": 0.5, "arr": [0, 1], "p": str(tmp_path)}
    write_text_atomic("héllo\n", tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == "héllo\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.json", "r.md", "sub", "x.parquet"]


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "m.json"
    write_json_atomic({"ok": 1}, target)
    with pytest.raises(TypeError):
        write_json_atomic({"bad": object()}, target)
    with pytest.raises(pa.ArrowInvalid):
        write_parquet_atomic(pd.DataFrame({"mixed": [1, "x"]}), tmp_path / "t.parquet")
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_file_sha256_local_and_url(tmp_path, memory_url):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    expected = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert file_sha256(path) == expected == file_sha256(str(path))
    with fsspec.open(f"{memory_url}/f.bin", "wb") as handle:
        handle.write(b"abc" * 1000)
    assert file_sha256(f"{memory_url}/f.bin") == expected
