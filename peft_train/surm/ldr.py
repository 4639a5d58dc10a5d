"""Low displacement rank SURM update: ΔW = Σ_k C(g_k) · S(h_k), circulant × skew-circulant, via FFTs
(per input row for a few rows, or ΔW built once per call by `ldr_matrix` for a batch)."""

from __future__ import annotations

import math

import torch
from torch import nn

from peft_train.surm._fft import (
    circulant_matrix,
    circular_convolve,
    ldr_matrix,
    negacyclic_convolve,
    pad_to,
    skew_circulant_matrix,
)
from peft_train.surm.base import StructuredDelta


class LDRDelta(StructuredDelta):
    """ΔW = top-left d_out × d_in block of Σ_{k<r} C(g_k) S(h_k), n = max(d_in, d_out), r = displacement rank.

    Trainable parameters: ``2 · r · max(d_in, d_out)``.

    ``h`` starts at zero (no-op); ``g ~ N(0, 1/(n·r))`` so the r terms together have unit gain at init, as in
    ``CirculantDelta``.
    """

    def __init__(self, d_in: int, d_out: int, scaling: float = 1.0, rank: int = 1) -> None:
        super().__init__(d_in, d_out, scaling)
        if rank <= 0:
            raise ValueError(f"displacement rank must be positive, got {rank}")
        n = self.square_size
        self.rank = rank
        self.g = nn.Parameter(torch.randn(rank, n) / math.sqrt(n * rank))
        self.h = nn.Parameter(torch.zeros(rank, n))

    @staticmethod
    def parameter_count(d_in: int, d_out: int, rank: int = 1) -> int:
        return 2 * rank * max(d_in, d_out)

    def apply_structured(self, x: torch.Tensor) -> torch.Tensor:
        n = self.square_size
        if x.numel() >= n * x.shape[-1]:
            # At least n input rows (any training batch): building ΔW once (O(r·n² + n² log n), see
            # `ldr_matrix`) and one matmul beat r FFT pairs per row, and keep only n² values for backward
            # instead of r·n complex values per row.
            return x @ ldr_matrix(self.g, self.h)[: self.d_out, : self.d_in].transpose(0, 1)
        x = pad_to(x, n).unsqueeze(-2)  # (..., 1, n) broadcasts over the r terms
        skewed = negacyclic_convolve(self.h, x, n)  # (..., r, n)
        terms = circular_convolve(torch.fft.rfft(self.g, n=n), skewed, n)
        return terms.sum(dim=-2)[..., : self.d_out]

    def _dense(self) -> torch.Tensor:
        total = sum(circulant_matrix(g) @ skew_circulant_matrix(h) for g, h in zip(self.g, self.h))
        return total[: self.d_out, : self.d_in]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}"
