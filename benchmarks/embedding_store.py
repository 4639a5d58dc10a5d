"""Why the embedding store is raw float16 vectors + Arrow key streams (issue 29): the SQLite blob cache it
replaced against the store in float32 and float16, on the same random unit vectors: bytes per row on disk,
write rows/s (chunk by chunk, each chunk durable, as an encode stores them), read rows/s (look every row up by
id and read it back whole) and a chunked pass (what bads does). Writes benchmarks/results/embedding_store.{json,md}.

    python benchmarks/embedding_store.py [--rows 100000] [--dim 384] [--repeats 3]
"""
from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from stats import ratio, table, write_report  # noqa: E402
from dpsel.models.embedding_store import Column, EmbeddingStore  # noqa: E402

CHUNK = 1024   # rows per durable write, as ENCODE_CHUNK_ROWS


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def sqlite_case(ids: list[str], vectors: np.ndarray, work: Path) -> dict:
    """The replaced cache: one table of (key, float32 blob), committed per chunk, read back 500 keys a query."""
    db = sqlite3.connect(work / "emb.sqlite")
    db.execute("CREATE TABLE emb (key TEXT PRIMARY KEY, vec BLOB)")
    started = time.perf_counter()
    for start in range(0, len(ids), CHUNK):
        db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)",
                       [(ids[j], vectors[j].tobytes()) for j in range(start, min(start + CHUNK, len(ids)))])
        db.commit()
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    out = np.empty_like(vectors)
    position = {key: j for j, key in enumerate(ids)}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        hits = db.execute(f"SELECT key, vec FROM emb WHERE key IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        out[[position[k] for k, _ in hits]] = np.frombuffer(b"".join(v for _, v in hits), np.float32).reshape(
            len(hits), -1)
    read_s = time.perf_counter() - started
    db.close()
    assert np.array_equal(out, vectors)
    return {"write_s": write_s, "read_s": read_s, "chunked_s": read_s, "bytes": folder_bytes(work)}


def store_case(ids: list[str], vectors: np.ndarray, work: Path, dtype: str) -> dict:
    store = EmbeddingStore(work, dtype)
    writer = store.writer()
    started = time.perf_counter()
    for start in range(0, len(ids), CHUNK):
        writer.append(ids[start:start + CHUNK], vectors[start:start + CHUNK])
    writer.close()
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    segments = store.segments()
    column = Column(segments, *store.locate(ids, segments), segments[0].dim)
    whole = column.to_array()
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    total = sum(float(part[:, 0].sum()) for _, part in column.chunks())
    chunked_s = time.perf_counter() - started
    assert np.allclose(whole, vectors, atol=1e-3) and np.isfinite(total)
    return {"write_s": write_s, "read_s": read_s, "chunked_s": chunked_s, "bytes": folder_bytes(work)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "embedding_store")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"sqlite float32": [], "store float32": [], "store float16": []}
    for seed in range(args.repeats):
        rng = np.random.default_rng(seed)
        vectors = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = [f"{seed}-{i:016x}" for i in rng.permutation(args.rows)]
        for case in results:
            work = Path(tempfile.mkdtemp(prefix="dpsel-store-bench-"))
            try:
                results[case].append(sqlite_case(ids, vectors, work) if case.startswith("sqlite") else
                                     store_case(ids, vectors, work, case.split()[1]))
            finally:
                shutil.rmtree(work)
    summary = {case: {"bytes_per_row": float(np.median([r["bytes"] for r in runs])) / args.rows,
                      **{f"{k}_rows_per_s": float(np.median([args.rows / r[f"{k}_s"] for r in runs]))
                         for k in ("write", "read", "chunked")}} for case, runs in results.items()}
    base = summary["sqlite float32"]
    rows = [[case, round(s["bytes_per_row"]), f"{s['write_rows_per_s']:,.0f}", f"{s['read_rows_per_s']:,.0f}",
             f"{s['chunked_rows_per_s']:,.0f}", ratio(s["bytes_per_row"], base["bytes_per_row"], 2),
             ratio(s["read_rows_per_s"], base["read_rows_per_s"], 1)] for case, s in summary.items()]
    md = "\n".join(["# Embedding store vs the SQLite blob cache (benchmarks/embedding_store.py)", "",
                    f"{args.rows:,} rows of dim {args.dim}, median of {args.repeats} seeds; written {CHUNK} rows a "
                    "durable chunk; read = every row looked up by id and read back; chunked = a pass in 65,536-row "
                    "chunks after the lookup.", "",
                    *table(["format", "bytes/row on disk", "write rows/s", "read rows/s", "chunked rows/s",
                            "bytes × sqlite", "read × sqlite"], rows, align="lrrrrrr")]) + "\n"
    write_report(args.out, {"rows": args.rows, "dim": args.dim, "repeats": args.repeats, "summary": summary,
                            "runs": results}, md)
    print(md)


if __name__ == "__main__":
    main()
