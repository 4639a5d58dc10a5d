"""`filter` streamed (dpsel.curation.stream): the same outputs as the whole input held at once, whatever the
batch size, and memory that does not grow with the rows beyond the allowed per-row state."""
from __future__ import annotations

import json
import random
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dpsel.curation.filter as filter_module
import dpsel.curation.stream as stream
from dpsel.curation import curate, filter_rows
from dpsel.stages.options import StagesConfig

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega river stone cloud paper garden window").split()


def _rows(n: int, seed: int) -> list[dict]:
    """Alpaca rows with near-duplicates (one word changed, often far apart), exact repeats, invalid rows, PII
    and a task column."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pick = rng.random()
        if rows and pick < 0.15:                       # a near-duplicate of any earlier row
            base = dict(rng.choice(rows))
            words = base["output"].split() or ["x"]
            words[rng.randrange(len(words))] = rng.choice(WORDS)
            row = {**base, "output": " ".join(words)}
        elif rows and pick < 0.22:                     # an exact repeat
            row = dict(rng.choice(rows))
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 40)))
            row = {"instruction": f"Explain item {i} {rng.choice(WORDS)}", "input": "", "output": text}
            if pick > 0.95:
                row["output"] += f" mail me at user{i}@example.com"
            if 0.93 < pick <= 0.95:
                row["output"] = " "                    # invalid
        rows.append({**row, "task": rng.choice(["qa", "code", "chat"])})
    return rows


def _shards(folder, rows: list[dict], parts: int) -> str:
    folder.mkdir(parents=True)
    size = -(-len(rows) // parts)
    for k in range(parts):
        pq.write_table(pa.Table.from_pylist(rows[k * size:(k + 1) * size]), folder / f"part-{k}.parquet")
    return str(folder)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    work = tmp_path_factory.mktemp("stream")
    meta = work / "meta.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": f"Question {i}", "input": "", "output": f"Answer {i}."}
                                         for i in range(40)]), meta)
    return curate(str(meta), str(meta), work / "run", method="random").out_dir / "scorer"


def _outputs(out) -> tuple[pa.Table, pa.Table, dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    facts = {k: manifest[k] for k in ("inputs", "method", "selection", "counts", "groups", "outputs")}
    facts["selection"].pop("run_id")
    return pq.read_table(out / "scores.parquet"), pq.read_table(out / "curated.parquet"), facts


def _whole(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as patch:
        patch.setattr(filter_module, "_streamable", lambda stages, plan: False)
        return filter_rows(*args, **kwargs)


@pytest.mark.parametrize("rule, pii", [({"threshold": 0.4}, "flag"), ({"budget": 0.6}, "redact"), ({}, "drop")])
def test_streamed_filter_writes_what_the_whole_input_gives(scorer, tmp_path, monkeypatch, rule, pii):
    inputs = _shards(tmp_path / "in", _rows(300, seed=2), parts=3)
    options = StagesConfig(pii=pii)
    whole = _whole(monkeypatch, scorer, inputs, tmp_path / "whole", stages=options, **rule)
    monkeypatch.setattr(stream, "BATCH_ROWS", 16)     # many batches per shard: near-dups far apart
    streamed = filter_rows(scorer, inputs, tmp_path / "streamed", stages=options, **rule)
    expected, got = _outputs(whole.out_dir), _outputs(streamed.out_dir)
    assert got[0].equals(expected[0]) and got[1].equals(expected[1])
    assert got[2] == expected[2]
    counts = got[2]["counts"]
    assert counts["input_rows"] == counts["kept_rows"] + counts["dropped_rows"] == 300
    by_reason = counts["dropped_by_reason"]
    assert by_reason["near_duplicate"] and by_reason["duplicate"] and by_reason["invalid"]   # the data has them
    assert got[0].schema.metadata[b"dpsel_run_id"] == streamed.manifest["run_id"].encode()
    assert (streamed.out_dir / "report.md").read_text().count("|") > 0
    assert not [p.name for p in streamed.out_dir.iterdir() if p.name.startswith(".")]   # no pending files


def _peak_filter(scorer, folder, rows: int, out) -> int:
    """Peak of Python's and Arrow's allocations while filtering `rows` generated rows. Arrow's are counted by a
    proxy pool of their own (the process pool's `max_memory` keeps whatever peak earlier tests reached)."""
    inputs = _shards(folder, _rows(rows, seed=3), parts=2)
    previous = pa.default_memory_pool()
    arrow = pa.proxy_memory_pool(previous)
    pa.set_memory_pool(arrow)
    tracemalloc.start()
    try:
        filter_rows(scorer, inputs, out, threshold=0.5)
        python = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)
    return python + arrow.max_memory()


def test_filter_memory_grows_only_by_the_small_per_row_state(scorer, tmp_path, monkeypatch):
    """From 2k to 8k rows, peak memory grows by the per-row state only (weights, flags, the near-dup signatures:
    ~250 B/row; measured ~330 B/row), not by the rows: the same input held as one batch grows ~2.4 kB/row here.
    A warm-up run first, so one-time allocations (caches, lazy imports) count in neither size."""
    def growth_per_row(batch_rows: int) -> float:
        monkeypatch.setattr(stream, "BATCH_ROWS", batch_rows)
        small = _peak_filter(scorer, tmp_path / f"small-{batch_rows}", 2000, tmp_path / f"out-small-{batch_rows}")
        large = _peak_filter(scorer, tmp_path / f"large-{batch_rows}", 8000, tmp_path / f"out-large-{batch_rows}")
        return (large - small) / 6000

    _peak_filter(scorer, tmp_path / "warm", 500, tmp_path / "out-warm")
    streamed, held = growth_per_row(500), growth_per_row(10**9)
    assert streamed < 800, streamed
    assert held > 3 * streamed, (held, streamed)   # the measure tells streaming from holding the input

@pytest.mark.parametrize("pii", ["flag", "redact"])
def test_curate_writes_curated_rows_in_parts_that_equal_one_table(scorer, tmp_path, monkeypatch, pii):
    """curate's curated.parquet is built a chunk of input rows at a time (`curated.curated_parts`): with chunks
    of 16 rows it has many row groups and the same rows, columns and run id as with one chunk."""
    import dpsel.curation.curated as curated_module
    train = _shards(tmp_path / "in", _rows(300, seed=4), parts=2)
    meta = scorer.parent.parent / "meta.parquet"
    options = StagesConfig(pii=pii)
    one = curate(train, str(meta), tmp_path / "one", method="random", budget=0.5, stages=options)
    monkeypatch.setattr(curated_module, "CHUNK_ROWS", 16)
    parts = curate(train, str(meta), tmp_path / "parts", method="random", budget=0.5, stages=options)
    whole, chunked = (pq.ParquetFile(run.out_dir / "curated.parquet") for run in (one, parts))
    assert whole.metadata.num_row_groups == 1 and chunked.metadata.num_row_groups > 10
    expected, got = whole.read(), chunked.read()
    assert got.num_rows == one.counts["kept_rows"] > 0
    assert got.schema.metadata[b"dpsel_run_id"] == parts.manifest["run_id"].encode()
    assert got.replace_schema_metadata(None).equals(expected.replace_schema_metadata(None))
    if pii == "redact":
        assert "[EMAIL]" in " ".join(m["content"] for row in got.column("messages").to_pylist() for m in row)
