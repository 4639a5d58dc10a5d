"""`select_bads` with θ in the sentence embedder's space (embedding_problem.py): which θ a run gets, and the run.

The reference is the same map fitted on the meta rows alone (closed-form ridge): its distance on each pool row is
the prior's `reference` evidence, as the meta-fitted LM's loss is on the LM path. θ₀ is the ridge map fitted on the
meta rows plus the pool; SGLD then samples (θ, w) with the unchanged BADS model, and the weight net is distilled on
embedding features so `filter` scores new shards in the same space.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import torch

from dpsel.errors import DpselInputError
from dpsel.models.embedder_files import is_off
from dpsel.select.bads.config import BadsSettings
from dpsel.select.bads.embedding_problem import (EmbeddingProblem, as_map, embedding_features, map_distances,
                                                 sampled_embedding_features)
from dpsel.select.bads.priors import combine_rule, evidence_ablations, prior_means
from dpsel.select.bads.problems import infer_groups
from dpsel.select.bads.quality_evidence import QUALITY_PREFIX
from dpsel.select.bads.quality_problem import QualityEmbeddingProblem, quality_features
from dpsel.select.bads.runner import run_sampler
from dpsel.select.bads.scorer import EmbedderBadsScorer
from dpsel.select.bads.weights import HeldRows, distil_sample, final_weights
from dpsel.select.base import Messages, ProgressFn, Scores, SelectConfig
from dpsel.select.features import FeatureStats

log = logging.getLogger(__name__)
THETA_SPACES = ("auto", "embedder", "lm")
EMBEDDER_ASKED = "bads theta_space=embedder (curate.select.extra.theta_space)"


def theta_space(config: SelectConfig, settings: BadsSettings, data_parallel) -> tuple[str, object, str]:
    """(space, the embedder or None, why): where θ lives for this run, said in the log and the manifest. Only
    the default `auto` picks and may switch (and says why); an explicit `embedder` is honoured or exits 2."""
    from dpsel.models.embedder import try_embedder
    choice = settings.theta_space
    if choice not in THETA_SPACES:
        raise DpselInputError(f"bads theta_space {choice!r} (curate.select.extra.theta_space) is not one of "
                              f"{', '.join(THETA_SPACES)}")
    if choice == "lm":
        return "lm", None, "asked for (theta_space=lm)"
    if choice == "embedder":
        _check_embedder_choice(config, settings, data_parallel)
    elif kept := _lm_kept_by(config, data_parallel):
        return "lm", None, f"the LM's parameters: {kept}"
    embedder = try_embedder(settings.embedder)   # an explicit embedder loads or exits 2; the default may not
    if embedder is not None:
        return "embedder", embedder, f"a question→answer map in {embedder.name}'s space"
    if choice == "embedder":
        raise DpselInputError(f"{EMBEDDER_ASKED} needs a sentence embedder, and the default one is unavailable "
                              "(the warning above says why); give --embedder a folder or a hub id, or use "
                              "theta_space lm")
    reason = (f"--embedder {settings.embedder}" if is_off(settings.embedder) else
              "the default embedder is unavailable")
    log.warning("bads: %s, so θ falls back to the built-in byte LM's parameters (theta_space auto; it knows no "
                "language: expect weaker selection on real text)", reason)
    return "lm", None, f"{reason}: fell back to the built-in LM"


def _lm_kept_by(config: SelectConfig, data_parallel) -> str | None:
    """What makes `auto` keep θ in the LM's parameters (None: nothing, θ goes to the embedder if it loads)."""
    return ("--variant paper" if config.variant == "paper" else
            f"--model {config.model}" if config.model != "tiny" else
            "torchrun data parallelism" if data_parallel is not None else None)


def _check_embedder_choice(config: SelectConfig, settings: BadsSettings, data_parallel) -> None:
    """theta_space=embedder, asked for explicitly: exit 2 (DpselInputError) where it cannot be honoured."""
    if data_parallel is not None:
        raise DpselInputError(f"{EMBEDDER_ASKED} runs in one process; under torchrun θ stays in the LM: use "
                              "theta_space lm or auto")
    if is_off(settings.embedder):
        raise DpselInputError(f"{EMBEDDER_ASKED} needs a sentence embedder, and --embedder {settings.embedder!r} "
                              "turns it off; give --embedder default, a folder or a hub id, or use theta_space lm")
    if config.model != "tiny":
        raise DpselInputError(f"{EMBEDDER_ASKED} uses no LM, so --model {config.model} would be ignored; use "
                              "theta_space lm (or auto) with --model")


def _problem(q, a, q_meta, a_meta, group_ids, theta0, settings: BadsSettings, calibration: dict) -> EmbeddingProblem:
    """θ's problem: the question→answer map, with the quality density over the calibrated quality signals (and
    fluency) when there are any (quality_problem.py)."""
    names = [n for n in calibration if n.startswith(QUALITY_PREFIX) or n == "fluency"]
    if not settings.quality or not any(n.startswith(QUALITY_PREFIX) for n in names):
        return EmbeddingProblem(q, a, q_meta, a_meta, group_ids, theta0, settings.embed_loss_scale)
    f_train, f_meta = quality_features(calibration, names)
    return QualityEmbeddingProblem(q, a, q_meta, a_meta, group_ids, theta0, settings.embed_loss_scale, f_train,
                                   f_meta, names)


