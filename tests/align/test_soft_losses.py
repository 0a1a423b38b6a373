"""SoftREPA / AGSM losses against hand-computed references (plain Python math), row-chunk invariance, diagnostics."""
import math

import pytest
import torch

from dream.align.soft_losses import (agsm_loss, pair_diagnostics, pair_errors, plackett_luce_weights,
                                     softrepa_loss)


def test_softrepa_loss_equals_a_hand_computed_2x2_example():
    err = [[0.10, 0.30], [0.20, 0.05]]
    tau, alpha, dw = 0.07, 4.0, 10.0
    ref = 0.0
    for i in range(2):
        logits = [alpha * math.exp(-e / tau) for e in err[i]]
        ref += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    ref = ref / 2 + dw * (err[0][0] + err[1][1]) / 2
    got = softrepa_loss(torch.tensor(err, dtype=torch.float64), tau, alpha, dw)
    assert abs(float(got) - ref) < 1e-12
    # the double exponential caps the logits at alpha: a perfect separation cannot push the loss below this bound
    sat = softrepa_loss(torch.tensor([[0.0, 50.0], [50.0, 0.0]], dtype=torch.float64), tau, alpha)
    assert abs(float(sat) - (-alpha + math.log(math.exp(alpha) + 1))) < 1e-12


def test_pair_errors_are_per_element_means():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 2, generator=g), torch.randn(3, 5, 2, generator=g)
    e = pair_errors(pred, target)
    assert e.shape == (3, 4)
    assert abs(float(e[1, 2]) - float(((pred[1, 2] - target[1]) ** 2).mean())) < 1e-6
    with pytest.raises(ValueError, match="do not pair up"):
        pair_errors(pred, target[:, :4])


def test_plackett_luce_weights_sum_to_one_per_row_and_prefer_low_error():
    g = torch.Generator().manual_seed(1)
    err = torch.rand(5, 5, generator=g, dtype=torch.float64)
    w = plackett_luce_weights(err, 0.1)
    torch.testing.assert_close(w.sum(1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)
    i, j = 2, 3
    assert abs(float(w[i, j]) - math.exp(-float(err[i, j]) / 0.1) / sum(math.exp(-float(e) / 0.1)
                                                                    for e in err[i].tolist())) < 1e-12
    assert int(w[0].argmax()) == int(err[0].argmin())


def _agsm_inputs(B=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    shape = (4, 2)
    return (torch.randn(B, B, *shape, generator=g, dtype=torch.float64),
            torch.randn(B, B, *shape, generator=g, dtype=torch.float64),
            torch.randn(B, *shape, generator=g, dtype=torch.float64))


def test_agsm_with_zero_guidance_is_the_plain_diagonal_mse():
    pred, ema, y = _agsm_inputs()
    loss, info = agsm_loss(pred, ema, y, g_pos=0.0, g_neg=0.0)
    ref = sum(((pred[i, i] - y[i]) ** 2).mean() for i in range(3)) / 3
    assert abs(float(loss) - float(ref)) < 1e-12
    assert float(info["neg"]) == 0.0                       # the negative term is dropped when gamma- = 0


def test_agsm_matches_a_loop_reference():
    pred, ema, y = _agsm_inputs(B=3, seed=5)
    tau, gp, gn = 0.1, 1.0, 0.7
    B = 3
    pos = neg = 0.0
    for i in range(B):
        r = [-float(((y[i] - ema[i, k]) ** 2).mean()) for k in range(B)]
        z = sum(math.exp(v / tau) for v in r)
        w = [math.exp(v / tau) / z for v in r]
        mix = sum(w[k] * ema[i, k] for k in range(B))
        for j in range(B):
            delta = ema[i, j] - mix
            if i == j:
                pos += float(((pred[i, i] - (y[i] + gp * delta)) ** 2).mean()) / B
            else:
                neg += float(((pred[i, j] - (y[i] - gn * delta)) ** 2).mean()) / (B * B - B)
    loss, info = agsm_loss(pred, ema, y, tau, gp, gn)
    assert abs(float(loss) - (pos + neg)) < 1e-12
    assert abs(float(info["pos"]) - pos) < 1e-12 and abs(float(info["neg"]) - neg) < 1e-12


def test_agsm_gradient_reaches_only_the_online_predictions():
    pred, ema, y = _agsm_inputs()
    pred.requires_grad_(True)
    ema.requires_grad_(True)
    agsm_loss(pred, ema, y)[0].backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert ema.grad is None


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_losses_do_not_depend_on_the_row_chunk_size(chunk):
    B = 5
    g = torch.Generator().manual_seed(3)
    err = torch.rand(B, B, generator=g, dtype=torch.float64)
    full = softrepa_loss(err, dweight=10.0)
    parts = sum(softrepa_loss(err[lo:lo + chunk], dweight=10.0, rows=torch.arange(lo, min(B, lo + chunk)), batch=B)
                for lo in range(0, B, chunk))
    assert abs(float(full) - float(parts)) < 1e-12
    pred, ema, y = _agsm_inputs(B=B, seed=4)
    full = agsm_loss(pred, ema, y, g_neg=0.3)[0]
    parts = sum(agsm_loss(pred[lo:lo + chunk], ema[lo:lo + chunk], y[lo:lo + chunk], g_neg=0.3,
                          rows=torch.arange(lo, min(B, lo + chunk)), batch=B)[0] for lo in range(0, B, chunk))
    assert abs(float(full) - float(parts)) < 1e-12


def test_win_rate_and_margin():
    err = torch.tensor([[0.1, 0.3, 0.2], [0.1, 0.2, 0.3], [0.5, 0.4, 0.1]], dtype=torch.float64)
    d = pair_diagnostics(err, tau=0.1)
    w = plackett_luce_weights(err, 0.1)
    assert d["win_rate"] == pytest.approx(2 / 3)               # row 1 prefers caption 0
    margins = [float(w[i, i] - max(w[i, j] for j in range(3) if j != i)) for i in range(3)]
    assert d["margin"] == pytest.approx(sum(margins) / 3)
    assert d["err_pos"] == pytest.approx((0.1 + 0.2 + 0.1) / 3)
