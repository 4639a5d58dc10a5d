"""Throughput and memory of the data path on real-size pools, side by side in one run (on demand).

    python benchmarks/scale.py [--sizes 10000 100000 1000000] [--filter-rows 2000] [--threads 1]

For every pool size (synthetic short Alpaca rows, ~1% exact duplicates, clean otherwise so `validate`
passes) it measures, each case in a fresh child process so peak RSS is the case's own:
- `ceiling`: a plain pyarrow read + write of the same file (the I/O ceiling);
- `validate`: `dpsel.data.validate_paths` (streaming);
- `read`: the curation read, `dpsel.data.read_instruction_set` (normalise, ids, dedup; the whole set as Arrow);
- `filter-data`: `dpsel.curation.filter.filter_rows` end to end with a `random` scorer (the data path and the run's
  outputs, no model), for its memory at every size;
and once, on `--filter-rows` rows: `filter` with a built-in-model (`bads`) scorer, next to the model's raw
batched forward throughput on the same rows and batches (the ceiling for scoring), and one LoRA vs
SURM-LDR training step (time and bytes saved for backward).

Reports rows/s, the ratio to the ceiling, peak RSS, and bytes per row beyond the fixed cost (peak RSS minus
the RSS after imports, over the rows). Writes benchmarks/results/scale.{json,md}.
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

ROOT = Path(__file__).resolve().parents[1]
# Streaming reads hold one row group: pools are written as Spark/HF `datasets` write them (tens of
# thousands of rows per group), not as one group of the whole file.
ROW_GROUP_ROWS = 65_536
RESULTS = ROOT / "benchmarks" / "results"
WORDS = ("the a of to and in explain list name give write short answer colour number city river why how "
         "which first small large warm cold animal plant country language sentence word summarise translate "
         "describe compare example reason simple").split()


from peft_train.memory import current_rss, peak_rss  # noqa: E402  (the one home of the memory meters)
from stats import ratio, table, write_report  # noqa: E402


# ----------------------------------------------------------------------------- data
def make_pool(path: Path, rows: int, seed: int = 0) -> Path:
    """Short Alpaca rows (8-word instruction, optional context, 12-word answer), ~1% exact repeats."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    words = pa.array(WORDS)

    def sentences(n_words: int, end: str) -> pa.Array:
        picks = [words.take(pa.array(rng.integers(0, len(WORDS), rows))) for _ in range(n_words)]
        return pc.binary_join_element_wise(*picks, pa.scalar(end), " ")
    source = rng.integers(0, rows, rows)
    repeat = rng.random(rows) < 0.01             # ~1% rows repeat an earlier row's content exactly
    index = np.where(repeat, np.minimum(source, np.arange(rows)), np.arange(rows))
    number = pa.array(np.char.mod("%d", np.arange(rows)))
    instruction = pc.binary_join_element_wise(sentences(8, "?"), number, " #")
    context = pc.if_else(pa.array(rng.random(rows) < 0.3), sentences(6, "."), pa.nulls(rows, pa.string()))
    table = pa.table({"instruction": instruction, "input": context, "output": sentences(12, "."),
                      "task": pa.array(np.char.mod("t%d", rng.integers(0, 8, rows)))})
    pq.write_table(table.take(pa.array(index)), path, row_group_size=ROW_GROUP_ROWS)
    return path


# ----------------------------------------------------------------------------- cases (child processes)
def case_ceiling(path: Path, work: Path) -> dict:
    import pyarrow.dataset  # noqa: F401  (read_table imports it on first use: keep that out of the timing)
    import pyarrow.parquet as pq
    base = current_rss()
    start = time.perf_counter()
    pq.write_table(pq.read_table(path), work / "copy.parquet")
    return {"seconds": time.perf_counter() - start, "base_rss": base}


def case_validate(path: Path, work: Path) -> dict:
    from dpsel.data import validate_paths
    base = current_rss()
    start = time.perf_counter()
    summary = validate_paths(path)
    return {"seconds": time.perf_counter() - start, "base_rss": base, "duplicates": summary.duplicates}


def case_read(path: Path, work: Path) -> dict:
    from dpsel.data import read_instruction_set
    base = current_rss()
    start = time.perf_counter()
    data = read_instruction_set(path)
    return {"seconds": time.perf_counter() - start, "base_rss": base, "counts": data.counts()}


def case_filter_data(path: Path, work: Path) -> dict:
    from dpsel.curation import curate, filter_rows
    scorer_run = work / "random-run"
    if not (scorer_run / "scorer").exists():
        meta = make_pool(work / "meta.parquet", 50, seed=1)
        curate(meta, meta, scorer_run, method="random")
    import dpsel.report  # noqa: F401  (plotting, imported by the run writer: a fixed cost, not per row)
    base = current_rss()
    start = time.perf_counter()
    result = filter_rows(scorer_run / "scorer", path, work / "filtered", threshold=0.5)
    return {"seconds": time.perf_counter() - start, "base_rss": base, "kept": result.counts["kept_rows"]}


