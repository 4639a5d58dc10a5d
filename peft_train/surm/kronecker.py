"""Kronecker SURM update: ΔW = kron(B, A), applied as B · X · Aᵀ on the reshaped input."""

from __future__ import annotations

import math

import torch
from torch import nn

from peft_train.surm.base import StructuredDelta


def balanced_factor(d: int, limit: int | None = None) -> int:
    """The divisor of ``d`` closest to √d (ties to the smaller), or the largest divisor ≤ ``limit`` if given."""
    divisors = [k for k in range(1, d + 1) if d % k == 0]
    if limit is not None and limit > 0:
        return max(k for k in divisors if k <= limit)
    root = math.sqrt(d)
    return min(divisors, key=lambda k: (abs(k - root), k))


def kronecker_shapes(d_in: int, d_out: int, factor: int | None = None) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of (A, B): A is (a_out, a_in) with a_* = ``balanced_factor(d_*, factor)``, B the quotient shape."""
    a_out, a_in = balanced_factor(d_out, factor), balanced_factor(d_in, factor)
    return (a_out, a_in), (d_out // a_out, d_in // a_in)


class KroneckerDelta(StructuredDelta):
    """ΔW = kron(B, A), natively rectangular: A is (a_out, a_in), B is (d_out/a_out, d_in/a_in).

    The factor sizes are the divisors of d_out and d_in closest to their square roots (``factor`` caps them
    instead); a prime width degenerates to a 1-wide factor but stays exact.
    Trainable parameters: ``a_out·a_in + (d_out/a_out)·(d_in/a_in)``, e.g. 2·64 = 128 for 64 × 64.

    ``B`` starts at zero (no-op); ``A ~ N(0, 1/(a_out·a_in))`` so ‖A‖_F ≈ 1 and the first steps on B are not
    scaled down.
    """

    def __init__(self, d_in: int, d_out: int, scaling: float = 1.0, factor: int | None = None) -> None:
        super().__init__(d_in, d_out, scaling)
        (a_out, a_in), (b_out, b_in) = kronecker_shapes(d_in, d_out, factor)
        self.factor = factor
        self.A = nn.Parameter(torch.randn(a_out, a_in) / math.sqrt(a_out * a_in))
        self.B = nn.Parameter(torch.zeros(b_out, b_in))

    @staticmethod
    def parameter_count(d_in: int, d_out: int, factor: int | None = None) -> int:
        (a_out, a_in), (b_out, b_in) = kronecker_shapes(d_in, d_out, factor)
        return a_out * a_in + b_out * b_in

    def apply_structured(self, x: torch.Tensor) -> torch.Tensor:
        # kron(B, A)[(i, k), (j, l)] = B[i, j] A[k, l], so with x viewed as X[j, l]: y viewed as Y = B X Aᵀ
        b_in, a_in = self.B.shape[1], self.A.shape[1]
        blocks = x.reshape(*x.shape[:-1], b_in, a_in)
        out = torch.einsum("ij,...jl,kl->...ik", self.B, blocks, self.A)
        return out.reshape(*x.shape[:-1], self.d_out)

    def _dense(self) -> torch.Tensor:
        return torch.kron(self.B, self.A)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, A={tuple(self.A.shape)}, B={tuple(self.B.shape)}"
