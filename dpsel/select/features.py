"""Fixed per-row features e_i (computed once with the meta-fitted reference) and the weight network g_φ.

The amortised bads parametrisation samples φ in w_i = sigmoid(g_φ(e_i)); the free-logit one distils its
posterior mean weights into the same network after the run. Either way unseen rows are scored as
sigmoid(g_φ(e)) with e computed by the saved reference model, normalised by the saved statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dpsel.models.forward import forward_rows
from dpsel.models.lm import LM, EncodedRows

POOL_DIM = 16  # hidden-state summary kept per row (a fixed random projection of the pooled answer states)


@dataclass
class FeatureStats:
    """Standardisation of the raw features, fitted on the training rows and saved with the scorer."""
    mean: np.ndarray
    std: np.ndarray

    def apply(self, raw: np.ndarray) -> np.ndarray:
        return (raw - self.mean) / self.std

    @classmethod
    def fit(cls, raw: np.ndarray) -> "FeatureStats":
        return cls(raw.mean(0), raw.std(0) + 1e-6)

    @classmethod
    def from_chunks(cls, chunks, width: int) -> "FeatureStats":
        """`fit` (mean, std + 1e-6) from float64 sums over chunks of rows: no [N, features] array or temporary."""
        total, total_sq, n = np.zeros(width), np.zeros(width), 0
        for chunk in chunks:
            part = np.asarray(chunk, np.float64)
            total += part.sum(0)
            total_sq += (part * part).sum(0)
            n += len(part)
        mean = total / max(n, 1)
        return cls(mean, np.sqrt(np.maximum(total_sq / max(n, 1) - mean * mean, 0)) + 1e-6)

    def standardise(self, raw: np.ndarray) -> np.ndarray:
        """`apply` in place on float32 features (no float64 copy); returns `raw`."""
        raw -= self.mean.astype(np.float32)
        raw /= self.std.astype(np.float32)
        return raw

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureStats":
        return cls(np.asarray(d["mean"]), np.asarray(d["std"]))


def _projection(hidden: int, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(hidden, POOL_DIM, generator=g) / hidden ** 0.5


def row_features(lm: LM, rows: EncodedRows, batch_size: int = 64) -> np.ndarray:
    """Raw features per row: response NLL under the reference, its token count, prompt length, the answer's
    max token NLL, and a fixed projection of the answer's mean last hidden state (what the answer looks like).
    A pool pass (`dpsel.models.passes.pool_pass`) computed by the batched forward (`dpsel.models.forward`)."""
    return forward_rows(lm.model, lambda chunk: rows.batch(chunk, lm.device), rows.lengths, _features,
                        batch_size=batch_size, output_hidden_states=True)


def _features(result, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from peft_train.encode import IGNORE_INDEX
    logits = result.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    token_nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none").view(labels.shape)
    n_answer = mask.sum(1).clamp(min=1)
    mean_nll = (token_nll * mask).sum(1) / n_answer
    max_nll = (token_nll * mask).max(1).values
    hidden = result.hidden_states[-1][:, :-1].float()
    pooled = (hidden * mask[..., None]).sum(1) / n_answer[:, None]
    projected = pooled @ _projection(hidden.shape[-1]).to(pooled.device)
    n_prompt = (batch["attention_mask"].sum(1) - n_answer).float()
    return torch.cat([mean_nll[:, None], max_nll[:, None], torch.log1p(n_answer.float())[:, None],
                      torch.log1p(n_prompt)[:, None], projected], dim=1)


class WeightNet(nn.Module):
    """g_φ: a small MLP from normalised features to a weight logit."""

    def __init__(self, n_features: int, hidden: int = 32, init_logit: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.net[-1].bias.fill_(init_logit)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


def distil_weight_net(features: np.ndarray, weights: np.ndarray, seed: int, steps: int = 400,
                      hidden: int = 32) -> WeightNet:
    """Fit g_φ so sigmoid(g_φ(e_i)) matches given weights (soft-label cross-entropy, full batch, Adam)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = WeightNet(features.shape[1], hidden)
    torch.random.set_rng_state(gen_state)
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(np.clip(weights, 1e-4, 1 - 1e-4), dtype=torch.float32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()
