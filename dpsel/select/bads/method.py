"""`select_bads`, the method: fit the meta reference (θ₀, row features, empirical-Bayes prior), sample (θ, w)
with `runner.run_sampler` (each rank its shard under torchrun), and build the scorer."""
from __future__ import annotations

import time
from dataclasses import asdict, fields, replace

import numpy as np
import torch

from dpsel.resume.checkpoints import RankCheckpoints, current as current_checkpoints, flatten, unflatten
from dpsel.errors import DpselInputError
from dpsel.parallel.collectives import from_env
from dpsel.select.bads.config import BadsSettings
from dpsel.select.bads.embedder_method import select_bads_embedder, theta_space
from dpsel.select.bads.parallel import gather_result, subset_rows
from dpsel.select.bads.priors import combine_rule, evidence_ablations, prior_means
from dpsel.select.bads.problems import LMProblem, infer_groups
from dpsel.select.bads.runner import run_sampler
from dpsel.select.bads.scorer import BadsScorer
from dpsel.select.bads.weights import final_weights
from dpsel.models.lm import LM_EXTRA_KEYS
from dpsel.models.reference_fit import REFERENCE_EXTRA_KEYS
from dpsel.select.base import Messages, ProgressFn, Scores, SelectConfig

# the `SelectConfig.extra` settings bads reads: its settings by name, the LM's and the reference fit's
EXTRA_KEYS = frozenset({f.name for f in fields(BadsSettings)} | {"measure_plain_steps"} | set(LM_EXTRA_KEYS)
                       | set(REFERENCE_EXTRA_KEYS))


def reference_budget(config: SelectConfig, run_steps: int, fraction: float) -> SelectConfig:
    """The meta reference's step cap follows the run: `ref_steps` if given, else `fraction` of the run's steps
    within [100, 400] (early stopping usually ends it sooner; a 150-step demo should not fit 400 steps first)."""
    if "ref_steps" in config.extra:
        return config
    ref_steps = int(min(400, max(100, round(fraction * run_steps))))
    return replace(config, extra={**config.extra, "ref_steps": ref_steps})


def _data_parallel(config: SelectConfig):
    """The torchrun process group (None unless launched with several processes), refusing what it cannot run."""
    from dpsel.models.passes import runs_in_process
    dp = from_env()
    if dp is not None and not runs_in_process():
        raise DpselInputError("curate --engine ray under torchrun: the ranks already split the feature pass; "
                              "use one of the two (--engine local under torchrun, or --engine ray in one process)")
    if dp is not None and config.weight_param != "logits":
        raise DpselInputError("data-parallel bads needs --weight-param logits (the amortised net is shared)")
    return dp


def _reference(lm, train: list[Messages], train_rows, meta_rows, config: SelectConfig, budget: SelectConfig,
               checkpoint, dp, progress: ProgressFn | None):
    """(the reference fit, its θ state, the raw row features): fitted and checkpointed, or resumed."""
    from dpsel.select.features import row_features
    from dpsel.models.passes import pool_pass
    from dpsel.models.reference_fit import ReferenceFit, fit_reference
    saved = checkpoint.load("reference") if checkpoint is not None else None
    if saved is None:
        # torchrun: every rank fits the same reference; only the finished one is saved (stage `reference`)
        ref = fit_reference(lm, meta_rows, budget, progress, checkpointed=dp is None)
        ref_state = lm.theta_state()
        if dp is not None:
            dp.broadcast(lm.theta())  # one reference for all ranks, even where GPU kernels are not deterministic
        if dp is None:
            raw_features = pool_pass(row_features, lm, train, config.max_length, train_rows, stage="bads.features")
        else:
            raw_features = dp.gather_rows(row_features(lm, subset_rows(train_rows, dp.shard(len(train_rows)))))
        if checkpoint is not None:
            checkpoint.save("reference", {**flatten("theta", ref_state), "features": torch.as_tensor(raw_features)},
                            {k: v for k, v in asdict(ref).items() if k != "state"})
        return ref, ref_state, raw_features
    # resumed: the fitted reference and the features it gave (safetensors + JSON)
    ref_state, raw_features = unflatten("theta", saved[0]), saved[0]["features"].numpy()
    ref = ReferenceFit(state=ref_state, **saved[1])
    lm.load_theta(ref_state)
    lm.model.eval()
    checkpoint.resuming("reference", {"steps": ref.steps},
                        f"the reference fit ({ref.steps} steps) and the row feature pass skipped")
    return ref, ref_state, raw_features


