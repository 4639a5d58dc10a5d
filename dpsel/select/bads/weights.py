"""The weight parametrisations: free per-row logits (row-sparse) or an amortised net over row features (dense),
each with the SGLD parameter group it is sampled as."""
from __future__ import annotations

import math

import numpy as np
import pyro.distributions as dist
import torch

from dpsel.errors import DpselInputError
from dpsel.select.bads.config import BadsSettings


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


def build_weights(weight_param: str, settings: BadsSettings, *, prior_mean: torch.Tensor,
                  features: torch.Tensor | None, n: int, batch_size: int, seed: int) -> tuple[object, dict]:
    """The weights of `weight_param` and their SGLD parameter group."""
    if weight_param == "logits":
        weights = LogitWeights(torch.logit(prior_mean.float().clamp(1e-3, 1 - 1e-3)))
        # A visit is a Langevin step of size lr_w on the row's own conditional: the group's lr is lr_w·B/N and
        # its N/B-scaled gradient brings it back to lr_w. Not preconditioned: that curvature is known and O(1).
        return weights, {"params": weights.params(), "lr": settings.lr_w * batch_size / n, "precondition": False,
                         "temperature": settings.temperature_w, "row_sparse": True, "visit_scale": n / batch_size,
                         "decay_gamma": 0.0}
    if weight_param == "amortized":
        if features is None:
            raise ValueError("amortized weights need per-row features")
        weights = AmortizedWeights(features, settings.weight_hidden, math.log(settings.beta / (1 - settings.beta)),
                                   seed)
        return weights, {"params": weights.params(), "lr": settings.lr_phi, "temperature": settings.temperature_w}
    raise DpselInputError(f"unknown weight parametrisation {weight_param!r}; use 'logits' or 'amortized'")


def final_weights(result, config, scaled_features):
    """(weight mean, weight std, weight net, φ samples): the amortised run's own net, or a net distilled from
    the rows the run backs, which also scores the under-visited rows. `scaled_features`: the standardised
    features, [N, features] or the `HeldRows` of the distillation sample."""
    from dpsel.select.features import distil_weight_net
    weight_mean, weight_std = result.weight_mean, result.weight_std
    if config.weight_param == "amortized":
        return weight_mean, weight_std, result.weights_model.net, \
            result.phi_samples or [result.weights_model.net.state_dict()]
    backed = ~result.under_visited
    if not backed.any():  # no row had enough visits: the net can only learn the prior means
        backed = np.ones(len(backed), dtype=bool)
        result.coverage["weight_network_fit_on"] = "prior means (no row reached min_visits)"
    rows = _distil_rows(backed, config.seed)
    net = distil_weight_net(scaled_features[rows], weight_mean[rows], config.seed)
    if result.under_visited.any():
        # Too few visits for a posterior of their own: the net distilled from the well-visited rows scores
        # them (std 0 there means "no draws", which the coverage record states).
        with torch.no_grad():
            low = np.flatnonzero(result.under_visited)
            weight_mean = weight_mean.copy()
            weight_mean[low] = torch.sigmoid(net(torch.as_tensor(scaled_features[low], dtype=torch.float32))
                                             ).double().numpy()
            weight_std = weight_std.copy()
            weight_std[low] = 0.0
    return weight_mean, weight_std, net, [net.state_dict()]


DISTIL_ROWS = 100_000   # the weight net (features -> weight, a few hundred parameters) is distilled on at most this


def _distil_rows(backed: np.ndarray, seed: int) -> np.ndarray:
    """The backed rows the net is distilled on: all of them up to DISTIL_ROWS, else a seeded sample of that many
    (the full-batch fit's memory grows with its rows; a pool of millions teaches the net no more than this)."""
    rows = np.flatnonzero(backed)
    if len(rows) <= DISTIL_ROWS:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, DISTIL_ROWS, replace=False))


def distil_sample(n: int, seed: int) -> np.ndarray:
    """The rows `final_weights` distils the net on when every row is backed (a posterior pass scores them all)."""
    return _distil_rows(np.ones(n, dtype=bool), seed)


class HeldRows:
    """Some rows of an [N, features] array, indexed by their row numbers in the whole: what `final_weights` reads
    when it is known in advance which rows it reads (`distil_sample`), so the other rows' features are never held.
    Asking for a row not held is a bug, not a fallback: it raises."""

    def __init__(self, rows: np.ndarray, values: np.ndarray):
        self.rows, self.values = np.asarray(rows, np.int64), values

    def __getitem__(self, index) -> np.ndarray:
        index = np.asarray(index, np.int64)
        at = np.minimum(np.searchsorted(self.rows, index), max(len(self.rows) - 1, 0))
        if len(index) and (not len(self.rows) or not np.array_equal(self.rows[at], index)):
            raise IndexError("features are held for the weight net's distillation sample only")
        return self.values[at]
