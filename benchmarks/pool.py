"""Real pools end to end (issue 20): the data path on 100k and 1M rows, the model-bound paths on two small
pools for their slope, each case in a fresh child process (its own peak RSS). One run writes
benchmarks/results/pool.{json,md}.

    python benchmarks/pool.py [--sizes 100000 1000000] [--model-sizes 10000 100000] [--threads 1]

Data cases (per size; the pool is scale.py's: short Alpaca rows, ~1% exact repeats, cached under
benchmarks/cache/): `ceiling` (pyarrow read + write of the same file), `validate`, `read` (the curation read,
`read_instruction_set`), `stages` (the curation read plus the default curation stages: exact and near
duplicates, PII flag), `filter-data` (`filter` end to end with a `random` scorer: the data part, no model).
Model cases (per model size; `dpsel synth`'s generator, the built-in `tiny` model, CPU): `loss`, `bads`
(`curate --method ...`, defaults otherwise) and `filter` (the bads run's scorer on a fresh synth pool of the
same size). Per case: wall seconds, rows/s, peak RSS, RSS after imports, bytes per row beyond that. The
model-bound cost of 1M rows is extrapolated from the slope between the two model sizes, labelled so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from scale import case_ceiling, case_filter_data, case_read, case_validate, make_pool  # noqa: E402
from scale import run_child as run_script_child  # noqa: E402
from stats import ratio, table, write_report  # noqa: E402
from peft_train.memory import current_rss, peak_rss  # noqa: E402

CACHE = ROOT / "benchmarks" / "cache"
RESULTS = ROOT / "benchmarks" / "results"
EXTRAPOLATE_TO = 1_000_000
PROJECT_TO = 10_000_000


def case_stages(path: Path, work: Path) -> dict:
    from dpsel.curation.rows import read_rows
    from dpsel.curation.stages import apply_stages
    from dpsel.stages.options import StagesConfig
    base = current_rss()
    start = time.perf_counter()
    rows = read_rows(path)
    read_s = time.perf_counter() - start
    apply_stages(rows, StagesConfig())
    return {"seconds": time.perf_counter() - start, "base_rss": base, "read_s": read_s,
            "stages": {s["stage"]: round(s["seconds"], 3) for s in rows.stage_stats}}


SYNTH_MOST = 100_000   # `dpsel synth` runs out of distinct prompts a little above this


def _synth(work: Path, rows: int, seed: int) -> dict:
    from dpsel.synth import generate
    folder = work / f"synth-{rows}-{seed}"
    if (folder / "truth.parquet").exists():
        return {k: folder / f"{k}.parquet" for k in ("train", "meta", "test", "truth")}
    if rows > SYNTH_MOST:
        return _tiled(_synth(work, SYNTH_MOST, seed), folder, rows)
    return generate(folder, rows=rows, meta_rows=200, test_rows=10, seed=seed)


def _tiled(base: dict, folder: Path, rows: int) -> dict:
    """A pool of `rows` made of copies of a synth pool, copy k's instructions ending " (copy k)" (every row
    distinct, the same problems and truth kinds), its truth re-keyed by the reader's ids; meta and test as is."""
    import shutil
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from dpsel.data import read_instruction_set
    folder.mkdir(parents=True, exist_ok=True)
    train, truth = pq.read_table(base["train"]), pq.read_table(base["truth"])
    parts, kinds = [], []
    for k in range(-(-rows // train.num_rows)):
        part = train.slice(0, min(train.num_rows, rows - k * train.num_rows))
        if k:
            tagged = pc.binary_join_element_wise(part["instruction"], pa.scalar(f" (copy {k})"), "")
            part = part.set_column(part.schema.get_field_index("instruction"), "instruction", tagged)
        parts.append(part)
        kinds.append(truth.slice(0, part.num_rows))
    pq.write_table(pa.concat_tables(parts), folder / "train.parquet")
    ids = read_instruction_set([str(folder / "train.parquet")]).id_list()
    kinds = pa.concat_tables(kinds)
    pq.write_table(pa.table({"row": pa.array(range(rows), pa.int64()), "dpsel_id": pa.array(ids, pa.string()),
                             "kind": kinds["kind"], "task": kinds["task"]}), folder / "truth.parquet")
    for name in ("meta", "test"):
        shutil.copy(base[name], folder / f"{name}.parquet")
    return {k: folder / f"{k}.parquet" for k in ("train", "meta", "test", "truth")}


def _curate(method: str, rows: int, work: Path, embedder: str = "default") -> dict:
    from dpsel.config import SelectConfig
    from dpsel.curation.run import curate
    paths = _synth(work, rows, seed=0)
    base = current_rss()
    start = time.perf_counter()
    name = f"{method}-{rows}" if embedder == "default" else f"{method}-{embedder}-{rows}"
    result = curate(paths["train"], paths["meta"], work / name, method=method, config=SelectConfig(embedder=embedder),
                    truth=paths["truth"])
    return {"seconds": time.perf_counter() - start, "base_rss": base, "kept": result.counts["kept_rows"],
            "auroc": (result.auroc or {}).get("overall"),
            "timings": {k: v for k, v in result.manifest["timings"].items() if isinstance(v, (int, float))}}


def case_loss(path: Path, work: Path) -> dict:
    return _curate("loss", int(path.name), work)


def case_bads(path: Path, work: Path) -> dict:
    return _curate("bads", int(path.name), work)


def case_bads_static(path: Path, work: Path) -> dict:
    """`bads` with `--embedder static` (the packaged MiniLM distilled by model2vec, built before timing: `child`)."""
    return _curate("bads", int(path.name), work, embedder="static")


def _filter(scorer_run: str, rows: int, work: Path) -> dict:
    """`filter` with the scorer of a bads run on the same size, on a fresh pool (another seed)."""
    from dpsel.curation.filter import filter_rows
    fresh = _synth(work, rows, seed=1)["train"]
    base = current_rss()
    start = time.perf_counter()
    result = filter_rows(work / f"{scorer_run}-{rows}" / "scorer", fresh, work / f"filter-{scorer_run}-{rows}")
    return {"seconds": time.perf_counter() - start, "base_rss": base, "kept": result.counts["kept_rows"]}


def case_filter(path: Path, work: Path) -> dict:
    return _filter("bads", int(path.name), work)


def case_filter_static(path: Path, work: Path) -> dict:
    return _filter("bads-static", int(path.name), work)


CASES = {"ceiling": case_ceiling, "validate": case_validate, "read": case_read, "stages": case_stages,
         "filter-data": case_filter_data, "loss": case_loss, "bads": case_bads, "filter": case_filter,
         "bads-static": case_bads_static, "filter-static": case_filter_static}
DATA_CASES = ("ceiling", "validate", "read", "stages", "filter-data")
MODEL_CASES = ("loss", "bads", "filter", "bads-static", "filter-static")


def run_child(case: str, path: Path, work: Path, threads: int) -> dict:
    return run_script_child(case, path, work, threads, script=__file__,
                            env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})


def child(case: str, path: Path, work: Path, threads: int) -> None:
    from dpsel.threads import configure_threads
    policy = configure_threads(threads)
    import torch
    torch.set_num_threads(threads)
    from dpsel.data.arrays import lean_memory_pool
    lean_memory_pool()   # as the command line does
    if case in MODEL_CASES:   # a cold embedding cache: every model case pays for its own embeddings
        import shutil
        cache = work / f"cache-{case}-{path.name}"
        shutil.rmtree(cache, ignore_errors=True)
        os.environ["DPSEL_CACHE"] = str(cache)
        if case.endswith("-static"):   # the static embedder is built into the fresh cache before timing
            from dpsel.models.distil import static_folder
            static_folder()
    result = CASES[case](path, work)
    import pyarrow as pa
    result.update({"peak_rss": peak_rss(), "threads": policy.describe(),
                   "arrow_pool": pa.default_memory_pool().backend_name})
    print(json.dumps(result))


def row(rows: int, case: str, result: dict, ceiling: dict | None) -> dict:
    rate = rows / result["seconds"]
    out = {"rows": rows, "case": case, "seconds": round(result["seconds"], 3), "rows_per_s": round(rate, 1),
           "peak_rss_mb": round(result["peak_rss"] / 2**20, 1), "base_rss_mb": round(result["base_rss"] / 2**20, 1),
           "bytes_per_row_beyond_fixed": round((result["peak_rss"] - result["base_rss"]) / rows, 1)}
    if ceiling is not None:
        out["ratio_to_ceiling"] = ratio(rate, rows / ceiling["seconds"], 3)
    out.update({k: result[k] for k in ("read_s", "stages", "timings", "kept", "auroc") if k in result})
    return out


def slopes(by_case: dict, sizes: list[int]) -> dict:
    """Growth between the two sizes: peak RSS ratio, bytes per extra row; for model cases, seconds per extra
    row and the 1M-row seconds extrapolated along that line."""
    if len(sizes) < 2:
        return {}
    small, large = sorted(sizes)[-2:]
    out = {}
    for case, per_size in by_case.items():
        if small not in per_size or large not in per_size:
            continue
        a, b = per_size[small], per_size[large]
        per_row = (b["seconds"] - a["seconds"]) / (large - small)
        out[case] = {"from_rows": small, "to_rows": large, "peak_rss_growth": ratio(b["peak_rss_mb"], a["peak_rss_mb"], 2),
                     "bytes_per_extra_row": round((b["peak_rss_mb"] - a["peak_rss_mb"]) * 2**20 / (large - small), 1),
                     "seconds_per_extra_row": round(per_row, 6)}
        if case in MODEL_CASES and large < EXTRAPOLATE_TO:
            out[case]["extrapolated_seconds_at_1m"] = round(b["seconds"] + per_row * (EXTRAPOLATE_TO - large))
        if case in MODEL_CASES and large < PROJECT_TO:   # from the measured slope: a projection, labelled so
            out[case]["projected_at_10m"] = {
                "seconds": round(b["seconds"] + per_row * (PROJECT_TO - large)),
                "peak_rss_mb": round(b["peak_rss_mb"] + (b["peak_rss_mb"] - a["peak_rss_mb"]) / (large - small)
                                     * (PROJECT_TO - large), 1)}
    return out


def markdown(report: dict) -> str:
    lines = ["# Real pools end to end (benchmarks/pool.py)", "",
             f"Machine: {report['machine']}; threads: {report['threads']}; Arrow pool: {report['arrow_pool']}; "
             f"{report['when']}; the whole run took {report['total_s']:.0f} s.", "",
             *table(["rows", "case", "seconds", "rows/s", "× pyarrow ceiling", "peak RSS MB", "RSS after imports MB",
                     "bytes/row beyond fixed"],
                    [[f"{r['rows']:,}", r["case"], r["seconds"], f"{r['rows_per_s']:,}", r.get("ratio_to_ceiling", "-"),
                      r["peak_rss_mb"], r["base_rss_mb"], r["bytes_per_row_beyond_fixed"]] for r in report["table"]],
                    align="rlrrrrrr")]
    slope_rows = []
    for case, s in report["slopes"].items():
        extra = s.get("extrapolated_seconds_at_1m")
        slope_rows.append([case, f"{s['from_rows']:,} → {s['to_rows']:,}", f"{s['peak_rss_growth']}×",
                           s["bytes_per_extra_row"], s["seconds_per_extra_row"],
                           f"{extra:,} s ({extra / 3600:.1f} h), EXTRAPOLATED" if extra else "-"])
    lines += ["", "Growth between the two sizes of each case (data cases: 100k → 1M; model cases: the two model sizes):", "",
              *table(["case", "rows", "peak RSS growth", "bytes per extra row", "seconds per extra row",
                      "1M rows, extrapolated"], slope_rows, align="llrrrr")]
    projected = [[case, f"{s['projected_at_10m']['peak_rss_mb']:,.0f}",
                  f"{s['projected_at_10m']['seconds']:,} s ({s['projected_at_10m']['seconds'] / 3600:.1f} h)"]
                 for case, s in report["slopes"].items() if "projected_at_10m" in s]
    if projected:
        lines += ["", "10M rows, PROJECTED linearly from the two sizes' slope (not measured):", "",
                  *table(["case", "peak RSS MB", "seconds"], projected, align="lrr")]
    if report.get("versus_loss"):
        cases = list(dict.fromkeys(c for r in report["versus_loss"] for c in r["ratios"]))
        lines += ["", "Each model case's total time over `curate --method loss` on the same rows (target for bads: <= 3x):",
                  "", *table(["rows", *cases], [[f"{r['rows']:,}", *(f"{r['ratios'][c]}×" if c in r["ratios"] else "-"
                                                                     for c in cases)] for r in report["versus_loss"]],
                             align="r" * (len(cases) + 1))]
    lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def versus_loss(by_case: dict) -> list[dict]:
    """Per model size that has a `loss` row: every other model case's seconds over loss's."""
    out = []
    for rows, loss in sorted(by_case.get("loss", {}).items()):
        ratios = {c: ratio(by_case[c][rows]["seconds"], loss["seconds"], 2)
                  for c in MODEL_CASES if c != "loss" and rows in by_case.get(c, {})}
        if ratios:
            out.append({"rows": rows, "ratios": ratios})
    return out


def merged(old: list[dict], new: list[dict]) -> tuple[list[dict], dict]:
    """`old` rows with those of the same (rows, case) as a `new` row replaced in place; new others appended."""
    fresh = {(r["rows"], r["case"]): r for r in new}
    table = [fresh.pop((r["rows"], r["case"]), r) for r in old] + list(fresh.values())
    by_case: dict = {}
    for r in table:
        by_case.setdefault(r["case"], {})[r["rows"]] = r
    return table, by_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--model-sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--cases", nargs="+", default=[*DATA_CASES, *MODEL_CASES])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=CACHE)
    parser.add_argument("--child", default=None)
    parser.add_argument("--path", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "pool")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of OUT.json's other cases (and sizes), replacing only what this run measured")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path, args.work, args.threads)
        return
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    table, by_case, pool_name = [], {}, None
    for rows in args.sizes:
        pool = make_pool(args.work / f"scale-{rows}.parquet", rows)
        ceiling = run_child("ceiling", pool, args.work, args.threads) if "ceiling" in args.cases else None
        for case in [c for c in args.cases if c in DATA_CASES]:
            result = ceiling if case == "ceiling" else run_child(case, pool, args.work, args.threads)
            pool_name = result.get("arrow_pool", pool_name)
            table.append(row(rows, case, result, ceiling))
            by_case.setdefault(case, {})[rows] = table[-1]
            print(json.dumps(table[-1]), flush=True)
    for rows in args.model_sizes:
        for case in [c for c in args.cases if c in MODEL_CASES]:
            result = run_child(case, Path(str(rows)), args.work, args.threads)
            pool_name = result.get("arrow_pool", pool_name)
            table.append(row(rows, case, result, None))
            by_case.setdefault(case, {})[rows] = table[-1]
            print(json.dumps(table[-1]), flush=True)
    if args.merge and args.out.with_suffix(".json").exists():
        table, by_case = merged(json.loads(args.out.with_suffix(".json").read_text())["table"], table)
        args.sizes = sorted({r["rows"] for r in table if r["case"] in DATA_CASES})
        args.model_sizes = sorted({r["rows"] for r in table if r["case"] in MODEL_CASES})
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} at start, "
                         f"{os.getloadavg()[0]:.1f} at end", "threads": args.threads, "arrow_pool": pool_name,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "total_s": time.perf_counter() - started,
              "table": table, "cases": {c: list(v.values()) for c, v in by_case.items()},
              "slopes": {**slopes({c: v for c, v in by_case.items() if c in DATA_CASES}, args.sizes),
                         **slopes({c: v for c, v in by_case.items() if c in MODEL_CASES}, args.model_sizes)},
              "versus_loss": versus_loss(by_case),
              "note": (f"Model-bound cases ran on {', '.join(f'{n:,}' for n in args.model_sizes)} rows (synth pools, "
                       "above 100k tiled copies of the 100k pool: `_tiled`; the built-in `tiny` model, CPU). A size "
                       "in the first table was measured; a cost in the slope tables is EXTRAPOLATED or PROJECTED "
                       "linearly from the two largest sizes, as labelled. `-static` cases: `--embedder static`. "
                       "No GPU figure: none was used for this run.")}
    write_report(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
