"""Base models: the built-in tiny Llama, local directories and hub ids, full precision or 4-bit NF4.

Tokenizers that lack a pad token get ``pad = eos``; tokenizers that lack a chat template get
``DEFAULT_CHAT_TEMPLATE`` (``<s><|system|>\\n…\\n<|user|>\\n…\\n<|assistant|>\\n…</s>``, see tokenizer.py);
``tokenizer_defaults(tokenizer)`` says which of the two a loaded tokenizer got, for metrics and manifests.

A source that cannot be loaded (missing folder, no tokenizer, no weights, a hub id while offline, a model that
needs its own code) raises ``ModelLoadError`` naming the folder or id and what is missing.

4-bit loads check themselves: transformers' bitsandbytes replacement quantises only exact ``nn.Linear`` and
``Conv1D``; linear-like subclasses (Falcon's ``FalconLinear``) are quantised here when they compute exactly
``x Wᵀ + b`` (checked on a probe input), and a load that leaves any other linear layer in full precision, or
quantises nothing, raises ``ModelLoadError`` naming the layer types.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from peft_train.tokenizer import DEFAULT_CHAT_TEMPLATE, ByteTokenizer

TINY_NAME = "tiny"
QUANT_CHOICES = (None, "nf4")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
DEFAULTS_ATTRIBUTE = "peft_train_defaults"  # set on a tokenizer by load_model: which defaults it was given


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; ``source`` is the folder or hub id at fault."""

    def __init__(self, message: str, source: str):
        super().__init__(message)
        self.source = source