def _bads_scorer(work: Path) -> Path:
    from dpsel.curation.run import curate
    from dpsel.select.base import SelectConfig
    from dpsel.synth import generate
    run = work / "bads-run"
    if not (run / "scorer").exists():
        paths = generate(work / "synth", rows=300, meta_rows=60, test_rows=10, seed=0)
        curate(paths["train"], paths["meta"], run, method="bads",
               config=SelectConfig(steps=60, extra={"ref_steps": 50}))
    return run / "scorer"


def case_filter_model(path: Path, work: Path) -> dict:
    """filter with the built-in model's bads scorer, and the model's raw forward on the same batches."""
    import numpy as np
    from dpsel.curation.filter import filter_rows
    from dpsel.data import read_instruction_set
    from dpsel.select import load_scorer
    from dpsel.models.lm import EncodedRows
    from dpsel.models.forward import length_batches, raw_forward_seconds
    scorer_dir = _bads_scorer(work)
    base = current_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    filter_rows(scorer_dir, path, work / "filtered-model", threshold=0.5)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    scorer = load_scorer(scorer_dir)
    lm, max_length = scorer.lm, int(scorer.info.get("max_length", 256))
    data = read_instruction_set(path)
    rows = EncodedRows(data.messages(data.usable_mask()), lm.tokenizer, max_length, lm.pad_id)
    batches = [rows.batch(chunk, lm.device) for chunk in length_batches(rows.lengths, np.arange(len(rows)), 64)]
    cpu_start = time.process_time()
    forward = raw_forward_seconds(lm.model, batches)
    forward_cpu = time.process_time() - cpu_start
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "raw_forward_cpu_seconds": forward_cpu,
            "base_rss": base, "usable_rows": len(rows), "raw_forward_seconds": forward,
            "raw_forward_rows_per_s": len(rows) / forward, "mean_tokens": float(rows.lengths.mean())}


def case_adapter_step(path: Path, work: Path) -> dict:
    """LoRA vs SURM-LDR at the same r: CPU seconds per training step and bytes saved for backward."""
    import torch
    from peft_train.adapters import build_adapter
    from peft_train.models import load_model
    out = {}
    for method in ("lora", "surm-ldr"):
        torch.manual_seed(0)
        model, _ = load_model("tiny")
        model = build_adapter(model, method, r=8)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        tokens = torch.randint(3, 259, (16, 128))
        saved = [0]

        def pack(tensor):
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        def step():
            saved[0] = 0
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        step()
        start = time.process_time()
        for _ in range(5):
            step()
        out[method] = {"step_cpu_s": (time.process_time() - start) / 5, "saved_for_backward_bytes": saved[0]}
    return {"seconds": 0.0, "base_rss": 0, **out}


def case_make_pool(path: Path, work: Path) -> dict:
    make_pool(path, int(path.stem.split("-")[-1]))
    return {"seconds": 0.0, "base_rss": 0}


CASES = {"make-pool": case_make_pool, "ceiling": case_ceiling, "validate": case_validate, "read": case_read, "filter-data": case_filter_data,
         "filter-model": case_filter_model, "adapter-step": case_adapter_step}


