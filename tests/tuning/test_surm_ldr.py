"""SURM LDR: the batch path (ΔW built once by FFTs) and the per-row FFT path agree with the explicit dense
matrix, values and gradients, for square and rectangular shapes."""
from __future__ import annotations

import pytest
import torch

from peft_train.surm._fft import circulant_matrix, ldr_matrix, skew_circulant_matrix
from peft_train.surm.ldr import LDRDelta


@pytest.mark.parametrize("d_in, d_out, rank", [(12, 12, 3), (10, 6, 2), (6, 10, 4)])
def test_ldr_matrix_equals_the_explicit_sum_of_products(d_in, d_out, rank):
    torch.manual_seed(0)
    delta = LDRDelta(d_in, d_out, rank=rank)
    torch.nn.init.normal_(delta.h)
    explicit = sum(circulant_matrix(g) @ skew_circulant_matrix(h) for g, h in zip(delta.g, delta.h))
    torch.testing.assert_close(ldr_matrix(delta.g, delta.h), explicit, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [3, 40])   # fewer than n rows: per-row FFTs; at least n: dense ΔW
def test_both_paths_give_the_dense_result_and_its_gradients(rows):
    torch.manual_seed(1)
    delta = LDRDelta(10, 7, rank=3)
    torch.nn.init.normal_(delta.h)
    x = torch.randn(rows, 10)
    out = delta(x)
    expected = x @ delta.get_delta_weight().T
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (delta.g, delta.h))
    reference = torch.autograd.grad(expected.square().sum(), (delta.g, delta.h))
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
