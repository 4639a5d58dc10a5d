"""SURM structured updates: fast FFT products against dense ΔW, no-op init, parameter counts, peft layer."""

import pytest
import torch
from torch import nn

from peft_train.surm import (
    CirculantDelta,
    KroneckerDelta,
    LDRDelta,
    SurmConfig,
    ToeplitzDelta,
    make_structure,
    structure_parameter_count,
)
from peft_train.surm._fft import negacyclic_convolve, skew_circulant_matrix

SHAPES = [(64, 64), (63, 63), (64, 192), (192, 64), (37, 50)]  # (d_in, d_out)
STRUCTURES = ["circulant", "toeplitz", "kronecker", "ldr"]


def _randomised(structure: str, d_in: int, d_out: int) -> nn.Module:
    """A structure in float64 with every parameter random (a fresh one has ΔW = 0, which proves nothing)."""
    torch.manual_seed(d_in * 1000 + d_out)
    delta = make_structure(structure, d_in, d_out, rank=3, scaling=0.7).double()
    with torch.no_grad():
        for p in delta.parameters():
            p.normal_()
    return delta


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("d_in,d_out", SHAPES)
def test_fast_product_matches_dense_forward_and_gradients(structure, d_in, d_out):
    delta = _randomised(structure, d_in, d_out)
    x = torch.randn(2, 3, d_in, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 3, d_out, dtype=torch.float64)

    fast = delta(x)
    assert fast.shape == (2, 3, d_out)
    fast_grads = torch.autograd.grad((fast * probe).sum(), [x, *delta.parameters()])
    dense = x @ delta.get_delta_weight().T
    dense_grads = torch.autograd.grad((dense * probe).sum(), [x, *delta.parameters()])

    torch.testing.assert_close(fast, dense, rtol=1e-9, atol=1e-9)
    for g_fast, g_dense in zip(fast_grads, dense_grads):
        torch.testing.assert_close(g_fast, g_dense, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("d_in,d_out", SHAPES)
def test_fresh_structure_is_a_noop_and_counts_match_docs(structure, d_in, d_out):
    delta = make_structure(structure, d_in, d_out, rank=3)
    assert torch.count_nonzero(delta.get_delta_weight()) == 0
    assert torch.count_nonzero(delta(torch.randn(4, d_in))) == 0
    n_params = sum(p.numel() for p in delta.parameters())
    assert n_params == structure_parameter_count(structure, d_in, d_out, rank=3)


def test_parameter_count_formulas():
    assert CirculantDelta.parameter_count(64, 192) == 2 * 192
    assert ToeplitzDelta.parameter_count(64, 192) == 64 + 192 - 1
    assert LDRDelta.parameter_count(192, 64, rank=4) == 2 * 4 * 192
    # divisors closest to √d: 64 → 8 (B gets 64/8 = 8), 192 → 12 (B gets 192/12 = 16)
    assert KroneckerDelta(192, 64).A.shape == (8, 12)
    assert KroneckerDelta(192, 64).B.shape == (8, 16)
    assert KroneckerDelta.parameter_count(192, 64) == 8 * 12 + 8 * 16


def test_circulant_init_has_unit_gain():
    """a ~ N(0, 1/n): C(a)C(a)ᵀ has eigenvalues |â_k|² with mean 1, so updates to b are not scaled down."""
    torch.manual_seed(0)
    gains = [torch.fft.fft(CirculantDelta(256, 256).a.detach()).abs().pow(2).mean() for _ in range(20)]
    assert 0.8 < float(torch.stack(gains).mean()) < 1.2


def test_skew_circulant_is_negacyclic():
    """S(v) shifted by one wraps the last entry around with a minus sign (f = -1)."""
    v = torch.tensor([1.0, 2.0, 3.0])
    expected = torch.tensor([[1.0, -3.0, -2.0], [2.0, 1.0, -3.0], [3.0, 2.0, 1.0]])
    torch.testing.assert_close(skew_circulant_matrix(v), expected)
    x = torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(negacyclic_convolve(v, x, 3), expected @ x)


def test_wrong_input_width_is_rejected():
    with pytest.raises(ValueError, match="last dimension 64"):
        CirculantDelta(64, 64)(torch.randn(3, 63))


def test_unknown_structure_is_rejected():
    with pytest.raises(ValueError, match="unknown SURM structure"):
        SurmConfig(surm_structure="hankel", target_modules=["q_proj"])


def _wrapped_linear(structure: str, form: str, d_in=64, d_out=128):
    """A SurmLinear around a random nn.Linear, through peft's own LoRA model."""
    from peft import get_peft_model

    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(d_in, d_out))
    config = SurmConfig(r=2, lora_alpha=4, target_modules=["proj"], surm_structure=structure, surm_form=form)
    return net, get_peft_model(net, config)


@pytest.mark.parametrize("form", ["layer", "adapter"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_peft_layer_noop_at_init_then_adds_scaled_update(structure, form):
    net, model = _wrapped_linear(structure, form)
    layer = model.base_model.model.proj
    x = torch.randn(5, 64)
    base_out = layer.base_layer(x)
    torch.testing.assert_close(model(x), base_out)  # fresh: a no-op

    delta = layer.lora_surm["default"]
    with torch.no_grad():
        for p in delta.parameters():
            p.normal_(0, 0.1)
    assert layer.scaling["default"] == 2.0  # lora_alpha / r
    if form == "layer":
        expected = base_out + 2.0 * x @ delta.get_delta_weight().T
    else:
        expected = base_out + 2.0 * torch.nn.functional.gelu(base_out @ delta.get_delta_weight().T)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_adapter_form_cannot_merge():
    _, model = _wrapped_linear("circulant", "adapter")
    with pytest.raises(ValueError, match="non-linear"):
        model.merge_and_unload()
