"""``dropout_mask`` (the cheap CPU keep-mask) and ``FastDropout`` behave like dropout."""
import math

import pytest
import torch

from dream.models.layers import FastDropout
from dream.ops.dropout import dropout_mask
from tolerance import U, binomial_tol, mean_tol

U32 = U[torch.float32]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_rate_and_values(p):
    m = dropout_mask((400, 2500), p)
    assert m.shape == (400, 2500) and m.dtype == torch.float32
    vals = torch.unique(m)
    # the keep value is 1 / (1 - p) computed in float64 and rounded to float32 once, as here
    assert torch.equal(vals, torch.tensor([0.0, 1.0 / (1.0 - p)]))
    rate = float((m == 0).double().mean())
    assert abs(rate - p) < binomial_tol(p, m.numel())  # 5 standard errors
    # both 32-bit halves of each random word are used: even and odd positions drop at the same rate (the
    # difference of two independent proportions of n / 2 draws: std sqrt(2 p (1 - p)), 5 standard errors)
    flat = (m.reshape(-1) == 0).double()
    half = flat.numel() // 2
    assert abs(float(flat[0::2].mean()) - float(flat[1::2].mean())) < mean_tol(math.sqrt(2 * p * (1 - p)), half)
    assert dropout_mask((3, 5), p, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="0 < p < 1"):
        dropout_mask((2,), 1.0)


def test_fast_dropout_matches_dropout_semantics():
    x = torch.randn(64, 80, 32, requires_grad=True)
    d = FastDropout(0.25)
    assert isinstance(d, torch.nn.Dropout)
    out = d(x)
    keep = out != 0
    assert abs(float((~keep).double().mean()) - 0.25) < binomial_tol(0.25, keep.numel())   # 5 standard errors
    # x * fl(1 / 0.75) vs x / 0.75: two roundings vs one, at most 2u apart
    torch.testing.assert_close(out[keep], x[keep] / 0.75, rtol=2 * U32, atol=0)
    out.sum().backward()
    torch.testing.assert_close(x.grad, keep.float() / 0.75, rtol=2 * U32, atol=0)
    # mean is preserved in expectation: each output is 0 or 1 / (1 - p), std sqrt(p / (1 - p)); 5 standard errors
    big = torch.ones(2_000_000)
    assert abs(float(d(big).double().mean()) - 1.0) < mean_tol(math.sqrt(0.25 / 0.75), big.numel())
    d.eval()
    assert d(x) is x
    d.train()
    d.p = 0.0  # the parity check switches dropout off this way
    assert d(x) is x


def test_fast_dropout_is_reproducible_under_the_global_seed():
    d = FastDropout(0.1)
    x = torch.randn(1000)
    torch.manual_seed(3)
    a = d(x)
    torch.manual_seed(3)
    b = d(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, d(x))
