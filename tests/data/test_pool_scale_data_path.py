"""The pool-scale data path: the columnar ids and messages equal the per-row reference on random conversations,
and `validate`'s peak allocation does not grow with the number of rows."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings, strategies as st

from dpsel.data import alpaca_to_messages, row_id
from dpsel.data.columnar import message_array, normal_rows
from dpsel.data.normalize import sha_ids, sha_ids_hashlib
from dpsel.data.schema import MESSAGE_TYPE

ROOT = Path(__file__).resolve().parents[2]

# text that exercises the canonical JSON: quotes, backslashes, every control character, non-BMP code points,
# the empty string and whitespace-only strings (valid for system turns)
_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))
_TEXT = st.one_of(st.text(_CHARS, max_size=30), st.sampled_from(["", " ", "\n", '"\\', "\x00\x1f\x7f", "é😀"]))
_VISIBLE = _TEXT.filter(lambda t: bool(t.strip()))


@st.composite
def conversations(draw):
    """A valid chat conversation: optional system turn, 1-3 user/assistant exchanges, the assistant last."""
    turns = [{"role": "system", "content": draw(_TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        turns += [{"role": "user", "content": draw(_VISIBLE)}, {"role": "assistant", "content": draw(_VISIBLE)}]
    return turns


CHAT_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(st.lists(conversations(), min_size=1, max_size=12))
def test_columnar_chat_ids_and_messages_equal_the_reference(rows):
    batch = pa.RecordBatch.from_pydict({"messages": pa.array(rows, CHAT_TYPE)})
    normal = normal_rows(batch, "chat")
    assert normal.clean.all()                     # every row takes the fast path that is under test
    every = np.arange(len(rows))
    assert normal.ids(every).to_pylist() == [row_id(m) for m in rows]
    assert message_array(normal, every, {}, MESSAGE_TYPE).to_pylist() == rows


@_SETTINGS
@given(st.lists(st.tuples(_VISIBLE, st.one_of(st.none(), _TEXT), _VISIBLE), min_size=1, max_size=12))
def test_columnar_alpaca_ids_and_messages_equal_the_reference(rows):
    instruction, extra, output = (list(column) for column in zip(*rows))
    batch = pa.RecordBatch.from_pydict({"instruction": instruction, "input": pa.array(extra, pa.string()),
                                        "output": output})
    normal = normal_rows(batch, "alpaca")
    expected = [alpaca_to_messages(i, o, x) for i, x, o in rows]
    every = np.arange(len(rows))
    assert normal.clean.all()
    assert normal.ids(every).to_pylist() == [row_id(m) for m in expected]
    assert message_array(normal, every, {}, MESSAGE_TYPE).to_pylist() == expected


def test_message_array_everywhere_leaves_unwanted_rows_empty():
    rows = [[{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": f"a{k}"}] for k in range(5)]
    normal = normal_rows(pa.RecordBatch.from_pydict({"messages": pa.array(rows, CHAT_TYPE)}), "chat")
    built = message_array(normal, np.array([1, 3]), {}, MESSAGE_TYPE, everywhere=True)
    assert built.to_pylist() == [[], rows[1], [], rows[3], []]


# ----------------------------------------------------------------------------- bounded allocation
_PROBE = """
import json, sys, tracemalloc
import pyarrow as pa
from dpsel.data import validate_paths
tracemalloc.start()
summary = validate_paths(sys.argv[1], batch_rows=int(sys.argv[2]))
print(json.dumps({"rows": summary.rows, "python_peak": tracemalloc.get_traced_memory()[1],
                  "arrow_peak": pa.default_memory_pool().max_memory()}))
