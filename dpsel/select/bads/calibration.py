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

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

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


def noisy_or(probabilities) -> np.ndarray:
    """P(bad) when any source's bad verdict suffices: 1 − Π(1 − p_k), over any iterable of per-row arrays,
    multiplied in place one source at a time (the product `np.prod` takes over axis 0, in the same order)
    so a generator of sources holds one source's array at a time, not [sources, rows]."""
    clean = None
    for p in probabilities:
        if clean is None:
            clean = 1.0 - np.asarray(p, dtype=np.float64)
        else:
            clean *= 1.0 - np.asarray(p)
    if clean is None:
        raise ValueError("noisy_or of no sources")
    return 1.0 - clean


def prior_mean_from_bad_probability(bad: np.ndarray, beta: float, floor: float = 1e-3) -> np.ndarray:
    """Beta prior mean β·P(clean): β for a row no calibrated source flags, towards 0 the surer one is."""
    return np.clip(beta * (1.0 - np.asarray(bad, dtype=np.float64)), floor, None)


# --- Reviewed labels (curate --labels): the only ground truth about this pool's noise -------------------------
# The tail calibration above learns each source's clean distribution from meta alone, so every calibrated source
# counts alike in the noisy-or. A reviewer's drops are known-bad pool rows and keeps known-good ones: they say
# which sources separate this pool's bad rows from its good ones. The combination becomes a weighted noisy-or,
# P(bad) = 1 − Π(1 − p_k)^{w_k}, with w_k = exp(u_k) fitted by penalised likelihood on the labelled rows (drops
# bad; keeps and meta clean, the clean side weighted to the drops' total so that the many meta rows do not swamp
# a few drops, and so that rows picked near the cut do not set the balance); u_k ~ N(0, 1) shrinks every weight
# to 1, the unsupervised combination, when labels are few. The labels set the sources' relative weights only: the
# weights are rescaled so that the pool's total evidence is the unsupervised one's (the tail calibration gives
# every row at least its source's base rate, so a fit to a 50/50 labelled balance would shrink every weight and
# with it the pool's bad share).

MIN_REVIEWED_DROPS = 3   # fewer drops than this: the unsupervised combination, and the manifest says why
WEIGHT_PRIOR_SD = 1.0    # sd of log w_k: a weight moves by e× only when the labels clearly ask for it

_REVIEWED: ContextVar["Reviewed | None"] = ContextVar("dpsel_reviewed", default=None)


@dataclass(frozen=True)
class Reviewed:
    """Which rows a reviewer labelled, as selection sees them: `drop` over the pool rows (still scored, so the
    calibration sees their evidence; their weight is fixed at 0 afterwards), `keep` over the meta rows (the
    reviewed keeps appended to the meta set)."""
    drop: np.ndarray
    keep: np.ndarray


@contextmanager
def reviewed_rows(drop: np.ndarray, keep: np.ndarray):
    """Make the reviewed rows known to the prior's calibration for the selection run inside."""
    token = _REVIEWED.set(Reviewed(np.asarray(drop, dtype=bool), np.asarray(keep, dtype=bool)))
    try:
        yield
    finally:
        _REVIEWED.reset(token)


def current_reviewed(n_pool: int, n_meta: int) -> Reviewed | None:
    """The reviewed rows of this selection run, or None (none set, or set for another run's row counts)."""
    reviewed = _REVIEWED.get()
    if reviewed is None or len(reviewed.drop) != n_pool or len(reviewed.keep) != n_meta:
        return None
    return reviewed


def meta_bad_probability(pool: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """P(bad) of each meta row read off the pool's curve (`tail_bad_probability`): that of the highest pool score
    at or below the meta row's (0 below every pool row)."""
    pool, meta = np.asarray(pool, dtype=np.float64), np.asarray(meta, dtype=np.float64)
    order = np.argsort(pool, kind="stable")
    curve = np.maximum.accumulate(tail_bad_probability(pool, meta)[order])
    at = np.searchsorted(pool[order], meta, side="right") - 1
    return np.where(at >= 0, curve[np.maximum(at, 0)], 0.0)


def weighted_noisy_or(probabilities: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """1 − Π(1 − p_k)^{w_k}: noisy-or where source k counts w_k times (w = 1: `noisy_or`)."""
    return 1.0 - np.exp(-(_evidence(probabilities) @ np.asarray(weights, dtype=np.float64)))


def _evidence(probabilities: list[np.ndarray]) -> np.ndarray:
    """[rows, sources] of −log(1 − p): each source's additive say in the noisy-or's log."""
    return -np.log1p(-np.clip(np.stack(probabilities, axis=1), 0.0, 1.0 - 1e-6))


def fit_source_weights(bad: list[np.ndarray], clean: list[np.ndarray]) -> np.ndarray:
    """w_k of the weighted noisy-or from labelled rows: `bad`/`clean` hold, per source, the P_k(bad) of the rows
    known bad / known clean. Penalised maximum likelihood (block comment above); w = 1 without enough drops."""
    from scipy.optimize import minimize
    x_bad, x_clean = _evidence(bad), _evidence(clean)
    if len(x_bad) < MIN_REVIEWED_DROPS or not len(x_clean):
        return np.ones(len(bad))
    clean_weight = len(x_bad) / len(x_clean)

    def loss(u):
        w = np.exp(u)
        s_bad, s_clean = x_bad @ w, x_clean @ w
        p_bad = -np.expm1(-np.maximum(s_bad, 1e-9))
        nll = -np.log(p_bad).sum() + clean_weight * s_clean.sum()
        grad_s_bad = -np.exp(-s_bad) / p_bad
        grad = (x_bad.T @ grad_s_bad + clean_weight * x_clean.sum(0)) * w + u / WEIGHT_PRIOR_SD ** 2
        return nll + 0.5 * float(u @ u) / WEIGHT_PRIOR_SD ** 2, grad

    fit = minimize(loss, np.zeros(x_bad.shape[1]), jac=True, method="L-BFGS-B", bounds=[(-6.0, 4.0)] * x_bad.shape[1])
    return np.exp(fit.x)


def labelled_bad_probability(calibration: dict, names: list[str], reviewed: Reviewed | None
                             ) -> tuple[np.ndarray, dict | None]:
    """P(bad) per pool row by the calibrated sources `names`: the noisy-or, weighted by the reviewed labels where
    there are enough (`fit_source_weights`); and the manifest's record of the weights (None without labels)."""
    if reviewed is None:   # one source's P(bad) at a time
        return noisy_or(tail_bad_probability(*calibration[name]) for name in names), None
    pool_p = [tail_bad_probability(*calibration[name]) for name in names]
    record = {"drops": int(reviewed.drop.sum()), "keeps": int(reviewed.keep.sum()),
              "meta_rows_as_clean": int((~reviewed.keep).sum())}
    if reviewed.drop.sum() < MIN_REVIEWED_DROPS:
        return noisy_or(pool_p), {**record, "weights": None,
                                  "why": f"fewer than {MIN_REVIEWED_DROPS} reviewed drops: the unsupervised noisy-or"}
    meta_p = [meta_bad_probability(*calibration[name]) for name in names]
    weights = fit_source_weights([p[reviewed.drop] for p in pool_p], meta_p)
    weights *= _evidence(pool_p).sum() / max((_evidence(pool_p) @ weights).sum(), 1e-12)
    record["weights"] = {name: round(float(w), 4) for name, w in zip(names, weights)}
    record["weights_without_labels"] = {name: 1.0 for name in names}
    return weighted_noisy_or(pool_p, weights), record
