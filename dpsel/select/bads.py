"""`bads`: Bayesian data-point selection — joint SGLD over θ and the row weights w (see DESIGN.md).

Pyro-style separation: `log_joint` is the model (written once, priors as pyro distributions), the sampler
(`run_sampler` with `sgld.SGLD`) is separate, and what computes per-row losses is a `SelectionProblem`
(an LM here; a logistic regression in the tests) — swapping the model changes nothing else.

    log p(w)            = Σ_i log Beta(w_i; a_i, b_i)            (sparsity prior; a_i, b_i from the meta-fitted
                                                                   reference in the default variant: empirical Bayes)
    log p(θ | w, D_t)   ≈ log N(θ; θ₀, s²I) − ρ Σ_i w_i ℓ̃_i(θ)   (weighted train rows as a prior on θ; Z(w) dropped)
    log p(D_m | θ)      = −Σ_j ℓ(z_j; θ)                          (the meta rows are the likelihood)

ℓ̃_i = ℓ_i − c_g(i): the default variant centres each row's loss on a running mean of its group's losses
(per-task normalisation; it stands in for the dropped normaliser's gradient, which is what keeps every
weight from being pushed down alike). Minibatch terms are scaled by N/B and M/B_m.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pyro.distributions as dist
import torch

from dpsel import distributed
from dpsel.errors import DpselInputError
from dpsel.select.base import Messages, ProgressFn, Scores, SelectConfig
from dpsel.select.consistency import (combine_evidence, consistency_z, evidence_z, group_consistency,
                                      prior_mean_from_z)
from dpsel.select.sgld import SGLD, RunningMoments

# ----------------------------------------------------------------------------------------------- settings


# Passes over the pool after burn-in. Two give every row at least one visit after burn-in (measured at 3,000 rows:
# min 1 / median 2 / max 3 visits), so the visit averages (the `visits_only` ablation) exist for every row; the
# default variant's weights come from the posterior pass, which needs θ trained, not every row visited.
DEFAULT_EPOCHS = 2.0


@dataclass
class BadsSettings:
    """Hyperparameters (SelectConfig.extra overrides any of them by name)."""
    steps: int | None = None          # None: from `epochs` (SelectConfig.steps / extra["steps"] override)
    epochs: float = DEFAULT_EPOCHS    # passes over the pool after burn-in
    burn_in: float = 0.25             # fraction of steps before averaging starts
    posterior_pass: bool = True       # score every row under θ draws after the run (Rao-Blackwellised, below)
    theta_draws: int = 4              # θ snapshots kept after burn-in for the posterior pass
    ref_fraction: float = 0.5         # meta reference fit capped at this fraction of the run (ref_steps overrides)
    refresh_prior: str = "min"        # posterior pass: "min" (prior from reference and θ, see posterior_pass) | "none"
    min_visits: int = 2               # without the posterior pass: rows visited fewer times get the weight net
    beta: float = 0.7                 # prior expected kept fraction
    # Prior concentration a + b. 12 since the prior carries two kinds of evidence (reference loss and group
    # consistency): measured on 3k rows, seeds 0 / 1, AUROC 0.802 / 0.827 at 6, 0.813 / 0.829 at 12. The paper
    # form keeps 6 (its flat prior carries no evidence).
    kappa: float = 12.0
    rho: float = 3.0                  # weight of the train-likelihood term on w (measured: 1 → 0.69, 3 → 0.75 AUROC)
    prior_scale: float = 1.0          # s: std of the Gaussian prior on θ around θ₀ (0.05 kept θ from learning)
    lr_theta: float = 1e-3
    lr_w: float = 0.5                 # per-visit Langevin step of a free logit (its 1-D conditional has curvature ~κ/4)
    lr_phi: float = 1e-3
    temperature_theta: float = 1e-3   # cold posterior on θ (pSGLD with a small temperature)
    temperature_w: float = 1.0        # the weights are sampled at the true posterior temperature
    precondition: bool = True         # pSGLD
    decay_gamma: float = 0.33         # polynomial step-size decay ε_t = ε (1 + t/t0)^-γ
    decay_t0: float = 200.0
    anchor: str = "meta"              # θ₀: "meta" (short fit on meta) | "base"
    eb_prior: bool = True             # Beta prior means from the reference's per-group loss ranks
    eb_gamma: float = 1.0             # how sharply the reference ranks move the prior mean
    group_consistency: bool = True    # prior evidence: does the answer look like its group's? (select/consistency.py)
    centre_losses: str = "group"      # "group" | "global" | "none"
    standardise_losses: bool = True   # divide centred losses by the group's running std
    baseline_momentum: float = 0.95
    rao_blackwell: bool = True        # logits: average E[w_i | θ, ℓ̃_i] (1-D quadrature) at each visit, not the draw
    diag_every: int = 10
    weight_hidden: int = 32

    @classmethod
    def for_variant(cls, variant: str, extra: dict) -> "BadsSettings":
        base = cls()
        if variant == "paper":
            # The plain form: θ anchored at the base model, symmetric Beta prior, raw losses, plain SGLD at T = 1.
            base = cls(anchor="base", eb_prior=False, centre_losses="none", standardise_losses=False,
                       precondition=False, temperature_theta=1.0, lr_theta=1e-6, prior_scale=1.0,
                       posterior_pass=False, group_consistency=False, kappa=6.0)
        elif variant != "default":
            from dpsel.errors import DpselInputError
            raise DpselInputError(f"unknown bads variant {variant!r}; use 'default' or 'paper'")
        names = {f.name for f in fields(cls)}
        overrides = {k: v for k, v in extra.items() if k in names}
        return cls(**{**asdict(base), **overrides})

    def resolve_steps(self, n_rows: int, batch_size: int) -> int:
        """Run length: the explicit `steps`, else `epochs` passes over the pool after a `burn_in` fraction."""
        if self.steps is not None:
            return int(self.steps)
        batches_per_pass = math.ceil(n_rows / batch_size)
        return max(1, math.ceil(self.epochs * batches_per_pass / (1.0 - self.burn_in)))


# ----------------------------------------------------------------------------------------------- the model


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


# ----------------------------------------------------------------------------------------------- problems


class SelectionProblem:
    """What the sampler needs from a model: θ, per-row losses on index batches, groups, batch order."""
    n_train: int
    n_meta: int
    groups: np.ndarray  # [n_train] int group id (per-task normalisation); all zeros if unknown

    def theta(self) -> list[torch.nn.Parameter]: ...

    def losses(self, train_idx: np.ndarray, meta_idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...

    def train_batches(self, batch_size: int, seed: int) -> list[list[int]]:
        order = np.random.default_rng(seed).permutation(self.n_train)
        return [order[i:i + batch_size].tolist() for i in range(0, self.n_train, batch_size)]

    def plain_step_loss(self, train_idx: np.ndarray) -> torch.Tensor:
        return self.losses(train_idx, np.zeros(0, dtype=int))[0].mean()

    def all_losses(self) -> torch.Tensor:
        """Loss of every train row under the current θ (no grad); the posterior pass calls it once per θ draw."""
        return _losses_in_batches(self)


@torch.no_grad()
def _losses_in_batches(problem, batch_size: int = 256) -> torch.Tensor:
    none = np.zeros(0, dtype=int)
    return torch.cat([problem.losses(np.arange(i, min(i + batch_size, problem.n_train)), none)[0].float().cpu()
                      for i in range(0, problem.n_train, batch_size)])


# ----------------------------------------------------------------------------------------------- weights


class LogitWeights:
    """Free per-row logits u, w = sigmoid(u); a row-sparse SGLD group."""
    row_sparse = True

    def __init__(self, init_logits: torch.Tensor):
        self.u = torch.nn.Parameter(init_logits.clone().float())

    def params(self):
        return [self.u]

    def weights(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.u[idx])

    def all_weights(self) -> torch.Tensor:
        return torch.sigmoid(self.u.detach())


class AmortizedWeights:
    """w_i = sigmoid(g_φ(e_i)) over fixed features; φ gets a N(0, 1) prior; a dense SGLD group."""
    row_sparse = False

    def __init__(self, features: torch.Tensor, hidden: int, init_logit: float, seed: int):
        from dpsel.select.features import WeightNet
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.net = WeightNet(features.shape[1], hidden, init_logit)
        torch.random.set_rng_state(state)
        self.features = features.float()

    def params(self):
        return list(self.net.parameters())

    def weights(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(self.features[idx]))

    def all_weights(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(self.net(self.features))

    def log_prior(self) -> torch.Tensor:
        return sum(dist.Normal(0.0, 1.0).log_prob(p).sum() for p in self.net.parameters())


# ----------------------------------------------------------------------------------------------- sampler


class GroupBaseline:
    """Running mean/std of the losses of each group: the centre (and scale) ℓ̃ uses."""

    def __init__(self, n_groups: int, momentum: float, mode: str, standardise: bool):
        self.mean = torch.full((n_groups,), float("nan"))
        self.var = torch.ones(n_groups)
        self.momentum, self.mode, self.standardise = momentum, mode, standardise

    def update(self, losses: torch.Tensor, groups: torch.Tensor, pooled=None) -> None:
        """Blend in this minibatch's per-group mean and variance. `pooled` (data-parallel runs: a sum over
        ranks) makes them the global minibatch's, from every rank's per-group count, sum and sum of squares."""
        losses = losses.detach().float().cpu()
        if self.mode == "global":
            groups = torch.zeros_like(groups)
        if pooled is not None:
            self._update_pooled(losses, groups, pooled)
            return
        for g in groups.unique():
            vals = losses[groups == g]
            self._blend(g, vals.mean(), vals.var(unbiased=False) if len(vals) > 1 else None)

    def _update_pooled(self, losses: torch.Tensor, groups: torch.Tensor, pooled) -> None:
        sums = torch.zeros(3, len(self.mean), dtype=torch.float64)
        values = losses.double()
        for row, v in enumerate((torch.ones_like(values), values, values * values)):
            sums[row].index_add_(0, groups, v)
        count, total, squares = pooled(sums)
        for g in torch.nonzero(count).flatten():
            m = total[g] / count[g]
            self._blend(g, m.float(), (squares[g] / count[g] - m * m).clamp(min=0).float() if count[g] > 1 else None)

    def _blend(self, g, m: torch.Tensor, v: torch.Tensor | None) -> None:
        """Running mean/variance of group g; `v` None: one row, no variance of its own."""
        if torch.isnan(self.mean[g]):
            self.mean[g], self.var[g] = m, v if v is not None else torch.tensor(1.0)
        else:
            k = self.momentum
            v = self.var[g] if v is None else v
            self.mean[g] = k * self.mean[g] + (1 - k) * m
            self.var[g] = k * self.var[g] + (1 - k) * (v + (m - self.mean[g]) ** 2)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.mean, self.var = state["mean"].clone(), state["var"].clone()

    def normalise(self, losses: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(centre, scale) per row, detached."""
        if self.mode == "none":
            return torch.zeros_like(losses), torch.ones_like(losses)
        if self.mode == "global":
            groups = torch.zeros_like(groups)
        centre = self.mean[groups].to(losses)
        scale = self.var[groups].sqrt().clamp(min=1e-3).to(losses) if self.standardise else torch.ones_like(losses)
        return centre, scale


