"""Name → structured-update factory, shared by the peft layer and the benchmark."""

from __future__ import annotations

from peft_train.surm.base import StructuredDelta
from peft_train.surm.circulant import CirculantDelta
from peft_train.surm.kronecker import KroneckerDelta
from peft_train.surm.ldr import LDRDelta
from peft_train.surm.toeplitz import ToeplitzDelta

STRUCTURES: dict[str, type[StructuredDelta]] = {
    "circulant": CirculantDelta,
    "toeplitz": ToeplitzDelta,
    "kronecker": KroneckerDelta,
    "ldr": LDRDelta,
}


def check_structure(name: str) -> str:
    if name not in STRUCTURES:
        raise ValueError(f"unknown SURM structure {name!r}; expected one of {sorted(STRUCTURES)}")
    return name


def make_structure(
    name: str, d_in: int, d_out: int, *, rank: int = 1, kron_factor: int | None = None, scaling: float = 1.0
) -> StructuredDelta:
    """Build one structured update; ``rank`` is used by ``ldr`` only, ``kron_factor`` by ``kronecker`` only."""
    cls = STRUCTURES[check_structure(name)]
    if cls is LDRDelta:
        return LDRDelta(d_in, d_out, scaling, rank=rank)
    if cls is KroneckerDelta:
        return KroneckerDelta(d_in, d_out, scaling, factor=kron_factor)
    return cls(d_in, d_out, scaling)


def structure_parameter_count(name: str, d_in: int, d_out: int, *, rank: int = 1, kron_factor: int | None = None) -> int:
    """The documented trainable-parameter count of one structured update."""
    cls = STRUCTURES[check_structure(name)]
    if cls is LDRDelta:
        return LDRDelta.parameter_count(d_in, d_out, rank)
    if cls is KroneckerDelta:
        return KroneckerDelta.parameter_count(d_in, d_out, kron_factor)
    return cls.parameter_count(d_in, d_out)
