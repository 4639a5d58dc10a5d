"""benchmarks/dedup.py `--shape chat|realtext`: near-duplicates and decontamination on the chat-shaped dev sets
of benchmarks/dedup_pools.py, dpsel against the previous dpsel (`--base-root`, a checkout of the earlier commit)
and the peers (datatrove's MinHash pipeline and NGramsDecontFilter, Data-Juicer's MinHash deduplicator; Data-Juicer
has no decontamination). Quality over `--seeds` (mean ± sd); speed as rows/s on one core.

    python benchmarks/dedup.py --shape chat --rows 100000 --peer-rows 10000 --base-root ../wt-base
    python benchmarks/dedup.py --shape realtext --base-root ../wt-base
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from dpsel.stages.near_dup import ANSWER_THRESHOLD, SHORT_ANSWER_WORDS

from dedup import cluster_scores, planted_clusters, write_messages
from dedup_pools import CONTAM_KINDS, DUP_KINDS, build, truth
from stats import mean_sd, pm, table, write_report

METHODS = ("dpsel", "dpsel_base", "datatrove", "data_juicer")
LABELS = {"dpsel": "dpsel", "dpsel_base": "dpsel before (077f164)", "datatrove": "datatrove",
          "data_juicer": "Data-Juicer"}


def _words(text: str) -> list[str]:
    return "".join(ch if ch.isalnum() or ch == "_" else " " for ch in text.lower()).split()


def _answer(row) -> str:
    return row.answer.partition("\n\n")[0]           # the body: boilerplate paragraphs left out


def _share13(eval_text: str, text: str, n: int = 13) -> float:
    def grams(t):
        w = _words(t)
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    mine = grams(eval_text)
    return len(mine & grams(text)) / len(mine) if mine else 0.0


def _jaccard(a: str, b: str) -> float:
    x, y = set(_words(a)), set(_words(b))
    return len(x & y) / max(len(x | y), 1)


# ----------------------------------------------------------------------------- scoring one run
def score_near_dup(result: dict, data, info: dict) -> tuple[dict, dict]:
    dropped = set(result["dropped"])
    clusters = planted_clusters(info["copy_of"])
    tp, ideal = cluster_scores(dropped, clusters)
    out = {"dropped": len(dropped), "precision": tp / max(len(dropped), 1), "recall": tp / max(ideal, 1),
           "rows_per_s": len(data.pool) / result["seconds"]}
    for kind in DUP_KINDS:
        rows = [r for r, k in enumerate(info["kind"]) if k == kind]
        out[f"recall {kind}"] = sum(r in dropped or info["copy_of"][r] in dropped for r in rows) / max(len(rows), 1)
    missed = Counter()
    for r, src in enumerate(info["copy_of"]):
        if src < 0 or r in dropped or src in dropped:
            continue
        a, b = _answer(data.pool[r]), _answer(data.pool[src])
        missed[f"answer < {SHORT_ANSWER_WORDS} words" if min(len(_words(a)), len(_words(b))) < SHORT_ANSWER_WORDS
               else f"answer word-Jaccard < {ANSWER_THRESHOLD}" if _jaccard(a, b) < ANSWER_THRESHOLD
               else "other (keys, LSH or estimate)"] += 1
    planted = {m for c in clusters for m in c}
    partner = dict(zip(result["dropped"], result.get("dup_of", [-1] * len(dropped))))
    wrong = Counter()
    for d in dropped - planted:
        p = partner.get(d, -1)
        if p < 0 or p >= len(data.pool):
            wrong[f"{info['kind'][d]} (partner unknown)"] += 1
            continue
        same_key = data.pool[d].subject.key == data.pool[p].subject.key
        j = _jaccard(_answer(data.pool[d]), _answer(data.pool[p]))
        wrong[f"{info['kind'][d]} with {info['kind'][p]}; same key {same_key}; answer J "
              f"{'>=' if j >= ANSWER_THRESHOLD else '<'} {ANSWER_THRESHOLD}"] += 1
    return out, {"near_dup_missed": dict(missed), "near_dup_false": dict(wrong)}


def score_decon(result: dict, data, info: dict) -> tuple[dict, dict]:
    if "contaminated" not in result:
        return {}, {}
    flagged, planted = set(result["contaminated"]), set(info["contaminated"])
    clean = len(data.pool) - len(planted)
    out = {"recall": len(flagged & planted) / max(len(planted), 1),
           "clean_flagged_share": len(flagged - planted) / clean, "clean_flagged": len(flagged - planted),
           "rows_per_s": len(data.pool) / result["decon_seconds"]}
    for kind in CONTAM_KINDS:
        rows = [r for r in planted if info["kind"][r] == kind]
        out[f"recall {kind}"] = len(flagged.intersection(rows)) / max(len(rows), 1)
    missed = Counter()
    for r in planted - flagged:
        ev = data.evals[info["eval_of"][r]]
        missed[f"{info['kind'][r]}; eval answer {'<' if len(_words(ev.answer)) < 13 else '>='} 13 words"] += 1
    false, examples = Counter(), []
    details = {int(k): v for k, v in result.get("contam_detail", {}).items()}
    for r in sorted(flagged - planted):
        named = re.search(r"eval row (\d+)", details.get(r) or "")
        overlap = ""
        if named:
            overlap = "; " + _why_flagged(data.pool[r], data.evals[int(named.group(1))], details[r])
        false[info["kind"][r] + overlap] += 1
        if len(examples) < 3 and details.get(r):
            examples.append(f"{details[r]}: pool answer {data.pool[r].answer[:160]!r} / eval answer "
                            f"{data.evals[int(named.group(1))].answer[:160]!r}" if named else details[r])
    return out, {"decon_missed": dict(missed), "decon_false_by_kind": dict(false), "decon_false_examples": examples}


def _why_flagged(row, ev, detail: str) -> str:
    """A clean row flagged: text its answer really shares with the eval answer (e.g. two functions documented
    alike), or the question's template and shared context words matching with a different key, or else."""
    if "assistant" in detail and _share13(_answer(ev), row.answer) >= 0.5:
        return "answer holds >= 0.5 of the eval answer's 13-grams (text shared in the source)"
    if "user" in detail and row.subject.key != ev.subject.key:
        return "user 13-grams: question template + shared context words, another key"
    return "other"


