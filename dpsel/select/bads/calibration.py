"""Evidence calibrated on the trusted meta rows: each source's score becomes a probability that the row is bad.

The `max` of robust z-scores let every source's noisy upper tail into the prior, so the combination scored below
its best single source (issue 18: synth 0.807 vs question–answer consistency 0.844). Here each source is read as a
two-group model (Efron's empirical Bayes): the meta rows are draws from the clean distribution, the pool a mixture
π₀·clean + (1 − π₀)·bad. A pool row at score s gets the tail-area false-discovery rate
Fdr(s) = π₀·P_meta(S ≥ s) / P_pool(S ≥ s), and P(bad | s) = 1 − Fdr(s). A source whose tail is no heavier in the
pool than in meta (uninformative, or anti-informative like fluency on fluent boilerplate) gets π₀ ≈ 1 and P(bad) ≈ 0
on average, and so drops out (only its few most extreme rows keep some: 150 meta rows say little about the pool's
top 1%); an informative source's least suspicious rows get the base rate 1 − π₀ (a tail area, not a local rate); one that is informative only in its far tail (fluency on shuffled words) counts only there. The sources
are combined by noisy-or, 1 − Π(1 − P_k(bad)): a row is bad if any calibrated source says so.
"""
from __future__ import annotations

import numpy as np


def clean_fraction(pool: np.ndarray, meta: np.ndarray) -> float:
    """π₀ (Storey's estimate): pool rows below the meta median, over the half that clean rows put there."""
    return float(min(1.0, np.mean(pool <= np.median(meta)) / 0.5))


def tail_bad_probability(pool: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """1 − Fdr(s) per pool row (s = badness, high = looks bad), monotone in s (q-value style), in [0, 1]."""
    pool, meta = np.asarray(pool, dtype=np.float64), np.sort(np.asarray(meta, dtype=np.float64))
    n, m = len(pool), len(meta)
    order = np.argsort(-pool, kind="stable")
    meta_tail = (m - np.searchsorted(meta, pool[order], side="left") + 1) / (m + 1)  # +1: no meta row is past s
    pool_tail = np.arange(1, n + 1) / n
    fdr = np.minimum(1.0, clean_fraction(pool, meta) * meta_tail / pool_tail)
    fdr = np.minimum.accumulate(fdr[::-1])[::-1]  # a worse score never gets a lower P(bad)
    out = np.empty(n)
    out[order] = 1.0 - fdr
    return out


def noisy_or(probabilities: list[np.ndarray]) -> np.ndarray:
    """P(bad) when any source's bad verdict suffices: 1 − Π(1 − p_k)."""
    return 1.0 - np.prod([1.0 - np.asarray(p) for p in probabilities], axis=0)


def prior_mean_from_bad_probability(bad: np.ndarray, beta: float, floor: float = 1e-3) -> np.ndarray:
    """Beta prior mean β·P(clean): β for a row no calibrated source flags, towards 0 the surer one is."""
    return np.clip(beta * (1.0 - np.asarray(bad, dtype=np.float64)), floor, None)
