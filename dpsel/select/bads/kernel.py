"""One joint SGLD step over θ and the weights (the kernel; `runner.run_sampler` owns the loop around it).

A step: the minibatch's losses, the group baselines updated, the log joint's gradient, one (p)SGLD update.
Under torchrun the kernel is given the run's `DataParallel`: the baselines pool the global minibatch, θ's
gradients are summed over ranks and θ is made rank 0's after the update (see `bads/parallel.py`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpsel.resume.checkpoints import flatten, load_optimizer, optimizer_state, unflatten
from dpsel.select.bads.baseline import GroupBaseline
from dpsel.select.bads.config import BadsSettings
from dpsel.select.bads.model import beta_prior_params, conditional_weight_moments, log_joint
from dpsel.select.bads.parallel import rank_objective
from dpsel.select.bads.problems import SelectionProblem
from dpsel.select.bads.weights import build_weights
from dpsel.select.sgld import SGLD


@dataclass
class Step:
    """One step's minibatch: its rows and their losses, and the centre/scale ℓ̃ used (all on the CPU)."""
    idx: torch.Tensor
    train_nll: torch.Tensor
    meta_nll: torch.Tensor
    centre: torch.Tensor
    scale: torch.Tensor


class SGLDKernel:
    """θ, the weights, their priors, the optimizer and the group baselines of one sampler run."""

    def __init__(self, problem: SelectionProblem, settings: BadsSettings, *, batch_size: int, seed: int,
                 prior_mean: torch.Tensor, theta0: list[torch.Tensor] | None, features: torch.Tensor | None,
                 weight_param: str, data_parallel=None):
        self.problem, self.settings = problem, settings
        self.weight_param, self.data_parallel = weight_param, data_parallel
        self.theta = problem.theta()
        self.theta0 = [t.detach().clone() for t in self.theta] if theta0 is None else theta0
        self.prior_a, self.prior_b = beta_prior_params(prior_mean.float(), settings.kappa)
        self.weights, w_group = build_weights(weight_param, settings, prior_mean=prior_mean, features=features,
                                              n=problem.n_train, batch_size=batch_size, seed=seed)
        self.optimizer = SGLD([{"params": self.theta, "lr": settings.lr_theta,
                                "temperature": settings.temperature_theta}, w_group],
                              precondition=settings.precondition, decay_gamma=settings.decay_gamma,
                              decay_t0=settings.decay_t0)
        self.optimizer.generator = torch.Generator().manual_seed(seed + 1)
        self.groups = torch.as_tensor(problem.groups, dtype=torch.long)
        self.baseline = GroupBaseline(int(self.groups.max()) + 1, settings.baseline_momentum,
                                      settings.centre_losses, settings.standardise_losses)

    def step(self, train_idx: np.ndarray, meta_idx: np.ndarray) -> Step:
        settings, dp = self.settings, self.data_parallel
        idx_t = torch.as_tensor(train_idx, dtype=torch.long)
        train_nll, meta_nll = self.problem.losses(train_idx, meta_idx)
        # The weights, their priors and the baselines live on the CPU (N floats); the losses join them there.
        train_nll, meta_nll = train_nll.float().cpu(), meta_nll.float().cpu()
        g = self.groups[idx_t]
        self.baseline.update(train_nll, g, pooled=None if dp is None else dp.sum_over_ranks)
        centre, scale = self.baseline.normalise(train_nll.detach(), g)
        w = self.weights.weights(idx_t)
        # Standardising only rescales the w-term: ρ w (ℓ − c)/σ; θ sees ρ w ℓ / σ (σ a detached constant).
        terms = log_joint(w=w, prior_a=self.prior_a[idx_t], prior_b=self.prior_b[idx_t], train_nll=train_nll / scale,
                          train_centre=centre / scale, meta_nll=meta_nll, theta=self.theta, theta0=self.theta0,
                          n_train=self.problem.n_train, n_meta=self.problem.n_meta, rho=settings.rho,
                          prior_scale=settings.prior_scale, logit_jacobian=self.weight_param == "logits")
        total = terms["total"]
        if self.weight_param == "amortized":
            total = total + self.weights.log_prior()
        if dp is not None:
            total = rank_objective(terms, total, dp.world)
        self.optimizer.zero_grad(set_to_none=True)
        (-total).backward()
        if dp is not None:
            dp.reduce_grads(self.theta)
        if self.weight_param == "logits":
            self.optimizer.set_visited(self.weights.u, idx_t)
        self.optimizer.step()
        if dp is not None:
            dp.broadcast(self.theta)
        return Step(idx_t, train_nll, meta_nll, centre, scale)

    def conditional_moments(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """E[w_i | θ, ℓ̃_i] and E[w_i² | θ, ℓ̃_i] of the step's rows (the Rao-Blackwellised visit record)."""
        tilt = self.settings.rho * ((step.train_nll - step.centre) / step.scale).detach()
        return conditional_weight_moments(self.prior_a[step.idx], self.prior_b[step.idx], tilt)

    # -- checkpoints -----------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        """The kernel's part of a sampler checkpoint: tensors (safetensors) and JSON."""
        opt_tensors, opt_state = optimizer_state(self.optimizer)
        tensors = {**flatten("theta", [t.detach() for t in self.theta]),
                   **flatten("w", [p.detach() for p in self.weights.params()]),
                   **flatten("baseline", self.baseline.state_dict()),
                   **flatten("noise_rng", self.optimizer.rng_state()), **opt_tensors}
        return tensors, opt_state

    def load_state(self, tensors: dict, state: dict) -> None:
        with torch.no_grad():
            for target, value in zip([*self.theta, *self.weights.params()],
                                     [*listed(tensors, "theta"), *listed(tensors, "w")]):
                target.copy_(value)
        self.baseline.load_state_dict(unflatten("baseline", tensors))
        load_optimizer(self.optimizer, tensors, state)
        self.optimizer.set_rng_state(unflatten("noise_rng", tensors))


def listed(tensors: dict, prefix: str) -> list[torch.Tensor]:
    """The tensors `flatten(prefix, [...])` saved, back in list order."""
    items = unflatten(prefix, tensors)
    return [items[str(i)] for i in range(len(items))]