# ----------------------------------------------------------------------------- running
def _worker(name: str, folder: Path, args) -> subprocess.CompletedProcess:
    """One method's worker (benchmarks/dedup_workers.py) in its own process on one core; `dpsel_base` runs the
    code of --base-root, the peers run in --peers-python."""
    python = sys.executable if name.startswith("dpsel") else args.peers_python
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env |= {"DPSEL_ROOT": str(args.base_root)} if name == "dpsel_base" else {}
    return subprocess.run([python, str(Path(__file__).with_name("dedup.py")), "--worker", name, "--folder", str(folder)],
                          env=env, capture_output=True, text=True, timeout=3000)


def _run_methods(data, methods, args, seed: int) -> dict:
    info = truth(data)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_messages(folder, [r.messages() for r in data.pool], [r.messages() for r in data.evals])
        for name in methods:
            done = _worker(name, folder, args)
            if done.returncode != 0:
                out[name] = {"skipped": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
                print(f"{name} skipped: {done.stderr[-2000:]}", flush=True)
                continue
            result = json.loads((folder / f"{name}.json").read_text())
            nd, nd_why = score_near_dup(result, data, info)
            dc, dc_why = score_decon(result, data, info)
            out[name] = {"near_dup": nd, "decon": dc, "why": nd_why | dc_why, "peak_rss_mb": result["peak_rss_mb"]}
            print(f"seed {seed} rows {len(data.pool)} {name}: {json.dumps({'nd': nd, 'dc': dc})}", flush=True)
    return out


def _summary(runs: list[dict]) -> dict:
    """Per method: every numeric figure as mean_sd over the seeds; the seeds' miss classes summed."""
    summary = {}
    for name in runs[0]:
        done = [r[name] for r in runs if "skipped" not in r.get(name, {"skipped": 1})]
        if not done:
            summary[name] = {"skipped": runs[0][name].get("skipped", "failed")}
            continue
        entry = {part: {k: mean_sd(d[part][k] for d in done) for k in done[0][part]} for part in ("near_dup", "decon")}
        why: dict = {}
        for d in done:
            for section, counts in d["why"].items():
                if section.endswith("examples"):
                    why.setdefault(section, counts)
                    continue
                for k, v in counts.items():
                    why.setdefault(section, Counter())[k] += v
        summary[name] = entry | {"why": {k: v if isinstance(v, list) else dict(v) for k, v in why.items()},
                                 "seeds": len(done)}
    return summary


def speed(args, rows: int, seed: int = 0) -> dict:
    """rows/s of dpsel's near-dup and decontamination against the previous code's, on one pool, the two runs
    alternating `--repeats` times (so a busy machine slows both alike)."""
    data = build(args.shape, rows, seed, contam_frac=0.01 if args.shape == "chat" else 0.05)
    names = [m for m in ("dpsel", "dpsel_base") if m != "dpsel_base" or args.base_root]
    seconds = {name: {"near_dup": [], "decon": []} for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_messages(folder, [r.messages() for r in data.pool], [r.messages() for r in data.evals])
        for _ in range(args.repeats):
            for name in names:
                _worker(name, folder, args).check_returncode()
                result = json.loads((folder / f"{name}.json").read_text())
                seconds[name]["near_dup"].append(result["seconds"])
                seconds[name]["decon"].append(result["decon_seconds"])
    out = {"rows": len(data.pool), "seed": seed, "repeats": args.repeats,
           "rows_per_s": {n: {stage: mean_sd(len(data.pool) / t for t in ts) for stage, ts in s.items()}
                          for n, s in seconds.items()}, "seconds": seconds}
    if "dpsel_base" in seconds:   # slowdown: new seconds / old seconds, on the medians
        out["slowdown"] = {stage: float(np.median(seconds["dpsel"][stage]) / np.median(seconds["dpsel_base"][stage]))
                           for stage in ("near_dup", "decon")}
    return out


def run_chat(args) -> None:
    name = args.name if args.name != "dedup" else f"dedup-{args.shape}"
    if args.speed_only:
        report = json.loads((args.out / f"{name}.json").read_text())
        report["speed"] = speed(args, args.rows)
        write_report(args.out / name, report, markdown(report))
        return print(markdown(report))
    seeds = [int(s) for s in args.seeds.split(",")]
    asked = [m for m in args.methods.split(",") if m in METHODS]
    methods = [m for m in METHODS if m in asked or (m == "dpsel_base" and args.base_root)]
    if args.shape == "chat":
        sizes = {args.rows: [m for m in methods if m.startswith("dpsel")], args.peer_rows: methods}
    else:
        sizes = {0: methods}
    report = {"shape": args.shape, "seeds": seeds, "sizes": []}
    for rows, names in sorted(sizes.items(), reverse=True):
        runs, shape = [], None
        for seed in seeds:
            data = build(args.shape, rows, seed, contam_frac=0.01 if args.shape == "chat" else 0.05)
            info = truth(data)
            shape = {"pool_rows": len(data.pool), "eval_rows": len(data.evals),
                     "kinds": dict(Counter(info["kind"])), "planted_copies": sum(k in DUP_KINDS for k in info["kind"]),
                     "planted_contaminated": len(info["contaminated"])}
            runs.append(_run_methods(data, names, args, seed))
        report["sizes"].append({"rows": shape["pool_rows"], "set": shape, "methods": _summary(runs)})
    write_report(args.out / name, report, markdown(report))
    print(markdown(report))


# ----------------------------------------------------------------------------- report
TARGETS = ("Targets (issue): near-dup recall >= 0.90 on template-differing pairs with precision >= 0.99; "
           "decontamination recall >= 0.95 of planted copies; clean rows flagged <= 0.5%; rows/s within 1.5x of "
           "before.")


def markdown(report: dict) -> str:
    lines = [f"# Near-duplicates and decontamination, {report['shape']}-shaped dev set", "", __doc__.split("\n\n")[0]
             .replace("\n", " "), "", f"Seeds {report['seeds']}: mean ± sd. One core each (OMP_NUM_THREADS=1). "
             "See benchmarks/dedup_pools.py for the set. The rows/s columns are single runs (another benchmark may have "
             "shared the machine's second core); the Speed section, alternating runs, is the comparison of codes. "
             "A precision of a run that drops nothing counts as 0.", "", TARGETS, ""]
    for size in report["sizes"]:
        s = size["set"]
        lines += [f"## {s['pool_rows']:,} pool rows, {s['eval_rows']:,} eval rows", "",
                  f"Planted: {s['planted_copies']:,} template-differing near-duplicates, "
                  f"{s['planted_contaminated']:,} eval copies; row kinds {s['kinds']}.", ""]
        rows = []
        for name, m in size["methods"].items():
            if "skipped" in m:
                rows.append([LABELS[name], f"skipped: {m['skipped']}"] + [""] * 8)
                continue
            nd, dc = m["near_dup"], m["decon"]
            rows.append([LABELS[name], pm(nd["precision"]), pm(nd["recall"]), pm(nd["recall retemplate+system"]),
                         f"{nd['rows_per_s']['mean']:,.0f}", pm(dc.get("recall")),
                         pm(dc.get("recall template")), pm(dc.get("recall system")),
                         pm(dc.get("clean_flagged_share"), 4),
                         f"{dc['rows_per_s']['mean']:,.0f}" if dc else "none comparable"])
        lines += table(["method", "near-dup precision", "near-dup recall", "recall (system changed too)",
                        "near-dup rows/s", "decon recall", "recall (template changed)", "recall (system changed)",
                        "clean flagged share", "decon rows/s"], rows, align="lllrlllll" + "r")
        lines += ["", "Why (summed over seeds):", ""]
        for name, m in size["methods"].items():
            for section, counts in m.get("why", {}).items():
                if counts:
                    lines.append(f"- {LABELS[name]}, {section.replace('_', ' ')}: {counts}")
        lines.append("")
    if report.get("speed"):
        sp = report["speed"]
        lines += [f"## Speed: {sp['rows']:,} rows (seed {sp['seed']}), {sp['repeats']} alternating runs each", "",
                  "rows/s on one core, mean ± sd; slowdown = median seconds now / median seconds before.", ""]
        rows = [[LABELS[n], f"{r['near_dup']['mean']:,.0f} ± {r['near_dup']['sd']:,.0f}",
                 f"{r['decon']['mean']:,.0f} ± {r['decon']['sd']:,.0f}"] for n, r in sp["rows_per_s"].items()]
        if "slowdown" in sp:
            rows.append(["slowdown (now / before)", f"{sp['slowdown']['near_dup']:.2f}x", f"{sp['slowdown']['decon']:.2f}x"])
        lines += table(["code", "near-dup rows/s", "decontamination rows/s"], rows, align="lrr") + [""]
    return "\n".join(lines)
