"""The tolerance helpers (tests/tolerance.py) themselves: the formulas, and that the 2x rule accepts another
reduction order of the same math but rejects a slightly different math."""
import math

import pytest
import torch

from tolerance import U, assert_2x, assert_rel_close, binomial_tol, gemm_rel_tol, lowp_rel_tol, max_rel_err, mean_tol


def test_formulas():
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        assert U[dtype] == torch.finfo(dtype).eps / 2
    assert gemm_rel_tol(torch.float32, 256) == 4 * 16 * 2.0 ** -24
    assert gemm_rel_tol(torch.float64, 100, depth=3, c=2) == 2 * 3 * 10 * 2.0 ** -53
    assert lowp_rel_tol(torch.bfloat16, 12) == 4 * 12 * 2.0 ** -8
    assert mean_tol(2.0, 400) == 5 * 2.0 / 20 and binomial_tol(0.5, 100, z=3) == 3 * 0.5 / 10
    assert max_rel_err(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 4.0])) == 0.25
    with pytest.raises(ValueError):
        gemm_rel_tol(torch.float32, 0)


def test_2x_rule_accepts_another_reduction_order_and_rejects_another_math():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 512, generator=g), torch.randn(512, 48, generator=g)
    truth = a.double() @ b.double()
    ref = a @ b
    # the same product summed in 8 blocks of 64 (another reduction order)
    blocked = sum(a[:, k:k + 64] @ b[k:k + 64] for k in range(0, 512, 64))
    assert_2x(blocked, ref, truth, "blocked matmul")
    assert_rel_close(ref, truth, gemm_rel_tol(torch.float32, 512), "float32 matmul vs float64")
    # a constant off by 1e-5 is far beyond rounding
    with pytest.raises(AssertionError, match="2 x reference error"):
        assert_2x(blocked * (1 + 1e-5), ref, truth, "scaled matmul")
    # a float16 round trip of the inputs too
    with pytest.raises(AssertionError):
        assert_2x(a.half().float() @ b.half().float(), ref, truth, "float16 inputs")
    assert math.isfinite(max_rel_err(blocked, truth))
