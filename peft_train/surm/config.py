"""SURM's peft configuration and the one registration call that makes saved SURM adapters loadable.

SURM rides on peft's LoRA machinery: ``SurmConfig`` is a ``LoraConfig`` (peft_type "LORA") with three extra
fields saved in ``adapter_config.json`` (``surm_structure``, ``surm_form``, ``surm_kron_factor``) and
``SurmLinear`` registered as the custom module for every ``nn.Linear`` (subclasses included: bitsandbytes
``Linear4bit``, so 4-bit bases are covered, and e.g. ``FalconLinear``) and for transformers' ``Conv1D`` (GPT-2). Plain peft would drop the extra fields when loading, hence:

    from peft_train.surm import register_surm
    register_surm()                      # once per process, before PeftModel.from_pretrained
    model = PeftModel.from_pretrained(base, "out/adapter")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from peft import LoraConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType

from peft_train.surm.layer import FORMS, LINEAR_LIKE, SurmLinear
from peft_train.surm.structures import check_structure


@dataclass
class SurmConfig(LoraConfig):
    """LoraConfig + the SURM structure. ``r`` is the displacement rank for ``ldr``; scaling = lora_alpha / r."""

    surm_structure: Optional[str] = field(
        default="circulant", metadata={"help": "circulant | toeplitz | kronecker | ldr"}
    )
    surm_form: str = field(
        default="layer", metadata={"help": "'layer': W x + s·ΔW x; 'adapter': h + s·GELU(M h) on the layer output"}
    )
    surm_kron_factor: Optional[int] = field(
        default=None, metadata={"help": "kronecker only: cap on the size of factor A (default: ≈ √d)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # resets _custom_modules, so register after it
        check_structure(self.surm_structure)
        if self.surm_form not in FORMS:
            raise ValueError(f"unknown SURM form {self.surm_form!r}; expected one of {FORMS}")
        self._register_custom_module({layer_type: SurmLinear for layer_type in LINEAR_LIKE})

    @classmethod
    def from_peft_type(cls, **kwargs):
        """Build a SurmConfig for a saved SURM adapter and a plain LoraConfig for any other LoRA adapter."""
        target = SurmConfig if kwargs.get("surm_structure") else LoraConfig
        known = {f.name for f in dataclasses.fields(target)}
        return target(**{k: v for k, v in kwargs.items() if k in known})


def register_surm() -> None:
    """Make ``PeftModel.from_pretrained`` rebuild SURM layers from a saved adapter dir; idempotent.

    Routes peft's config lookup for "LORA" through ``SurmConfig.from_peft_type``, which returns a plain
    ``LoraConfig`` for adapters without ``surm_structure``, so ordinary LoRA loading is unchanged.
    """
    PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORA] = SurmConfig


def is_surm_registered() -> bool:
    return PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LORA] is SurmConfig
