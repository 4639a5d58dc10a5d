"""Active-curation benchmark: does a reviewer's keep/drop on K rows picked by `dpsel review` teach the selector
more than K random rows, or the K rows nearest the cut? Not a test; writes results/review.{json,md}.

    python benchmarks/review.py                                   # both real-text sets + synth, seeds 0,1,2, K = 30,60,120
    python benchmarks/review.py --datasets realtext --seeds 0 --ks 60 --rows 600   # a quick look

Per dataset (any `--dataset` of benchmarks/selection_data.py: `realtext`, the docstring set; `realtext-chat`;
`synth`) and seed: `dpsel.curate` (bads, the defaults, budget 0.7) on the training rows, from an empty
embedding cache (DPSEL_CACHE under the work folder); then for each picker and K an oracle reviewer (the truth:
clean → keep, any corruption → drop) labels K rows and `dpsel.curate(..., labels=FILE)` runs again into a new
folder (the embedding cache now warm, as for a user's re-run). Pickers, all over the rows the selection decided
(kept or `low_weight`, first copies):
- `review`: `dpsel.curation.review.review_rows`, what `dpsel review --rows K` writes;
- `random`: K of them uniformly (seeded);
- `margin`: the K with the lowest |weight − cut|, the std ignored.
Figures, 3-seed mean ± sd: AUROC (clean vs corrupted) on the rows nobody labelled, before (the first run) and
after, the paired gain and the gain over `random`'s on the same seed; kept-set precision (clean share of the
kept rows, labelled ones included); the re-run's wall time over the first run's.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from selection_data import make_data  # noqa: E402
from stats import mean_sd, pm, table, write_report  # noqa: E402

PICKERS = ("review", "random", "margin")
TARGET_GAIN, TARGET_OVER_RANDOM, TARGET_K = 0.03, 0.02, 60


def write_inputs(data: dict, folder: Path) -> dict[str, Path]:
    """The seed's training rows (first copies, in order: row i has truth kinds[i]) and meta rows as chat Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"train": folder / "train.parquet", "meta": folder / "meta.parquet"}
    for name in paths:
        pq.write_table(pa.Table.from_pylist([{"messages": m} for m in data[name]]), paths[name])
    return paths


def timed_curate(paths: dict, out: Path, args, labels: Path | None = None):
    import dpsel
    started = time.perf_counter()
    result = dpsel.curate(str(paths["train"]), str(paths["meta"]), out=out, budget=args.budget, seed=args.seed_now,
                          progress=False, labels=str(labels) if labels else None)
    return result, time.perf_counter() - started


def decided_rows(scores) -> np.ndarray:
    """Rows whose keep/drop the selection decided: kept, or dropped for their weight (not by a stage)."""
    return np.flatnonzero(scores.dpsel_reason.isin(["", "low_weight"]).to_numpy())


def pick(picker: str, run: Path, scores, cut: float, k: int, seed: int) -> list[str]:
    """The ids of the k rows `picker` hands the reviewer."""
    candidates = decided_rows(scores)
    if picker == "review":
        from dpsel.curation.review import review_rows
        return review_rows(run, k).column("dpsel_id").to_pylist()
    if picker == "random":
        chosen = np.random.default_rng(10_000 + seed * 1_000 + k).choice(candidates, size=k, replace=False)
    else:
        gap = np.abs(scores.dpsel_weight.to_numpy()[candidates] - cut)
        chosen = candidates[np.argsort(gap, kind="stable")[:k]]
    return scores.dpsel_id.to_numpy()[chosen].tolist()


def oracle_labels(ids: list[str], clean_by_id: dict[str, bool], path: Path) -> Path:
    import pandas as pd
    pd.DataFrame({"dpsel_id": ids, "label": ["keep" if clean_by_id[i] else "drop" for i in ids]}).to_parquet(path)
    return path