def run_child(case: str, path: Path, work: Path, threads: int, script: str = __file__,
              env: dict | None = None) -> dict:
    """One case of `script` (this one, or another benchmark with the same `--child` options) in a fresh
    interpreter (its own peak RSS), with `env` added to the environment; returns its JSON line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    command = [sys.executable, script, "--child", case, "--path", str(path), "--work", str(work),
               "--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"case {case} on {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(case: str, path: Path, work: Path, threads: int) -> None:
    from dpsel.threads import configure_threads
    policy = configure_threads(threads)
    result = CASES[case](path, work)
    result.update({"peak_rss": peak_rss(), "threads": policy.describe()})
    print(json.dumps(result))


# ----------------------------------------------------------------------------- report
def summarise(rows: int, case: str, result: dict, ceiling: dict) -> dict:
    rate = rows / result["seconds"] if result["seconds"] else None
    beyond = result["peak_rss"] - result["base_rss"]
    return {"rows": rows, "case": case, "seconds": round(result["seconds"], 3),
            "rows_per_s": round(rate) if rate else None,
            "ratio_to_ceiling": ratio(rate, rows / ceiling["seconds"], 3) if rate else None,
            "peak_rss_mb": round(result["peak_rss"] / 2**20, 1), "base_rss_mb": round(result["base_rss"] / 2**20, 1),
            "bytes_per_row_beyond_fixed": round(beyond / rows, 1)}


def markdown(report: dict) -> str:
    lines = ["# Throughput and memory at scale (benchmarks/scale.py)", "",
             f"Machine: {report['machine']}; threads: {report['threads']}; {report['when']}.", "",
             *table(["rows", "case", "seconds", "rows/s", "× ceiling", "peak RSS MB", "RSS after imports MB",
                     "bytes/row beyond fixed"],
                    [[f"{r['rows']:,}", r["case"], r["seconds"], f"{r['rows_per_s']:,}", r["ratio_to_ceiling"],
                      r["peak_rss_mb"], r["base_rss_mb"], r["bytes_per_row_beyond_fixed"]] for r in report["table"]],
                    align="rlrrrrrr")]
    if report.get("flatness"):
        lines += ["", "Peak RSS growth from the middle to the largest size: "
                  + ", ".join(f"{k} {v}×" for k, v in report["flatness"].items())]
    if report.get("marginal_bytes_per_row"):
        lines += ["", "Bytes per extra row (peak RSS slope between the two largest sizes): "
                  + ", ".join(f"{k} {v}" for k, v in report["marginal_bytes_per_row"].items())]
    model = report.get("filter_model")
    if model:
        lines += ["", f"`filter` with the built-in model (bads scorer) on {model['rows']:,} rows: "
                  f"{model['filter_rows_per_s']:.1f} rows/s end to end; the model's raw batched forward on the same "
                  f"rows and batches: {model['raw_forward_rows_per_s']:.1f} rows/s "
                  f"(ratio {model['ratio_to_raw_forward']:.2f} in wall time; in CPU time, which a loaded machine "
                  f"disturbs less: {model['ratio_to_raw_forward_cpu']:.2f}; mean {model['mean_tokens']:.0f} tokens/row)."]
    step = report.get("adapter_step")
    if step:
        lora, ldr = step["lora"], step["surm-ldr"]
        lines += ["", f"Training step, tiny model, batch 16×128, r=8: LoRA {lora['step_cpu_s'] * 1e3:.0f} ms CPU, "
                  f"{lora['saved_for_backward_bytes'] / 2**20:.1f} MiB saved for backward; SURM-LDR "
                  f"{ldr['step_cpu_s'] * 1e3:.0f} ms ({ldr['step_cpu_s'] / lora['step_cpu_s']:.2f}×), "
                  f"{ldr['saved_for_backward_bytes'] / 2**20:.1f} MiB "
                  f"({ldr['saved_for_backward_bytes'] / lora['saved_for_backward_bytes']:.2f}×)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--filter-rows", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None, help="where pools and runs go (default: a temp dir)")
    parser.add_argument("--cases", nargs="+", default=["ceiling", "validate", "read", "filter-data"])
    parser.add_argument("--child", default=None)
    parser.add_argument("--path", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path, args.work, args.threads)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="dpsel-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    table, by_case = [], {}
    for rows in args.sizes:
        pool = work / f"pool-{rows}.parquet"
        run_child("make-pool", pool, work, args.threads)   # in a child: the parent stays small
        results = {case: run_child(case, pool, work, args.threads) for case in args.cases}
        for case in args.cases:
            row = summarise(rows, case, results[case], results["ceiling"])
            table.append(row)
            by_case.setdefault(case, {})[rows] = row
            print(json.dumps(row), flush=True)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
              "threads": args.threads, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "table": table}
    if len(args.sizes) >= 2:
        middle, largest = sorted(args.sizes)[-2:]
        report["flatness"] = {case: ratio(r[largest]["peak_rss_mb"], r[middle]["peak_rss_mb"], 2)
                              for case, r in by_case.items()}
        # the cost of one more row, free of fixed and first-batch costs: peak RSS slope between the two sizes
        report["marginal_bytes_per_row"] = {
            case: round((r[largest]["peak_rss_mb"] - r[middle]["peak_rss_mb"]) * 2**20 / (largest - middle), 1)
            for case, r in by_case.items()}
    if args.filter_rows:
        pool = work / f"pool-{args.filter_rows}.parquet"
        run_child("make-pool", pool, work, args.threads)
        model = run_child("filter-model", pool, work, args.threads)
        report["filter_model"] = {"rows": args.filter_rows, "filter_rows_per_s": args.filter_rows / model["seconds"],
                                  "raw_forward_rows_per_s": model["raw_forward_rows_per_s"],
                                  "ratio_to_raw_forward": (model["usable_rows"] / model["seconds"])
                                  / model["raw_forward_rows_per_s"], "mean_tokens": model["mean_tokens"],
                                  "ratio_to_raw_forward_cpu": model["raw_forward_cpu_seconds"] / model["cpu_seconds"],
                                  "seconds": model["seconds"], "peak_rss_mb": model["peak_rss"] / 2**20}
        report["adapter_step"] = run_child("adapter-step", pool, work, args.threads)
    write_report(args.out, report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
