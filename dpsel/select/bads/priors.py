"""The empirical-Bayes prior: each row's prior mean weight from the evidence that it looks bad (the reference's
within-group loss rank, group consistency, the embedder's question–answer consistency and pseudo-groups, the
answer's word-order fluency), and the evidence-only ablation scores."""
from __future__ import annotations

import logging

import numpy as np
import torch

from dpsel.select.bads.config import BadsSettings
from dpsel.select.base import Messages
from dpsel.select.consistency import (combine_evidence, consistency_z, evidence_z, group_consistency, has_groups,
                                      prior_mean_from_z)

log = logging.getLogger(__name__)
SEMANTIC_EVIDENCE = ("qa_consistency", "pseudo_group_consistency")


def fluency_evidence(train: list[Messages], meta: list[Messages] | None) -> np.ndarray:
    """Normal score (high = looks bad) of the answer's word-order fluency (select/fluency.py), robust-z'd so only
    the disfluent tail stands out in the prior's `max`."""
    from dpsel.select.consistency import answer_text
    from dpsel.select.fluency import bigram_fluency
    from dpsel.select.semantic import robust_z
    return robust_z(-bigram_fluency([answer_text(m) for m in train], [answer_text(m) for m in meta or []]))


def empirical_bayes_mean(ref_nll: np.ndarray, groups: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """Prior mean weight per row from its reference-loss rank within its group (empirical Bayes).

    A row at its group's median loss gets β; rows the meta-fitted reference finds much harder get less.
    """
    return prior_mean_from_z(evidence_z(ref_nll, groups), beta, gamma)


def semantic_evidence(train: list[Messages], meta: list[Messages] | None, groups: np.ndarray,
                      settings: BadsSettings, seed: int, report: dict) -> dict[str, np.ndarray]:
    """The embedder's evidence (select/semantic.py): question–answer consistency and, without a group column,
    group consistency over pseudo-groups; {} (the log says what the prior falls back to) without an embedder.
    `report` gets the embedder's manifest record and its encoding cost."""
    from dpsel.models.embedder import EmbeddingCache, try_embedder
    from dpsel.select.semantic import pseudo_groups, qa_consistency, robust_z, row_embeddings
    embedder = try_embedder(settings.embedder)
    if embedder is None:
        return {}
    cache = EmbeddingCache(embedder)
    q, a = row_embeddings(embedder, train, cache)
    extra = row_embeddings(embedder, meta, cache) if meta else None
    report["embedder"] = {**embedder.record(), **cache.stats, "rows_per_second": cache.rows_per_second()}
    evidence = {"qa_consistency": robust_z(-qa_consistency(q, a, seed, extra))}
    if settings.group_consistency and settings.pseudo_groups is not False and not has_groups(groups):
        pseudo = pseudo_groups(q, seed)
        log.info("bads prior: no group column; group consistency over %d pseudo-groups (k-means of the "
                 "instruction embeddings)", len(np.unique(pseudo)))
        confidence = group_consistency(train, pseudo, seed)
        if confidence is not None:
            evidence["pseudo_group_consistency"] = consistency_z(confidence)
    return evidence


def prior_evidence_z(train: list[Messages], ref_nll: np.ndarray, groups: np.ndarray, settings: BadsSettings,
                     seed: int, meta: list[Messages] | None = None, report: dict | None = None,
                     reference_z: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The evidence behind the empirical-Bayes prior, each as a normal score (high = looks bad): the reference's
    within-group loss rank, when the pool has groups how unlike its group's answers the row's answer is, and the
    embedder's evidence (`semantic_evidence`, with pseudo-groups where the pool has none)."""
    evidence = {"reference": evidence_z(ref_nll, groups) if reference_z is None else reference_z}
    if settings.group_consistency and has_groups(groups):
        evidence["group_consistency"] = consistency_z(group_consistency(train, groups, seed))
    if settings.semantic:
        evidence.update(semantic_evidence(train, meta, groups, settings, seed, report if report is not None else {}))
    if settings.fluency:
        evidence["fluency"] = fluency_evidence(train, meta) - settings.fluency_margin
    if settings.group_consistency and "group_consistency" not in evidence \
            and "pseudo_group_consistency" not in evidence:
        group_consistency(train, groups, seed)  # logs that group consistency is off, and what the prior keeps
    return evidence


def evidence_ablations(prior_evidence: dict[str, np.ndarray], alternatives: dict[str, np.ndarray],
                       groups: np.ndarray) -> dict[str, np.ndarray]:
    """Scores from the evidence alone, no posterior (higher = keep): each source, the prior itself (the sources
    combined by `max`: `evidence_prior_only`), and the sources with θ's loss combined by `max` and by Stouffer's
    Σz/√k (the rule it was chosen over)."""
    out = {f"{name}_only": -z for name, z in prior_evidence.items() if name != "reference"}  # reference: below
    if len(prior_evidence) > 1:
        out["evidence_prior_only"] = -combine_evidence(list(prior_evidence.values()), "max")
    if "theta_loss_only" in alternatives and len(prior_evidence) > 1:
        zs = [*prior_evidence.values(), evidence_z(-alternatives["theta_loss_only"], groups)]
        out.update(evidence_max=-combine_evidence(zs, "max"), evidence_stouffer=-combine_evidence(zs, "stouffer"))
    return out


def prior_means(train: list[Messages], ref_nll: np.ndarray, groups: np.ndarray, settings: BadsSettings,
                seed: int, meta: list[Messages] | None = None, report: dict | None = None,
                reference_z: np.ndarray | None = None
                ) -> tuple[dict[str, np.ndarray], torch.Tensor, dict[str, torch.Tensor]]:
    """(the prior evidence, the prior mean per row, the ablations' prior means): the evidence combined by
    `max`, or β everywhere without the empirical-Bayes prior; `reference_only` from the reference alone."""
    prior_evidence = prior_evidence_z(train, ref_nll, groups, settings, seed, meta, report, reference_z) \
        if settings.eb_prior else {}
    if prior_evidence:
        prior_mean = torch.as_tensor(prior_mean_from_z(combine_evidence(list(prior_evidence.values()), "max"),
                                                       settings.beta, settings.eb_gamma))
    else:
        prior_mean = torch.full((len(train),), settings.beta, dtype=torch.float64)
    ablation_priors = {}
    semantic = [name for name in prior_evidence if name in SEMANTIC_EVIDENCE]
    if semantic:  # the same run's posterior pass from the prior without the embedder's evidence
        ablation_priors["no_semantic"] = torch.as_tensor(prior_mean_from_z(combine_evidence(
            [z for name, z in prior_evidence.items() if name not in semantic], "max"), settings.beta,
            settings.eb_gamma))
    if len(prior_evidence) > 1:  # the same run's posterior pass from the reference-only prior
        ablation_priors["reference_only"] = torch.as_tensor(
            prior_mean_from_z(prior_evidence["reference"], settings.beta, settings.eb_gamma))
    return prior_evidence, prior_mean, ablation_priors