@dataclass
class SamplerResult:
    weight_mean: np.ndarray
    weight_std: np.ndarray
    diagnostics: dict[str, list[float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    weights_model: object = None
    phi_samples: list[dict] = field(default_factory=list)
    visits: np.ndarray | None = None          # per row: minibatch visits after burn-in
    under_visited: np.ndarray | None = None   # rows whose weight is not yet backed by enough draws (caller decides)
    coverage: dict = field(default_factory=dict)
    alternatives: dict[str, np.ndarray] = field(default_factory=dict)  # other per-row estimates from this run


def coverage_summary(visits: np.ndarray, steps: int, burn_in: int, scored_by: dict[str, int]) -> dict:
    """What the manifest records about how every row got its weight."""
    return {"steps": int(steps), "burn_in_steps": int(burn_in),
            "visits_after_burn_in": {"min": int(visits.min()), "median": float(np.median(visits)),
                                     "max": int(visits.max())},
            "rows_never_visited_after_burn_in": int((visits == 0).sum()), "rows_scored_by": scored_by}


def _quantiles(w: torch.Tensor) -> list[float]:
    return torch.quantile(w.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()


def run_sampler(problem: SelectionProblem, settings: BadsSettings, *, batch_size: int, meta_batch_size: int,
                seed: int, prior_mean: torch.Tensor, theta0: list[torch.Tensor] | None = None,
                features: torch.Tensor | None = None, weight_param: str = "logits",
                progress: ProgressFn | None = None, measure_plain_steps: int = 0,
                checkpoint=None, data_parallel=None,
                ablation_priors: dict[str, torch.Tensor] | None = None) -> SamplerResult:
    """Joint SGLD over θ and the weights; posterior mean/std of every weight from running averages after burn-in.

    `checkpoint` (a `dpsel.checkpoint.Checkpoints`): resume from its `sampler` stage when there is one, and
    save the whole sampler state there whenever it says one is due.
    `data_parallel` (dpsel.distributed.DataParallel, under torchrun): `problem` is this rank's row shard,
    θ's gradients are summed over ranks and θ is kept identical (see dpsel/distributed.py).
    `ablation_priors`: other prior means put through the same posterior pass (`posterior_pass_<name>` alternatives)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n, m = problem.n_train, problem.n_meta
    theta = problem.theta()
    theta0 = [t.detach().clone() for t in theta] if theta0 is None else theta0
    prior_a, prior_b = beta_prior_params(prior_mean.float(), settings.kappa)
    init_logit = math.log(settings.beta / (1 - settings.beta))
    if weight_param == "logits":
        weights = LogitWeights(torch.logit(prior_mean.float().clamp(1e-3, 1 - 1e-3)))
        # A visit is a Langevin step of size lr_w on the row's own conditional: the group's lr is lr_w·B/N and
        # its N/B-scaled gradient brings it back to lr_w. Not preconditioned: that curvature is known and O(1).
        w_group = {"params": weights.params(), "lr": settings.lr_w * batch_size / n, "precondition": False,
                   "temperature": settings.temperature_w, "row_sparse": True, "visit_scale": n / batch_size,
                   "decay_gamma": 0.0}
    elif weight_param == "amortized":
        if features is None:
            raise ValueError("amortized weights need per-row features")
        weights = AmortizedWeights(features, settings.weight_hidden, init_logit, seed)
        w_group = {"params": weights.params(), "lr": settings.lr_phi, "temperature": settings.temperature_w}
    else:
        from dpsel.errors import DpselInputError
        raise DpselInputError(f"unknown weight parametrisation {weight_param!r}; use 'logits' or 'amortized'")
    optimizer = SGLD([{"params": theta, "lr": settings.lr_theta, "temperature": settings.temperature_theta}, w_group],
                     precondition=settings.precondition, decay_gamma=settings.decay_gamma, decay_t0=settings.decay_t0)
    optimizer.generator = torch.Generator().manual_seed(seed + 1)
    groups = torch.as_tensor(problem.groups, dtype=torch.long)
    baseline = GroupBaseline(int(groups.max()) + 1, settings.baseline_momentum, settings.centre_losses,
                             settings.standardise_losses)
    moments = RunningMoments(n)
    steps = settings.resolve_steps(n, batch_size)
    burn_in = int(settings.burn_in * steps)
    visits = torch.zeros(n, dtype=torch.long)  # minibatch visits per row after burn-in
    # θ draws kept for the posterior pass, evenly spaced after burn-in (the last step always among them)
    draw_steps = set(np.linspace(burn_in, steps - 1, max(1, settings.theta_draws)).round().astype(int).tolist())
    theta_draws: list[list[torch.Tensor]] = []
    diag: dict[str, list[float]] = {k: [] for k in ("step", "mean_weight", "meta_loss", "train_loss", "weight_q10",
                                                    "weight_q50", "weight_q90", "lr_theta")}
    timings = {}
    if measure_plain_steps:
        timings["plain_step_seconds"] = measure_plain_step(problem, batch_size, measure_plain_steps, seed)

    batches: list[list[int]] = []
    phi_samples: list[dict] = []
    step_time = 0.0

    def snapshot(next_step: int) -> tuple[dict, dict]:
        """The loop's whole state after a step: tensors (safetensors) and JSON."""
        from dpsel.checkpoint import flatten
        opt = optimizer.state_dict()
        tensors = {**flatten("theta", [t.detach() for t in theta]), **flatten("w", [p.detach() for p in weights.params()]),
                   **flatten("moments", moments.state_dict()), **flatten("baseline", baseline.state_dict()),
                   **flatten("noise_rng", optimizer.rng_state()), "torch_rng": torch.get_rng_state(), "visits": visits}
        for idx, param_state in opt["state"].items():
            tensors.update(flatten(f"opt.{idx}", param_state))
        for i, draw in enumerate(theta_draws):
            tensors.update(flatten(f"draw.{i}", draw))
        for i, sample in enumerate(phi_samples):
            tensors.update(flatten(f"phi.{i}", sample))
        state = {"step": next_step, "param_groups": opt["param_groups"], "opt_state": sorted(opt["state"]),
                 "numpy_rng": rng.bit_generator.state, "batches": [list(map(int, b)) for b in batches],
                 "diag": diag, "step_time": step_time, "draws": len(theta_draws), "phi": len(phi_samples)}
        return tensors, state

    def restore(tensors: dict, state: dict) -> int:
        from dpsel.checkpoint import unflatten

        def listed(prefix: str) -> list[torch.Tensor]:
            items = unflatten(prefix, tensors)
            return [items[str(i)] for i in range(len(items))]
        with torch.no_grad():
            for target, value in zip([*theta, *weights.params()], [*listed("theta"), *listed("w")]):
                target.copy_(value)
        moments.load_state_dict(unflatten("moments", tensors))
        baseline.load_state_dict(unflatten("baseline", tensors))
        optimizer.load_state_dict({"state": {i: unflatten(f"opt.{i}", tensors) for i in state["opt_state"]},
                                   "param_groups": state["param_groups"]})
        optimizer.set_rng_state(unflatten("noise_rng", tensors))
        torch.set_rng_state(tensors["torch_rng"])
        visits.copy_(tensors["visits"])
        rng.bit_generator.state = state["numpy_rng"]
        batches[:] = state["batches"]
        diag.update(state["diag"])
        theta_draws[:] = [listed(f"draw.{i}") for i in range(state["draws"])]
        phi_samples[:] = [unflatten(f"phi.{i}", tensors) for i in range(state["phi"])]
        return int(state["step"])

    start_step, saved = 0, checkpoint.load("sampler") if checkpoint is not None else None
    if saved is not None:
        start_step, step_time = restore(*saved), float(saved[1]["step_time"])
        checkpoint.resumed["sampler"] = {"from_step": start_step, "steps": steps}
    if checkpoint is not None:
        checkpoint.loop_start()   # a SIGTERM during the first step waits for it too, then saves
    for step in range(start_step, steps):
        if not batches:
            batches = problem.train_batches(batch_size, int(rng.integers(2**31)))
        train_idx = np.asarray(batches.pop(0))
        meta_idx = rng.choice(m, size=min(meta_batch_size, m), replace=False)
        _sync(theta[0].device)
        started = time.perf_counter()
        idx_t = torch.as_tensor(train_idx, dtype=torch.long)
        train_nll, meta_nll = problem.losses(train_idx, meta_idx)
        # The weights, their priors and the baselines live on the CPU (N floats); the losses join them there.
        train_nll, meta_nll = train_nll.float().cpu(), meta_nll.float().cpu()
        g = groups[idx_t]
        baseline.update(train_nll, g, pooled=None if data_parallel is None else data_parallel.sum_over_ranks)
        centre, scale = baseline.normalise(train_nll.detach(), g)
        w = weights.weights(idx_t)
        # Standardising only rescales the w-term: ρ w (ℓ − c)/σ; θ sees ρ w ℓ / σ (σ a detached constant).
        terms = log_joint(w=w, prior_a=prior_a[idx_t], prior_b=prior_b[idx_t], train_nll=train_nll / scale,
                          train_centre=centre / scale, meta_nll=meta_nll, theta=theta, theta0=theta0,
                          n_train=n, n_meta=m, rho=settings.rho, prior_scale=settings.prior_scale,
                          logit_jacobian=weight_param == "logits")
        total = terms["total"]
        if weight_param == "amortized":
            total = total + weights.log_prior()
        if data_parallel is not None:
            total = data_parallel.objective(terms, total)
        optimizer.zero_grad(set_to_none=True)
        (-total).backward()
        if data_parallel is not None:
            data_parallel.reduce_theta_grads(theta)
        if weight_param == "logits":
            optimizer.set_visited(weights.u, idx_t)
        optimizer.step()
        if data_parallel is not None:
            data_parallel.broadcast(theta)
        _sync(theta[0].device)
        step_time += time.perf_counter() - started

        if step >= burn_in:
            visits.index_add_(0, idx_t, torch.ones(len(idx_t), dtype=torch.long))
            if settings.posterior_pass and step in draw_steps:
                theta_draws.append([t.detach().clone() for t in theta])
            if weight_param == "logits" and settings.rao_blackwell:
                cond_mean, cond_sq = conditional_weight_moments(prior_a[idx_t], prior_b[idx_t],
                                                                settings.rho * ((train_nll - centre) / scale).detach())
                moments.update_moments(cond_mean, cond_sq, idx_t)
            elif weight_param == "logits":
                moments.update(weights.weights(idx_t).detach(), idx_t)
            else:
                moments.update(weights.all_weights())
                if (step - burn_in) % max(1, (steps - burn_in) // 8) == 0:
                    phi_samples.append({k: v.detach().clone() for k, v in weights.net.state_dict().items()})
        if step % settings.diag_every == 0 or step == steps - 1:
            all_w = weights.all_weights()
            q = _quantiles(all_w)
            record = {"step": step, "mean_weight": float(all_w.mean()), "meta_loss": float(meta_nll.detach().mean()),
                      "train_loss": float(train_nll.detach().mean()), "weight_q10": q[0], "weight_q50": q[1],
                      "weight_q90": q[2], "lr_theta": optimizer.current_lr(optimizer.param_groups[0])}
            for k, v in record.items():
                diag[k].append(float(v))
            if progress:
                progress(step + 1, steps, record)
        if checkpoint is not None and step < steps - 1:
            checkpoint.after_step("sampler", lambda: snapshot(step + 1))
    if checkpoint is not None:
        checkpoint.loop_done()
    visits_np = visits.numpy()
    under_visited = np.zeros(n, dtype=bool)
    alternatives: dict[str, np.ndarray] = {}
    if weight_param == "amortized":
        # w_i = g_φ(e_i): every row's weight is recorded at every step after burn-in, visited or not.
        mean, std = moments.mean().numpy(), moments.std().numpy()
        scored_by = {"weight_network_draws": n}
    elif settings.posterior_pass:
        pass_started = time.perf_counter()
        passed = posterior_pass_over_pool(problem, theta, theta_draws, prior_mean, groups, settings, data_parallel,
                                          ablation_priors)
        mean, std = passed["mean"], passed["std"]
        timings["posterior_pass_seconds"] = time.perf_counter() - pass_started
        scored_by = {"posterior_pass": n}
        # Ablations from the same run: the visit averages alone (unvisited rows at their prior), θ's
        # standardised loss alone (no prior), the posterior pass without the refreshed prior, and the posterior
        # pass from each of `ablation_priors`.
        alternatives = {"visits_only": moments.mean(fallback=prior_mean).numpy(),
                        "theta_loss_only": -passed["theta_loss"],
                        "posterior_pass_no_theta_refresh": passed["reference_prior_mean"],
                        **{f"posterior_pass_{name}": mean for name, mean in passed["ablations"].items()}}
    else:
        # A row seen fewer than min_visits times after burn-in has no posterior of its own worth the name: the
        # caller scores it another way (select_bads: the weight network) and the coverage record says so.
        under_visited = visits_np < settings.min_visits
        mean = moments.mean(fallback=prior_mean).numpy()
        std = moments.std().numpy()
        scored_by = {"visits": int((~under_visited).sum()), "under_visited": int(under_visited.sum())}
    timings.update(sampler_seconds=step_time, seconds_per_step=step_time / max(steps, 1))
    if "plain_step_seconds" in timings:
        timings["step_ratio_vs_plain"] = timings["seconds_per_step"] / timings["plain_step_seconds"]
    coverage = coverage_summary(visits_np, steps, burn_in, scored_by)
    return SamplerResult(np.clip(mean, 0, 1), std, diag, timings, weights, phi_samples, visits_np, under_visited,
                         coverage, alternatives)


def posterior_pass_over_pool(problem: SelectionProblem, theta: list[torch.Tensor],
                             theta_draws: list[list[torch.Tensor]], prior_mean: torch.Tensor, groups: torch.Tensor,
                             settings: BadsSettings, data_parallel=None,
                             ablation_priors: dict[str, torch.Tensor] | None = None) -> dict:
    """`posterior_pass` for this process's rows. Under torchrun `problem` is the rank's shard, but the pass's
    statistics (group loss mean/std, within-group ranks) are the whole pool's: every rank runs it on the
    gathered pool (θ is the same everywhere) and keeps its own rows, so a row scores as in one process."""
    if data_parallel is None:
        return posterior_pass(problem, theta, theta_draws, prior_mean, groups, settings, ablation_priors)
    pool, pool_prior, pool_groups = data_parallel.whole_pool(problem, prior_mean, groups)
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
    `ablation_priors` go through the same refresh and average (out["ablations"]).
    """
    current = [t.detach().clone() for t in theta]
    tilts, standardised = [], torch.zeros(problem.n_train, dtype=torch.float64)
    try:
        for draw in theta_draws:
            _load(theta, draw)
            losses = problem.all_losses() if hasattr(problem, "all_losses") else _losses_in_batches(problem)
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
    out["reference_prior_mean"], _ = _average_conditionals(prior_mean, tilts, settings.kappa)
    theta_prior = None
    if settings.refresh_prior == "min":
        theta_prior = torch.as_tensor(empirical_bayes_mean(theta_loss, groups.numpy(), settings.beta,
                                                           settings.eb_gamma))
    elif settings.refresh_prior != "none":
        from dpsel.errors import DpselInputError
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
        for rows in torch.arange(len(first)).split(4096):  # the quadrature is [rows, grid]: bound its memory
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


_W_GRID = torch.linspace(0.0005, 0.9995, 1000, dtype=torch.float64)


def conditional_weight_moments(a: torch.Tensor, b: torch.Tensor, tilt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E[w] and E[w²] under a row's exact conditional given θ, p(w | θ) ∝ Beta(w; a, b)·exp(−tilt·w) (tilt = ρ ℓ̃),
    by quadrature on a fixed grid: the Rao-Blackwellised version of recording the sampled w."""
    grid = _W_GRID[None, :]
    a, b, tilt = (v.detach().double().cpu()[:, None] for v in (a, b, tilt))
    log_density = (a - 1) * torch.log(grid) + (b - 1) * torch.log1p(-grid) - tilt * grid
    p = torch.softmax(log_density, dim=1)
    return (p * grid).sum(1), (p * grid * grid).sum(1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_plain_step(problem: SelectionProblem, batch_size: int, steps: int, seed: int) -> float:
    """Seconds per plain training step (forward/backward on B train rows + an AdamW update), θ restored after."""
    theta = problem.theta()
    saved = [t.detach().clone() for t in theta]
    opt = torch.optim.AdamW(theta, lr=1e-4)
    batches = problem.train_batches(batch_size, seed)[:steps + 1]
    elapsed = 0.0
    for k, b in enumerate(batches):
        _sync(theta[0].device)
        started = time.perf_counter()
        loss = problem.plain_step_loss(np.asarray(b))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(theta[0].device)  # CUDA runs asynchronously: time the work, not the launch
        if k > 0:  # the first step pays one-off allocation costs
            elapsed += time.perf_counter() - started
    with torch.no_grad():
        for t, s in zip(theta, saved):
            t.copy_(s)
            t.grad = None
    return elapsed / max(len(batches) - 1, 1)


# ----------------------------------------------------------------------------------------------- priors


def empirical_bayes_mean(ref_nll: np.ndarray, groups: np.ndarray, beta: float, gamma: float) -> np.ndarray:
    """Prior mean weight per row from its reference-loss rank within its group (empirical Bayes).

    A row at its group's median loss gets β; rows the meta-fitted reference finds much harder get less.
    """
    from dpsel.select.consistency import evidence_z, prior_mean_from_z
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


# ----------------------------------------------------------------------------------------------- the LM case


class LMProblem(SelectionProblem):
    """Train and meta rows under an LM whose trainable parameters are θ; one forward over both batches."""

    def __init__(self, lm, train_rows, meta_rows, groups: np.ndarray):
        self.lm, self.train_rows, self.meta_rows = lm, train_rows, meta_rows
        self.n_train, self.n_meta = len(train_rows), len(meta_rows)
        self.groups = groups

    def theta(self):
        return self.lm.theta()

    def losses(self, train_idx, meta_idx):
        from dpsel.models.lm import batch_nll
        # Two forwards, each padded to its own longest row: train batches are length-grouped, meta rows are not,
        # and one joint batch would pad the train rows to the longest meta row.
        train_nll = batch_nll(self.lm.model, self.train_rows.batch(train_idx, self.lm.device))
        if len(meta_idx) == 0:
            return train_nll, train_nll.new_zeros(0)
        return train_nll, batch_nll(self.lm.model, self.meta_rows.batch(meta_idx, self.lm.device))

    def train_batches(self, batch_size, seed):
        from peft_train.encode import length_grouped_batches
        return length_grouped_batches(self.train_rows.lengths.tolist(), batch_size, seed)

    def all_losses(self):
        from dpsel.models.lm import score_nll
        return torch.as_tensor(score_nll(self.lm, self.train_rows), dtype=torch.float32)


def reference_budget(config: SelectConfig, run_steps: int, fraction: float) -> SelectConfig:
    """The meta reference's step cap follows the run: `ref_steps` if given, else `fraction` of the run's steps
    within [100, 400] (early stopping usually ends it sooner; a 150-step demo should not fit 400 steps first)."""
    if "ref_steps" in config.extra:
        return config
    from dataclasses import replace
    ref_steps = int(min(400, max(100, round(fraction * run_steps))))
    return replace(config, extra={**config.extra, "ref_steps": ref_steps})


def infer_groups(messages: list[Messages], groups) -> np.ndarray:
    """Integer group per row: the given labels (e.g. a `task` column), else one group."""
    if groups is None:
        return np.zeros(len(messages), dtype=int)
    _, codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return codes.astype(int)


def select_bads(train: list[Messages], meta: list[Messages], config: SelectConfig,
                progress: ProgressFn | None = None, groups=None) -> Scores:
    """Fit the meta reference (θ₀, features, empirical-Bayes prior), then sample (θ, w) by SGLD."""
    from dpsel.select.features import FeatureStats, distil_weight_net, row_features
    from dpsel.models.passes import pool_pass, runs_in_process
    from dpsel.checkpoint import current as current_checkpoints, flatten, unflatten
    from dpsel.models.lm import EncodedRows, ReferenceFit, build_lm, fit_reference, score_nll, seed_all

    started = time.perf_counter()
    settings = BadsSettings.for_variant(config.variant, config.extra)
    if config.epochs is not None:
        settings.epochs, settings.steps = float(config.epochs), None
    if config.steps is not None:  # --steps overrides --epochs
        settings.steps = int(config.steps)
    seed_all(config.seed)
    dp = distributed.from_env()  # None unless launched by torchrun / accelerate with several processes
    if dp is not None and not runs_in_process():
        raise DpselInputError("curate --engine ray under torchrun: the ranks already split the feature pass; "
                              "use one of the two (--engine local under torchrun, or --engine ray in one process)")
    if dp is not None and config.weight_param != "logits":
        raise DpselInputError("data-parallel bads needs --weight-param logits (the amortised net is shared)")
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
        checkpoint = distributed.RankCheckpoints(checkpoint, dp)
    saved = checkpoint.load("reference") if checkpoint is not None else None
    if saved is None:
        ref = fit_reference(lm, meta_rows, reference_budget(config, run_steps, settings.ref_fraction), progress)
        ref_state = lm.theta_state()
        if dp is not None:
            dp.broadcast(lm.theta())  # one reference for all ranks, even where GPU kernels are not deterministic
        raw_features = pool_pass(row_features, lm, train, config.max_length, train_rows) if dp is None else \
            dp.gather_rows(row_features(lm, distributed.subset_rows(train_rows, dp.shard(len(train_rows)))))
        if checkpoint is not None:
            checkpoint.save("reference", {**flatten("theta", ref_state), "features": torch.as_tensor(raw_features)},
                            {k: v for k, v in asdict(ref).items() if k != "state"})
    else:  # resumed: the fitted reference and the features it gave (safetensors + JSON)
        ref_state, raw_features = unflatten("theta", saved[0]), saved[0]["features"].numpy()
        ref = ReferenceFit(state=ref_state, **saved[1])
        lm.load_theta(ref_state)
        lm.model.eval()
        checkpoint.resumed["reference"] = {"steps": ref.steps}
    ref_nll = raw_features[:, 0]
    stats = FeatureStats.fit(raw_features)
    features = torch.as_tensor(stats.apply(raw_features), dtype=torch.float32)
    ref_seconds = time.perf_counter() - ref_started

    evidence_started = time.perf_counter()
    prior_evidence = prior_evidence_z(train, ref_nll, group_ids, settings, config.seed) if settings.eb_prior else {}
    if prior_evidence:
        prior_mean = torch.as_tensor(prior_mean_from_z(combine_evidence(list(prior_evidence.values()), "max"),
                                                       settings.beta, settings.eb_gamma))
    else:
        prior_mean = torch.full((len(train),), settings.beta, dtype=torch.float64)
    evidence_seconds = time.perf_counter() - evidence_started
    ablation_priors = {}
    if "group_consistency" in prior_evidence:  # the same run's posterior pass from the reference-only prior
        ablation_priors["no_group_consistency"] = torch.as_tensor(
            prior_mean_from_z(prior_evidence["reference"], settings.beta, settings.eb_gamma))
    if settings.anchor == "base":
        lm.load_theta(base_state)
    theta0 = [t.detach().clone() for t in lm.theta()]
    lm.model.train()
    problem = LMProblem(lm, train_rows, meta_rows, group_ids)
    batch_size, seed, rows = config.batch_size, config.seed, slice(None)
    if dp is not None:  # this rank samples its shard with its share of the global batch
        rows = dp.shard(len(train_rows))
        problem = LMProblem(lm, distributed.subset_rows(train_rows, rows), meta_rows, group_ids[rows])
        batch_size, seed = dp.local_batch(config.batch_size), config.seed + dp.rank
    result = run_sampler(problem, settings, batch_size=batch_size, meta_batch_size=config.meta_batch_size,
                         seed=seed, prior_mean=prior_mean[rows], theta0=theta0, features=features[rows],
                         weight_param=config.weight_param, progress=progress,
                         measure_plain_steps=int(config.extra.get("measure_plain_steps", 0)), checkpoint=checkpoint,
                         data_parallel=dp, ablation_priors={k: v[rows] for k, v in ablation_priors.items()})
    if dp is not None:
        result = dp.gather_result(result)
    result.coverage["prior_evidence"] = list(prior_evidence) + (
        ["theta"] if settings.posterior_pass and settings.refresh_prior == "min" else [])
    result.alternatives.update(evidence_ablations(prior_evidence, result.alternatives, group_ids))
    lm.model.eval()

    weight_mean, weight_std = result.weight_mean, result.weight_std
    if config.weight_param == "amortized":
        phi_samples = result.phi_samples or [result.weights_model.net.state_dict()]
        net = result.weights_model.net
    else:
        backed = ~result.under_visited
        if not backed.any():  # no row had enough visits: the net can only learn the prior means
            backed = np.ones(len(backed), dtype=bool)
            result.coverage["weight_network_fit_on"] = "prior means (no row reached min_visits)"
        net = distil_weight_net(stats.apply(raw_features)[backed], weight_mean[backed], config.seed)
        phi_samples = [net.state_dict()]
        if result.under_visited.any():
            # Too few visits for a posterior of their own: the net distilled from the well-visited rows scores
            # them (std 0 there means "no draws", which the coverage record states).
            with torch.no_grad():
                low = torch.as_tensor(np.flatnonzero(result.under_visited))
                weight_mean = weight_mean.copy()
                weight_mean[low.numpy()] = torch.sigmoid(net(features[low])).double().numpy()
                weight_std = weight_std.copy()
                weight_std[low.numpy()] = 0.0
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
                  alternatives=dict(result.alternatives, reference_loss_only=-ref_nll))


# ----------------------------------------------------------------------------------------------- scorer

from dpsel.select.scorers import SeenTableScorer  # noqa: E402  (after the sampler: scorers import nothing heavy)


class BadsScorer(SeenTableScorer):
    """Seen rows: the run's posterior weights. Unseen rows: E_φ[sigmoid(g_φ(e))] over the saved φ samples,
    e from the saved meta-fitted reference (tiny: the whole model; otherwise its adapter)."""
    kind = "bads"

    def attach(self, lm, net, phi_samples: list[dict]) -> None:
        self.lm, self.net, self.phi_samples = lm, net, phi_samples

    def _score_unseen(self, messages, ids):
        from dpsel.select.features import FeatureStats, row_features
        from dpsel.models.lm import EncodedRows
        rows = EncodedRows(messages, self.lm.tokenizer, int(self.info.get("max_length", 256)), self.lm.pad_id)
        stats = FeatureStats.from_dict(self.info["features"])
        x = torch.as_tensor(stats.apply(row_features(self.lm, rows)), dtype=torch.float32)
        draws = []
        with torch.no_grad():
            for state in self.phi_samples:
                self.net.load_state_dict(state)
                draws.append(torch.sigmoid(self.net(x)).double().numpy())
        draws = np.stack(draws)
        return np.clip(draws.mean(0), 0, 1), draws.std(0)

    def _save_model(self, directory: Path) -> None:
        from dpsel.models.lm import save_theta
        info = save_theta(self.lm, directory / "reference")
        torch.save({"phi_samples": self.phi_samples, "n_features": self.net.net[0].in_features,
                    "hidden": self.net.net[0].out_features, "reference": info}, directory / "weight_net.pt")

    def _load_model(self, directory: Path) -> None:
        from dpsel.select.features import WeightNet
        from dpsel.models.lm import load_theta
        saved = torch.load(directory / "weight_net.pt", weights_only=True)
        net = WeightNet(saved["n_features"], saved["hidden"])
        self.attach(load_theta(directory / "reference", saved["reference"], device="cpu"), net.eval(),
                    saved["phi_samples"])
