"""Scale-out benchmark: `dpsel filter` local vs `--engine ray` (1 and 2 scorer actors) next to a plain pyarrow
read + write of the same shards, and the data-parallel bads sampler (2 gloo processes) vs one process.

Protocol.
- Filter, engine-bound: >= 200k rows in 8 Parquet shards (synth rows, each made unique), scored with a `random`
  curation's scorer (a seeded hash per row: scoring costs ~nothing, so this measures what the engine adds:
  read, normalise, id, score calls, gather, write). Reference: pyarrow read_table + write_table of the shards.
- Filter, model-bound: a smaller set scored by a `loss` curation's scorer (the tiny reference model on every
  unseen row), where the per-row model cost dominates as it does with a real model.
- Ray runs share one local runtime started before timing (its start-up is reported apart); every timed run
  is repeated `--repeats` times and the best kept (the machine is shared). Threads: OMP/MKL = 1 everywhere.
- Sampler: `dpsel curate --method bads` on `--sampler-rows` synth rows, one process vs `torchrun
  --nproc-per-node 2` (gloo), same global batch; seconds per step from each run's manifest.

  python benchmarks/scale_out.py              # the full run
  python benchmarks/scale_out.py --quick      # a smoke run

Writes benchmarks/results/scale_out.json and scale_out.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from dpsel.curate import curate, filter_rows  # noqa: E402
from dpsel.engines import RayOptions  # noqa: E402
from dpsel.select.base import SelectConfig  # noqa: E402
from dpsel.synth import generate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHARDS = 8


def make_shards(root: Path, rows: int, seed_rows: int = 20_000) -> Path:
    """`rows` unique rows in SHARDS files: synth rows repeated with a copy number in the instruction."""
    base = pq.read_table(generate(root / "synth", rows=seed_rows, noise=0.3, seed=0, meta_rows=10,
                                  test_rows=10)["train"])
    copies = []
    for k in range(-(-rows // base.num_rows)):
        marked = pc.binary_join_element_wise(base["instruction"], pa.scalar(f" (set {k})"), "")
        copies.append(base.set_column(base.column_names.index("instruction"), "instruction", marked))
    table = pa.concat_tables(copies).slice(0, rows)
    folder = root / "shards"
    folder.mkdir()
    per = -(-rows // SHARDS)
    for i in range(SHARDS):
        pq.write_table(table.slice(i * per, per), folder / f"part-{i:02d}.parquet")
    return folder


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def pyarrow_copy(folder: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(folder)
    pq.write_table(table, out / "copy.parquet")


def filter_timings(scorer: Path, folder: Path, rows: int, work: Path, repeats: int, batch_size: int,
                   with_pyarrow: bool) -> dict:
    import ray
    results = {}
    if with_pyarrow:
        results["pyarrow read+write"] = best_of(repeats, lambda: pyarrow_copy(folder, work / "copy"))
    results["local"] = best_of(repeats, lambda: filter_rows(scorer, folder, work / "local"))
    for workers in (1, 2):
        options = RayOptions(workers=workers, batch_size=batch_size)
        results[f"ray, {workers} worker{'s' * (workers > 1)}"] = best_of(
            repeats, lambda: filter_rows(scorer, folder, work / f"ray{workers}", engine="ray", ray=options))
    same = all(pq.read_table(work / f"ray{w}" / "scores.parquet").equals(pq.read_table(work / "local" /
                                                                                       "scores.parquet"))
               for w in (1, 2))
    assert ray.is_initialized()
    return {"rows": rows, "seconds": results, "rows_per_second": {k: rows / v for k, v in results.items()},
            "ray_scores_identical_to_local": same}


def sampler_timings(root: Path, rows: int, steps: int, batch: int) -> dict:
    paths = generate(root / "sampler", rows=rows, noise=0.3, seed=0, meta_rows=40, test_rows=10)
    args = ["curate", "--train", str(paths["train"]), "--meta", str(paths["meta"]), "--steps", str(steps),
            "--batch-size", str(batch), "--max-length", "64"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = {}
    for label, launcher in (("1 process", [sys.executable, "-m", "dpsel.cli"]),
                            ("2 processes (gloo)", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc-per-node", "2", "-m", "dpsel.cli"])):
        target = root / label.split()[0]
        started = time.perf_counter()
        subprocess.run([*launcher, *args, "--out", str(target)], check=True, env=env, capture_output=True)
        manifest = json.loads((target / "manifest.json").read_text())
        out[label] = {"seconds_per_step": manifest["timings"]["method"]["seconds_per_step"],
                      "wall_seconds": time.perf_counter() - started}
    one, two = (pq.read_table(root / d / "scores.parquet").to_pandas() for d in ("1", "2"))
    kept_one, kept_two = set(one.index[one["dpsel_kept"]]), set(two.index[two["dpsel_kept"]])
    out["kept_set_jaccard"] = len(kept_one & kept_two) / len(kept_one | kept_two)
    out["weight_correlation"] = float(one["dpsel_weight"].corr(two["dpsel_weight"]))
    out["rows"], out["steps"], out["global_batch"] = rows, steps, batch
    return out


def render(result: dict) -> str:
    lines = ["# Scale-out benchmark (`benchmarks/scale_out.py`)", "",
             f"Machine: {result['machine']}. Threads: OMP/MKL 1. Ray {result['ray_version']}, one local runtime "
             f"({result['ray_cpus']} logical CPUs: the actors' plus one for Ray Data's read tasks), started in "
             f"{result['ray_start_seconds']:.1f} s before timing. Best of {result['repeats']} runs. "
             f"Load average at start: {result['load_average']}.", ""]
    for key, title in (("filter_engine_bound", "Filter, engine-bound (`random` scorer: a hash per row)"),
                       ("filter_model_bound", "Filter, model-bound (`loss` scorer: the tiny reference model)")):
        block = result[key]
        local = block["rows_per_second"]["local"]
        lines += [f"## {title}: {block['rows']:,} rows, {SHARDS} shards", "",
                  "| engine | seconds | rows/s | vs local |", "|---|---|---|---|"]
        for name, seconds in block["seconds"].items():
            rate = block["rows_per_second"][name]
            lines.append(f"| {name} | {seconds:.2f} | {rate:,.0f} | {rate / local:.2f}× |")
        one, two = block["rows_per_second"]["ray, 1 worker"], block["rows_per_second"]["ray, 2 workers"]
        lines += ["", f"Ray 2 workers / 1 worker: **{two / one:.2f}×**; Ray (2 workers) per-row time over local: "
                  f"**{(local / two - 1) * 100:+.0f}%**; scores.parquet identical to local: "
                  f"{block['ray_scores_identical_to_local']}.", ""]
    s = result["sampler"]
    lines += [f"## Data-parallel bads: {s['rows']} rows, {s['steps']} steps, global batch {s['global_batch']}", "",
              "| run | s/step | wall s |", "|---|---|---|"]
    lines += [f"| {k} | {v['seconds_per_step']:.3f} | {v['wall_seconds']:.1f} |" for k, v in s.items()
              if isinstance(v, dict)]
    lines += ["", f"Kept-set Jaccard 2 processes vs 1: {s['kept_set_jaccard']:.3f}; weight correlation "
              f"{s['weight_correlation']:.3f}.", ""]
    return "\n".join(lines + result.get("notes", []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--model-rows", type=int, default=3_000)
    parser.add_argument("--sampler-rows", type=int, default=400)
    parser.add_argument("--sampler-steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.model_rows, args.sampler_rows, args.sampler_steps, args.repeats = 20_000, 400, 160, 20, 1
    torch.set_num_threads(1)
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small = generate(root / "cur", rows=200, noise=0.3, seed=0, meta_rows=20, test_rows=10)
        random_run = curate(small["train"], small["meta"], root / "random", method="random", budget=0.7)
        loss_run = curate(small["train"], small["meta"], root / "loss", method="loss",
                          config=SelectConfig(steps=40, max_length=64))
        big = make_shards(root / "big", args.rows)
        model = make_shards(root / "model", args.model_rows, seed_rows=min(args.model_rows, 20_000))
        started = time.perf_counter()
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_start = time.perf_counter() - started
        result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                  "ray_version": ray.__version__, "ray_cpus": 3, "ray_start_seconds": ray_start,
                  "repeats": args.repeats, "load_average": [round(x, 2) for x in os.getloadavg()]}
        result["filter_engine_bound"] = filter_timings(random_run.out_dir / "scorer", big, args.rows,
                                                       root / "w1", args.repeats, args.batch_size, True)
        result["filter_model_bound"] = filter_timings(loss_run.out_dir / "scorer", model, args.model_rows,
                                                      root / "w2", 1, 256, False)
        ray.shutdown()
        result["sampler"] = sampler_timings(root, args.sampler_rows, args.sampler_steps, 16)
        result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "scale_out-quick" if args.quick else "scale_out"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{name}.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
