"""The empirical-Bayes prior: each row's prior mean weight from the evidence that it looks bad (the reference's
within-group loss rank, group consistency), and the evidence-only ablation scores."""
from __future__ import annotations

import numpy as np
import torch

from dpsel.select.bads.config import BadsSettings
from dpsel.select.base import Messages
from dpsel.select.consistency import (combine_evidence, consistency_z, evidence_z, group_consistency,
                                      prior_mean_from_z)


def empirical_bayes_mean(ref_nll: np.ndarray, groups: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """Prior mean weight per row from its reference-loss rank within its group (empirical Bayes).

    A row at its group's median loss gets β; rows the meta-fitted reference finds much harder get less.
    """
    return prior_mean_from_z(evidence_z(ref_nll, groups), beta, gamma)


def prior_evidence_z(train: list[Messages], ref_nll: np.ndarray, groups: np.ndarray, settings: BadsSettings,
                     seed: int) -> dict[str, np.ndarray]:
    """The evidence behind the empirical-Bayes prior, each as a normal score (high = looks bad): the reference's
    within-group loss rank and, when the pool has groups, how unlike its group's answers the row's answer is."""
    evidence = {"reference": evidence_z(ref_nll, groups)}
    if settings.group_consistency:
        confidence = group_consistency(train, groups, seed)  # None (logged) without groups
        if confidence is not None:
            evidence["group_consistency"] = consistency_z(confidence)
    return evidence


def evidence_ablations(prior_evidence: dict[str, np.ndarray], alternatives: dict[str, np.ndarray],
                       groups: np.ndarray) -> dict[str, np.ndarray]:
    """Scores from the evidence alone, no posterior (higher = keep): each source, and the sources with θ's loss
    combined by `max` (the default's prior) and by Stouffer's Σz/√k (the rule it was chosen over)."""
    out = {f"{name}_only": -z for name, z in prior_evidence.items() if name != "reference"}  # reference: below
    if "theta_loss_only" in alternatives and "group_consistency" in prior_evidence:
        zs = [*prior_evidence.values(), evidence_z(-alternatives["theta_loss_only"], groups)]
        out.update(evidence_max=-combine_evidence(zs, "max"), evidence_stouffer=-combine_evidence(zs, "stouffer"))
    return out


def prior_means(train: list[Messages], ref_nll: np.ndarray, groups: np.ndarray, settings: BadsSettings,
                seed: int) -> tuple[dict[str, np.ndarray], torch.Tensor, dict[str, torch.Tensor]]:
    """(the prior evidence, the prior mean per row, the ablations' prior means): the evidence combined by
    `max`, or β everywhere without the empirical-Bayes prior; `no_group_consistency` from the reference alone."""
    prior_evidence = prior_evidence_z(train, ref_nll, groups, settings, seed) if settings.eb_prior else {}
    if prior_evidence:
        prior_mean = torch.as_tensor(prior_mean_from_z(combine_evidence(list(prior_evidence.values()), "max"),
                                                       settings.beta, settings.eb_gamma))
    else:
        prior_mean = torch.full((len(train),), settings.beta, dtype=torch.float64)
    ablation_priors = {}
    if "group_consistency" in prior_evidence:  # the same run's posterior pass from the reference-only prior
        ablation_priors["no_group_consistency"] = torch.as_tensor(
            prior_mean_from_z(prior_evidence["reference"], settings.beta, settings.eb_gamma))
    return prior_evidence, prior_mean, ablation_priors
