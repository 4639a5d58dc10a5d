"""Common interface of the structured updates ΔW (d_out × d_in) used by SURM."""

from __future__ import annotations

import torch
from torch import nn


class StructuredDelta(nn.Module):
    """A trainable structured matrix ΔW applied as ``scaling · ΔW x`` without materialising ΔW.

    Rectangular shapes (the published SURM code handles square ones only): structures that are defined on a
    square n × n matrix (circulant, LDR) use n = max(d_in, d_out); the input is zero-padded to n and the output
    truncated to d_out, i.e. ΔW is the top-left d_out × d_in block of the square structured matrix.
    Toeplitz and Kronecker are natively rectangular.

    Subclasses implement ``apply_structured(x)`` (fast, on the last dimension) and ``_dense()`` (explicit matrix, used for
    merging and as the test reference), and ``parameter_count(d_in, d_out, ...)`` (the documented formula).
    """

    def __init__(self, d_in: int, d_out: int, scaling: float = 1.0) -> None:
        super().__init__()
        if d_in <= 0 or d_out <= 0:
            raise ValueError(f"d_in and d_out must be positive, got d_in={d_in}, d_out={d_out}")
        self.d_in = d_in
        self.d_out = d_out
        self.scaling = float(scaling)

    @property
    def square_size(self) -> int:
        return max(self.d_in, self.d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise ValueError(f"expected last dimension {self.d_in}, got {tuple(x.shape)}")
        return self.apply_structured(x) * self.scaling

    def get_delta_weight(self) -> torch.Tensor:
        """The dense ``scaling · ΔW`` of shape (d_out, d_in)."""
        return self._dense() * self.scaling

    def apply_structured(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dense(self) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, scaling={self.scaling}"
