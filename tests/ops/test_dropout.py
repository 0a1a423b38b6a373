"""``dropout_mask`` (the cheap CPU keep-mask) and ``FastDropout`` behave like dropout."""
import math

import pytest
import torch

from dream.models.layers import FastDropout
from dream.ops.dropout import dropout_mask


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_rate_and_values(p):
    m = dropout_mask((400, 2500), p)
    assert m.shape == (400, 2500) and m.dtype == torch.float32
    vals = torch.unique(m)
    assert torch.allclose(vals, torch.tensor([0.0, 1.0 / (1.0 - p)]))
    rate = float((m == 0).double().mean())
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / m.numel())  # 5 sigma
    # both 32-bit halves of each random word are used: even and odd positions drop at the same rate
    flat = (m.reshape(-1) == 0).double()
    assert abs(float(flat[0::2].mean()) - float(flat[1::2].mean())) < 0.01
    assert dropout_mask((3, 5), p, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="0 < p < 1"):
        dropout_mask((2,), 1.0)


def test_fast_dropout_matches_dropout_semantics():
    x = torch.randn(64, 80, 32, requires_grad=True)
    d = FastDropout(0.25)
    assert isinstance(d, torch.nn.Dropout)
    out = d(x)
    keep = out != 0
    assert 0.2 < float((~keep).float().mean()) < 0.3
    assert torch.allclose(out[keep], x[keep] / 0.75)
    out.sum().backward()
    assert torch.allclose(x.grad, keep.float() / 0.75)
    # mean is preserved in expectation
    big = torch.ones(2_000_000)
    assert abs(float(d(big).mean()) - 1.0) < 0.005
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