# Llama-style and small enough for CPU tests. Every linear width is a multiple of 64 because the
# bitsandbytes CPU 4-bit kernels need it; the vocabulary (259 byte-level ids) is padded up to 320.
TINY_CONFIG: dict = dict(
    vocab_size=320,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def build_tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama; the same seed gives the same weights without touching the global RNG."""
    config = LlamaConfig(**{**TINY_CONFIG, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → cuda when available, else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given."""
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but CUDA is not available; use 'cpu' or 'auto'")
        try:
            resolved = torch.device(name)
        except RuntimeError as err:
            raise ValueError(f"invalid device {device!r}: {err}") from None
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        return resolved
    raise ValueError(f"unknown device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected e.g. 'float32', 'bfloat16', 'float16'")
    return resolved


def _check_quant(quant: str | None) -> str | None:
    if quant not in QUANT_CHOICES:
        raise ValueError(f"unknown quant {quant!r}; expected one of {QUANT_CHOICES}")
    return quant


def nf4_config(device: torch.device) -> BitsAndBytesConfig:
    """NF4 with double quantisation; compute in fp32 on CPU (no fast bf16 matmul there), bf16 on CUDA."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
    )


def disable_bnb_cpu_repack(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' CPU weight repacking on every ``Linear4bit``; returns how many were changed.

    bitsandbytes 0.50.2 repacks a Linear4bit's weight during an eval-mode no-grad forward on CPUs with
    avx512-bf16, after which backward through that layer is wrong.
    """
    import bitsandbytes as bnb  # imported lazily: only 4-bit models need it

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def is_quantized_4bit(model: torch.nn.Module) -> bool:
    """True for a model with bitsandbytes 4-bit layers (False, without importing it, when bitsandbytes is absent)."""
    if getattr(model, "is_loaded_in_4bit", False):
        return True
    try:
        import bitsandbytes as bnb  # imported lazily: only 4-bit models need it
    except ImportError:  # no bitsandbytes, no 4-bit layers
        return False
    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Write model and tokenizer to one directory that ``load_model(out_dir)`` reads back."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _is_byte_tokenizer_dir(path: Path) -> bool:
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return False
    return json.loads(config_file.read_text()).get("tokenizer_class") == ByteTokenizer.__name__


def _load_tokenizer(name_or_path: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    if Path(name_or_path).is_dir() and _is_byte_tokenizer_dir(Path(name_or_path)):
        return ByteTokenizer.from_pretrained(name_or_path)
    remote = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **remote)
    except (ValueError, ImportError) as error:  # e.g. a sentencepiece model without sentencepiece installed
        raise ModelLoadError(f"cannot load the tokenizer of {name_or_path}: {error}", name_or_path) from None


def _complete_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    defaults = {"pad_token": "own", "chat_template": "own"}
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
        defaults["pad_token"] = "eos"  # padded positions are masked out of attention and labels
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        defaults["chat_template"] = "peft_train default (<|role|> lines, eos after each answer)"
    setattr(tokenizer, DEFAULTS_ATTRIBUTE, defaults)
    return tokenizer


def tokenizer_defaults(tokenizer) -> dict:
    """Which defaults ``load_model`` gave the tokenizer: ``pad_token`` own | eos, ``chat_template`` own | default."""
    return dict(getattr(tokenizer, DEFAULTS_ATTRIBUTE, {"pad_token": "own", "chat_template": "own"}))


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")  # "name" or "org/name"


def _looks_like_path(name: str) -> bool:
    return Path(name).expanduser().exists() or not HUB_ID.match(name)


def check_model_folder(folder: str | Path, trust_remote_code: bool = False) -> None:
    """Raise ModelLoadError when ``folder`` cannot be a transformers checkpoint (say what is missing)."""
    where, folder = str(folder), Path(folder).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"model folder {where} does not exist (give 'tiny', a model folder or a hub id)", where)
    if not folder.is_dir():
        raise ModelLoadError(f"model {where} is a file; give the folder that holds config.json and the weights", where)
    names = {p.name for p in folder.iterdir()}
    if "config.json" not in names:
        raise ModelLoadError(f"model folder {where} has no config.json: not a transformers checkpoint", where)
    if not names & set(TOKENIZER_FILES):
        raise ModelLoadError(f"model folder {where} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                             "save the tokenizer next to the model (tokenizer.save_pretrained)", where)
    if not any(name.endswith(WEIGHT_SUFFIXES) for name in names):
        raise ModelLoadError(f"model folder {where} has no weights (*.safetensors or pytorch_model*.bin)", where)
    config = json.loads((folder / "config.json").read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(f"model folder {where} needs its own Python code (config.json has auto_map) and "
                             "remote code is off; use a model whose architecture transformers has built in", where)


def _check_source(name_or_path: str, trust_remote_code: bool) -> None:
    if _looks_like_path(name_or_path):
        check_model_folder(name_or_path, trust_remote_code)


def _hub_error(name: str, error: OSError) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = "the hub is offline (HF_HUB_OFFLINE) and it is not in the local cache" if offline else str(error)
    return ModelLoadError(f"model {name!r} is not a local folder and cannot be fetched as a hub id: {why}", name)


# ----------------------------------------------------------------------------- 4-bit self-check


def _is_plain_linear_map(module: torch.nn.Linear) -> bool:
    """Does this nn.Linear subclass compute exactly x Wᵀ + b? (probe input, in its own dtype)"""
    weight = module.weight
    probe = torch.randn(2, module.in_features, generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        got = module(probe)
        expected = torch.nn.functional.linear(probe, weight, module.bias)
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-3, atol=1e-4)


def _quantise_linear(module: torch.nn.Linear, config: BitsAndBytesConfig):
    import bitsandbytes as bnb

    device = module.weight.device
    layer = bnb.nn.Linear4bit(
        module.in_features, module.out_features, module.bias is not None, config.bnb_4bit_compute_dtype,
        compress_statistics=config.bnb_4bit_use_double_quant, quant_type=config.bnb_4bit_quant_type,
        quant_storage=config.bnb_4bit_quant_storage, device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        module.weight.data.detach().to("cpu"), requires_grad=False, quant_type=config.bnb_4bit_quant_type,
        compress_statistics=config.bnb_4bit_use_double_quant, quant_storage=config.bnb_4bit_quant_storage,
    )
    if module.bias is not None:
        layer.bias = torch.nn.Parameter(module.bias.data.detach().to("cpu"), requires_grad=False)
    layer.source_cls = type(module)
    return layer.to(device)  # Params4bit quantises on its move to the device


def _float_linear_layers(model: PreTrainedModel) -> dict[str, torch.nn.Module]:
    """Linear-like layers left in floating point, the output head (tied to the embeddings or not) excepted."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head
        and module.weight.dtype.is_floating_point
    }


def quantise_remaining_linear(model: PreTrainedModel, config: BitsAndBytesConfig) -> list[str]:
    """Quantise the nn.Linear subclasses transformers left in full precision (where they are plain linear maps),
    then check that every linear layer but the head is 4-bit; returns the names quantised here."""
    import bitsandbytes as bnb

    quantised = []
    for name, module in _float_linear_layers(model).items():
        if isinstance(module, torch.nn.Linear) and type(module) is not torch.nn.Linear and _is_plain_linear_map(module):
            model.set_submodule(name, _quantise_linear(module, config))
            quantised.append(name)
    left = _float_linear_layers(model)
    n_4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    if left or n_4bit == 0:
        kinds = sorted({type(m).__name__ for m in left.values()})
        raise ModelLoadError(
            f"4-bit loading quantised {n_4bit} linear layer(s) and left {len(left)} in full precision "
            f"({', '.join(kinds) or 'no linear layer found'}; e.g. {next(iter(left), '-')}): these layer types "
            "cannot be quantised safely, so qlora/qsurm would not train over a 4-bit base; use lora/surm-*",
            getattr(model.config, "_name_or_path", "") or "model",
        )
    return quantised


def _load_pretrained(
    name_or_path: str, quant: str | None, device: torch.device, dtype: torch.dtype, trust_remote_code: bool
) -> PreTrainedModel:
    # device_map puts weights straight on the target device (no full CPU copy of a large model first).
    kwargs: dict = {"dtype": dtype, "device_map": {"": str(device)}}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if quant == "nf4":
        kwargs["quantization_config"] = nf4_config(device)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def _load_tiny(quant: str | None, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    model = build_tiny_model()
    if quant is None:
        return model.to(device=device, dtype=dtype)
    # Quantise through the same from_pretrained path a real checkpoint takes, so "tiny" exercises it.
    with tempfile.TemporaryDirectory(prefix="dpsel-tiny-") as tmp:
        model.save_pretrained(tmp)
        return _load_pretrained(tmp, quant, device, dtype, trust_remote_code=False)


def load_model(
    name_or_path: str = TINY_NAME,
    quant: str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``"tiny"``, a local directory or a hub id, optionally 4-bit NF4; returns ``(model, tokenizer)`` in eval mode.

    ``dtype`` defaults to fp32 on CPU and bf16 on CUDA (for a 4-bit model it is the dtype of the
    layers left unquantised, e.g. norms and ``lm_head``).
    """
    quant = _check_quant(quant)
    target = resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, target)
    if name_or_path == TINY_NAME:
        model, tokenizer = _load_tiny(quant, target, torch_dtype), ByteTokenizer()
    else:
        _check_source(name_or_path, trust_remote_code)
        try:
            tokenizer = _load_tokenizer(name_or_path, trust_remote_code)
            model = _load_pretrained(name_or_path, quant, target, torch_dtype, trust_remote_code)
        except OSError as error:  # not a local folder: a hub id that could not be fetched
            raise _hub_error(name_or_path, error) from None
    if quant == "nf4":
        quantise_remaining_linear(model, nf4_config(target))
        disable_bnb_cpu_repack(model)
    tokenizer = _complete_tokenizer(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
