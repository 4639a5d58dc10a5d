"""The on-disk embedding store (dpsel/models/embedding_store.py): chunked reads equal whole reads, a killed
writer keeps every chunk it finished, concurrent writers and compaction lose no row."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import zlib

import numpy as np

from dpsel.models.embedder import Embedder, EmbeddingCache
from dpsel.models.embedding_store import EmbeddingStore


class Hashing:
    """A stand-in model: a text's vector is a fixed function of the text (no weights to load)."""
    def __init__(self):
        self.encoded = 0

    def encode(self, texts, **_):
        self.encoded += len(texts)
        return np.array([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(8) for t in texts], np.float32)


def _cache(root, dtype="float16"):
    return EmbeddingCache(Embedder("hashing", Hashing(), {"w": "1" * 64}, {}), root=root, dtype=dtype)


def test_chunked_and_gathered_reads_equal_the_whole_read(tmp_path):
    ids = [f"r{i}" for i in range(50)]
    cache = _cache(tmp_path)
    cache.column(ids[:20], ids[:20], "q", chunk_rows=7)             # two writer sessions: two segments
    column = cache.column(ids, ids, "q", chunk_rows=9)
    assert len({s for s in column.segment_of}) == 2
    whole = column.to_array()
    np.testing.assert_array_equal(np.vstack([part for _, part in column.chunks(size=6)]), whole)
    order = np.random.default_rng(0).permutation(50)
    np.testing.assert_array_equal(column.rows(order), whole[order])
    expected = Hashing().encode(ids).astype(np.float16).astype(np.float32)   # stored as float16, read as float32
    np.testing.assert_array_equal(whole, expected)


def test_a_killed_embedding_run_resumes_without_recomputing_stored_rows(tmp_path):
    """A writer killed (SIGKILL) mid-run: the chunks it finished are read back, the re-run encodes the rest."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.getcwd()!r})
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from pathlib import Path
        from test_embedding_store import _cache
        ids = [f"r{{i}}" for i in range(40)]
        def progress(done, total, diag):
            if done == 24:
                os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no close: as an OOM kill or a pulled plug
        _cache(Path({str(tmp_path)!r})).column(ids, ids, "q", progress, chunk_rows=8)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    cache = _cache(tmp_path)
    ids = [f"r{i}" for i in range(40)]
    column = cache.column(ids, ids, "q", chunk_rows=8)
    assert cache.stats["cached"] == 24 and cache.stats["encoded"] == 16 == cache.embedder.model.encoded
    np.testing.assert_array_equal(column.to_array(), _cache(tmp_path / "fresh").embed(ids, ids, "q"))


def test_a_torn_key_batch_is_ignored(tmp_path):
    """Bytes of a half-written last key batch (a kill inside the write): the whole batches still read."""
    store = EmbeddingStore(tmp_path)
    writer = store.writer()
    writer.append(["a", "b"], np.ones((2, 4)))
    writer.append(["c"], np.full((1, 4), 2.0))
    writer.close()
    keys = next(tmp_path.glob("*.keys"))
    keys.write_bytes(keys.read_bytes()[:-20])
    [segment] = store.segments()
    assert segment.keys.to_pylist() == ["a", "b"]
    np.testing.assert_array_equal(segment.vectors, np.ones((2, 4)))


def test_concurrent_writers_and_compaction_keep_every_row(tmp_path):
    store = EmbeddingStore(tmp_path, "float32")
    writers = [store.writer() for _ in range(3)]     # open at once, as three workers would
    for w, writer in enumerate(writers):
        writer.append([f"r{i}" for i in range(w, 30, 3)], np.arange(w, 30, 3, dtype=np.float32)[:, None] * [1, 1])
    writers[0].append(["r0"], np.zeros((1, 2)))     # a row two writers computed: kept once
    for writer in writers:
        writer.close()
    ids = [f"r{i}" for i in range(30)]
    assert not store.compact(min_segments=4) and len(store.segments()) == 3
    assert store.compact(min_segments=3) and len(store.segments()) == 1
    segments = store.segments()
    segment_of, offset = store.locate(ids, segments)
    assert (segment_of == 0).all() and len(segments[0].keys) == 30
    np.testing.assert_array_equal(segments[0].vectors[offset][:, 0], np.arange(30))


def _rss_file_mb() -> int | None:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) // 1024
    return None


def test_scattered_reads_equal_the_stored_rows_and_map_nothing(tmp_path):
    """A sampler gathers a few scattered rows per step: through the memory map each one faulted in a large folio,
    so a run made the whole store resident (issue 29); `preadv` reads leave the process's RSS alone."""
    store = EmbeddingStore(tmp_path / "store")
    writer = store.writer()
    rows, dim = 40_000, 256                                # 20 MB of float16
    vectors = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float16)
    for start in range(0, rows, 10_000):
        writer.append([f"r{i}" for i in range(start, start + 10_000)], vectors[start:start + 10_000])
    writer.close()
    segment = store.segments()[0]
    picks = np.random.default_rng(1).integers(0, rows, (200, 50))
    before = _rss_file_mb()
    for idx in picks:
        np.testing.assert_array_equal(segment.read(idx), vectors[idx])
    after = _rss_file_mb()
    if before is not None:
        assert after - before < 8, f"scattered reads made {after - before} MB of the store resident"
    # unordered, repeated and consecutive rows in one read, and none at all
    idx = np.array([5, 3, 4, 5, 39_999, 0, 1, 2])
    np.testing.assert_array_equal(segment.read(idx), vectors[idx])
    assert segment.read(np.array([], np.int64)).shape == (0, dim)
