"""Word-order (fluency) evidence for the bads prior, label-free: does the answer read as running text?

A word-bigram model is counted over the pool's and the meta set's answers (the clean majority writes fluent text),
and each answer is scored by its mean pointwise mutual information, log p(w_t | w_{t-1}) − log p(w_t), with its own
counts left out (a shuffled answer's bigrams would otherwise find themselves). PMI, not log-probability, so rare
vocabulary does not read as disfluent. Answers whose words were shuffled land in the low tail (measured on the
docstring set, seed 0: garbage AUROC 0.93 alone; 0.55 for the embedder's question–answer consistency).
"""
from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np

TOKEN = re.compile(r"\w+|[^\w\s]")


def _words(text: str) -> list[str]:
    return ["<s>", *TOKEN.findall(text.lower()), "</s>"]


def bigram_fluency(answers, extra=(), smoothing: float = 1.0) -> np.ndarray:
    """Per answer: mean leave-one-out bigram PMI (higher = more fluent). `extra` (meta answers) only count.
    Two passes over `answers` (a sequence, or a `TextView` reading a pool a chunk at a time): the counts, then
    each answer's score, its words made again; no answer's words are held beyond its own turn."""
    unigrams, bigrams = Counter(), Counter()
    for text in itertools.chain(answers, extra):
        words = _words(text)
        unigrams.update(words)
        bigrams.update(zip(words[:-1], words[1:]))
    total = sum(unigrams.values()) + len(unigrams)
    scores = np.zeros(len(answers))
    for i, text in enumerate(answers):
        words = _words(text)
        own_uni, own_bi = Counter(words), Counter(zip(words[:-1], words[1:]))
        pmi = []
        for prev, word in zip(words[:-1], words[1:]):
            p_word = (unigrams[word] - own_uni[word] + 1) / total
            p_next = (bigrams[prev, word] - own_bi[prev, word] + smoothing * p_word) / \
                (unigrams[prev] - own_uni[prev] + smoothing)
            pmi.append(np.log(p_next) - np.log(p_word))
        scores[i] = float(np.mean(pmi))
    return scores
