"""Selection benchmark, summary: mean ± sample sd over the data seeds per method, the issue's targets checked on
the seed means, and the saved runs of a selection JSON (read back, or merged from runs on disjoint seeds)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stats import mean_sd, read_json, sd

KINDS = ("wrong", "swapped", "garbage", "truncated", "refusal")  # the docstring set's; synth's and chat's differ


def kinds_of(entries: list[dict]) -> list[str]:
    """The corruption kinds scored in these results (method entries with an `auroc` dict), in first-seen order."""
    seen = [k for e in entries for k in e.get("auroc", {}) if k != "overall"]
    return list(dict.fromkeys(seen))


def summarise(per_seed: list[dict]) -> list[dict]:
    """Mean ± sample sd over the seeds, per method (in the order they ran)."""
    order = list(dict.fromkeys(r["method"] for s in per_seed for r in s["methods"]))
    summary = []
    for name in order:
        rows = [r for s in per_seed for r in s["methods"] if r["method"] == name]
        entry = {"method": name, "seeds": len(rows), "precision_kept": mean_sd([r["precision_kept"] for r in rows]),
                 "seconds": mean_sd([r["seconds"] for r in rows])}
        if all("auroc" in r for r in rows):
            entry["auroc"] = {k: mean_sd([r["auroc"][k] for r in rows]) for k in rows[0]["auroc"]}
        ratios = [r["timings"]["step_ratio_vs_plain"] for r in rows if "step_ratio_vs_plain" in r["timings"]]
        if ratios:
            entry["step_ratio_vs_plain"] = mean_sd(ratios)
        if rows[0].get("coverage"):
            entry["coverage"] = [r["coverage"] for r in rows]
        summary.append(entry)
    return summary


def multi_seed_targets(summary: list[dict]) -> list[str]:
    """The issues' targets on the seed means: bads ≥ every peer (overall, each kind), bads ≥ loss + 0.02, bads ≥
    its own evidence-prior-only ablation + 0.02 (issue 28), every kind ≥ 0.75."""
    by = {e["method"]: e for e in summary if "auroc" in e}
    notes = ["Targets (checked automatically on the seed means):", ""]
    bads, loss = by.get("bads"), by.get("loss")
    if not bads:
        return notes
    others = [n for n in by if not n.startswith("bads") and n not in ("random",)]
    for key in ["overall", *kinds_of(summary)]:
        if key not in bads["auroc"]:
            continue
        best = max(others, key=lambda n: by[n]["auroc"][key]["mean"], default=None)
        if best:
            b, o = bads["auroc"][key]["mean"], by[best]["auroc"][key]["mean"]
            notes.append(f"- {'met' if b >= o else 'MISSED'}: bads ≥ every other method on {key} "
                         f"(bads {b:.3f}, best other {best} {o:.3f})")
    if loss:
        gain = _paired_gain(bads, loss)
        ok = gain.mean() >= 0.02 and gain.mean() > sd(gain)
        notes.append(f"- {'met' if ok else 'MISSED'}: bads ≥ loss + 0.02 AUROC overall, margin above its spread "
                     f"(paired gain {_gain_text(gain)})")
    prior = by.get("bads[evidence_prior_only]")
    if prior:  # issue 28: the posterior must earn its keep over its own evidence prior
        gain = _paired_gain(bads, prior)
        ok = gain.mean() >= 0.02 and gain.mean() > sd(gain)
        notes.append(f"- {'met' if ok else 'MISSED'}: bads ≥ its own evidence-prior-only ablation + 0.02, paired, "
                     f"beyond the spread (gain {_gain_text(gain)}; per seed {', '.join(f'{g:+.3f}' for g in gain)})")
    low = {k: v["mean"] for k, v in bads["auroc"].items() if k != "overall" and v["mean"] < 0.75}
    notes.append(f"- {'MISSED' if low else 'met'}: every kind ≥ 0.75"
                 + (f" (under: {', '.join(f'{k} {v:.3f}' for k, v in low.items())})" if low else ""))
    best = max(others, key=lambda n: by[n]["auroc"]["overall"]["mean"], default=None)
    if best and best != "loss":
        gain = _paired_gain(bads, by[best])
        notes.append(f"- paired gain of bads over the best other method ({best}), overall: {_gain_text(gain)}; "
                     f"per seed {', '.join(f'{g:+.3f}' for g in gain)}")
    return notes


def _paired_gain(entry: dict, other: dict) -> np.ndarray:
    return np.asarray(entry["auroc"]["overall"]["values"]) - np.asarray(other["auroc"]["overall"]["values"])


def _gain_text(gain: np.ndarray) -> str:
    return f"{gain.mean():+.3f} ± {sd(gain):.3f} over {len(gain)} seeds"


def saved_runs(path: Path) -> dict:
    """Earlier runs kept in selection.json, one per base (a file from before bases were tracked is random-init)."""
    if not path.is_file():
        return {}
    saved = read_json(path)
    return saved["runs"] if "runs" in saved else {"random": saved}


def merge_runs(paths: list[Path]) -> dict:
    """The multi-seed runs of several files with the same settings, one report per run key, re-summarised.
    Disjoint seeds are appended (single-process runs side by side, to use both cores); on a seed two files share,
    their methods are joined and a method in both keeps the first file's row (a peers-only run, `--methods ''`,
    adds its peers to a committed report without touching its bads rows)."""
    merged: dict = {}
    for path in paths:
        for key, report in saved_runs(path).items():
            if "per_seed" not in report:
                continue
            if key not in merged:
                merged[key] = {**report, "per_seed": [], "seeds": []}
            _join_seeds(merged[key], report)
    for report in merged.values():
        report["summary"] = summarise(report["per_seed"])
        report["notes"] = multi_seed_targets(report["summary"])
        report["args"]["seeds"] = ",".join(map(str, report["seeds"]))
    return merged


def _join_seeds(into: dict, report: dict) -> None:
    by_seed = {run["seed"]: run for run in into["per_seed"]}
    for run in report["per_seed"]:
        if run["seed"] not in by_seed:
            into["per_seed"].append(run)
            into["seeds"].append(run["seed"])
            continue
        have = {m["method"] for m in by_seed[run["seed"]]["methods"]}
        by_seed[run["seed"]]["methods"] += [m for m in run["methods"] if m["method"] not in have]
    into["seconds"] = max(into.get("seconds", 0), report["seconds"])
