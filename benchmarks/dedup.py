"""Near-duplicate removal and decontamination on a generated pool with planted truth: dpsel's near-dup
stage against datatrove's MinHash pipeline and Data-Juicer's MinHash deduplicator, on the same rows.

The pool: distinct documents (40-160 words drawn from a Zipf vocabulary, wrapped in one of a few prompt
templates) plus planted near-duplicates of random originals: word edits (1-3 substituted, inserted or
deleted words), reorderings (two halves swapped) and template changes (the same text in another
template). Planted contamination: pool rows that contain an evaluation text (a long one, sharing
13-grams, or a short question of 6-12 words). Truth for near-duplicates: a planted copy should be dropped,
an original kept; recall is also given over the planted copies whose exact word-5-shingle Jaccard with
their original reaches the threshold (what a perfect MinHash could find).

Each deduplicator runs in its own process (peak RSS = that process's max resident set): dpsel in this
venv, the peers in the venv given by --peers-python (they are not dpsel dependencies). A peer that is not
installed is reported as skipped.

    python benchmarks/dedup.py --rows 100000 --peers-python .venv-peers/bin/python

`--shape chat` / `--shape realtext`: the chat-shaped dev sets of benchmarks/dedup_pools.py (system prompts,
shared templates and boilerplate, re-templated duplicates, eval copies), run by benchmarks/dedup_chat.py.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dedup_workers import LOOSE, ROOT, THRESHOLD, WORKERS, run_worker
from stats import table, write_report

TEMPLATES = ("{t}", "### Instruction:\n{t}\n\n### Response:", "Question: {t}\nAnswer:", "<|user|>\n{t}")
RESULTS = Path(__file__).parent / "results"


# ----------------------------------------------------------------------------- the pool
def _vocabulary(rng: random.Random, size: int = 20_000) -> tuple[list[str], list[float]]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(size * 2)})[:size]
    rng.shuffle(words)
    return words, [1 / (k + 1) ** 1.05 for k in range(len(words))]


def _edit(rng: random.Random, words: list[str], vocab: list[str]) -> list[str]:
    words = list(words)
    for _ in range(rng.randint(1, 3)):
        at, kind = rng.randrange(len(words)), rng.choice("sid")
        if kind == "s":
            words[at] = rng.choice(vocab)
        elif kind == "i":
            words.insert(at, rng.choice(vocab))
        elif len(words) > 10:
            del words[at]
    return words


def make_pool(rows: int, seed: int = 0, dup_frac: float = 0.2, contaminated: int = 1000):
    """(texts, truth) where truth has `copy_of` (row index or -1), `kind` and the eval texts."""
    rng = random.Random(seed)
    vocab, weights = _vocabulary(rng)
    n_dup = int(rows * dup_frac)
    n_orig = rows - n_dup
    bodies = [rng.choices(vocab, weights, k=rng.randint(40, 160)) for _ in range(n_orig)]
    template = [rng.randrange(len(TEMPLATES)) for _ in range(n_orig)]
    texts = [TEMPLATES[t].format(t=" ".join(b)) for b, t in zip(bodies, template)]
    copy_of, kind = [-1] * n_orig, ["original"] * n_orig
    for _ in range(n_dup):
        src = rng.randrange(n_orig)
        how = rng.choice(("edit", "reorder", "template"))
        words = bodies[src]
        if how == "edit":
            text = TEMPLATES[template[src]].format(t=" ".join(_edit(rng, words, vocab)))
        elif how == "reorder":
            cut = rng.randint(len(words) // 3, 2 * len(words) // 3)
            text = TEMPLATES[template[src]].format(t=" ".join(words[cut:] + words[:cut]))
        else:
            other = rng.choice([k for k in range(len(TEMPLATES)) if k != template[src]])
            text = TEMPLATES[other].format(t=" ".join(words))
        texts.append(text)
        copy_of.append(src)
        kind.append(how)
    order = list(range(rows))
    rng.shuffle(order)       # copies are spread through the pool, each after or before its original
    position = {old: new for new, old in enumerate(order)}
    texts = [texts[o] for o in order]
    copy_of = [position[copy_of[o]] if copy_of[o] >= 0 else -1 for o in order]
    kind = [kind[o] for o in order]
    evals, contaminated_rows = _plant_contamination(rng, texts, copy_of, vocab, weights, contaminated)
    return texts, {"copy_of": copy_of, "kind": kind, "evals": evals, "contaminated": contaminated_rows}


def _plant_contamination(rng, texts, copy_of, vocab, weights, n):
    """Put eval texts (half long, half short questions) into `n` original rows that have no copies."""
    has_copy = {c for c in copy_of if c >= 0}
    candidates = [k for k, c in enumerate(copy_of) if c < 0 and k not in has_copy]
    chosen = sorted(rng.sample(candidates, n))
    evals = []
    for j, row in enumerate(chosen):
        length = rng.randint(30, 80) if j % 2 == 0 else rng.randint(6, 12)
        eval_text = " ".join(rng.choices(vocab, weights, k=length)) + ("?" if j % 2 else "")
        evals.append(eval_text)
        texts[row] = f"{texts[row]}\n{eval_text}"
    evals += [" ".join(rng.choices(vocab, weights, k=rng.randint(6, 80))) for _ in range(n)]  # unused evals
    return evals, chosen


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(text):
        words = "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()
        return {tuple(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}
    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y)



# ----------------------------------------------------------------------------- scoring and report
def cluster_scores(dropped: set[int], clusters: list[list[int]]) -> tuple[int, int]:
    """(true positives, ideal drops): each planted cluster should lose all members but one."""
    tp = sum(min(len(dropped.intersection(c)), len(c) - 1) for c in clusters)
    return tp, sum(len(c) - 1 for c in clusters)


def planted_clusters(copy_of: list[int], texts: list[str] | None = None) -> list[list[int]]:
    """Original + copies; with `texts`, only the copies within THRESHOLD (exact 5-shingle Jaccard)."""
    groups: dict[int, list[int]] = {}
    for row, src in enumerate(copy_of):
        if src >= 0 and (texts is None or shingle_jaccard(texts[row], texts[src]) >= THRESHOLD):
            groups.setdefault(src, [src]).append(row)
    return list(groups.values())


def score(result: dict, rows: int, clusters, reachable) -> dict:
    dropped = set(result["dropped"])
    tp, ideal = cluster_scores(dropped, clusters)
    tp_reach, ideal_reach = cluster_scores(dropped, reachable)
    return {"dropped": len(dropped), "precision": round(tp / max(len(dropped), 1), 4),
            "recall": round(tp / max(ideal, 1), 4), "recall_reachable": round(tp_reach / max(ideal_reach, 1), 4),
            "seconds": round(result["seconds"], 2), "rows_per_s": round(rows / result["seconds"]),
            "peak_rss_mb": round(result["peak_rss_mb"]), "start_rss_mb": round(result["start_rss_mb"]),
            "bands_x_rows": result.get("bands")}


def _misses(result: dict, truth: dict, texts: list[str]) -> dict:
    """Why planted copies were kept: counts by planted kind and by exact-Jaccard band."""
    dropped = set(result["dropped"])
    by_kind, by_band = {}, {}
    for row, src in enumerate(truth["copy_of"]):
        if src < 0 or row in dropped or src in dropped:
            continue
        j = shingle_jaccard(texts[row], texts[src])
        band = "J>=0.8" if j >= THRESHOLD else ("0.7<=J<0.8" if j >= 0.7 else "J<0.7")
        by_kind[truth["kind"][row]] = by_kind.get(truth["kind"][row], 0) + 1
        by_band[band] = by_band.get(band, 0) + 1
    return {"missed_by_kind": by_kind, "missed_by_exact_jaccard": by_band}


def write_pool(folder: Path, texts: list[str], evals: list[str]) -> list[str]:
    messages = [[{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}] for t in texts]
    (folder / "evals.json").write_text(json.dumps(evals))
    return write_messages(folder, messages)


def write_messages(folder: Path, messages: list[list[dict]], evals: list[list[dict]] | None = None) -> list[str]:
    """pool.parquet (dpsel's rows), pool.jsonl (the same conversation text for the peers) and, given chat eval
    rows, evals.parquet; returns the conversation texts."""
    sys.path.insert(0, str(ROOT))
    from dpsel.stages.base import ConversationBatch

    def rows(conversations):
        return pa.table({"dpsel_id": [f"{i:020d}" for i in range(len(conversations))],
                         "dpsel_messages": conversations})
    table = rows(messages)
    pq.write_table(table, folder / "pool.parquet")
    if evals is not None:
        pq.write_table(rows(evals), folder / "evals.parquet")
    conversation = ConversationBatch(table).text.to_pylist()       # the peers see the same text as dpsel
    with (folder / "pool.jsonl").open("w") as f:
        for i, text in enumerate(conversation):
            f.write(json.dumps({"id": str(i), "text": text}) + "\n")
    return conversation


def _markdown(report: dict) -> str:
    lines = [f"# Near-duplicate removal: {report['rows']:,} rows, threshold {THRESHOLD}", "",
             report["note"], ""]
    rows = []
    for name, r in report["methods"].items():
        if "skipped" in r:
            rows.append(f"| {name} | skipped: {r['skipped']} | | | | | | | |")
            continue
        mark = " (earlier run, same pool)" if r.get("reused") else ""
        rows.append([f"{name}{mark}", r["bands_x_rows"], r["dropped"], r["precision"], r["recall"],
                     r["recall_reachable"], f"{r['rows_per_s']:,}", r["peak_rss_mb"], r["start_rss_mb"]])
    lines += table(["method", "bands×rows", "dropped", "precision", "recall", "recall (J≥0.8 copies)", "rows/s (1 core)",
                    "peak RSS MB", "RSS after load MB"], rows, align="l" * 9)
    d = report["dpsel_extra"]
    lines += ["", f"dpsel near-dup state: {d['declared_bytes_per_row']} bytes/row declared, "
              f"{d['state_bytes_per_row']:.0f} measured (index arrays / rows)."]
    if report.get("state"):
        st = report["state"]
        lines.append(f"At {st['rows']:,} rows (random signatures, 20% copies; no text): state "
                     f"{st['state_bytes_per_row']:.0f} bytes/row, peak of numpy allocations through clustering and "
                     f"compaction {st['peak_bytes_per_row']:.0f} bytes/row, clustering {st['cluster_seconds']:.1f} s.")
    lines += [
              f"Decontamination: recall {d['decon_recall']} ({d['decon_found']}/{d['decon_planted']} planted rows), "
              f"{d['decon_false']} other rows flagged, {d['decon_rows_per_s']:,} rows/s.",
              "", "Misses (planted copies kept alongside their original):"]
    for name, m in report["misses"].items():
        lines.append(f"- {name}: by kind {m['missed_by_kind']}; by exact Jaccard {m['missed_by_exact_jaccard']}")
    return "\n".join(lines) + "\n"


def _run_state(folder: Path, rows: int, env: dict) -> dict | None:
    if not rows:
        return None
    subprocess.run([sys.executable, __file__, "--worker", "state", "--folder", str(folder), "--state-rows", str(rows)],
                   env=env, check=True, timeout=1800)
    return json.loads((folder / "state.json").read_text())


def _reuse(args, methods: dict, misses: dict) -> None:
    """Entries of methods not run this time, from the last report on the same pool (marked `reused`)."""
    path = args.out / f"{args.name}.json"
    if not args.reuse or not path.exists():
        return
    old = json.loads(path.read_text())
    if old.get("rows") != args.rows or old.get("seed") != args.seed:
        return
    for name, entry in old["methods"].items():
        if name not in methods:
            methods[name] = entry | {"reused": True}
            misses[name] = old["misses"].get(name, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peers-python", default=str(ROOT / ".venv-peers/bin/python"))
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--methods", default=f"dpsel,dpsel@{LOOSE},datatrove,data_juicer")
    parser.add_argument("--state-rows", type=int, default=1_000_000, help="near-dup state/clustering check")
    parser.add_argument("--name", default="dedup", help="results file name (e.g. dedup-1m for a 1M-row run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the entries of methods not run now from results/dedup.json (same rows and seed)")
    parser.add_argument("--shape", choices=("alpaca", "chat", "realtext", "infotext"), default="alpaca",
                        help="alpaca: this module's pool; chat/realtext/infotext: benchmarks/dedup_chat.py's chat-shaped sets")
    parser.add_argument("--seeds", default="0,1", help="chat/realtext: seeds of the quality figures")
    parser.add_argument("--peer-rows", type=int, default=10_000, help="chat: pool size the peers run at")
    parser.add_argument("--base-root", type=Path, help="chat/realtext: a checkout of the previous code (dpsel_base)")
    parser.add_argument("--repeats", type=int, default=3, help="chat/realtext --speed-only: alternating runs")
    parser.add_argument("--speed-only", action="store_true",
                        help="chat/realtext: only the speed runs (dpsel vs --base-root), added to the saved report")
    args = parser.parse_args()
    if args.worker:
        return run_worker(args.worker, args.folder, args.state_rows)
    if args.shape != "alpaca":
        from dedup_chat import run_chat
        return run_chat(args)
    texts, truth = make_pool(args.rows, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        conversation = write_pool(folder, texts, truth["evals"])
        clusters = planted_clusters(truth["copy_of"])
        reachable = planted_clusters(truth["copy_of"], conversation)
        methods, misses, results = {}, {}, {}
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        for name in args.methods.split(","):
            python = sys.executable if name.startswith("dpsel") else args.peers_python
            done = subprocess.run([python, __file__, "--worker", name, "--folder", str(folder)], env=env,
                                  capture_output=True, text=True, timeout=3000)
            if done.returncode != 0:
                methods[name] = {"skipped": done.stderr.strip().splitlines()[-1][:200] if done.stderr else "failed"}
                continue
            results[name] = json.loads((folder / f"{name}.json").read_text())
            methods[name] = score(results[name], args.rows, clusters, reachable)
            misses[name] = _misses(results[name], truth, conversation)
        state = _run_state(folder, args.state_rows, env)
    _reuse(args, methods, misses)
    d = results["dpsel"]
    planted = set(truth["contaminated"])
    found = planted.intersection(d["contaminated"])
    report = {"rows": args.rows, "threshold": THRESHOLD, "planted_copies": sum(len(c) - 1 for c in clusters),
              "planted_copies_reachable": sum(len(c) - 1 for c in reachable), "methods": methods, "misses": misses,
              "dpsel_extra": {"declared_bytes_per_row": d["declared_bytes_per_row"],
                              "state_bytes_per_row": d["state_bytes_per_row"],
                              "decon_planted": len(planted), "decon_found": len(found),
                              "decon_recall": round(len(found) / max(len(planted), 1), 4),
                              "decon_false": len(set(d["contaminated"]) - planted),
                              "decon_rows_per_s": round(args.rows / d["decon_seconds"])},
              "seed": args.seed, "state": state,
              "note": ("Each method in its own process on one core (OMP_NUM_THREADS=1), same rows and text. "
                       "Recall counts a planted cluster (original + copies) as fully found when all but one "
                       "member are dropped; 'J≥0.8 copies' only counts copies whose exact word-5-shingle Jaccard "
                       "with the original reaches the threshold. datatrove runs with its default 14×8 bands "
                       "(it takes bands, not a threshold; their S-curve's midpoint is 0.72, so dpsel is also run at "
                       f"{LOOSE}); Data-Juicer with jaccard_threshold=0.8. Peak RSS of dpsel: near-dup only "
                       "(before its decontamination pass).")}
    write_report(args.out / args.name, report, _markdown(report))
    print(_markdown(report))


if __name__ == "__main__":
    main()
