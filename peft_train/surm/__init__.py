"""SURM: structured unrestricted-rank updates (circulant, Toeplitz, Kronecker, low displacement rank) for peft.

Standalone structured updates (``CirculantDelta(d_in, d_out)`` etc.) apply ``scaling·ΔW x`` in O(n log n) and
expose the dense ``get_delta_weight()``. ``SurmConfig`` + ``register_surm()`` plug them into peft.
"""

from peft_train.surm.adapter import structured_adapter_update
from peft_train.surm.base import StructuredDelta
from peft_train.surm.circulant import CirculantDelta
from peft_train.surm.config import SurmConfig, is_surm_registered, register_surm
from peft_train.surm.kronecker import KroneckerDelta, balanced_factor, kronecker_shapes
from peft_train.surm.layer import FORMS, SurmLinear
from peft_train.surm.ldr import LDRDelta
from peft_train.surm.structures import STRUCTURES, make_structure, structure_parameter_count
from peft_train.surm.toeplitz import ToeplitzDelta

__all__ = [
    "FORMS",
    "STRUCTURES",
    "CirculantDelta",
    "KroneckerDelta",
    "LDRDelta",
    "StructuredDelta",
    "SurmConfig",
    "SurmLinear",
    "ToeplitzDelta",
    "balanced_factor",
    "is_surm_registered",
    "kronecker_shapes",
    "make_structure",
    "register_surm",
    "structure_parameter_count",
    "structured_adapter_update",
]
