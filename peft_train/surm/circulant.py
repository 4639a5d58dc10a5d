"""Circulant SURM update: ΔW = C(a) · C(b), applied with real FFTs in O(n log n)."""

from __future__ import annotations

import math

import torch
from torch import nn

from peft_train.surm._fft import circulant_matrix, circular_convolve, pad_to
from peft_train.surm.base import StructuredDelta


class CirculantDelta(StructuredDelta):
    """ΔW = top-left d_out × d_in block of C(a) · C(b), n = max(d_in, d_out).

    Trainable parameters: ``2 · max(d_in, d_out)``.

    ``b`` starts at zero (ΔW = 0, the layer is a no-op); ``a ~ N(0, 1/n)`` so that C(a) C(a)ᵀ has unit
    expected eigenvalues and the first gradient steps on ``b`` are not scaled down. (An elementwise a ⊙ b
    parametrisation of one circulant starts about 50× slower.)
    """

    def __init__(self, d_in: int, d_out: int, scaling: float = 1.0) -> None:
        super().__init__(d_in, d_out, scaling)
        n = self.square_size
        self.a = nn.Parameter(torch.randn(n) / math.sqrt(n))
        self.b = nn.Parameter(torch.zeros(n))

    @staticmethod
    def parameter_count(d_in: int, d_out: int) -> int:
        return 2 * max(d_in, d_out)

    def apply_structured(self, x: torch.Tensor) -> torch.Tensor:
        n = self.square_size
        # the product of two circulants is the circulant of a ⊛ b: multiply their spectra once
        spectrum = torch.fft.rfft(self.a, n=n) * torch.fft.rfft(self.b, n=n)
        return circular_convolve(spectrum, pad_to(x, n), n)[..., : self.d_out]

    def _dense(self) -> torch.Tensor:
        return (circulant_matrix(self.a) @ circulant_matrix(self.b))[: self.d_out, : self.d_in]
