"""FFT kernels and dense reference matrices shared by the structured layers.

Dense builders index explicitly (no FFT) so that tests comparing the fast path against them are meaningful.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to(x: torch.Tensor, n: int) -> torch.Tensor:
    """Zero-pad the last dimension of ``x`` up to ``n``."""
    extra = n - x.shape[-1]
    return F.pad(x, (0, extra)) if extra > 0 else x


def circular_convolve(c_hat: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """``C(c) x`` for a circulant with first column ``c``, given ``c_hat = rfft(c, n)``; O(n log n)."""
    return torch.fft.irfft(c_hat * torch.fft.rfft(x, n=n), n=n)


def negacyclic_convolve(v: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """``S(v) x`` for a skew-circulant (f = -1) with first column ``v``.

    A length-2n linear convolution z folds back with a minus sign: y_i = z_i - z_{i+n}; stays real-valued.
    ``v`` may carry leading batch dimensions that broadcast against ``x``.
    """
    z = torch.fft.irfft(torch.fft.rfft(v, n=2 * n) * torch.fft.rfft(x, n=2 * n), n=2 * n)
    return z[..., :n] - z[..., n:]


def _offsets(n_rows: int, n_cols: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(n_rows, device=device)[:, None]
    cols = torch.arange(n_cols, device=device)[None, :]
    return rows - cols


def circulant_matrix(c: torch.Tensor) -> torch.Tensor:
    """Dense circulant: ``C[i, j] = c[(i - j) mod n]``."""
    n = c.shape[-1]
    return c[_offsets(n, n, c.device) % n]


def skew_circulant_matrix(v: torch.Tensor) -> torch.Tensor:
    """Dense skew-circulant: ``S[i, j] = v[i - j]`` on and below the diagonal, ``-v[n + i - j]`` above."""
    n = v.shape[-1]
    offsets = _offsets(n, n, v.device)
    sign = torch.where(offsets >= 0, 1.0, -1.0).to(v.dtype)
    return v[offsets % n] * sign


def toeplitz_matrix(t: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """Dense ``d_out × d_in`` Toeplitz: ``T[i, j] = t[i - j + d_in - 1]`` (t holds d_out + d_in - 1 diagonals)."""
    return t[_offsets(d_out, d_in, t.device) + d_in - 1]
