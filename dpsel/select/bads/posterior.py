"""The posterior pass: every row's weight from the kept θ draws, visited or not (Rao-Blackwellised over the
whole pool), and its data-parallel form (the pool's statistics, each rank keeping its own rows)."""
from __future__ import annotations

import torch

from dpsel.errors import DpselInputError
from dpsel.select.bads.baseline import GroupBaseline
from dpsel.select.bads.config import BadsSettings
from dpsel.select.bads.model import beta_prior_params, conditional_weight_moments
from dpsel.select.bads.parallel import whole_pool
from dpsel.select.bads.priors import empirical_bayes_mean
from dpsel.select.bads.problems import SelectionProblem, losses_in_batches


def posterior_pass_over_pool(problem: SelectionProblem, theta: list[torch.Tensor],
                             theta_draws: list[list[torch.Tensor]], prior_mean: torch.Tensor, groups: torch.Tensor,
                             settings: BadsSettings, data_parallel=None,
                             ablation_priors: dict[str, torch.Tensor] | None = None) -> dict:
    """`posterior_pass` for this process's rows. Under torchrun `problem` is the rank's shard, but the pass's
    statistics (group loss mean/std, within-group ranks) are the whole pool's: every rank runs it on the
    gathered pool (θ is the same everywhere) and keeps its own rows, so a row scores as in one process."""
    if data_parallel is None:
        return posterior_pass(problem, theta, theta_draws, prior_mean, groups, settings, ablation_priors)
    pool, pool_prior, pool_groups = whole_pool(data_parallel, problem, prior_mean, groups)
    pool_ablations = {name: data_parallel.gather_tensor(mean) for name, mean in (ablation_priors or {}).items()}
    passed = posterior_pass(pool, theta, theta_draws, pool_prior, pool_groups, settings, pool_ablations)
    return data_parallel.own_rows(passed, len(pool_groups))


def posterior_pass(problem: SelectionProblem, theta: list[torch.Tensor], theta_draws: list[list[torch.Tensor]],
                   prior_mean: torch.Tensor, groups: torch.Tensor, settings: BadsSettings,
                   ablation_priors: dict[str, torch.Tensor] | None = None) -> dict:
    """Posterior mean and std of every row's weight from the kept θ draws, visited or not.

    Given θ the weights are conditionally independent: p(w_i | θ, D) ∝ Beta(w_i; a_i, b_i)·exp(−ρ ℓ̃_i(θ) w_i).
    So E[w_i | D] = E_θ[E[w_i | θ]] is estimated by averaging that 1-D conditional's moments over the θ draws
    (Rao-Blackwellisation over every row), with ℓ̃ centred and scaled on the whole pool's losses under each draw.

    `refresh_prior="min"` (default variant) refreshes the empirical-Bayes prior from θ before that average: θ has
    trained on the w-weighted pool, so it knows each task's answers far better than the meta-only reference (it
    flags swapped, garbled and cut answers the reference misses), but it has also learnt boilerplate the pool
    repeats (refusals), which the reference still flags. A row keeps a high prior mean only if *both* find it
    typical of its task: a_i/(a_i+b_i) = min(prior mean before the pass, EB mean from θ's losses). Measured as
    the ablation `bads[posterior_pass_no_theta_refresh]` in benchmarks/results/selection.md.
    `ablation_priors` go through the same refresh and average (out["ablations"]); with `settings.ablations`,
    out["reference_prior_mean"] is the pass without the refresh.
    """
    current = [t.detach().clone() for t in theta]
    tilts, standardised = [], torch.zeros(problem.n_train, dtype=torch.float64)
    try:
        for draw in theta_draws:
            _load(theta, draw)
            losses = problem.all_losses() if hasattr(problem, "all_losses") else losses_in_batches(problem)
            baseline = GroupBaseline(int(groups.max()) + 1, 0.0, settings.centre_losses,
                                     settings.standardise_losses)
            baseline.update(losses, groups)
            centre, scale = baseline.normalise(losses, groups)
            standardised += ((losses - centre) / scale).double()
            tilts.append(settings.rho * (losses - centre) / scale)
    finally:
        _load(theta, current)
    theta_loss = (standardised / max(len(tilts), 1)).numpy()
    out = {"theta_loss": theta_loss}
    if settings.ablations:   # the `posterior_pass_no_theta_refresh` ablation: one more average over the pool
        out["reference_prior_mean"], _ = _average_conditionals(prior_mean, tilts, settings.kappa)
    theta_prior = None
    if settings.refresh_prior == "min":
        theta_prior = torch.as_tensor(empirical_bayes_mean(theta_loss, groups.numpy(), settings.beta,
                                                           settings.eb_gamma))
    elif settings.refresh_prior != "none":
        raise DpselInputError(f"unknown refresh_prior {settings.refresh_prior!r}; use 'min' or 'none'")

    def refresh(mean: torch.Tensor) -> torch.Tensor:
        return mean if theta_prior is None else torch.minimum(mean.double(), theta_prior)

    out["mean"], out["std"] = _average_conditionals(refresh(prior_mean), tilts, settings.kappa)
    out["ablations"] = {name: _average_conditionals(refresh(mean), tilts, settings.kappa)[0]
                        for name, mean in (ablation_priors or {}).items()}
    return out


def _average_conditionals(prior_mean: torch.Tensor, tilts: list[torch.Tensor], kappa: float):
    """Mean and std of w over the θ draws: the average of each draw's exact 1-D conditional moments."""
    a, b = beta_prior_params(prior_mean.float(), kappa)
    first = torch.zeros(len(prior_mean), dtype=torch.float64)
    second = torch.zeros_like(first)
    for tilt in tilts:
        for rows in torch.arange(len(first)).split(1024):  # the quadrature is [rows, grid] float64: ~8 MB temporaries
            m1, m2 = conditional_weight_moments(a[rows], b[rows], tilt[rows])
            first[rows] += m1
            second[rows] += m2
    k = max(len(tilts), 1)
    mean = first / k
    return mean.numpy(), (second / k - mean * mean).clamp(min=0).sqrt().numpy()


@torch.no_grad()
def _load(theta: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for t, v in zip(theta, values):
        t.copy_(v)
