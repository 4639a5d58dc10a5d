"""Selection benchmark, rendering: the Markdown of one multi-seed run, of an earlier single-seed run, and of a
whole selection JSON (every saved run). Reads only the saved report, so it re-renders a committed JSON."""
from __future__ import annotations

from selection_summary import kinds_of
from stats import DASH, fmt, mib, pm, table


def _source(a: dict) -> str:
    """Where the rows came from: the generator's command, or the real-text set (benchmarks/realtext.py)."""
    if a.get("dataset") == "realtext-chat":
        return (f"real text, chat-shaped: {a['rows']} rows built by `benchmarks/realtext_chat.py` from installed "
                f"packages' METADATA descriptions and the GNU info manuals, with {a['noise']} of them corrupted")
    if a.get("dataset") == "realtext":
        return (f"real text: {a['rows']} rows built by `benchmarks/realtext.py` from installed packages' docstrings, "
                f"with {a['noise']} of them corrupted")
    return f"`dpsel synth --rows {a['rows']} --noise {a['noise']}`"


def markdown(report: dict) -> str:
    """An earlier single-seed run (before issue 13)."""
    a = report["args"]
    base = a.get("base", "random") if a["model_size"] == "tiny" else "random"
    if base == "pretrained" and report.get("pretrain"):
        p = report["pretrain"]
        base_text = (f"Base: the tiny model **pretrained** for {p['steps_done']} steps ({p['epochs']} epochs, "
                     f"{p['seconds']:.0f} s on {p['device']}, final loss {p['final_loss']:.3f}) on {p['rows']} clean "
                     f"`make_rows` rows drawn with seed {p['settings']['seed']}, prompt-disjoint from this benchmark's "
                     "rows: a stand-in for the pretrained LLM a real user curates with (the random-init tiny model "
                     "cannot tell an arithmetic slip from a right answer). Selection and downstream start from it.")
    else:
        base_text = "Base: the tiny model at **random init** (no pretraining)."
    rows, kinds = [], kinds_of(report["methods"])
    for r in report["methods"]:
        au, t = r.get("auroc", {}), r["timings"]
        rows.append([r["method"], fmt(au.get("overall")), *(fmt(au.get(k)) for k in kinds), fmt(r["precision_kept"]),
                     fmt(t.get("step_ratio_vs_plain"), 2), fmt(t.get("seconds_per_step"), 3), fmt(r["seconds"], 1),
                     mib(r["peak_memory_bytes"], 0)])
    lines = [f"## Selection benchmark, {base} base", "", base_text, "",
             f"`dpsel synth` data: {a['rows']} training rows, {a['noise']:.0%} corrupted, {a['meta_rows']} meta rows, "
             f"model `{a['model_size']}` on `{a['device']}`, {a['steps']} selection steps, seed {a['seed']}. "
             f"Dedup removed {report['dedup']['removed']} rows before selection "
             f"({report['dedup']['removed_that_are_duplicates']} of {report['dedup']['duplicates_planted']} planted "
             f"duplicates): duplicates are handled by dedup, so they are not scored.", "",
             "AUROC of the posterior mean weights against the truth (clean = positive), overall and per corruption "
             f"kind; precision = fraction clean among the kept rows at budget {a['budget']}; step ratio = seconds per "
             "selection step / seconds per plain training step on the same batch size, measured in the same process.",
             "", *table(["method", "AUROC", *kinds, "precision@budget", "step ratio", "s/step", "total s",
                         "peak mem MB"], rows)]
    if report.get("downstream"):
        oracle = next((d["eval_loss"] for d in report["downstream"] if d["arm"] == "oracle (clean only)"), None)
        down = [[d["arm"], d["rows"], fmt(d["eval_loss"]), fmt(d["eval_exact_match"]),
                 f"{(d['eval_loss'] / oracle - 1) * 100:+.1f}%" if oracle else DASH] for d in report["downstream"]]
        lines += ["", f"Downstream: the base model (full fine-tune) trained {a['train_steps']} steps on each set, evaluated on the clean "
                  "test set (exact match = greedy answer equals the reference).", "",
                  *table(["trained on", "rows", "eval loss", "exact match", "vs oracle loss"], down)]
    if report.get("notes"):
        lines += ["", *report["notes"]]
    return "\n".join(lines) + "\n"


def multi_seed_markdown(report: dict) -> str:
    a, summary = report["args"], report["summary"]
    base = a.get("base", "random") if a["model_size"] == "tiny" else a["model_size"]
    rows, kinds = [], kinds_of(summary)
    for e in summary:
        au = e.get("auroc", {})
        rows.append([e["method"], pm(au.get("overall")), *(pm(au.get(k), 2) for k in kinds), pm(e["precision_kept"]),
                     pm(e.get("step_ratio_vs_plain"), 2), f"{e['seconds']['mean']:.0f}"])
    lines = [f"## {a.get('dataset', 'synth')}: {a['rows']} rows, {base} base, seeds {', '.join(map(str, report['seeds']))}", "",
             f"{_source(a)}, {a['meta_rows']} meta rows (the trusted set every "
             f"method and peer gets), model `{a['model_size']}` on `{a['device']}`, {a['threads']} torch thread(s), "
             f"selection run length {'--steps ' + str(a['steps']) if a['steps'] else 'the method default (epochs)'}, "
             f"extra {a['extra']}. Every figure: mean ± sample sd over the {len(report['seeds'])} data seeds. "
             "`name[alt]` rows are ablations computed from the same bads run.", "",
             *table(["method", "AUROC", *kinds, f"precision@{a['budget']}", "step ratio", "s"], rows)]
    for e in summary:
        for k, cov in enumerate(e.get("coverage", [])):
            v = cov["visits_after_burn_in"]
            lines.append(f"{'' if k else chr(10)}- {e['method']} seed {report['seeds'][k]}: {cov['steps']} steps, visits "
                         f"after burn-in min {v['min']} / median {v['median']:g} / max {v['max']}, "
                         f"{cov['rows_never_visited_after_burn_in']} rows never visited, scored by "
                         f"{cov['rows_scored_by']}")
    lines += ["", *report.get("notes", [])]
    return "\n".join(lines) + "\n"


def full_markdown(runs: dict) -> str:
    multi = [k for k in runs if "summary" in runs[k]]
    single = sorted((k for k in runs if k not in multi), key=lambda k: (k != "pretrained", k != "random", k))
    head = ["# Selection benchmark", "",
            "Newest run per (base, rows) (`python benchmarks/selection.py --base random --rows 3000 --seeds 0,1,2`); "
            "earlier single-seed runs kept below them."]
    body = [multi_seed_markdown(runs[k]) for k in sorted(multi, key=lambda k: (runs[k]["args"]["rows"], k))]
    if single:
        body += ["# Earlier single-seed runs (before issue 13)", ""] + [markdown(runs[k]) for k in single]
    return "\n".join(head) + "\n\n" + "\n".join(body)
