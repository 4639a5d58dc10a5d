"""Base models: the built-in tiny Llama, local directories and hub ids, full precision or 4-bit NF4.

Tokenizers that lack a pad token get ``pad = eos``; tokenizers that lack a chat template get
``DEFAULT_CHAT_TEMPLATE`` (``<s><|system|>\\n…\\n<|user|>\\n…\\n<|assistant|>\\n…</s>``, see tokenizer.py).
"""

from __future__ import annotations

import json
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
    return AutoTokenizer.from_pretrained(name_or_path, **remote)


def _complete_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


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
        tokenizer = _load_tokenizer(name_or_path, trust_remote_code)
        model = _load_pretrained(name_or_path, quant, target, torch_dtype, trust_remote_code)
    if quant == "nf4":
        disable_bnb_cpu_repack(model)
    tokenizer = _complete_tokenizer(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
