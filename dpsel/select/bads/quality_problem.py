"""θ that sees answer quality (issue 28): the question→answer map of embedding_problem.py plus a density over
the rows' quality signals, so the sampler, not a fixed rule, decides how much each signal counts for this pool.

A row's loss is ℓ_i = (1 − cos(W q_i + b, a_i))/τ + Σ_k nll_t(f_ik; μ_k, σ_k): f_i are the row's quality
signals (select/quality.py, and fluency), put on one scale with the meta rows' robust statistics, and nll_t is a
Student-t (ν = 2) negative log density whose centre μ_k and scale σ_k are part of θ. Under the unchanged BADS
model the w-weighted pool is θ's prior and the meta rows its likelihood: the meta rows (clean) pull every σ_k to
the clean spread, the weighted pool lets σ_k widen only for a signal on which the rows it keeps vary. A signal
whose bad tail is real gets a narrow σ_k, so its tail rows keep a high loss and a low weight; a signal that says
nothing about this pool gets a wide σ_k and drops out. The learnt σ_k go to the manifest (`theta_quality`).
The t's heavy tail bounds one signal's say: a loss grows with log |f|, not f².
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from dpsel.select.bads.embedding_problem import EmbeddingProblem

NU = 2.0            # Student-t degrees of freedom: heavy tails, a finite scale
SCALE_FLOOR = 0.05  # σ_k ≥ this (standardised units): a signal every meta row ties on cannot shrink σ to 0
CLIP = 20.0         # standardised signals are clipped to ±CLIP before the density


def standardise(pool: np.ndarray, meta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets on the meta rows' scale: (x − median_meta) / spread, spread = 1.4826·MAD of meta, else the
    pool's std where meta ties (a sparse signal), else 1; clipped to ±CLIP."""
    pool, meta = np.asarray(pool, dtype=np.float64), np.asarray(meta, dtype=np.float64)
    centre = np.median(meta)
    spread = 1.4826 * np.median(np.abs(meta - centre))
    if spread < 1e-9:
        spread = float(np.std(pool)) or 1.0
    return (np.clip((pool - centre) / spread, -CLIP, CLIP), np.clip((meta - centre) / spread, -CLIP, CLIP))


def quality_features(calibration: dict, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """([n_train, k], [n_meta, k]) standardised signals `names` from the calibration's (pool, meta) pairs."""
    pairs = [standardise(*calibration[name]) for name in names]
    return np.stack([p for p, _ in pairs], axis=1), np.stack([m for _, m in pairs], axis=1)


def t_nll(f: torch.Tensor, centre: torch.Tensor, raw_scale: torch.Tensor) -> torch.Tensor:
    """Σ_k −log Student-t(f_k; μ_k, σ_k, ν) up to a constant, per row; σ_k = softplus(raw) + SCALE_FLOOR."""
    scale = F.softplus(raw_scale) + SCALE_FLOOR
    z = (f - centre) / scale
    return (torch.log(scale) + 0.5 * (NU + 1.0) * torch.log1p(z * z / NU)).sum(1)


def inverse_softplus(x: np.ndarray) -> np.ndarray:
    return np.log(np.expm1(np.maximum(x, 1e-6)))


class QualityEmbeddingProblem(EmbeddingProblem):
    """EmbeddingProblem with θ = (W, b, μ, raw σ): the map's distance plus the quality density's NLL."""

    def __init__(self, q, a, q_meta, a_meta, groups, theta0, scale: float, f_train: np.ndarray,
                 f_meta: np.ndarray, names: list[str]):
        super().__init__(q, a, q_meta, a_meta, groups, theta0, scale)
        self.f, self.f_meta = (torch.as_tensor(x, dtype=torch.float32) for x in (f_train, f_meta))
        self.names = list(names)
        centre = np.median(f_meta, axis=0)
        spread = np.maximum(1.4826 * np.median(np.abs(f_meta - centre), axis=0), 1.0)  # θ₀: meta's spread
        self.centre = torch.nn.Parameter(torch.as_tensor(centre, dtype=torch.float32))
        self.raw_scale = torch.nn.Parameter(torch.as_tensor(inverse_softplus(spread - SCALE_FLOOR),
                                                            dtype=torch.float32))

    def theta(self):
        return [self.weight, self.bias, self.centre, self.raw_scale]

    def losses(self, train_idx, meta_idx):
        train_map, meta_map = super().losses(train_idx, meta_idx)
        train_idx, meta_idx = (torch.as_tensor(np.asarray(i), dtype=torch.long) for i in (train_idx, meta_idx))
        return (train_map + t_nll(self.f[train_idx], self.centre, self.raw_scale),
                meta_map + t_nll(self.f_meta[meta_idx], self.centre, self.raw_scale))

    @torch.no_grad()
    @torch.no_grad()   # the posterior pass's losses: no graph (it would hold [rows, signals] temporaries per draw)
    def all_losses(self) -> torch.Tensor:
        density = torch.cat([t_nll(part, self.centre, self.raw_scale) for part in self.f.split(65536)]) \
            if len(self.f) else torch.zeros(0)
        return super().all_losses() + density

    @torch.no_grad()
    def learnt(self) -> dict[str, dict]:
        """Per signal: the learnt centre and scale (standardised units; a small scale = the signal counts)."""
        scale = F.softplus(self.raw_scale) + SCALE_FLOOR
        return {name: {"centre": round(float(c), 4), "scale": round(float(s), 4)}
                for name, c, s in zip(self.names, self.centre, scale)}
