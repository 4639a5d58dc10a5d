"""The workers of benchmarks/dedup.py, one process each (peak RSS = that process's max resident set):
dpsel's near-dup (and decontamination) in dpsel's venv, datatrove and Data-Juicer in the peers' venv,
and the near-dup state check at 1M rows. Each reads the pool folder and writes `<name>.json` there."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

THRESHOLD = 0.8
ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> float:
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def _eval_rows(folder: Path, batch_type):
    """evals.json (plain texts) or evals.parquet (chat rows): as this dpsel's Decontaminate takes them. The
    previous code (no `EvalRows`) took the normalised conversations, system turns included, as its CLI did."""
    if not (folder / "evals.parquet").exists():
        return json.loads((folder / "evals.json").read_text())
    table = pq.read_table(folder / "evals.parquet")
    try:
        from dpsel.stages.decontaminate import EvalRows
    except ImportError:
        return batch_type(table).text
    messages = table.column("dpsel_messages").combine_chunks()
    return EvalRows.from_messages(table.column("dpsel_id").to_pylist(), ["evals.parquet"] * len(table), messages)


def worker_dpsel(folder: Path, threshold: float = THRESHOLD) -> dict:
    """dpsel's near-dup then decontamination; DPSEL_ROOT (default: this checkout) picks the code, e.g. a
    worktree of an earlier commit."""
    sys.path.insert(0, os.environ.get("DPSEL_ROOT", str(ROOT)))
    from dpsel.stages.base import ConversationBatch
    from dpsel.stages.decontaminate import Decontaminate
    from dpsel.stages.near_dup import NearDup
    table = pq.read_table(folder / "pool.parquet")
    evals = _eval_rows(folder, ConversationBatch)
    started = time.perf_counter()
    block = NearDup(threshold)
    verdict = block(ConversationBatch(table))
    seconds = time.perf_counter() - started
    near_dup_peak = _peak_rss_mb()
    started = time.perf_counter()
    contaminated = Decontaminate(evals)(ConversationBatch(table))
    decon_seconds = time.perf_counter() - started
    flagged = np.flatnonzero(contaminated.reason != "")
    details = contaminated.detail if getattr(contaminated, "detail", None) is not None else [None] * len(table)
    dropped = np.flatnonzero(verdict.reason != "")
    return {"dropped": dropped.tolist(), "seconds": seconds,
            "dup_of": [int(verdict.dup_of[i]) if verdict.dup_of[i] is not None else -1 for i in dropped],
            "contam_detail": {int(i): details[i] for i in flagged[:5000]},
            "state_bytes_per_row": block.index.nbytes / max(len(block.index), 1), "near_dup_peak_rss_mb": near_dup_peak,
            "declared_bytes_per_row": block.bytes_per_row, "bands": [block.bands, block.band_rows],
            "contaminated": np.flatnonzero(contaminated.reason != "").tolist(), "decon_seconds": decon_seconds}


def worker_datatrove(folder: Path) -> dict:
    """datatrove's 4-stage MinHash pipeline (signatures, buckets, clusters, filter), one task per stage
    (buckets: one task per bucket), run by LocalPipelineExecutor with one worker."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    config = MinhashConfig(n_grams=5, num_buckets=DATATROVE_BANDS[0], hashes_per_bucket=DATATROVE_BANDS[1])
    work = folder / "datatrove"
    reader = lambda: JsonlReader(str(folder), glob_pattern="pool.jsonl", id_key="id")  # noqa: E731
    started = time.perf_counter()
    for pipeline, tasks in (
            ([reader(), MinhashDedupSignature(output_folder=str(work / "sigs"), config=config)], 1),
            ([MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"),
                                  config=config)], config.num_buckets),
            ([MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"),
                                  config=config)], 1),
            ([reader(), MinhashDedupFilter(input_folder=str(work / "remove"),
                                           exclusion_writer=JsonlWriter(str(work / "removed"), compression=None)),
              JsonlWriter(str(work / "kept"), compression=None)], 1)):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(work / "logs"),
                              skip_completed=False).run()
    seconds = time.perf_counter() - started
    removed = [json.loads(line)["id"] for f in sorted((work / "removed").glob("*.jsonl")) for line in f.open()]
    out = {"dropped": sorted(int(i) for i in removed), "seconds": seconds, "bands": list(DATATROVE_BANDS)}
    return out | (_datatrove_decont(folder, reader) if (folder / "evals.parquet").exists() else {})


