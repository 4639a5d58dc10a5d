"""Toeplitz SURM update, applied by embedding in a circulant of length d_out + d_in - 1."""

from __future__ import annotations

import torch
from torch import nn

from peft_train.surm._fft import circular_convolve, pad_to, toeplitz_matrix
from peft_train.surm.base import StructuredDelta


class ToeplitzDelta(StructuredDelta):
    """ΔW[i, j] = t[i - j + d_in - 1], a natively rectangular d_out × d_in Toeplitz matrix.

    Trainable parameters: ``d_in + d_out - 1`` (one per diagonal), zero-initialised (a single factor, so its
    gradient is not scaled down at init).
    """

    def __init__(self, d_in: int, d_out: int, scaling: float = 1.0) -> None:
        super().__init__(d_in, d_out, scaling)
        self.t = nn.Parameter(torch.zeros(d_in + d_out - 1))

    @staticmethod
    def parameter_count(d_in: int, d_out: int) -> int:
        return d_in + d_out - 1

    def circulant_column(self) -> torch.Tensor:
        """First column of the length-L (L = d_out + d_in - 1) circulant whose top-left block is ΔW.

        Column 0 of ΔW (t[d_in-1:]) comes first, row 0 (t[:d_in-1], read backwards from the end) wraps around;
        L ≥ d_out + d_in - 1 keeps the two from overlapping.
        """
        return torch.cat([self.t[self.d_in - 1 :], self.t[: self.d_in - 1]])

    def apply_structured(self, x: torch.Tensor) -> torch.Tensor:
        length = self.d_in + self.d_out - 1
        column_hat = torch.fft.rfft(self.circulant_column(), n=length)
        return circular_convolve(column_hat, pad_to(x, length), length)[..., : self.d_out]

    def _dense(self) -> torch.Tensor:
        return toeplitz_matrix(self.t, self.d_out, self.d_in)