def auroc(weights: np.ndarray, clean: np.ndarray, rows: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score
    if len(set(clean[rows].tolist())) < 2:
        return None
    return float(roc_auc_score(clean[rows], weights[rows]))


def kept_precision(scores, clean: np.ndarray) -> float:
    kept = scores.dpsel_kept.to_numpy()
    return float(clean[kept].mean()) if kept.any() else float("nan")


def one_seed(dataset: str, seed: int, args) -> dict:
    """Every picker and K on one dataset and seed (module docstring)."""
    import json

    import pandas as pd
    work = Path(tempfile.mkdtemp(prefix=f"review-{dataset}-{seed}-", dir=args.workdir))
    os.environ["DPSEL_CACHE"] = str(work / "cache")   # an empty embedding cache: the first run embeds every row
    from dpsel.models.embedder import try_embedder
    try_embedder("default")                           # unpacked once, outside the timed runs
    options = SimpleNamespace(dataset=dataset, rows=args.rows, noise=args.noise, meta_rows=args.meta_rows,
                              test_rows=args.test_rows, seed=seed)
    data = make_data(options, work / "data")
    paths = write_inputs(data, work / "inputs")
    clean = np.asarray(data["kinds"]) == "clean"
    args.seed_now = seed
    first, first_s = timed_curate(paths, work / "first", args)
    scores = pd.read_parquet(first.paths["scores"])
    cut = json.loads(Path(first.paths["manifest"]).read_text())["selection"]["effective_threshold"]
    clean_by_id = dict(zip(scores.dpsel_id, clean))
    weights0 = scores.dpsel_weight.to_numpy()
    record = {"dataset": dataset, "seed": seed, "rows": len(scores), "corrupted": int((~clean).sum()),
              "first_seconds": first_s, "auroc_first_all": auroc(weights0, clean, decided_rows(scores)),
              "kept_precision_first": kept_precision(scores, clean), "runs": []}
    print(f"{dataset} seed {seed}: first run {first_s:.1f}s, AUROC {record['auroc_first_all']:.3f}", flush=True)
    for k in args.ks:
        for picker in args.pickers:
            ids = pick(picker, work / "first", scores, cut, k, seed)
            labels = oracle_labels(ids, clean_by_id, work / f"labels-{picker}-{k}.parquet")
            again, again_s = timed_curate(paths, work / f"{picker}-{k}", args, labels)
            after = pd.read_parquet(again.paths["scores"])
            unlabelled = np.setdiff1d(np.intersect1d(decided_rows(scores), decided_rows(after)),
                                      np.flatnonzero(after.dpsel_id.isin(ids).to_numpy()))
            run = {"picker": picker, "k": k, "labelled_corrupted": int(sum(not clean_by_id[i] for i in ids)),
                   "auroc_before": auroc(weights0, clean, unlabelled),
                   "auroc_after": auroc(after.dpsel_weight.to_numpy(), clean, unlabelled),
                   "kept_precision": kept_precision(after, clean), "seconds": again_s,
                   "time_ratio": again_s / first_s}
            run["gain"] = run["auroc_after"] - run["auroc_before"]
            record["runs"].append(run)
            print(f"  {picker:6s} K={k:4d}: AUROC {run['auroc_before']:.3f} -> {run['auroc_after']:.3f} "
                  f"({run['gain']:+.3f}), precision {run['kept_precision']:.3f}, re-run {again_s:.1f}s "
                  f"({run['time_ratio']:.2f} of the first)", flush=True)
    return record


def summarise(records: list[dict]) -> dict:
    """Per dataset, picker and K: mean ± sd over seeds of each figure, the gain over random's (paired by seed)."""
    out: dict = {}
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        seeds = [r for r in records if r["dataset"] == dataset]
        random_gain = {(r["seed"], run["k"]): run["gain"] for r in seeds for run in r["runs"] if run["picker"] == "random"}
        rows = {}
        for run0 in seeds[0]["runs"]:
            key = (run0["picker"], run0["k"])
            runs = [(r["seed"], run) for r in seeds for run in r["runs"] if (run["picker"], run["k"]) == key]
            rows[f"{key[0]}@{key[1]}"] = {
                "picker": key[0], "k": key[1],
                **{name: mean_sd([run[name] for _, run in runs]) for name in
                   ("auroc_before", "auroc_after", "gain", "kept_precision", "time_ratio", "labelled_corrupted")},
                "gain_over_random": mean_sd([run["gain"] - random_gain[(seed, run["k"])] for seed, run in runs])}
        out[dataset] = {"seeds": [r["seed"] for r in seeds], "rows": mean_sd([r["rows"] for r in seeds]),
                        "first_seconds": mean_sd([r["first_seconds"] for r in seeds]),
                        "kept_precision_first": mean_sd([r["kept_precision_first"] for r in seeds]),
                        "by_picker": rows, "target": _target(rows)}
    return out


def _target(rows: dict) -> dict:
    """The issue's bar at K = 60: gain ≥ +0.03 and ≥ +0.02 over random, each beyond its spread (mean − sd)."""
    review = rows.get(f"review@{TARGET_K}")
    if review is None:
        return {"checked": False}
    gain, over = review["gain"], review["gain_over_random"]
    return {"checked": True, "gain": gain["mean"], "gain_over_random": over["mean"],
            "met": bool(gain["mean"] >= TARGET_GAIN and over["mean"] >= TARGET_OVER_RANDOM
                        and gain["mean"] - gain["sd"] > 0 and over["mean"] - over["sd"] > 0)}


def markdown(summary: dict, args) -> str:
    lines = ["# Active curation: reviewed rows vs random vs nearest the cut", "",
             f"`python benchmarks/review.py --datasets {','.join(args.datasets)} --seeds "
             f"{','.join(map(str, args.seeds))} --ks {','.join(map(str, args.ks))} --rows {args.rows}` "
             f"(bads defaults, budget {args.budget}; mean ± sd over seeds; oracle reviewer = the truth).", ""]
    for dataset, entry in summary.items():
        target = entry["target"]
        verdict = ("met" if target.get("met") else "not met") if target.get("checked") else "not checked"
        lines += [f"## {dataset} ({entry['rows']['mean']:.0f} rows, seeds {entry['seeds']})", "",
                  f"First run {pm(entry['first_seconds'], 1)} s; kept-set precision before review "
                  f"{pm(entry['kept_precision_first'])}. Target at K = {TARGET_K} (gain ≥ +{TARGET_GAIN}, ≥ "
                  f"+{TARGET_OVER_RANDOM} over random, beyond the spread): **{verdict}**.", ""]
        rows = [[r["picker"], r["k"], pm(r["labelled_corrupted"], 1), pm(r["auroc_before"]), pm(r["auroc_after"]),
                 pm(r["gain"]), pm(r["gain_over_random"]), pm(r["kept_precision"]), pm(r["time_ratio"], 2)]
                for r in sorted(entry["by_picker"].values(), key=lambda r: (r["k"], PICKERS.index(r["picker"])))]
        lines += table(["picker", "K", "corrupted among K", "AUROC unlabelled, before", "after", "gain",
                        "gain − random's", "kept precision", "re-run / first run time"], rows) + [""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="realtext,realtext-chat,synth",
                        help="comma list of selection_data datasets")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ks", default="30,60,120")
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--meta-rows", type=int, default=150)
    parser.add_argument("--test-rows", type=int, default=10)
    parser.add_argument("--budget", type=float, default=0.7)
    parser.add_argument("--pickers", default=",".join(PICKERS), help="comma list of " + ", ".join(PICKERS))
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "review"))
    args = parser.parse_args(argv)
    args.datasets = [d for d in args.datasets.split(",") if d]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.pickers = [p for p in args.pickers.split(",") if p]
    if "random" not in args.pickers:
        parser.error("--pickers needs random: every gain is compared with random's")
    records = [one_seed(dataset, seed, args) for dataset in args.datasets for seed in args.seeds]
    summary = summarise(records)
    report = {"args": {k: v for k, v in vars(args).items() if k != "seed_now"}, "summary": summary, "seeds": records}
    json_path, md_path = write_report(Path(args.out), report, markdown(summary, args))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
