"""The cheap selection peers practitioners reach first, on the same rows and trusted (meta) set as `dpsel`'s
methods. Benchmark-only: each returns one score per train row, higher = cleaner / keep.

- `quality_classifier`: DCLM-style quality classifier, meta (positive) vs pool (negative), on hashed character
  n-grams with logistic regression (sklearn; fastText is the same linear model over n-gram buckets). The pool rows
  are scored out of fold (5 folds), so a row is never scored by a classifier that saw it labelled "pool".
- `dsir`: importance weights log p_meta(x) − log p_pool(x) of hashed word uni+bigrams, with the `data-selection`
  package's own HashedNgramDSIR featuriser and estimator (Xie et al. 2023).
- `task_disagreement`: predict the `task` from the answer alone (char n-grams, 5-fold out-of-fold probabilities)
  and score each row with cleanlab's label-quality score of its own task: an answer that does not look like its
  task's answers (swapped, garbage, refusals) scores low.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np


def prompt_and_answer(messages) -> str:
    return "\n".join(m["content"] for m in messages)


def answer_of(messages) -> str:
    return messages[-1]["content"]


def _char_ngrams():
    from dpsel.select.consistency import char_ngrams  # the featuriser bads' group-consistency evidence uses
    return char_ngrams()


def _logistic(seed: int):
    from dpsel.select.consistency import linear_classifier
    return linear_classifier(seed)


def quality_classifier(train, meta, seed: int, folds: int = 5) -> np.ndarray:
    from scipy.sparse import vstack
    from sklearn.model_selection import KFold
    vectorizer = _char_ngrams()
    x_pool = vectorizer.transform([prompt_and_answer(m) for m in train])
    x_meta = vectorizer.transform([prompt_and_answer(m) for m in meta])
    scores = np.zeros(len(train))
    for fit_idx, held_idx in KFold(folds, shuffle=True, random_state=seed).split(np.arange(len(train))):
        model = _logistic(seed).fit(vstack([x_meta, x_pool[fit_idx]]),
                                    np.r_[np.ones(x_meta.shape[0]), np.zeros(len(fit_idx))])
        scores[held_idx] = model.predict_proba(x_pool[held_idx])[:, 1]
    return scores


def dsir(train, meta) -> np.ndarray:
    from data_selection import HashedNgramDSIR
    with tempfile.TemporaryDirectory(prefix="dsir-") as tmp:
        paths = {}
        for name, rows in (("pool", train), ("meta", meta)):
            paths[name] = Path(tmp) / f"{name}.jsonl"
            paths[name].write_text("".join(json.dumps({"text": prompt_and_answer(m)}) + "\n" for m in rows))
        model = HashedNgramDSIR([str(paths["pool"])], [str(paths["meta"])], cache_dir=str(Path(tmp) / "cache"),
                                num_proc=1, min_example_length=0)
        model.fit_importance_estimator(num_tokens_to_fit="all")
        return np.array([model.importance_estimator(model.featurizer(prompt_and_answer(m))) for m in train])


def task_disagreement(train, tasks, seed: int, folds: int = 5) -> np.ndarray:
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import cross_val_predict
    labels_text = np.asarray([str(t) for t in tasks])
    classes, labels = np.unique(labels_text, return_inverse=True)
    x = _char_ngrams().transform([answer_of(m) for m in train])
    pred_probs = cross_val_predict(_logistic(seed), x, labels, cv=folds, method="predict_proba")
    return get_label_quality_scores(labels, pred_probs)


PEERS = {
    "quality-clf": lambda data, seed: quality_classifier(data["train"], data["meta"], seed),
    "dsir": lambda data, seed: dsir(data["train"], data["meta"]),
    "task-disagreement": lambda data, seed: task_disagreement(data["train"], data["tasks"], seed),
}
