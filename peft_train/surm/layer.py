"""The peft tuner layer that wraps a frozen linear-like layer with SURM updates: ``nn.Linear`` and its
subclasses (bitsandbytes ``Linear4bit``, Falcon's ``FalconLinear``, …) and transformers' ``Conv1D`` (GPT-2 style,
weight stored transposed as d_in × d_out). ``LINEAR_LIKE`` lists what it wraps; ``config.py`` registers it for
each, and ``peft_train.adapters`` refuses a target of any other type by name.

It follows peft's LoRA layer conventions (``LoraLayer`` subclass, per-adapter ``ModuleDict``) so that peft's
``LoraModel`` can create, save, load, enable/disable and merge it once registered through
``LoraConfig._register_custom_module`` (see ``config.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_train.surm.adapter import structured_adapter_update
from peft_train.surm.structures import make_structure

FORMS = ("layer", "adapter")
LINEAR_LIKE = (nn.Linear, Conv1D)  # nn.Linear covers its subclasses, Linear4bit included


class SurmLinear(nn.Module, LoraLayer):
    """``y = base(x) + s·ΔW x`` (form "layer") or ``h = base(x); y = h + s·GELU(M h)`` (form "adapter").

    ΔW is d_out × d_in (rectangular handled by the structure, see ``StructuredDelta``); M is d_out × d_out.
    ``s = lora_alpha / r`` as in LoRA; for ``ldr``, r is also the displacement rank.
    """

    adapter_layer_names = ("lora_surm",)
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "surm_form")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 8, lora_alpha: float = 8, **kwargs: Any):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.lora_surm = nn.ModuleDict()
        self.surm_form: dict[str, str] = {}
        # Conv1D keeps its weight as d_in × d_out: merging adds ΔWᵀ (peft's LoRA calls this fan_in_fan_out)
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config, **kwargs: Any) -> None:
        form = config.surm_form
        if form not in FORMS:
            raise ValueError(f"unknown SURM form {form!r}; expected one of {FORMS}")
        d_in = self.out_features if form == "adapter" else self.in_features
        structure = make_structure(
            config.surm_structure, d_in, self.out_features, rank=r, kron_factor=config.surm_kron_factor
        )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.surm_form[adapter_name] = form
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        # adapter parameters stay fp32 (torch.fft has no bf16/fp16 CPU kernels); only the device follows the base
        self.lora_surm[adapter_name] = structure.to(self.get_base_layer().weight.device)
        self.set_adapter(self.active_adapters)

    def _structure_dtype(self, adapter_name: str) -> torch.dtype:
        return next(self.lora_surm[adapter_name].parameters()).dtype

    def _update(self, adapter_name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        delta = self.lora_surm[adapter_name]
        dtype = self._structure_dtype(adapter_name)
        if self.surm_form[adapter_name] == "adapter":
            update = structured_adapter_update(delta, self.lora_dropout[adapter_name](base_out.to(dtype)))
        else:
            update = delta(self.lora_dropout[adapter_name](x.to(dtype)))
        return update * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("SURM layers do not support mixed-adapter batches (adapter_names)")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.lora_surm:
                result = result + self._update(name, x, result).to(result.dtype)
        return result

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``s·ΔW`` (d_out × d_in) of a "layer"-form adapter; the "adapter" form is not linear."""
        if self.surm_form[adapter_name] != "layer":
            raise ValueError("the SURM adapter form is non-linear and has no delta weight; it cannot be merged")
        return self.lora_surm[adapter_name].get_delta_weight() * self.scaling[adapter_name]

    def _delta_for_base(self, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        delta = self.get_delta_weight(adapter_name).to(dtype)
        return delta.T if self.fan_in_fan_out else delta

    def _check_mergeable(self, adapter_name: str) -> None:
        weight = self.get_base_layer().weight
        if not weight.dtype.is_floating_point:
            raise ValueError("merging SURM into a quantised (e.g. 4-bit) base layer is not supported")
        self.get_delta_weight(adapter_name)  # raises for the adapter form

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = [n for n in (adapter_names or self.active_adapters) if n in self.lora_surm]
        for name in names:
            if name in self.merged_adapters:
                continue
            self._check_mergeable(name)
            weight = self.get_base_layer().weight
            merged = weight.data + self._delta_for_base(name, weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs/infs detected while merging SURM adapter {name!r}")
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.get_base_layer().weight
            weight.data -= self._delta_for_base(name, weight.dtype)

    def __repr__(self) -> str:
        return "surm." + super().__repr__()
