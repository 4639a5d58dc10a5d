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


# ----------------------------------------------------------------------------- low displacement rank, dense
# Σ_k C(g_k) S(h_k) built in O(r·n² + n² log n) without a per-term n × n product. With F the DFT matrix,
# C(g) = F⁻¹ diag(F g) F and S(h) = D⁻¹ C(D h) D, D = diag(ψ^j), ψ = exp(iπ/n) (ψⁿ = -1). Hence
#   Σ_k C(g_k) S(h_k) = F⁻¹ [T ⊙ (Σ_k ĝ_k ĥ_kᵀ)] F D,  ĝ_k = F g_k, ĥ_k = F D h_k, T = F D⁻¹ F⁻¹ (fixed),
# a rank-r outer-product sum masked by a constant matrix, then two n × n FFTs. (Hand-written: no library
# builds structured matrices of this class.)
_COUPLING: dict[tuple[int, str], torch.Tensor] = {}


def _twist(n: int, device: torch.device) -> torch.Tensor:
    """ψ^j, j = 0..n-1, ψ = exp(iπ/n): the diagonal that turns a skew-circulant into a circulant."""
    return torch.polar(torch.ones(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64) * (torch.pi / n)
                       ).to(device=device, dtype=torch.complex64)


def _coupling(n: int, device: torch.device) -> torch.Tensor:
    """T = F D⁻¹ F⁻¹ for size n (computed in float64 once per size and device)."""
    key = (n, str(device))
    if key not in _COUPLING:
        eye = torch.eye(n, dtype=torch.complex128)
        twist = _twist(n, torch.device("cpu")).to(torch.complex128)
        coupling = torch.fft.fft(torch.fft.ifft(eye, dim=0) * twist.conj()[:, None], dim=0)
        _COUPLING[key] = coupling.to(device=device, dtype=torch.complex64)
    return _COUPLING[key]


def ldr_matrix(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Dense Σ_k C(g_k) S(h_k) for g, h of shape (r, n), by FFTs (differentiable)."""
    n = g.shape[-1]
    twist = _twist(n, g.device)
    g_hat = torch.fft.fft(g.to(torch.complex64), dim=-1)
    h_hat = torch.fft.fft(h.to(torch.complex64) * twist, dim=-1)
    inner = _coupling(n, g.device) * (g_hat.transpose(0, 1) @ h_hat)
    return (torch.fft.fft(torch.fft.ifft(inner, dim=0), dim=1) * twist).real.to(g.dtype)
