"""Peers that read language, for the real-text benchmark (issue 18). Benchmark-only: one score per train row,
higher = cleaner / keep.

- `qa-cosine`: cosine of the answer's and the question's embeddings (the packaged all-MiniLM-L6-v2).
- `rds-embed`: RDS+ with a real encoder: the row's (question + answer) embedding, mean cosine to its 5 nearest
  meta rows.
- `char-lm`: a character 4-gram LM (add-k smoothing, backing off to nothing) fitted on the meta answers; the
  answer's mean log-probability per character.
- `fasttext`: a fastText classifier, meta (positive) vs pool (negative), pool rows scored out of fold (5 folds).
"""
from __future__ import annotations

import math
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np


def _embeddings(rows):
    from dpsel.models.embedder import EmbeddingCache, load_embedder
    from dpsel.select.semantic import row_embeddings
    embedder = load_embedder("default")
    return row_embeddings(embedder, rows, EmbeddingCache(embedder))


def qa_cosine(train) -> np.ndarray:
    q, a = _embeddings(train)
    return np.sum(q * a, axis=1)


def rds_embed(train, meta, k: int = 5) -> np.ndarray:
    def rows(x):
        q, a = _embeddings(x)
        v = q + a
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    sims = rows(train) @ rows(meta).T
    return np.sort(sims, axis=1)[:, -k:].mean(axis=1)


def char_lm(train, meta, order: int = 4, add_k: float = 0.1) -> np.ndarray:
    from dpsel.select.consistency import answer_text
    grams, contexts = Counter(), Counter()
    for m in meta:
        text = "\x02" * (order - 1) + answer_text(m)
        for i in range(order - 1, len(text)):
            grams[text[i - order + 1:i + 1]] += 1
            contexts[text[i - order + 1:i]] += 1
    vocab = len({g[-1] for g in grams}) + 1
    scores = []
    for m in train:
        text = "\x02" * (order - 1) + answer_text(m)
        logp = [math.log((grams[text[i - order + 1:i + 1]] + add_k) / (contexts[text[i - order + 1:i]] + add_k * vocab))
                for i in range(order - 1, len(text))]
        scores.append(float(np.mean(logp)) if logp else -20.0)
    return np.asarray(scores)


def fasttext_quality(train, meta, seed: int, folds: int = 5) -> np.ndarray:
    """Out-of-fold P(meta) per pool row; where this interpreter lacks fasttext, in the peers' interpreter
    ($PEERS_PYTHON, default .venv-peers/bin/python beside the repository, as benchmarks/dedup.py uses)."""
    from sklearn.model_selection import KFold
    text = lambda m: " ".join(t["content"] for t in m).replace("\n", " ")  # noqa: E731
    pool, trusted = [text(m) for m in train], [f"__label__meta {text(m)}" for m in meta]
    splits = [(fit.tolist(), held.tolist()) for fit, held in KFold(folds, shuffle=True, random_state=seed).split(pool)]
    try:
        import fasttext  # noqa: F401
    except ImportError:
        return _fasttext_elsewhere(pool, trusted, splits, seed)
    return _fasttext_folds(pool, trusted, splits, seed)


def _fasttext_elsewhere(pool, trusted, splits, seed) -> np.ndarray:
    import json
    import os
    import subprocess
    python = os.environ.get("PEERS_PYTHON", str(Path(__file__).resolve().parents[1] / ".venv-peers/bin/python"))
    with tempfile.TemporaryDirectory(prefix="fasttext-io-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "scores.json"
        job.write_text(json.dumps({"pool": pool, "trusted": trusted, "splits": splits, "seed": seed}))
        subprocess.run([python, __file__, str(job), str(out)], check=True)
        return np.asarray(json.loads(out.read_text()))


def _fasttext_folds(pool, trusted, splits, seed) -> np.ndarray:
    import fasttext
    scores = np.zeros(len(pool))
    with tempfile.TemporaryDirectory(prefix="fasttext-") as tmp:
        path = Path(tmp) / "fit.txt"
        for fit, held in splits:
            path.write_text("\n".join(trusted + [f"__label__pool {pool[i]}" for i in fit]) + "\n")
            model = fasttext.train_supervised(str(path), epoch=10, wordNgrams=2, minn=2, maxn=4, seed=seed,
                                              thread=1, verbose=0)
            for i in held:  # model.f: fasttext-wheel 0.9.2's predict() breaks on numpy 2 (np.array(copy=False))
                scores[i] = {label: p for p, label in model.f.predict(pool[i], 2, 0.0, "strict")}.get(
                    "__label__meta", 0.0)
    return scores


PEERS = {
    "qa-cosine": lambda data, seed: qa_cosine(data["train"]),
    "rds-embed": lambda data, seed: rds_embed(data["train"], data["meta"]),
    "char-lm": lambda data, seed: char_lm(data["train"], data["meta"]),
    "fasttext": lambda data, seed: fasttext_quality(data["train"], data["meta"], seed),
}


if __name__ == "__main__":  # the fasttext worker: python peers_text.py JOB.json OUT.json
    import json
    import sys
    job = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(_fasttext_folds(job["pool"], job["trusted"], job["splits"],
                                                            job["seed"]).tolist()))
