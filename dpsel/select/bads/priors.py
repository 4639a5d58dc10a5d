"""The empirical-Bayes prior: each row's prior mean weight from the evidence that it looks bad (the reference's
within-group loss rank, group consistency, the embedder's question–answer consistency and pseudo-groups, the
answer's word-order fluency), and the evidence-only ablation scores."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from dpsel.select.bads.config import BadsSettings
from dpsel.select.base import Messages
from dpsel.select.consistency import (combine_evidence, consistency_z, evidence_z, group_consistency, has_groups,
                                      prior_mean_from_z)

log = logging.getLogger(__name__)
SEMANTIC_EVIDENCE = ("qa_consistency", "pseudo_group_consistency")
REVIEWED_DROP_PRIOR_MEAN = 1e-3  # calibration.prior_mean_from_bad_probability's floor: P(bad) = 1


def fluency_evidence(train: list[Messages], meta: list[Messages] | None,
                     calibration: dict | None = None) -> np.ndarray:
    """Normal score (high = looks bad) of the answer's word-order fluency (select/fluency.py), robust-z'd so only
    the disfluent tail stands out in the prior's `max`. `calibration` gets (pool, meta) disfluency: the counts are
    the same for both and each answer's own are left out, so meta rows are scored as pool rows are."""
    from dpsel.select.consistency import TextView, answer_text
    from dpsel.select.fluency import bigram_fluency
    from dpsel.select.semantic import robust_z
    pool_answers, meta_answers = TextView(train, answer_text), [answer_text(m) for m in meta or []]
    disfluency = -bigram_fluency(pool_answers, meta_answers)
    if calibration is not None and meta_answers:
        calibration["fluency"] = (disfluency, -bigram_fluency(meta_answers, pool_answers))
    return robust_z(disfluency)


