"""The columnar data path against the per-row reference: same ids, reasons and details on hostile
mixed input (pinned from the per-row implementation it replaced), the compact duplicate index, and the
streaming validate summary (pinned from the whole-list implementation it replaced)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from dpsel.data import SeenIds, iter_batches, read_instruction_set, reference_row, validate_paths
from dpsel.data.stats import length_stats
from dpsel.errors import DpselInputError

MSG_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
WS = "\u3000\u2028\x1c\x85\xa0 \t"


def hostile_alpaca() -> pa.Table:
    instruction = ["Add 2 and 3.", "Add 2 and 3.", None, WS, "q\"uote\\ \x01\x1f\u2028 ünï 😀", "ok", "ok",
                   "ok", "x" * 100_001, "dup", "dup", "", "tab\there", "ok", None, "ok"]
    inp = [None, "", "ctx", "ctx", "\n", "", None, " ", None, "in", "in", None, "\r\n", WS, None, "\x00"]
    output = ["5", "5", "a", "a", "b\\\"\n", None, "", WS, "z", "same", "same", "o", "\b\f", "y", None,
              "x" * 100_001]
    return pa.table({"instruction": instruction, "input": inp, "output": output,
                     "task": ["a", None, "b", "b", "c", "a", "a", "a", "b", "c", "c", "a", "b", "b", "a", "c"],
                     "n": pa.array(range(16), pa.int32())})


def _m(*pairs):
    return [None if p is None else {"role": p[0], "content": p[1]} for p in pairs]


def hostile_chat() -> pa.Table:
    rows = [_m(("user", "q"), ("assistant", "a")), None, [], _m(("user", "q")),
            _m(("user", "q"), ("robot", "a")), _m(("user", "q"), ("assistant", None)),
            _m(("user", "q"), ("assistant", WS)), _m(("system", "s"), ("assistant", "a")),
            _m(("user", "q"), None), _m(("user", "q"), ("assistant", "a")),
            _m(("system", ""), ("user", "q\"\\\x02"), ("assistant", "a\n😀")),
            _m((None, "q"), ("assistant", "a")), _m(("user", None), ("assistant", "a")),
            _m(("user", "x" * 100_001), ("assistant", "a")), _m(("user", "q2"), ("assistant", "a"), ("user", "more"),
                                                                 ("assistant", "b")),
            _m(("assistant", "a"), ("user", "q"), ("assistant", "b")), _m(("user", "q"), ("assistant", "a"))]
    ids = [None, "given-id", "", None, None, None, None, None, None, "abcdefabcdefabcdef01", None, None, None,
           None, None, "abcdefabcdefabcdef01", None]
    return pa.table({"messages": pa.array(rows, MSG_TYPE), "dpsel_id": ids,
                     "source": [f"s{i % 3}" for i in range(len(rows))]})


# (dpsel_id, dpsel_reason, dpsel_detail) per row, as the per-row implementation (before the columnar
# path) produced them for the tables above read with row groups of 5.
PINNED_ALPACA = [
    ('beb23255e5f6376898cf', '', ''),
    ('beb23255e5f6376898cf', 'duplicate', 'same content as input row 0'),
    ('1e3c6b38dc933e916780', 'invalid', 'null instruction'),
    ('2cf1cec267f9595710ad', 'invalid', 'empty instruction'),
    ('0827865ec573faba4601', '', ''),
    ('526ed70bfca55e74a35e', 'invalid', 'null output'),
    ('83b6ccdd209f91d84e53', 'invalid', 'empty output'),
    ('e316518ce7a775fe35e5', 'invalid', 'empty output'),
    ('1101fee8255c92f98d82', 'invalid', 'user message 0 has 100001 chars (limit 100000)'),
    ('4e0370f9e64a1b55c96a', '', ''),
    ('4e0370f9e64a1b55c96a', 'duplicate', 'same content as input row 9'),
    ('40b4e9e6dbd57ab93ed2', 'invalid', 'empty instruction'),
    ('821cf93a9409e5507cae', '', ''),
    ('296dae03c529b9a43107', '', ''),
    ('4741e2d6aaccbaab7c64', 'invalid', 'null instruction'),
    ('9c393f6fb985f1b93738', 'invalid', 'assistant message 1 has 100001 chars (limit 100000)'),
]
PINNED_CHAT = [
    ('b97259b5ad9ab7fb90ca', '', ''),
    ('given-id', 'invalid', 'messages is null'),
    ('4f53cda18c2baa0c0354', 'invalid', 'no messages'),
    ('7be60628a3ca0c783ea8', 'invalid', "last message is from 'user', not the assistant"),
    ('4a497edf9018f9b8ccb0', 'invalid', "message 1 has role 'robot'; expected one of ['system', 'user', 'assistant']"),
    ('1f0731aefe914fec311b', 'invalid', 'message 1 (assistant) has null content'),
    ('fee5746bf97c5d5cfba7', 'invalid', 'message 1 (assistant) is empty (empty output)'),
    ('3e1ef53e4a830a35a760', 'invalid', 'no user message'),
    ('7be60628a3ca0c783ea8', 'invalid', 'message 1 is null'),
    ('abcdefabcdefabcdef01', '', ''),
    ('fc5c6149978355258625', '', ''),
    ('bb52e93aedba3bb23ce7', 'invalid', "message 0 has role None; expected one of ['system', 'user', 'assistant']"),
    ('88a3a071ba5acec9e853', 'invalid', 'message 0 (user) has null content'),
    ('1366fadef564b0824002', 'invalid', 'user message 0 has 100001 chars (limit 100000)'),
    ('7160fbf8d7bb76d7dbf7', '', ''),
    ('abcdefabcdefabcdef01', 'duplicate', 'same content as input row 9'),
    ('b97259b5ad9ab7fb90ca', 'duplicate', 'same content as input row 0'),
]


def write(table: pa.Table, path: Path, row_group_size: int = 5) -> Path:
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def reference(table: pa.Table, shape: str) -> list[tuple]:
    """The oracle: every row through the per-row reference, dedup with a dict, as the old reader did."""
    first: dict[str, int] = {}
    out = []
    for index, row in enumerate(table.to_pylist()):
        _, problem, rid = reference_row(shape, row)
        if problem is not None:
            out.append((rid, "invalid", problem.detail))
        elif rid in first:
            out.append((rid, "duplicate", f"same content as input row {first[rid]}"))
        else:
            first[rid] = index
            out.append((rid, "", ""))
    return out


def columnar(path) -> list[tuple]:
    data = read_instruction_set(path)
    return list(zip(data.id_list(), data.reasons.tolist(), data.details.to_pylist()))


@pytest.mark.parametrize("shape, table, pinned", [("alpaca", hostile_alpaca(), PINNED_ALPACA),
                                                   ("chat", hostile_chat(), PINNED_CHAT)])
def test_columnar_path_matches_the_per_row_reference_on_hostile_input(tmp_path, shape, table, pinned):
    path = write(table, tmp_path / "h.parquet")
    assert columnar(path) == pinned == reference(table, shape)
    streamed = [(i, r, d) for b in iter_batches(path, batch_rows=3) for i, r, d in zip(b.ids, b.reasons, b.details)]
    assert streamed == pinned
    data = read_instruction_set(path)
    expected = [reference_row(shape, row)[0] for row in table.to_pylist()]
    assert data.messages() == expected
    assert data.messages(data.usable_mask()) == [m for m, r in zip(expected, data.reasons) if r == ""]
    assert data.counts()["input_rows"] == sum(data.counts()[k] for k in ("usable", "invalid", "duplicate"))
    assert data.duplicate_of.tolist() == [int(d.rsplit(" ", 1)[1]) if r == "duplicate" else -1
                                          for _, r, d in pinned]


def test_invalid_row_in_validate_names_the_same_row_as_the_reference(tmp_path):
    path = write(hostile_alpaca(), tmp_path / "h.parquet")
    with pytest.raises(DpselInputError, match=r"null instruction \(input row 2; row 2 of this file\)"):
        validate_paths(path, batch_rows=2)


_TEXT = st.text(alphabet=st.sampled_from(list("ab \t\n\"\\\x00\x1f\x85\xa0\u3000\u2028é😀")), max_size=6)


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(st.none() | _TEXT, st.none() | _TEXT, st.none() | _TEXT), min_size=1, max_size=12))
def test_columnar_path_matches_the_reference_on_generated_alpaca_rows(tmp_path_factory, rows):
    table = pa.table({"instruction": pa.array([r[0] for r in rows], pa.string()),
                      "input": pa.array([r[1] for r in rows], pa.string()),
                      "output": pa.array([r[2] for r in rows], pa.string())})
    path = write(table, tmp_path_factory.mktemp("g") / "g.parquet", row_group_size=4)
    assert columnar(path) == reference(table, "alpaca")


_ROLE = st.sampled_from(["user", "assistant", "system", "robot"]) | st.none()
_MESSAGE = st.none() | st.builds(lambda r, c: {"role": r, "content": c}, _ROLE, st.none() | _TEXT)


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.none() | st.lists(_MESSAGE, max_size=4), min_size=1, max_size=10))
def test_columnar_path_matches_the_reference_on_generated_chat_rows(tmp_path_factory, rows):
    table = pa.table({"messages": pa.array(rows, MSG_TYPE)})
    path = write(table, tmp_path_factory.mktemp("g") / "g.parquet", row_group_size=3)
    assert columnar(path) == reference(table, "chat")


def test_seen_ids_is_exact_for_near_collisions_repeats_in_a_batch_and_other_spellings():
    seen = SeenIds()
    same_hi = ["0123456789abcdef0000", "0123456789abcdef0001", "0123456789abcdef0000"]
    first = seen.first_rows(same_hi + ["mine", "mine"], np.array([10, 11, 12, 13, 14]), np.ones(5, bool))
    assert first.tolist() == [-1, -1, 10, -1, 13]
    first = seen.first_rows(["0123456789abcdef0001", "0123456789abcdef0002", "mine", "MINE"],
                            np.array([20, 21, 22, 23]), np.array([True, False, True, True]))
    assert first.tolist() == [11, -1, 13, -1]
    # not registered (an invalid row): still new next time
    assert seen.first_rows(["0123456789abcdef0002"], np.array([30]), np.ones(1, bool)).tolist() == [-1]
    assert len(seen) == 5


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(0, 50), max_size=40))
def test_length_stats_from_counts_equal_numpy_percentiles(values):
    stats = length_stats(Counter(values))
    if not values:
        assert stats == {"p50": 0, "p90": 0, "p99": 0, "max": 0}
        return
    assert stats == {f"p{q}": int(np.percentile(np.asarray(values), q)) for q in (50, 90, 99)} | {"max": max(values)}


def validate_shards(folder: Path, shape: str) -> Path:
    """Three clean shards: duplicates across files, unicode, whitespace inputs, nulls in carried columns."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        k = range(7 * i, 7 * i + 7)
        carried = {"task": [None if j % 5 == 0 else f"t{j % 2}" for j in k],
                   "source": pa.array([j % 3 for j in k], pa.int64())}
        if shape == "alpaca":
            columns = {"instruction": [f"Q{j % 9} ünï 😀" + "x" * (j % 9 * 3) for j in k],
                       "input": [None if j % 3 == 0 else "" if j % 3 == 1 else "ctx\t" * (j % 4) for j in k],
                       "output": [f"A{j % 9}" + "\n" * (j % 2) for j in k]}
        else:
            columns = {"messages": pa.array([[{"role": "system", "content": "s" * (j % 4)},
                                              {"role": "user", "content": f"Q{j % 8}" + "é" * j},
                                              {"role": "assistant", "content": "A" * (j % 8 + 1)}][j % 2:]
                                             for j in k], MSG_TYPE)}
        pq.write_table(pa.table(columns | carried), folder / f"part-{i}.parquet", row_group_size=3)
    return folder


