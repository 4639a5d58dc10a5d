"""Build, count and reload the fine-tuning adapters: LoRA/QLoRA, SURM (+ over 4-bit), peft's C3A and LoKr, full.

Trainable parameters per targeted linear layer W (d_out × d_in), r = ``r``:
- ``lora`` / ``qlora``: r·(d_in + d_out).
- ``surm-circulant`` / ``qsurm-circulant``: 2·max(d_in, d_out)               (ΔW = C(a)·C(b), padded square).
- ``surm-toeplitz`` / ``qsurm-toeplitz``:   d_in + d_out − 1                 (one value per diagonal).
- ``surm-kronecker`` / ``qsurm-kronecker``: a_out·a_in + (d_out/a_out)·(d_in/a_in), a_* the divisor of d_*
  closest to √d_* (``structure_kwargs={"kron_factor": f}`` caps it).
- ``surm-ldr`` / ``qsurm-ldr``:             2·r·max(d_in, d_out)             (r = displacement rank).
  With ``structure_kwargs={"form": "adapter"}`` SURM is the adapter form h + s·GELU(M h) on the outputs of
  attention (o_proj) and the MLP (down_proj), M square d_out × d_out: counts as above with d_in = d_out.
- ``c3a``: d_out·d_in / b, b = ``block_size`` (default 64; peft's C3AConfig).
- ``lokr``: peft's LoKrConfig (kron(w1, w2_a·w2_b) with w1 f×f and w2 low-rank r): f² + r·(d_in/f + d_out/f)
  for its default factor choice.
- ``full``: every weight of the model.

Layer types: ``all-linear`` targets every linear-like layer but the head — ``nn.Linear`` and its subclasses
(bitsandbytes ``Linear4bit``, ``FalconLinear``) and transformers' ``Conv1D`` (GPT-2, weight stored transposed).
LoRA and SURM wrap all of them; peft's C3A and LoKr wrap ``nn.Linear`` only, so on a model with ``Conv1D``
layers they are refused (``AdapterTargetError`` naming the module), never silently narrowed or swapped.

Scaling: LoRA-style s = alpha / r; ``alpha=None`` means 2·r for lora/qlora/lokr (s = 2) and r for SURM (s = 1).
"""

from __future__ import annotations

import math

import torch
from peft import C3AConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from peft_train.models import disable_bnb_cpu_repack, is_quantized_4bit
from peft_train.surm import SurmConfig, SurmLinear, register_surm
from peft_train.surm.layer import LINEAR_LIKE

METHODS = (
    "lora",
    "qlora",
    "surm-circulant",
    "surm-toeplitz",
    "surm-kronecker",
    "surm-ldr",
    "qsurm-circulant",
    "qsurm-toeplitz",
    "qsurm-kronecker",
    "qsurm-ldr",
    "c3a",
    "lokr",
    "full",
)

# peft's shorthand: every nn.Linear / Linear4bit except the output head
ALL_LINEAR = "all-linear"
# where the SURM adapter form goes: after attention and after the MLP (Llama names)
ADAPTER_FORM_TARGETS = ["o_proj", "down_proj"]
SURM_STRUCTURE_KWARGS = ("form", "kron_factor", "rank")
C3A_DEFAULT_BLOCK_SIZE = 64


class AdapterTargetError(ValueError):
    """A targeted layer that the method cannot wrap; ``module`` names it."""

    def __init__(self, message: str, module: str):
        super().__init__(message)
        self.module = module


def _supported_layer_types(method: str) -> tuple[type, ...] | None:
    """Layer types the method can wrap (None: leave it to peft, which knows LoRA's long list)."""
    if method in ("c3a", "lokr"):
        return (nn.Linear,)
    if _surm_structure(method) is not None:
        return LINEAR_LIKE
    return None


def _targeted(model: nn.Module, target_modules) -> dict[str, nn.Module]:
    """The modules a peft config with these target_modules wraps (peft's all-linear: linear-like but the head)."""
    if target_modules == ALL_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return {n: m for n, m in model.named_modules() if isinstance(m, LINEAR_LIKE) and m is not head}
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return {n: m for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in names)}


def check_targets(model: nn.Module, method: str, target_modules) -> None:
    """Refuse, naming the module, a target layer the method cannot wrap (peft would fail or fall back to LoRA)."""
    supported = _supported_layer_types(method)
    if supported is None:
        return
    targets = _targeted(model, target_modules)
    if not targets:
        raise AdapterTargetError(f"method {method!r}: no layer matches target_modules={target_modules!r}",
                                 str(target_modules))
    wrong = {n: m for n, m in targets.items() if not isinstance(m, supported)}
    if wrong:
        name, module = next(iter(wrong.items()))
        kinds = sorted({type(m).__name__ for m in wrong.values()})
        allowed = ", ".join(t.__name__ for t in supported)
        raise AdapterTargetError(
            f"method {method!r} cannot wrap {', '.join(kinds)} layers ({len(wrong)} of them, e.g. module {name!r}); "
            f"it supports {allowed} (and subclasses). Use lora or surm-* for this model", name)


