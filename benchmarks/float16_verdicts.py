"""Does storing embeddings in float16 change bads' verdicts? (issue 29: at most 0.5% of rows may flip.)
`curate --method bads --embedder static` on synth dev pools, once with the store in float16 (the default) and
once in float32, same seed; the share of rows kept by one and dropped by the other. Writes
benchmarks/results/float16_verdicts.{json,md}.

    python benchmarks/float16_verdicts.py [--rows 4000] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from stats import table, write_report  # noqa: E402


def kept_ids(train: Path, meta: Path, out: Path, dtype: str, seed: int) -> set[str]:
    import dpsel.models.embedder as embedder_module
    from dpsel.config import SelectConfig
    from dpsel.curation.run import curate
    embedder_module.EmbeddingCache.__init__.__defaults__ = (None, dtype)   # the store's dtype for this run
    curate(train, meta, out, method="bads", config=SelectConfig(embedder="static", seed=seed))
    return set(pq.read_table(out / "curated.parquet", columns=["dpsel_id"]).column(0).to_pylist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "float16_verdicts")
    args = parser.parse_args()
    from dpsel.synth import generate
    started, runs = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="dpsel-f16-") as work:
        work = Path(work)
        for seed in args.seeds:
            paths = generate(work / f"synth-{seed}", rows=args.rows, meta_rows=200, test_rows=10, seed=seed)
            half, full = (kept_ids(paths["train"], paths["meta"], work / f"{dtype}-{seed}", dtype, seed)
                          for dtype in ("float16", "float32"))
            flipped = len(half ^ full)
            runs.append({"seed": seed, "rows": args.rows, "kept_float16": len(half), "kept_float32": len(full),
                         "flipped": flipped, "flipped_share": flipped / args.rows})
    worst = max(r["flipped_share"] for r in runs)
    md = "\n".join(["# float16 vs float32 embedding store: bads verdicts (benchmarks/float16_verdicts.py)", "",
                    f"`curate --method bads --embedder static` on synth pools of {args.rows:,} rows (200 meta rows), "
                    f"store in float16 vs float32, same seed; {time.perf_counter() - started:.0f} s. Target: at most "
                    f"0.5% of rows flip. Worst: {100 * worst:.2f}%.", "",
                    *table(["seed", "kept (float16)", "kept (float32)", "rows flipped", "share"],
                           [[r["seed"], r["kept_float16"], r["kept_float32"], r["flipped"],
                             f"{100 * r['flipped_share']:.2f}%"] for r in runs], align="rrrrr")]) + "\n"
    write_report(args.out, {"runs": runs, "worst_flipped_share": worst}, md)
    print(md)


if __name__ == "__main__":
    main()