def _datatrove_decont(folder: Path, reader) -> dict:
    """datatrove's NGramsDecontFilter at its defaults (12-grams of the eval answer and of the question/answer
    seam, any hit flags the document). Its indexer's `run` loads lighteval tasks (not installed, and not our
    evals), so the index is built with the indexer's own `compute_hashes(answer, question)` per eval row, the
    hashing `run` applies to documents given as input."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.decont import NGramsDecontFilter, NGramsDecontIndexer
    from datatrove.pipeline.writers import JsonlWriter
    evals = pq.read_table(folder / "evals.parquet").column("dpsel_messages").to_pylist()
    work = folder / "datatrove_decont"
    (work / "index").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    NGramsDecontIndexer._requires_dependencies = []        # lighteval: only its `run` needs it
    indexer = NGramsDecontIndexer(output_folder=str(work / "index"))
    hashes = set()
    for messages in evals:
        by_role = {r: "\n".join(m["content"] for m in messages if m["role"] == r) for r in ("user", "assistant")}
        hashes.update(indexer.compute_hashes(by_role["assistant"], by_role["user"]))
    np.array(sorted(hashes), dtype=indexer.config.hash_config.np_descr).tofile(work / "index" / "evals.index.hashes")
    LocalPipelineExecutor(pipeline=[reader(), NGramsDecontFilter(str(work / "index"), exclusion_writer=JsonlWriter(
        str(work / "removed"), compression=None))], tasks=1, workers=1, logging_dir=str(work / "logs"),
        skip_completed=False).run()
    removed = [json.loads(line)["id"] for f in sorted((work / "removed").glob("*.jsonl")) for line in f.open()]
    return {"contaminated": sorted(int(i) for i in removed), "decon_seconds": time.perf_counter() - started}


def worker_data_juicer(folder: Path) -> dict:
    """Data-Juicer's DocumentMinhashDeduplicator (space tokens, 5-word windows, its default 256
    permutations, bands from its own optimisation at jaccard_threshold=THRESHOLD)."""
    from data_juicer.core.data import NestedDataset
    from data_juicer.ops.deduplicator import DocumentMinhashDeduplicator
    from datasets import Dataset
    rows = [json.loads(line) for line in (folder / "pool.jsonl").open()]
    dataset = NestedDataset(Dataset.from_dict({"text": [r["text"] for r in rows], "id": [int(r["id"]) for r in rows]}))
    started = time.perf_counter()
    op = DocumentMinhashDeduplicator(tokenization="space", window_size=5, lowercase=True,
                                     ignore_pattern=r"[^\w\s]", jaccard_threshold=THRESHOLD)
    hashed = dataset.map(op.compute_hash, num_proc=1)
    kept, _ = op.process(hashed, 0)
    seconds = time.perf_counter() - started
    left = set(kept["id"])
    return {"dropped": [i for i in range(len(rows)) if i not in left], "seconds": seconds,
            "bands": [op.num_bands, op.num_rows_per_band]}


def worker_state(folder: Path, rows: int = 1_000_000) -> dict:
    """The near-dup state and clustering at `rows` rows without the text: random signatures, 20% of the
    rows copies of others; numpy's allocations traced (tracemalloc) from the index to the verdict."""
    import tracemalloc
    sys.path.insert(0, str(ROOT))
    from dpsel.stages.near_dup import NearDup, NearDupIndex
    block, rng = NearDup(THRESHOLD), np.random.default_rng(0)
    tracemalloc.start()
    index = NearDupIndex(np.array([f"{i:020d}".encode() for i in range(rows)], "S20"),
                         rng.integers(0, 2**32, (rows, block.bands), dtype=np.uint32),
                         rng.integers(0, 256, (rows, block.num_perm), dtype=np.uint8))
    copies = rng.choice(rows, rows // 5, replace=False)
    index.bands[copies], index.sketch[copies] = index.bands[copies // 2], index.sketch[copies // 2]
    state = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    started = time.perf_counter()
    keeper = block._keepers(index, np.zeros(rows, bool))
    index.compact(np.flatnonzero(keeper == np.arange(rows)))
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    return {"rows": rows, "state_bytes_per_row": state / rows, "peak_bytes_per_row": peak / rows,
            "cluster_seconds": seconds, "dropped": int((keeper != np.arange(rows)).sum()), "kept_rows": len(index)}


# dpsel at the midpoint of datatrove's default S-curve, (1/14)**(1/8) = 0.72: what a looser threshold buys
LOOSE = round((1 / 14) ** (1 / 8), 2)
WORKERS = {"dpsel": worker_dpsel, "dpsel_base": worker_dpsel, f"dpsel@{LOOSE}": lambda folder: worker_dpsel(folder, LOOSE),
           "state": worker_state, "datatrove": worker_datatrove, "data_juicer": worker_data_juicer}
DATATROVE_BANDS = (14, 8)     # datatrove's defaults (S-curve midpoint ~0.72)


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_worker(name: str, folder: Path, state_rows: int) -> None:
    baseline = _rss_now_mb()
    result = WORKERS[name](folder, state_rows) if name == "state" else WORKERS[name](folder)
    result |= {"start_rss_mb": baseline, "peak_rss_mb": result.pop("near_dup_peak_rss_mb", None) or _peak_rss_mb()}
    (folder / f"{name}.json").write_text(json.dumps(result))
