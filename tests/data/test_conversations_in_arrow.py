"""The selection pool's messages held in Arrow (`dpsel.data.conversations`) read exactly as the Python lists."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpsel.curation.rows import read_rows
from dpsel.curation.stages import apply_stages
from dpsel.data import conversations
from dpsel.stages.options import StagesConfig
from dpsel.synth import generate


def _chat_file(path):
    system = {"role": "system", "content": "You are a careful assistant."}
    rows = [[system, {"role": "user", "content": f"Question {i}: mail jane.doe{i}@example.com?"},
             {"role": "assistant", "content": f"Answer {i}, with ünïcode and a\nnewline."}] for i in range(40)]
    rows[7] = [{"role": "user", "content": "   "}, {"role": "assistant", "content": "x"}]   # invalid: blank prompt
    rows[9] = rows[8]                                                                        # duplicate
    pq.write_table(pa.table({"messages": rows}), path)
    return path


@pytest.mark.parametrize("shape", ["alpaca", "chat"])
def test_arrow_conversations_equal_the_python_lists(tmp_path, shape, monkeypatch):
    monkeypatch.setattr(conversations, "CHUNK_ROWS", 7)   # iteration crosses chunk edges
    path = generate(tmp_path, rows=60, seed=1, meta_rows=10, test_rows=10)["train"] if shape == "alpaca" \
        else _chat_file(tmp_path / "chat.parquet")
    rows = read_rows(path)
    mask = rows.usable.copy()
    mask[::5] = False
    held, listed = rows.conversation_rows(mask), rows.conversations(mask)
    assert len(held) == len(listed) > 0 and list(held) == listed
    assert held[0] == listed[0] and held[-1] == listed[-1] and held[3:11] == listed[3:11]
    assert held[np.int64(2)] == listed[2]
    assert held[::4] == listed[::4]
    with pytest.raises(IndexError):
        held[len(listed)]
    assert [1] + held == [1] + listed and held + [2] == listed + [2]


def test_redacted_rows_are_what_selection_reads(tmp_path):
    rows = read_rows(_chat_file(tmp_path / "chat.parquet"))
    apply_stages(rows, StagesConfig(pii="redact"))
    held, listed = rows.conversation_rows(rows.usable), rows.conversations(rows.usable)
    assert list(held) == listed
    assert not any("@example.com" in m["content"] for row in held for m in row)
    assert np.sum(rows.usable) == len(held)


def test_spilled_pool_and_table_read_the_same_and_leave_no_file(tmp_path, monkeypatch):
    """Selection's pool and the input table in mapped temporary files (`dpsel.data.spill`): the same values
    after pages are given back mid-read, and no file left in TMPDIR (it is unlinked once mapped)."""
    spill_dir = tmp_path / "tmp"
    spill_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(spill_dir))
    monkeypatch.setattr("tempfile.tempdir", None)   # TMPDIR is read again
    monkeypatch.setattr(conversations, "CHUNK_ROWS", 5)
    monkeypatch.setattr(conversations, "LOOKUPS_HELD", 3)   # pages given back every few rows
    rows = read_rows(_chat_file(tmp_path / "chat.parquet"))
    before, listed = rows.data.table, rows.conversations(rows.usable)
    pool = rows.conversation_rows(rows.usable)
    rows.spill_table()
    assert rows.data.table is not before and rows.data.table.equals(before)
    assert list(pool) == listed and [pool[i] for i in range(len(pool))] == listed and list(pool) == listed
    assert pool._mapped is not None and list(spill_dir.iterdir()) == []


def test_a_tmpdir_that_cannot_take_the_spill_keeps_the_data_in_memory_and_says_so(tmp_path, monkeypatch, caplog):
    rows = read_rows(_chat_file(tmp_path / "chat.parquet"))

    def full(*_, **__):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("tempfile.mkstemp", full)
    before, listed = rows.data.table, rows.conversations(rows.usable)
    pool = rows.conversation_rows(rows.usable)
    rows.spill_table()
    assert rows.spilled is None and rows.data.table is before and pool._mapped is None and list(pool) == listed
    assert "held in memory instead" in caplog.text