"""


def _pool(path: Path, rows: int) -> Path:
    """Distinct Alpaca rows of similar length (the data is the same at every size, only longer)."""
    k = np.arange(rows)
    pq.write_table(pa.table({"instruction": [f"question number {i} about item {i * 7919 % 1000}" for i in k],
                             "output": [f"answer {i}: the item is {i % 97} units long" for i in k]}),
                   path, row_group_size=512)
    return path


def _peaks(path: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, str(path), "512"], capture_output=True, text=True,
                          check=True, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_validate_peak_allocation_does_not_grow_with_rows(tmp_path):
    """Four times the rows, read in the same batches: the peak of Arrow's pool and of Python's traced
    allocations stays within a small factor (a per-row structure would make it ~4x); only the duplicate
    index (10 bytes of id + 8 of row number per distinct row) may grow. Both sizes have more batches than
    the reader holds at once (the caller's and those read ahead)."""
    small, large = _peaks(_pool(tmp_path / "small.parquet", 4000)), _peaks(_pool(tmp_path / "large.parquet", 16000))
    assert (small["rows"], large["rows"]) == (4000, 16000)
    assert large["arrow_peak"] <= 1.5 * small["arrow_peak"], (small, large)
    index_growth = 18 * 2 * (16000 - 4000)        # the duplicate index, counted twice for its merge copy
    assert large["python_peak"] <= 1.5 * small["python_peak"] + index_growth, (small, large)


@_SETTINGS
@given(st.lists(_TEXT, max_size=20), st.integers(0, 5))
def test_column_sha_ids_equal_the_per_row_hashlib_ids_on_sliced_columns(values, skip):
    column = pa.array(values, pa.large_string()).slice(min(skip, len(values)))
    assert sha_ids(column).to_pylist() == sha_ids_hashlib(column).to_pylist()
    assert sha_ids(column).type == pa.string()


def _shard(path: Path, rows: int, bad_row: int | None = None) -> Path:
    """An Alpaca shard of distinct rows in row groups of 10; `bad_row` holds bytes that are not UTF-8."""
    outputs = [f"answer {k}".encode() for k in range(rows)]
    if bad_row is not None:
        outputs[bad_row] = b"\xff\xfe broken"
    table = pa.table({"instruction": [f"question {k} of {path.stem}" for k in range(rows)],
                      "output": pa.array(outputs, pa.binary()).cast(pa.string(), safe=False)})
    pq.write_table(table, path, row_group_size=10)
    return path


def test_read_ahead_keeps_input_order_and_the_first_error_in_input_order(tmp_path):
    """Batches prepared ahead on worker threads still come out in input order with continuous row numbers, and
    a bad row is reported as the first error even when a later batch (read ahead) is also bad."""
    from dpsel.data import iter_batches
    from dpsel.errors import DpselInputError
    good = [_shard(tmp_path / f"{name}.parquet", 35) for name in ("a", "b")]
    seen = [(nb.start_row, nb.file.url.rsplit("/", 1)[-1]) for nb in iter_batches(good, batch_rows=10)]
    assert seen == [(k * 10 if k < 4 else 35 + (k - 4) * 10, "a.parquet" if k < 4 else "b.parquet")
                    for k in range(8)]
    bad = [_shard(tmp_path / "c.parquet", 40, bad_row=12), _shard(tmp_path / "d.parquet", 40, bad_row=37)]
    batches = iter_batches(bad, batch_rows=10)
    assert next(batches).start_row == 0            # the batch before the bad one arrives whole
    with pytest.raises(DpselInputError, match="row 12 of this file") as error:
        next(batches)
    assert "c.parquet" in str(error.value)


def test_a_reader_left_early_stops_its_threads(tmp_path):
    import threading
    from dpsel.data import iter_batches
    before = threading.active_count()
    batches = iter_batches([_shard(tmp_path / "a.parquet", 200)], batch_rows=10)
    next(batches)
    batches.close()
    assert threading.active_count() == before


def _ids_in_child(queue) -> None:
    queue.put(sha_ids(pa.array(["x", "y"], pa.large_string())).to_pylist())


def test_a_process_forked_after_hashing_still_hashes(tmp_path):
    """polars' thread pool does not survive a fork; a child forked after the parent hashed must not hang on it
    (it hashes with hashlib) and gets the same ids."""
    import multiprocessing
    expected = sha_ids(pa.array(["x", "y"] * 500, pa.large_string())).to_pylist()[:2]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_ids_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) == expected
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
