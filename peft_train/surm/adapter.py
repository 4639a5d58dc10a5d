"""The SURM adapter form: a residual bottleneck adapter whose down/up pair is one structured square layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peft_train.surm.base import StructuredDelta


def structured_adapter_update(delta: StructuredDelta, hidden: torch.Tensor) -> torch.Tensor:
    """GELU(M h) for a square structured M (d × d) and a sub-layer output h: added residually, h + s·GELU(M h).

    A bottleneck adapter computes W_up σ(W_down h); SURM replaces the two low-rank maps by one full-rank
    structured M. With M zero at init, GELU(0) = 0 keeps the adapter a no-op.
    """
    if delta.d_in != delta.d_out:
        raise ValueError(f"the SURM adapter form needs a square structure, got {delta.d_out}×{delta.d_in}")
    return F.gelu(delta(hidden))
