"""A Gopher/C4 rule filter peer (benchmark only): the heuristic document filters of Gopher (Rae et al. 2021,
table A1: quality and repetition rules) and C4 (Raffel et al. 2020), applied to each answer as written, as datatrove's
GopherQualityFilter, GopherRepetitionFilter and C4QualityFilter apply them. Document-length rules (Gopher's 50-word
minimum, C4's 3-sentence minimum) are left out: one-paragraph answers would all fail them. Score: minus the number of
rules failed (higher = keep), a tie broken by the share of alphabetic words.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
TERMINAL = (".", "!", "?", '"', "'")
C4_BAD = ("lorem ipsum", "javascript", "terms of use", "privacy policy", "cookie policy", "uses cookies", "{")


def _top_ngram_fraction(words: list[str], n: int) -> float:
    grams = Counter(tuple(words[k:k + n]) for k in range(len(words) - n + 1))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return count * sum(map(len, gram)) / max(sum(map(len, words)), 1) if count > 1 else 0.0


def _duplicate_ngram_fraction(words: list[str], n: int) -> float:
    grams = [tuple(words[k:k + n]) for k in range(len(words) - n + 1)]
    counts, covered = Counter(grams), np.zeros(len(words), dtype=bool)
    for k, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[k:k + n] = True
    lengths = np.asarray([len(w) for w in words])
    return float(lengths[covered].sum() / max(lengths.sum(), 1))


def failed_rules(text: str) -> tuple[int, float]:
    """(rules failed, share of words with a letter) for one answer."""
    words = text.split()
    lower = [w.lower() for w in words]
    alpha = sum(any(c.isalpha() for c in w) for w in words) / max(len(words), 1)
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    mean_len = np.mean([len(w) for w in words]) if words else 0.0
    checks = [
        not 3 <= mean_len <= 10,
        (text.count("#") + text.count("...") + text.count("…")) / max(len(words), 1) > 0.1,
        sum(line.startswith(("•", "-", "*")) for line in lines) / len(lines) > 0.9,
        sum(line.endswith(("...", "…")) for line in lines) / len(lines) > 0.3,
        alpha < 0.8,
        len(STOP_WORDS & set(lower)) < 2,
        not text.rstrip().endswith(TERMINAL),                          # C4: lines end in terminal punctuation
        any(bad in text.lower() for bad in C4_BAD),                   # C4's bad-content rules
        sum(c for c in Counter(lines).values() if c > 1) / len(lines) > 0.3,
        *(_top_ngram_fraction(lower, n) > limit for n, limit in ((2, 0.20), (3, 0.18), (4, 0.16))),
        *(_duplicate_ngram_fraction(lower, n) > limit for n, limit in ((5, 0.15), (6, 0.14), (7, 0.13),
                                                                         (8, 0.12), (9, 0.11), (10, 0.10))),
    ]
    return sum(checks), alpha


def gopher_c4(train) -> np.ndarray:
    from dpsel.select.consistency import answer_text
    out = [failed_rules(answer_text(m)) for m in train]
    return np.asarray([-n + 0.01 * alpha for n, alpha in out])


PEERS = {"gopher-c4": lambda data, seed: gopher_c4(data["train"])}
