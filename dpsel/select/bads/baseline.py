"""Per-group loss baselines: the running centre (and scale) that turns a row's loss ℓ into ℓ̃ = (ℓ − c_g)/σ_g,
the per-task normalisation that stands in for the dropped normaliser's gradient."""
from __future__ import annotations

import torch


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
