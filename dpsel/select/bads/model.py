"""The model: the log joint of (θ, w) and the exact 1-D conditional of one weight given θ (see the package
docstring for the terms). Written once; what computes the losses is a `problems.SelectionProblem`."""
from __future__ import annotations

import pyro.distributions as dist
import torch


def beta_prior_params(mean: torch.Tensor, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean = mean.clamp(1e-3, 1 - 1e-3)
    return mean * kappa, (1 - mean) * kappa


def log_joint(*, w: torch.Tensor, prior_a: torch.Tensor, prior_b: torch.Tensor, train_nll: torch.Tensor,
              train_centre: torch.Tensor, meta_nll: torch.Tensor, theta: list[torch.Tensor],
              theta0: list[torch.Tensor], n_train: int, n_meta: int, rho: float, prior_scale: float,
              logit_jacobian: bool) -> dict[str, torch.Tensor]:
    """Minibatch estimate of the log joint of (θ, w) and its terms.

    `train_centre` is subtracted from the losses in the w-term only through a detached constant, so θ's
    gradient is exactly −ρ Σ w_i ∇ℓ_i. With free logits u (w = sigmoid(u)) the density is over u, hence the
    Jacobian log w(1−w) (`logit_jacobian`).
    """
    scale_t = n_train / max(len(w), 1)
    scale_m = n_meta / max(len(meta_nll), 1)
    w_safe = w.clamp(1e-6, 1 - 1e-6)
    log_prior_w = dist.Beta(prior_a, prior_b).log_prob(w_safe)
    if logit_jacobian:
        log_prior_w = log_prior_w + torch.log(w_safe) + torch.log1p(-w_safe)
    log_prior_theta = sum((dist.Normal(t0, prior_scale).log_prob(t).sum() for t, t0 in zip(theta, theta0)),
                          torch.zeros(()))
    log_train = -rho * (w * (train_nll - train_centre)).sum()
    log_meta = -meta_nll.sum()
    terms = {"log_prior_w": scale_t * log_prior_w.sum(), "log_prior_theta": log_prior_theta,
             "log_train": scale_t * log_train, "log_meta": scale_m * log_meta}
    terms["total"] = sum(terms.values())
    return terms


_W_GRID = torch.linspace(0.0005, 0.9995, 1000, dtype=torch.float64)


def conditional_weight_moments(a: torch.Tensor, b: torch.Tensor,
                               tilt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E[w] and E[w²] under a row's exact conditional given θ, p(w | θ) ∝ Beta(w; a, b)·exp(−tilt·w) (tilt = ρ ℓ̃),
    by quadrature on a fixed grid: the Rao-Blackwellised version of recording the sampled w."""
    grid = _W_GRID[None, :]
    a, b, tilt = (v.detach().double().cpu()[:, None] for v in (a, b, tilt))
    log_density = (a - 1) * torch.log(grid) + (b - 1) * torch.log1p(-grid) - tilt * grid
    p = torch.softmax(log_density, dim=1)
    return (p * grid).sum(1), (p * grid * grid).sum(1)