def _sample(lm, train_rows, meta_rows, group_ids: np.ndarray, config: SelectConfig, settings: BadsSettings,
            priors: tuple, features: torch.Tensor, checkpoint, dp, progress: ProgressFn | None):
    """The sampler run from θ₀ = the model's current θ, over the whole pool or (torchrun) this rank's shard
    with its share of the global batch, gathered back into the whole pool's result."""
    prior_mean, ablation_priors = priors
    theta0 = [t.detach().clone() for t in lm.theta()]
    lm.model.train()
    problem = LMProblem(lm, train_rows, meta_rows, group_ids)
    batch_size, seed, rows = config.batch_size, config.seed, slice(None)
    if dp is not None:
        rows = dp.shard(len(train_rows))
        problem = LMProblem(lm, subset_rows(train_rows, rows), meta_rows, group_ids[rows])
        batch_size, seed = dp.local_batch(config.batch_size), config.seed + dp.rank
    result = run_sampler(problem, settings, batch_size=batch_size, meta_batch_size=config.meta_batch_size,
                         seed=seed, prior_mean=prior_mean[rows], theta0=theta0, features=features[rows],
                         weight_param=config.weight_param, progress=progress,
                         measure_plain_steps=int(config.extra.get("measure_plain_steps", 0)), checkpoint=checkpoint,
                         data_parallel=dp, ablation_priors={k: v[rows] for k, v in ablation_priors.items()})
    return result if dp is None else gather_result(dp, result)


def select_bads(train: list[Messages], meta: list[Messages], config: SelectConfig,
                progress: ProgressFn | None = None, groups=None) -> Scores:
    """Fit the meta reference (θ₀, features, empirical-Bayes prior), then sample (θ, w) by SGLD."""
    from dpsel.select.features import FeatureStats
    from dpsel.models.lm import EncodedRows, build_lm, seed_all

    started = time.perf_counter()
    settings = BadsSettings.from_config(config)
    seed_all(config.seed)
    dp = _data_parallel(config)
    space, embedder, why = theta_space(config, settings, dp)
    if space == "embedder":
        return select_bads_embedder(train, meta, config, settings, embedder, why, progress, groups)
    lm = build_lm(config)
    train_rows = EncodedRows(train, lm.tokenizer, config.max_length, lm.pad_id)
    meta_rows = EncodedRows(meta, lm.tokenizer, config.max_length, lm.pad_id)
    group_ids = infer_groups(train, groups)
    base_state = lm.theta_state()

    ref_started = time.perf_counter()
    run_steps = settings.resolve_steps(len(train_rows), config.batch_size)
    if dp is not None:  # every rank takes the whole pool's step count (a shard's own could differ by one batch)
        settings.steps = run_steps
    checkpoint = current_checkpoints()
    if dp is not None and checkpoint is not None:  # torchrun: per-rank sampler files, rank 0's reference
        checkpoint = RankCheckpoints(checkpoint, dp)
    ref, ref_state, raw_features = _reference(lm, train, train_rows, meta_rows, config,
                                              reference_budget(config, run_steps, settings.ref_fraction),
                                              checkpoint, dp, progress)
    ref_nll = raw_features[:, 0]
    stats = FeatureStats.fit(raw_features)
    features = torch.as_tensor(stats.apply(raw_features), dtype=torch.float32)
    ref_seconds = time.perf_counter() - ref_started

    evidence_started = time.perf_counter()
    evidence_report: dict = {}
    prior_evidence, prior_mean, ablation_priors = prior_means(train, ref_nll, group_ids, settings, config.seed,
                                                              meta, evidence_report,
                                                              combine=combine_rule(settings, "lm"))
    evidence_seconds = time.perf_counter() - evidence_started
    if settings.anchor == "base":
        lm.load_theta(base_state)
    result = _sample(lm, train_rows, meta_rows, group_ids, config, settings, (prior_mean, ablation_priors),
                     features, checkpoint, dp, progress)
    result.coverage["theta_space"] = {"space": "lm", "why": why}
    result.coverage["prior_evidence"] = list(prior_evidence) + (
        ["theta"] if settings.posterior_pass and settings.refresh_prior == "min" else [])
    result.coverage.update(evidence_report)  # the embedder behind the evidence, its weights' sha256, rows/s
    if settings.ablations:
        result.alternatives.update(evidence_ablations(prior_evidence, result.alternatives, group_ids),
                                   reference_loss_only=-ref_nll)
    lm.model.eval()

    weight_mean, weight_std, net, phi_samples = final_weights(result, config, stats.apply(raw_features))
    lm.load_theta(ref_state)  # the scorer featurises unseen rows with the reference, as the run did
    from dpsel.data import row_id
    scorer = BadsScorer([row_id(m) for m in train], weight_mean, weight_std,
                        {"seed": config.seed, "max_length": config.max_length,
                         "weight_param": config.weight_param, "variant": config.variant,
                         "hidden": settings.weight_hidden, "features": stats.to_dict()})
    scorer.attach(lm, net, phi_samples)
    timings = dict(result.timings, reference_seconds=ref_seconds, prior_evidence_seconds=evidence_seconds,
                   seconds=time.perf_counter() - started,
                   reference_steps=ref.steps, reference_best_step=ref.best_step)
    diagnostics = dict(result.diagnostics)
    diagnostics["reference_heldout_loss"] = [v for _, v in ref.trace]
    cfg = config.to_dict()
    cfg["bads"] = asdict(settings)
    return Scores("bads", weight_mean, weight_std, cfg, diagnostics, timings, scorer, coverage=result.coverage,
                  alternatives=dict(result.alternatives))