# validate_paths' summaries of the shards above, as the whole-list implementation (before streaming) gave them.
PINNED_SUMMARIES = {
    "alpaca": {"rows": 21, "null_counts": {"instruction": 0, "input": 7, "output": 0, "task": 5, "source": 0},
               "empty_counts": {"instruction": 0, "input": 9, "output": 0, "task": 0, "source": 0},
               "prompt_chars": {"p50": 20, "p90": 32, "p99": 37, "max": 38},
               "response_chars": {"p50": 2, "p90": 3, "p99": 3, "max": 3}, "duplicates": 2,
               "groups": {"task": {"None": 5, "t1": 8, "t0": 8}, "source": {"0": 7, "1": 7, "2": 7}}},
    "chat": {"rows": 21, "null_counts": {"messages": 0, "task": 5, "source": 0},
             "empty_counts": {"messages": 0, "task": 0, "source": 0},
             "prompt_chars": {"p50": 13, "p90": 21, "p99": 22, "max": 22},
             "response_chars": {"p50": 4, "p90": 7, "p99": 8, "max": 8}, "duplicates": 0,
             "groups": {"task": {"None": 5, "t1": 8, "t0": 8}, "source": {"0": 7, "1": 7, "2": 7}}},
}


@pytest.mark.parametrize("shape", ["alpaca", "chat"])
@pytest.mark.parametrize("batch_rows", [2, 8192])
def test_streaming_validate_gives_the_same_summary_as_before_on_shards(tmp_path, shape, batch_rows):
    summary = validate_paths(validate_shards(tmp_path / "v", shape), batch_rows=batch_rows).as_dict()
    assert summary["shape"] == shape
    assert [(Path(url).name, rows) for url, rows in summary["files"]] == [(f"part-{i}.parquet", 7) for i in range(3)]
    assert {k: summary[k] for k in PINNED_SUMMARIES[shape]} == PINNED_SUMMARIES[shape]


def test_other_arrow_spellings_of_the_columns_give_the_same_rows(tmp_path):
    """large_list / large_string / dictionary-encoded roles, and a control character JSON spells \\u0001."""
    item = pa.struct([("role", pa.dictionary(pa.int8(), pa.string())), ("content", pa.large_string())])
    rows = [_m(("user", "q"), ("assistant", "a")), None, _m(("user", "x\x01"), ("assistant", "b")),
            _m(("system", "s"), ("user", "q"), ("assistant", "a"))]
    table = pa.table({"messages": pa.array(rows, pa.list_(item)).cast(pa.large_list(item))})
    path = write(table, tmp_path / "c.parquet")
    assert columnar(path) == reference(pq.read_table(path), "chat")
    alpaca = pa.table({"instruction": pa.array(["q\x01", "q"], pa.large_string()),
                       "output": pa.array(["a", "b"]).dictionary_encode()})
    path = write(alpaca, tmp_path / "a.parquet")
    assert columnar(path) == reference(pq.read_table(path), "alpaca")