def select_bads_embedder(train: list[Messages], meta: list[Messages], config: SelectConfig, settings: BadsSettings,
                         embedder, why: str, progress: ProgressFn | None = None, groups=None) -> Scores:
    """The reference map on meta, the prior's evidence, SGLD over (W, b, w), the weight net and its scorer."""
    from dpsel.resume.checkpoints import current as current_checkpoints
    from dpsel.data import row_id
    from dpsel.models.embedder import EmbeddingCache
    from dpsel.select.consistency import answer_text
    from dpsel.select.ridge_stats import stats_of
    from dpsel.select.semantic import robust_z, row_columns

    started = time.perf_counter()
    torch.manual_seed(config.seed)
    if settings.pseudo_groups is None:
        settings.pseudo_groups = False  # see BadsSettings.pseudo_groups
    if not settings.epochs_given and settings.steps is None:
        settings.epochs = settings.embed_epochs  # see BadsSettings.embed_epochs
    cache = EmbeddingCache(embedder)
    q, a = row_columns(embedder, train, cache, progress)   # the pool's: store columns, read in chunks
    q_meta, a_meta = (c.to_array() for c in row_columns(embedder, meta, cache, progress))
    group_ids = infer_groups(train, groups)
    meta_stats = stats_of(q_meta, a_meta)
    reference = as_map(meta_stats.solve(settings.embed_alpha))
    theta0 = as_map((meta_stats + stats_of(q, a)).solve(settings.embed_alpha))
    ref_distance = map_distances(q, a, *reference)
    ref_seconds = time.perf_counter() - started

    evidence_started = time.perf_counter()
    report: dict = {}
    calibration: dict = {}
    prior_evidence, prior_mean, ablation_priors = prior_means(train, ref_distance, group_ids, settings, config.seed,
                                                              meta, report, reference_z=robust_z(ref_distance),
                                                              combine=combine_rule(settings, "embedder"),
                                                              calibration=calibration, columns=(q, a))
    evidence_seconds = time.perf_counter() - evidence_started
    if not settings.ablations:   # the per-row evidence is in the prior mean (and θ's problem reads calibration)
        prior_evidence = dict.fromkeys(prior_evidence)
    maps = [theta0, reference]
    words = np.asarray([len(answer_text(m).split()) for m in train], dtype=np.int32)
    stats, scaled = _weight_net_features(q, a, words, maps, config, settings)
    features = torch.from_numpy(scaled) if isinstance(scaled, np.ndarray) else None   # shares the array

    problem = _problem(q, a, q_meta, a_meta, group_ids, theta0, settings, calibration)
    if not settings.ablations:   # the per-row evidence is in θ's problem now: not held on
        calibration = {}
    batch_size = settings.embed_batch_size(len(train), config.batch_size)
    if batch_size != config.batch_size:
        log.info("bads: %d rows, so the embedder θ takes %d rows a step (not %d) to stay within embed_max_steps "
                 "= %d with %g passes", len(train), batch_size, config.batch_size, settings.embed_max_steps,
                 settings.epochs)
    result = run_sampler(problem, settings, batch_size=batch_size, meta_batch_size=config.meta_batch_size,
                         seed=config.seed, prior_mean=prior_mean, features=features,
                         weight_param=config.weight_param, progress=progress,
                         measure_plain_steps=int(config.extra.get("measure_plain_steps", 0)),
                         checkpoint=current_checkpoints(), ablation_priors=ablation_priors)
    result.coverage["theta_space"] = {"space": "embedder", "why": why}
    result.coverage["batch_size"] = {"asked": config.batch_size, "used": batch_size}
    if isinstance(problem, QualityEmbeddingProblem):
        result.coverage["theta_quality"] = problem.learnt()
    result.coverage["prior_evidence"] = report.get("prior_combine", {}).get("used", list(prior_evidence)) + (
        ["theta"] if settings.posterior_pass and settings.refresh_prior == "min" else [])
    result.coverage["embedder"] = {**embedder.record(), **cache.stats, "rows_per_second": cache.rows_per_second()}
    result.coverage.update({k: v for k, v in report.items() if k != "embedder"})
    if settings.ablations:
        result.alternatives.update(evidence_ablations(prior_evidence, result.alternatives, group_ids, prior_mean,
                                                      calibration), reference_loss_only=-ref_distance)

    weight_mean, weight_std, net, phi_samples = final_weights(result, config, scaled)
    scorer = EmbedderBadsScorer((row_id(m) for m in train), weight_mean, weight_std,
                                {"seed": config.seed, "weight_param": config.weight_param, "variant": config.variant,
                                 "theta_space": "embedder", "embedder": settings.embedder, "embedder_sha": embedder.sha,
                                 "hidden": settings.weight_hidden, "features": stats.to_dict()})
    scorer.attach(maps, net, phi_samples)
    timings = dict(result.timings, reference_seconds=ref_seconds, prior_evidence_seconds=evidence_seconds,
                   seconds=time.perf_counter() - started)
    cfg = config.to_dict()
    cfg["bads"] = asdict(settings)
    return Scores("bads", weight_mean, weight_std, cfg, dict(result.diagnostics), timings, scorer,
                  coverage=result.coverage, alternatives=dict(result.alternatives))


def _weight_net_features(q, a, words: np.ndarray, maps, config: SelectConfig, settings: BadsSettings):
    """(the features' standardisation, the standardised features `final_weights` reads). Where the posterior pass
    scores every row and the weights are per-row logits, nothing reads a row's features but the weight net's
    distillation: its sample's alone are held (`HeldRows`), not the pool's [N, features] float32 array (148 MB
    a million rows). Otherwise the amortised weights (and the net's scoring of under-visited rows) need them all."""
    if config.weight_param == "logits" and settings.posterior_pass:
        sample = distil_sample(len(words), config.seed)
        stats, raw = sampled_embedding_features(q, a, words, maps, sample)
        return stats, HeldRows(sample, stats.standardise(raw))
    raw = embedding_features(q, a, words, maps)
    stats = FeatureStats.from_chunks((raw[start:start + 65536] for start in range(0, len(raw), 65536)), raw.shape[1])
    return stats, stats.standardise(raw)
