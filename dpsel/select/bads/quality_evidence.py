"""Answer-quality evidence for the bads prior and θ (issue 28): the label-free signals of select/quality.py on the
pool and on the meta rows, scored alike, so each is calibrated on meta (calibration.py) as the other sources are;
θ's quality density (quality_problem.py) reads the same (pool, meta) pairs.

Meta rows are scored as pool rows are: row-local signals need nothing else, and template frequency counts the
other set's answers too (a meta answer is compared with the pool and the other meta answers, a pool answer with
the other pool answers and meta)."""
from __future__ import annotations

import numpy as np

from dpsel.select.base import Messages
from dpsel.select.consistency import TextView, answer_text

QUALITY_PREFIX = "quality_"


def _texts(rows: list[Messages]) -> tuple[TextView, TextView]:
    """The rows' questions and answers, made as each signal reads them (no list of a pool's texts is held)."""
    from dpsel.select.semantic import question_text
    return TextView(rows, question_text), TextView(rows, answer_text)


def scaled(badness: np.ndarray) -> np.ndarray:
    """A robust z (median, 1.4826·MAD) whose scale falls back to the std, then 1, where most rows tie (a sparse
    signal: most answers have no repetition at all), so a tie-heavy signal does not blow up to huge z."""
    badness = np.asarray(badness, dtype=np.float64)
    centre = np.median(badness)
    scale = 1.4826 * np.median(np.abs(badness - centre))
    if scale < 1e-9:
        scale = float(np.std(badness)) or 1.0
    return (badness - centre) / scale


def quality_signals(train: list[Messages], meta: list[Messages] | None) -> tuple[dict, dict]:
    """({name: pool badness}, {name: meta badness}) for every text signal (meta {} without meta rows)."""
    from dpsel.select.quality import text_signals
    pool_q, pool_a = _texts(train)
    if not meta:
        return text_signals(pool_q, pool_a), {}
    meta_q, meta_a = _texts(meta)
    return text_signals(pool_q, pool_a, (meta_q, meta_a)), text_signals(meta_q, meta_a, (pool_q, pool_a))


def quality_evidence(train: list[Messages], meta: list[Messages] | None,
                     calibration: dict | None = None) -> dict[str, np.ndarray]:
    """{quality_<signal>: normal-ish score (high = looks bad)} per text signal; `calibration` gets (pool, meta)
    badness per signal (which θ's quality density also reads)."""
    pool, meta_scores = quality_signals(train, meta)
    evidence = {}
    for name, badness in pool.items():
        key = QUALITY_PREFIX + name
        evidence[key] = scaled(badness)
        if calibration is not None and name in meta_scores:
            calibration[key] = (badness, meta_scores[name])
    return evidence


def genericness_evidence(q: np.ndarray, a: np.ndarray, extra: tuple[np.ndarray, np.ndarray] | None, seed: int,
                         calibration: dict | None = None) -> dict[str, np.ndarray]:
    """{quality_genericness: score}: the answer's closeness to other rows' answers against its own question
    (select/quality.genericness), meta rows scored against the pool's answers."""
    from dpsel.select.quality import genericness
    key = QUALITY_PREFIX + "genericness"
    pool = genericness(q, a, seed=seed)
    if calibration is not None and extra is not None and len(extra[0]) >= 2:
        calibration[key] = (pool, genericness(extra[0], extra[1], pool_a=a, seed=seed))
    return {key: scaled(pool)}


def calibrated_weights(calibration: dict, used: list[str]) -> dict[str, dict]:
    """What the manifest says of each calibrated source the prior used: π₀ (the clean share meta implies; 1 = the
    source says nothing about this pool), the mean and 90th percentile of P(bad) over the pool, and the share of
    pool rows it gives P(bad) ≥ 0.5."""
    from dpsel.select.bads.calibration import clean_fraction, tail_bad_probability
    out = {}
    for name in used:
        if name not in calibration:
            continue
        pool, meta = calibration[name]
        bad = tail_bad_probability(pool, meta)
        out[name] = {"clean_fraction": round(clean_fraction(np.asarray(pool), np.asarray(meta)), 4),
                     "mean_p_bad": round(float(bad.mean()), 4), "p_bad_q90": round(float(np.quantile(bad, 0.9)), 4),
                     "rows_p_bad_over_half": round(float((bad >= 0.5).mean()), 4)}
    return out
