"""aiayn.dropout: the CPU's 16-bit dropout mask against what F.dropout promises."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aiayn.config import TransformerConfig
from aiayn.dropout import RESOLUTION, Dropout, dropout, keep_mask, rounded_p
from aiayn.model import Transformer


def test_p_is_rounded_to_a_multiple_of_one_65536th():
    assert rounded_p(0.1) == 6554 / 65536
    assert abs(rounded_p(0.1) - 0.1) < 1 / RESOLUTION
    assert rounded_p(0.3) == round(0.3 * 65536) / 65536


def test_eval_mode_and_p_zero_return_the_input_itself():
    x = torch.randn(4, 8)
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0, training=True) is x


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_drops_at_the_rounded_rate_and_scales_what_it_keeps(p):
    torch.manual_seed(0)
    n = 1 << 20
    out = dropout(torch.ones(n), p)
    dropped = (out == 0).double().mean().item()
    # Binomial(n, p): 6 standard deviations is about 0.0003 * 6 at p = 0.1.
    assert abs(dropped - rounded_p(p)) < 6 * math.sqrt(p * (1 - p) / n)
    kept = out[out != 0]
    assert torch.all(kept == torch.tensor(1.0) * (1.0 / (1.0 - rounded_p(p))))


def test_neighbouring_elements_are_dropped_independently():
    """Four elements share one 64-bit draw: their masks must still be independent."""
    torch.manual_seed(1)
    n, p = 1 << 20, 0.1
    dropped = keep_mask(torch.Size([n]), p, torch.float32) == 0
    for lag in (1, 2, 3, 4):
        both = (dropped[:-lag] & dropped[lag:]).double().mean().item()
        q = rounded_p(p) ** 2
        assert abs(both - q) < 6 * math.sqrt(q * (1 - q) / n), lag


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_output_and_gradient_are_the_mask_times_input_and_upstream_gradient(dtype):
    """Bit for bit: x times the 0/1 mask times 1 / (1 - p), the scale applied in x's precision
    (float32 for bfloat16), also where the scale is folded into the mask (float32, float64)."""
    x = torch.randn(32, 16, 64).to(dtype).requires_grad_()
    torch.manual_seed(3)
    out = dropout(x, 0.1)
    torch.manual_seed(3)
    mask = keep_mask(x.shape, 0.1, dtype)
    scale = 1.0 / (1.0 - rounded_p(0.1))
    assert out.dtype == dtype and out.shape == x.shape
    # The scale is applied in at least float32 and rounded once, also in bfloat16.
    compute = torch.promote_types(dtype, torch.float32)
    expected = (x.detach().to(compute) * mask.to(compute) * scale).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    torch.testing.assert_close(
        x.grad, (upstream.to(compute) * mask.to(compute) * scale).to(dtype), rtol=0, atol=0
    )
    assert set(mask.unique().tolist()) == {0.0, 1.0}


def test_the_mask_follows_the_seed():
    x = torch.ones(4096)
    torch.manual_seed(5)
    first = dropout(x, 0.1)
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.1), first)
    torch.manual_seed(6)
    assert not torch.equal(dropout(x, 0.1), first)


def test_odd_sizes_and_non_contiguous_inputs():
    torch.manual_seed(7)
    x = torch.randn(7, 5).t()  # 35 elements, not a multiple of four, transposed
    out = dropout(x, 0.5)
    assert out.shape == (5, 7)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] * (1.0 / (1.0 - rounded_p(0.5))))


def test_p_too_close_to_one_for_16_bits_falls_back_to_f_dropout():
    torch.manual_seed(8)
    p = 1 - 1e-6  # rounds to 65,536 / 65,536
    x = torch.randn(1000)
    out = dropout(x, p)
    torch.manual_seed(8)
    torch.testing.assert_close(out, F.dropout(x, p, training=True))


def test_the_module_is_an_nn_dropout_that_uses_it():
    module = Dropout(0.1)
    assert isinstance(module, torch.nn.Dropout) and module.state_dict() == {}
    x = torch.randn(64, 64)
    torch.manual_seed(9)
    out = module(x)
    torch.manual_seed(9)
    assert torch.equal(out, dropout(x, 0.1))
    assert module.eval()(x) is x


def test_the_model_draws_every_dropout_with_it():
    model = Transformer(TransformerConfig.from_preset("tiny"))
    modules = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert modules and all(isinstance(m, Dropout) for m in modules)