def empirical_bayes_mean(ref_nll: np.ndarray, groups: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """Prior mean weight per row from its reference-loss rank within its group (empirical Bayes).

    A row at its group's median loss gets β; rows the meta-fitted reference finds much harder get less.
    """
    return prior_mean_from_z(evidence_z(ref_nll, groups), beta, gamma)


def semantic_evidence(train: list[Messages], meta: list[Messages] | None, groups: np.ndarray,
                      settings: BadsSettings, seed: int, report: dict,
                      calibration: dict | None = None, columns: tuple | None = None) -> dict[str, np.ndarray]:
    """The embedder's evidence (select/semantic.py): question–answer consistency and, without a group column,
    group consistency over pseudo-groups; {} (the log says what the prior falls back to) without an embedder.
    `report` gets the embedder's manifest record and its encoding cost; `calibration` (pool, meta) inconsistency,
    each meta row predicted by a map fitted on the pool and the other meta folds, as pool rows are. `columns`: the
    pool's (question, answer) store columns where the caller has them already (embedder θ), not looked up again."""
    from dpsel.models.embedder import EmbeddingCache, try_embedder
    from dpsel.select.semantic import pseudo_groups, qa_consistency, robust_z, row_columns
    embedder = try_embedder(settings.embedder)
    if embedder is None:
        return {}
    cache = EmbeddingCache(embedder)
    q, a = columns if columns is not None else row_columns(embedder, train, cache)   # store columns: read in chunks
    extra = row_columns(embedder, meta, cache) if meta else None
    report["embedder"] = {**embedder.record(), **cache.stats, "rows_per_second": cache.rows_per_second()}
    inconsistency = -qa_consistency(q, a, seed, extra)
    evidence = {"qa_consistency": robust_z(inconsistency)}
    if calibration is not None and extra is not None and len(extra[0]) >= 2:
        calibration["qa_consistency"] = (inconsistency, -qa_consistency(*extra, seed, (q, a)))
    if settings.quality:
        from dpsel.select.bads.quality_evidence import genericness_evidence
        evidence.update(genericness_evidence(q, a, extra, seed, calibration))
    if settings.group_consistency and settings.pseudo_groups is not False and not has_groups(groups):
        pseudo = pseudo_groups(q.to_array(), seed)   # k-means needs the whole array
        log.info("bads prior: no group column; group consistency over %d pseudo-groups (k-means of the "
                 "instruction embeddings)", len(np.unique(pseudo)))
        confidence = group_consistency(train, pseudo, seed)
        if confidence is not None:
            evidence["pseudo_group_consistency"] = consistency_z(confidence)
    return evidence


def prior_evidence_z(train: list[Messages], ref_nll: np.ndarray, groups: np.ndarray, settings: BadsSettings,
                     seed: int, meta: list[Messages] | None = None, report: dict | None = None,
                     reference_z: np.ndarray | None = None, calibration: dict | None = None,
                     calibrated_only: bool = False, columns: tuple | None = None) -> dict[str, np.ndarray]:
    """The evidence behind the empirical-Bayes prior, each as a normal score (high = looks bad): the reference's
    within-group loss rank, when the pool has groups how unlike its group's answers the row's answer is, and the
    embedder's evidence (`semantic_evidence`, with pseudo-groups where the pool has none). `calibration` gets
    (pool, meta) badness of the sources that can score the meta rows out of sample (calibration.py).
    `calibrated_only`: leave out group consistency, which cannot score meta rows, where calibrated sources
    (fluency, quality: any meta row scores them) will be there for the `tail` rule, which then never uses it."""
    evidence = {"reference": evidence_z(ref_nll, groups) if reference_z is None else reference_z}
    if calibrated_only and settings.group_consistency and meta and (settings.fluency or settings.quality):
        log.info("bads prior: group consistency not computed: the tail rule uses only evidence calibrated on "
                 "meta (bads.ablations computes it, as an ablation)")
        settings = dataclasses.replace(settings, group_consistency=False)
    if settings.group_consistency and has_groups(groups):
        evidence["group_consistency"] = consistency_z(group_consistency(train, groups, seed))
    if settings.semantic:
        evidence.update(semantic_evidence(train, meta, groups, settings, seed, report if report is not None else {},
                                          calibration, columns))
    if settings.fluency:
        evidence["fluency"] = fluency_evidence(train, meta, calibration) - settings.fluency_margin
    if settings.quality:
        from dpsel.select.bads.quality_evidence import quality_evidence
        evidence.update(quality_evidence(train, meta, calibration))
    if settings.group_consistency and "group_consistency" not in evidence \
            and "pseudo_group_consistency" not in evidence:
        group_consistency(train, groups, seed)  # logs that group consistency is off, and what the prior keeps
    return evidence


def evidence_ablations(prior_evidence: dict[str, np.ndarray], alternatives: dict[str, np.ndarray],
                       groups: np.ndarray, prior_mean: torch.Tensor | None = None,
                       calibration: dict | None = None) -> dict[str, np.ndarray]:
    """Scores from the evidence alone, no posterior (higher = keep): each source, the prior itself
    (`evidence_prior_only`: `prior_mean` where given, else the sources' `max`; `evidence_prior_max` the `max`
    beside a `prior_mean`), the sources with θ's loss combined by `max` and by Stouffer's Σz/√k, and with a
    `calibration`, the quality sources' noisy-or alone (`quality_evidence_only`) and the rest's without them."""
    out = {f"{name}_only": -z for name, z in prior_evidence.items() if name != "reference"}  # reference: below
    if len(prior_evidence) > 1:
        by_max = -combine_evidence(list(prior_evidence.values()), "max")
        if prior_mean is None:
            out["evidence_prior_only"] = by_max
        else:
            out["evidence_prior_only"], out["evidence_prior_max"] = np.asarray(prior_mean, dtype=np.float64), by_max
    if calibration:
        out.update(_quality_split(calibration))
    if "theta_loss_only" in alternatives and len(prior_evidence) > 1:
        zs = [*prior_evidence.values(), evidence_z(-alternatives["theta_loss_only"], groups)]
        out.update(evidence_max=-combine_evidence(zs, "max"), evidence_stouffer=-combine_evidence(zs, "stouffer"))
    return out


def _quality_split(calibration: dict) -> dict[str, np.ndarray]:
    """P(clean) by the calibrated quality sources' noisy-or, and by the other calibrated sources' (higher = keep)."""
    from dpsel.select.bads.calibration import noisy_or, tail_bad_probability
    from dpsel.select.bads.quality_evidence import QUALITY_PREFIX
    out = {}
    for label, names in (("quality_evidence_only", [n for n in calibration if n.startswith(QUALITY_PREFIX)]),
                         ("evidence_prior_no_quality", [n for n in calibration if not n.startswith(QUALITY_PREFIX)])):
        if names:
            out[label] = 1.0 - noisy_or([tail_bad_probability(*calibration[n]) for n in names])
    return out


def combine_rule(settings: BadsSettings, space: str) -> str:
    """BadsSettings.prior_combine resolved for θ's space: `auto` is `tail` for the embedder θ, `max` for the LM."""
    from dpsel.errors import DpselInputError
    rule = settings.prior_combine
    if rule not in ("auto", "tail", "max"):
        raise DpselInputError(f"unknown prior_combine {rule!r}; use 'auto', 'tail' or 'max'")
    return ("tail" if space == "embedder" else "max") if rule == "auto" else rule


def _combined_mean(prior_evidence: dict[str, np.ndarray], calibration: dict, names: list[str], combine: str,
                   settings: BadsSettings, reviewed=None, report: dict | None = None) -> np.ndarray:
    """Prior means from the sources `names`: noisy-or of their meta-calibrated P(bad) (`tail`, over those that
    have a calibration; weighted by the `reviewed` labels, calibration.labelled_bad_probability, whose record
    goes to `report["labels"]`) or the `max` of their normal scores."""
    from dpsel.select.bads.calibration import labelled_bad_probability, prior_mean_from_bad_probability
    calibrated = [name for name in names if name in calibration]
    if combine == "tail" and calibrated:
        bad, record = labelled_bad_probability(calibration, calibrated, reviewed)
        if report is not None and record is not None:
            report["labels"] = record
        return prior_mean_from_bad_probability(bad, settings.beta)
    return prior_mean_from_z(combine_evidence([prior_evidence[name] for name in names], "max"), settings.beta,
                             settings.eb_gamma)


def prior_means(train: list[Messages], ref_nll: np.ndarray, groups: np.ndarray, settings: BadsSettings,
                seed: int, meta: list[Messages] | None = None, report: dict | None = None,
                reference_z: np.ndarray | None = None, combine: str = "max", calibration: dict | None = None,
                columns: tuple | None = None) -> tuple[dict[str, np.ndarray], torch.Tensor, dict[str, torch.Tensor]]:
    """(the prior evidence, the prior mean per row, the ablations' prior means): the evidence combined by
    `combine` (`_combined_mean`; `tail` leaves the reference out, see BadsSettings.prior_combine), or β
    everywhere without the empirical-Bayes prior; `reference_only` from the reference alone. `calibration`
    (filled here when given): each calibrated source's (pool, meta) badness. The quality sources join only the
    calibrated `tail` rule: uncalibrated, a sparse signal's z would dominate the `max`. The ablations' prior
    means only with `settings.ablations` (else {}). `columns`: see `semantic_evidence`."""
    from dpsel.select.bads.calibration import current_reviewed
    from dpsel.select.bads.quality_evidence import QUALITY_PREFIX, calibrated_weights
    calibration = {} if calibration is None else calibration
    prior_evidence = prior_evidence_z(train, ref_nll, groups, settings, seed, meta, report, reference_z,
                                      calibration, calibrated_only=combine == "tail" and not settings.ablations,
                                      columns=columns) if settings.eb_prior else {}
    used = [name for name in prior_evidence if combine != "tail" or name != "reference"]
    if combine == "tail" and any(name in calibration for name in used):
        used = [name for name in used if name in calibration]  # _combined_mean reads only these
    if combine != "tail":
        used = [name for name in used if not name.startswith(QUALITY_PREFIX)]
    if report is not None and prior_evidence:
        report["prior_combine"] = {"rule": combine, "calibrated_on_meta": sorted(calibration), "used": used,
                                   "calibrated_weights": calibrated_weights(calibration, used)}
    reviewed = current_reviewed(len(train), len(meta or []))
    if prior_evidence:
        prior_mean = torch.as_tensor(_combined_mean(prior_evidence, calibration, used, combine, settings, reviewed,
                                                    report.setdefault("prior_combine", {}) if report is not None
                                                    else None))
    else:
        prior_mean = torch.full((len(train),), settings.beta, dtype=torch.float64)
    if reviewed is not None:  # a reviewed drop is known bad: θ's weighted-pool prior should not learn from it
        prior_mean[torch.as_tensor(reviewed.drop)] = REVIEWED_DROP_PRIOR_MEAN
    ablation_priors = {}
    if not settings.ablations:
        return prior_evidence, prior_mean, ablation_priors
    semantic = [name for name in prior_evidence if name in SEMANTIC_EVIDENCE]
    if semantic:  # the same run's posterior pass from the prior without the embedder's evidence
        rest = [name for name in used if name not in semantic] or ["reference"]
        ablation_priors["no_semantic"] = torch.as_tensor(_combined_mean(prior_evidence, calibration, rest,
                                                                        combine, settings))
    quality = [name for name in used if name.startswith(QUALITY_PREFIX)]
    if quality:  # the same run's posterior pass from the prior without the quality evidence
        ablation_priors["no_quality"] = torch.as_tensor(_combined_mean(
            prior_evidence, calibration, [name for name in used if name not in quality] or ["reference"],
            combine, settings))
    if combine == "tail" and calibration:  # the rule it replaced, through the same posterior pass
        ablation_priors["max_prior"] = torch.as_tensor(_combined_mean(
            prior_evidence, calibration, [name for name in prior_evidence if not name.startswith(QUALITY_PREFIX)],
            "max", settings))
    if len(prior_evidence) > 1:  # the same run's posterior pass from the reference-only prior
        ablation_priors["reference_only"] = torch.as_tensor(
            prior_mean_from_z(prior_evidence["reference"], settings.beta, settings.eb_gamma))
    return prior_evidence, prior_mean, ablation_priors
