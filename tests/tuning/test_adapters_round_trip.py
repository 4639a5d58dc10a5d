"""build_adapter / load_adapter: every method round-trips through save_pretrained, SURM merges, 4-bit grads."""

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel

from peft_train.adapters import METHODS, build_adapter, count_parameters, load_adapter, needs_4bit
from peft_train.models import build_tiny_model, load_model
from peft_train.surm import is_surm_registered

TOKENS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
FP_METHODS = [m for m in METHODS if m != "full" and not needs_4bit(m)]


def _base(method: str):
    if needs_4bit(method):
        return load_model("tiny", quant="nf4", device="cpu")[0]
    return build_tiny_model()


def _perturb_adapter(model, scale=0.05, seed=1):
    """Random adapter weights, so a lost or mis-loaded adapter changes the logits (fresh adapters are no-ops)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(TOKENS).logits


def _save_load_check(method, tmp_path):
    model = build_adapter(_base(method), method, r=2)
    _perturb_adapter(model)
    before = _logits(model)
    assert not torch.allclose(before, _logits(_base(method).eval()), atol=1e-4)  # the adapter does something
    model.save_pretrained(tmp_path)
    loaded = load_adapter(_base(method), tmp_path)
    assert isinstance(loaded, PeftModel)
    torch.testing.assert_close(_logits(loaded), before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", FP_METHODS)
def test_save_load_identical_logits(method, tmp_path):
    _save_load_check(method, tmp_path)


@pytest.mark.parametrize("method", ["qlora", "qsurm-circulant"])
def test_save_load_identical_logits_over_4bit_base(method, tmp_path):
    _save_load_check(method, tmp_path)


def test_surm_structure_recovered_from_adapter_dir(tmp_path):
    model = build_adapter(build_tiny_model(), "surm-kronecker", r=2, structure_kwargs={"kron_factor": 4})
    model.save_pretrained(tmp_path)
    loaded = load_adapter(build_tiny_model(), tmp_path)
    layer = loaded.base_model.model.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == "SurmLinear"
    assert layer.lora_surm["default"].A.shape == (4, 4)  # factor capped at 4, not the default √d


def test_plain_lora_still_loads_as_lora_after_registration(tmp_path):
    model = build_adapter(build_tiny_model(), "lora", r=2)
    model.save_pretrained(tmp_path)
    loaded = load_adapter(build_tiny_model(), tmp_path)
    assert is_surm_registered()
    assert type(loaded.peft_config["default"]).__name__ == "LoraConfig"
    assert type(loaded.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


@pytest.mark.parametrize("structure", ["circulant", "toeplitz", "kronecker", "ldr"])
def test_surm_merge_matches_unmerged(structure):
    model = build_adapter(build_tiny_model(), f"surm-{structure}", r=2)
    _perturb_adapter(model)
    unmerged = _logits(model)
    merged = model.merge_and_unload()
    assert not any(type(m).__name__ == "SurmLinear" for m in merged.modules())
    torch.testing.assert_close(_logits(merged), unmerged, rtol=1e-4, atol=1e-4)


def test_surm_adapter_form_targets_attention_and_mlp_outputs(tmp_path):
    model = build_adapter(build_tiny_model(), "surm-circulant", structure_kwargs={"form": "adapter"})
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "SurmLinear"}
    assert wrapped == {"o_proj", "down_proj"}
    torch.testing.assert_close(_logits(model), _logits(build_tiny_model().eval()))  # no-op at init
    _perturb_adapter(model)
    before = _logits(model)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(load_adapter(build_tiny_model(), tmp_path)), before, rtol=0, atol=1e-5)


def _tiny_layer_shapes():
    """(d_in, d_out) of every targeted linear layer in the tiny model."""
    model = build_tiny_model()
    return [
        (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    ]


def test_trainable_parameter_counts_follow_documented_formulas():
    shapes = _tiny_layer_shapes()
    r = 4
    expected = {
        "lora": sum(r * (i + o) for i, o in shapes),
        "surm-circulant": sum(2 * max(i, o) for i, o in shapes),
        "surm-toeplitz": sum(i + o - 1 for i, o in shapes),
        "surm-ldr": sum(2 * r * max(i, o) for i, o in shapes),
        "c3a": sum(i * o // 64 for i, o in shapes),
    }
    for method, count in expected.items():
        trainable, total = count_parameters(build_adapter(build_tiny_model(), method, r=r))
        assert trainable == count, method
        assert total == count_parameters(build_tiny_model())[1] + count


def test_full_unfreezes_everything_and_4bit_methods_need_4bit_base():
    model = build_adapter(build_tiny_model(), "full")
    trainable, total = count_parameters(model)
    assert trainable == total > 0
    with pytest.raises(ValueError, match="4-bit base"):
        build_adapter(build_tiny_model(), "qlora")
    with pytest.raises(ValueError, match="unknown adapter method"):
        build_adapter(build_tiny_model(), "dora")


# --- bitsandbytes 0.50.2 CPU guard -----------------------------------------------------------------------------


def _lora_grads(model) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(TOKENS, labels=TOKENS).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _cosine(a: dict, b: dict) -> float:
    flat_a = torch.cat([a[k].flatten() for k in sorted(a)])
    flat_b = torch.cat([b[k].flatten() for k in sorted(a)])
    return float(torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0))


def _dequantised_fp32_twin(model_4bit):
    """An fp32 tiny model whose linear weights are the 4-bit model's dequantised weights."""
    twin = build_tiny_model()
    quantised = dict(model_4bit.named_modules())
    with torch.no_grad():
        for name, module in twin.named_modules():
            source = quantised.get(name)
            if isinstance(source, bnb.nn.Linear4bit):
                weight = source.weight
                module.weight.copy_(bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float())
    return twin