def _check_wrapped_as_surm(peft_model: nn.Module) -> None:
    """Every adapter layer of a SURM model must be a SurmLinear: no silent LoRA fallback."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module, SurmLinear):
            raise AdapterTargetError(f"module {name!r} ({type(module.get_base_layer()).__name__}) got a plain LoRA "
                                     "layer instead of SURM; SURM wraps linear layers only", name)


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; expected one of {', '.join(METHODS)}")
    return method


def needs_4bit(method: str) -> bool:
    """True for methods that train over a 4-bit NF4 base (``qlora``, ``qsurm-*``)."""
    return _check_method(method) == "qlora" or method.startswith("qsurm-")


def _surm_structure(method: str) -> str | None:
    for prefix in ("surm-", "qsurm-"):
        if method.startswith(prefix):
            return method[len(prefix) :]
    return None


def _surm_config(structure: str, r: int, alpha, dropout: float, target_modules, structure_kwargs: dict) -> SurmConfig:
    unknown = set(structure_kwargs) - set(SURM_STRUCTURE_KWARGS)
    if unknown:
        raise ValueError(f"unknown SURM structure_kwargs {sorted(unknown)}; allowed: {SURM_STRUCTURE_KWARGS}")
    form = structure_kwargs.get("form", "layer")
    rank = int(structure_kwargs.get("rank", r))
    if target_modules is None:
        target_modules = ADAPTER_FORM_TARGETS if form == "adapter" else ALL_LINEAR
    return SurmConfig(
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        surm_structure=structure,
        surm_form=form,
        surm_kron_factor=structure_kwargs.get("kron_factor"),
    )


def _peft_config(method: str, r: int, alpha, dropout: float, target_modules, structure_kwargs: dict):
    structure = _surm_structure(method)
    if structure is not None:
        return _surm_config(structure, r, alpha, dropout, target_modules, structure_kwargs)
    targets = ALL_LINEAR if target_modules is None else target_modules
    if method in ("lora", "qlora"):
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=r,
            lora_alpha=2 * r if alpha is None else alpha,
            lora_dropout=dropout,
            target_modules=targets,
        )
    if method == "c3a":
        block_size = int(structure_kwargs.get("block_size", C3A_DEFAULT_BLOCK_SIZE))
        return C3AConfig(task_type="CAUSAL_LM", block_size=block_size, target_modules=targets)
    if method == "lokr":
        return LoKrConfig(
            task_type="CAUSAL_LM",
            r=r,
            alpha=2 * r if alpha is None else alpha,
            module_dropout=dropout,
            target_modules=targets,
        )
    raise AssertionError(f"no peft config for {method!r}")


def _unfreeze_all(model: nn.Module) -> nn.Module:
    if is_quantized_4bit(model):
        raise ValueError("method 'full' needs an unquantised base; load the model without quant='nf4'")
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def build_adapter(
    model: nn.Module,
    method: str,
    *,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    structure_kwargs: dict | None = None,
) -> nn.Module:
    """Wrap ``model`` for fine-tuning with ``method``; returns a ``PeftModel`` (``full``: the model, all unfrozen).

    ``target_modules`` defaults to every linear layer except the head (q,k,v,o,gate,up,down for Llama).
    ``structure_kwargs``: SURM ``form`` ("layer" | "adapter"), ``kron_factor``, ``rank`` (LDR displacement
    rank, default ``r``); C3A ``block_size`` (default 64).
    ``qlora`` / ``qsurm-*`` need the base already loaded as 4-bit NF4 with double quantisation
    (``peft_train.models.load_model(..., quant="nf4")``): the base is prepared with
    ``prepare_model_for_kbit_training`` (gradient checkpointing on) and bitsandbytes' CPU repacking is disabled.
    """
    _check_method(method)
    structure_kwargs = dict(structure_kwargs or {})
    if method == "full":
        return _unfreeze_all(model)
    if needs_4bit(method):
        if not is_quantized_4bit(model):
            raise ValueError(f"method {method!r} needs a 4-bit base: load it with load_model(..., quant='nf4')")
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    register_surm()
    config = _peft_config(method, r, alpha, dropout, target_modules, structure_kwargs)
    check_targets(model, method, config.target_modules if method.startswith(("surm-", "qsurm-")) else
                  (ALL_LINEAR if target_modules is None else target_modules))
    peft_model = get_peft_model(model, config)
    if _surm_structure(method) is not None:
        _check_wrapped_as_surm(peft_model)
    if is_quantized_4bit(peft_model):
        disable_bnb_cpu_repack(peft_model)
    return peft_model


def _full_numel(param: torch.Tensor) -> int:
    # a bitsandbytes Params4bit stores two 4-bit values per byte; its quant_state knows the real shape
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    return param.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unquantised number of values."""
    trainable = total = 0
    for param in model.parameters():
        numel = _full_numel(param)
        total += numel
        if param.requires_grad:
            trainable += numel
    return trainable, total


def load_adapter(base_model: nn.Module, path) -> PeftModel:
    """Load an adapter directory written by ``save_pretrained`` (any method but ``full``) for inference."""
    register_surm()
    model = PeftModel.from_pretrained(base_model, str(path))
    if is_quantized_4bit(model):
        disable_bnb_cpu_repack(model)
    return model