def test_qlora_gradients_survive_an_eval_forward():
    """Backward after an eval-mode no-grad forward must match the unquantised path (bnb CPU repack bug)."""
    base = load_model("tiny", quant="nf4", device="cpu")[0]
    reference = build_adapter(_dequantised_fp32_twin(base), "lora", r=4)
    model = build_adapter(base, "qlora", r=4)
    _perturb_adapter(model, seed=3)  # non-zero lora_B so lora_A gets gradients too
    lora_state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert not reference.load_state_dict(lora_state, strict=False).unexpected_keys
    assert all(not layer.support_avx512bf16_for_cpu for layer in model.modules() if isinstance(layer, bnb.nn.Linear4bit))

    grads_before = _lora_grads(model)
    _logits(model)  # eval-mode no-grad forward: where bitsandbytes would repack
    grads_after = _lora_grads(model)
    grads_reference = _lora_grads(reference)

    assert _cosine(grads_after, grads_before) > 0.99
    assert _cosine(grads_before, grads_reference) > 0.99
    assert _cosine(grads_after, grads_reference) > 0.99


# ----------------------------------------------------------------------------- layer types beyond nn.Linear


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=64, n_layer=1, n_head=2, n_positions=64))


@pytest.mark.parametrize("structure", ["circulant", "toeplitz"])
def test_surm_wraps_conv1d_and_merges_with_its_transposed_weight(structure):
    from transformers.pytorch_utils import Conv1D

    from peft_train.surm import SurmLinear

    model = build_adapter(_tiny_gpt2(), f"surm-{structure}", r=2)
    wrapped = [m for m in model.modules() if isinstance(m, SurmLinear)]
    assert len(wrapped) == 4 and all(isinstance(m.get_base_layer(), Conv1D) for m in wrapped)
    assert not any(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in model.modules())  # no LoRA
    _perturb_adapter(model)
    unmerged = _logits(model)
    torch.testing.assert_close(_logits(model.merge_and_unload()), unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["c3a", "lokr"])
def test_methods_that_cannot_wrap_conv1d_refuse_by_module(method):
    from peft_train.adapters import AdapterTargetError

    with pytest.raises(AdapterTargetError, match=r"cannot wrap Conv1D .*'transformer\.h\.0\.attn\.c_attn'"):
        build_adapter(_tiny_gpt2(), method)


def test_surm_refuses_a_layer_type_it_cannot_wrap():
    from peft_train.adapters import AdapterTargetError

    with pytest.raises(AdapterTargetError, match="Embedding.*embed_tokens") as error:
        build_adapter(build_tiny_model(), "surm-circulant", target_modules=["embed_tokens", "q_proj"])
    assert error.value.module == "model.embed_tokens"
