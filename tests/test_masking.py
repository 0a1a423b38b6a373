"""Tests for dream.masking: Masking Warmup schedule and sampler, random orders, masks.

References: the official parity fixture (``official_dream_tiny/io.safetensors``: orders, masks, mw_mu,
mw_num_masked_seeded), scipy.stats.truncnorm (distribution reference, used only here in the tests) and the
probability table of dream_spec.md section 4.

Tolerances (tests/tolerance.py): float64 formulas within a few float64 roundings (scaled by the truncated mass
they divide by); Monte Carlo estimates against the exact probabilities / means in standard errors (z = 5);
the spec's table within half a unit of its last printed digit. Seeds are fixed, so every check is deterministic;
the statistical tests (KS, chi-square) reject a correct sampler with probability 1e-3 each.
"""
import json
import math

import pytest
import scipy.stats as st
import torch
from tolerance import U, binomial_tol, mean_tol

from dream.masking import (
    MaskingWarmup,
    MaskingWarmupConfig,
    mask_by_order,
    mask_from_orders,
    num_masked,
    sample_orders,
    truncated_normal,
)

U64 = U[torch.float64]
TABLE_ROUNDING = 0.5e-3  # the spec table prints 3 decimals

# dream_spec.md section 4: epoch -> (E[r], P(r <= 0.75), P(r >= 0.5)) for TN(mu(e), 0.45) on [0, 1]
SPEC_TABLE = {
    0: (0.338, 0.929, 0.247),
    6: (0.388, 0.893, 0.322),
    12: (0.442, 0.846, 0.408),
    18: (0.500, 0.787, 0.500),
    24: (0.558, 0.719, 0.592),
    30: (0.612, 0.644, 0.678),
    36: (0.662, 0.567, 0.753),
}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _scipy_tn(mu, sigma=0.45, lo=0.0, hi=1.0):
    return st.truncnorm((lo - mu) / sigma, (hi - mu) / sigma, loc=mu, scale=sigma)


def _tn_tol(tn, scale: float = 1.0) -> float:
    """float64 error bound of a truncated-normal CDF or mean evaluated by two implementations (ours, scipy):
    (Phi(x) - Phi(lo)) / Z with Phi (ndtr) accurate to a few ulps, two subtractions and a division, on values
    of size ``scale`` -- ~8 u64 / Z per implementation, Z the truncated mass."""
    a, b = tn.args
    return 16 * U64 * scale / float(st.norm.cdf(b) - st.norm.cdf(a))


@pytest.fixture
def io(official_tiny):
    from safetensors.torch import load_file

    return load_file(str(official_tiny / "io.safetensors"))


# ----------------------------------------------------------------------------------------------------------
# Fixture parity
# ----------------------------------------------------------------------------------------------------------
def test_mu_schedule_matches_fixture(io):
    mw = MaskingWarmup(MaskingWarmupConfig.dream())
    mu_t = mw.mu(io["mw_est_idx"])
    # mu = min(e / 36, 1): one division, correctly rounded here and in the official code (values <= 1)
    torch.testing.assert_close(mu_t, io["mw_mu"], rtol=0, atol=U64)
    for e, ref in zip(io["mw_est_idx"].tolist(), io["mw_mu"].tolist()):
        assert mw.mu(e) == pytest.approx(ref, abs=U64)


@pytest.mark.parametrize("ratio_key,mask_key", [("mask_ratio", "mask"), ("gate_low_ratio", "gate_low_mask"),
                                                ("gate_high_ratio", "gate_high_mask")])
def test_mask_from_orders_matches_fixture(io, ratio_key, mask_key):
    orders = io["orders"]
    n = num_masked(float(io[ratio_key]), orders.shape[1])
    mask = mask_from_orders(orders, n)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, io[mask_key].bool())
    assert torch.equal(mask_by_order(n, orders), mask)


def test_num_masked_matches_fixture(io):
    n = num_masked(io["mw_ratio_seeded"], 16)
    assert torch.equal(n, io["mw_num_masked_seeded"])
    assert [num_masked(float(r), 16) for r in io["mw_ratio_seeded"]] == io["mw_num_masked_seeded"].tolist()


# ----------------------------------------------------------------------------------------------------------
# num_masked, orders, masks
# ----------------------------------------------------------------------------------------------------------
def test_num_masked_float_fuzz():
    assert num_masked(0.6, 16) == 10
    assert num_masked(0.5, 16) == 8
    assert num_masked(0.07, 100) == 7  # 7.000000000000001 in float
    assert num_masked(0.0, 256) == 0 and num_masked(1.0, 256) == 256
    assert num_masked(torch.tensor([0.6, 0.5, 0.07]), 16).tolist() == [10, 8, 2]


def test_num_masked_equals_ceil_for_random_ratios():
    r = torch.rand(5000, generator=_gen(1), dtype=torch.float64)
    for seq_len in (16, 256, 1024):
        expected = [math.ceil(seq_len * x) for x in r.tolist()]
        assert num_masked(r, seq_len).tolist() == expected
        assert [num_masked(x, seq_len) for x in r[:200].tolist()] == expected[:200]


def test_sample_orders_are_permutations_and_uniform():
    orders = sample_orders(4000, 8, generator=_gen(2))
    assert orders.shape == (4000, 8) and orders.dtype == torch.long
    assert torch.equal(orders.sort(dim=1).values, torch.arange(8).expand(4000, 8))
    # position of token 0 should be uniform over the 8 slots (chi-square test)
    pos = (orders == 0).float().argmax(dim=1)
    counts = torch.bincount(pos, minlength=8).numpy()
    assert st.chisquare(counts).pvalue > 1e-3
    assert not torch.equal(orders[0], orders[1]) or not torch.equal(orders[1], orders[2])


def test_sample_orders_generator_determinism():
    a = sample_orders(3, 16, generator=_gen(5))
    b = sample_orders(3, 16, generator=_gen(5))
    c = sample_orders(3, 16, generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mask_from_orders_per_row_counts_matches_loop():
    orders = sample_orders(6, 10, generator=_gen(3))
    n = torch.tensor([0, 1, 3, 5, 9, 10])
    mask = mask_from_orders(orders, n)
    ref = torch.zeros(6, 10, dtype=torch.bool)
    for b in range(6):
        for i in range(int(n[b])):
            ref[b, orders[b, i]] = True
    assert torch.equal(mask, ref)
    assert mask.sum(1).tolist() == n.tolist()


@pytest.mark.parametrize("bad", [torch.zeros(4), torch.zeros(2, 4)])
def test_mask_from_orders_rejects_bad_orders(bad):
    with pytest.raises(ValueError, match="orders"):
        mask_from_orders(bad, 1)


def test_mask_from_orders_rejects_bad_counts():
    orders = sample_orders(2, 4, generator=_gen(0))
    with pytest.raises(ValueError, match="num_masked"):
        mask_from_orders(orders, 5)
    with pytest.raises(ValueError, match="num_masked"):
        mask_from_orders(orders, torch.tensor([1, 2, 3]))


# ----------------------------------------------------------------------------------------------------------
# Distribution
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epoch", [0, 6, 18, 30, 36, 48])
def test_samples_match_scipy_truncnorm_ks(epoch):
    mw = MaskingWarmup()
    r = mw.sample(epoch, 20000, generator=_gen(epoch + 100))
    assert r.dtype == torch.float64 and r.shape == (20000,)
    assert float(r.min()) >= 0.0 and float(r.max()) <= 1.0
    ref = _scipy_tn(min(epoch / 36.0, 1.0))
    assert st.kstest(r.numpy(), ref.cdf).pvalue > 1e-3


@pytest.mark.parametrize("epoch", sorted(SPEC_TABLE))
def test_gate_probabilities_match_spec_table(epoch):
    mean, p_clip, p_diff = SPEC_TABLE[epoch]
    mw = MaskingWarmup()
    n = 50000
    r = mw.sample(epoch, n, generator=_gen(epoch))
    # exact helpers against the table (rounded to 3 decimals there)
    ex_clip, ex_diff, ex_mean = float(mw.cdf(0.75, epoch)), 1 - float(mw.cdf(0.5, epoch)), mw.mean(epoch)
    table = TABLE_ROUNDING + 64 * U64
    assert ex_clip == pytest.approx(p_clip, abs=table)
    assert ex_diff == pytest.approx(p_diff, abs=table)
    assert ex_mean == pytest.approx(mean, abs=table)
    # Monte Carlo estimates against the exact values, 5 standard errors
    assert float((r <= 0.75).double().mean()) == pytest.approx(ex_clip, abs=binomial_tol(ex_clip, n))
    assert float((r >= 0.5).double().mean()) == pytest.approx(ex_diff, abs=binomial_tol(ex_diff, n))
    std = math.sqrt(_scipy_tn(min(epoch / 36.0, 1.0)).var())
    assert float(r.mean()) == pytest.approx(ex_mean, abs=mean_tol(std, n))


@pytest.mark.parametrize("epoch", [0.0, 7.3, 22.0, 40.0])
def test_cdf_and_mean_match_scipy(epoch):
    mw = MaskingWarmup()
    ref = _scipy_tn(min(epoch / 36.0, 1.0))
    xs = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(mw.cdf(xs, epoch), torch.from_numpy(ref.cdf(xs.numpy())), rtol=0, atol=_tn_tol(ref))
    assert mw.mean(epoch) == pytest.approx(ref.mean(), abs=_tn_tol(ref, scale=1.0 + 0.45))


def test_fluid_preset_mean():
    mw = MaskingWarmup(MaskingWarmupConfig.fluid())
    r = mw.sample(10.0, 50000, generator=_gen(7))
    assert float(r.min()) >= 0.7 and float(r.max()) <= 1.0
    ref = _scipy_tn(1.0, 0.25, 0.7, 1.0)
    assert float(r.mean()) == pytest.approx(mw.mean(10.0), abs=mean_tol(math.sqrt(ref.var()), 50000))  # 5 SE
    assert mw.mean(0.0) == pytest.approx(ref.mean(), abs=_tn_tol(ref, scale=1.0 + 0.25))
    assert mw.mean(0.0) == pytest.approx(0.867, abs=TABLE_ROUNDING)                      # the preset's 0.867
    assert st.kstest(r.numpy(), _scipy_tn(1.0, 0.25, 0.7, 1.0).cdf).pvalue > 1e-3


def test_never_and_constant_presets():
    never = MaskingWarmup(MaskingWarmupConfig.never())
    for e in (0.0, 20.0, 100.0):
        assert torch.equal(never.sample(e, 100, generator=_gen(0)), torch.zeros(100, dtype=torch.float64))
    draw = never.draw_masks(5.0, 4, 16, generator=_gen(0))
    assert not draw.mask.any() and draw.num_masked.tolist() == [0] * 4
    const = MaskingWarmup(MaskingWarmupConfig.constant(0.6))
    assert const.sample(3.0, 10, generator=_gen(0)).tolist() == [0.6] * 10
    assert const.draw_masks(3.0, 2, 16, generator=_gen(0)).mask.sum(1).tolist() == [10, 10]
    with pytest.raises(ValueError):
        MaskingWarmupConfig.constant(1.5)


@pytest.mark.parametrize("a,b", [(8.0, 9.0), (-45.0, -40.0), (40.0, 45.0), (-3.0, 2.0), (1.0, 1.001)])
def test_truncated_normal_tails_match_scipy(a, b):
    x = truncated_normal(0.0, 1.0, a, b, (20000,), generator=_gen(11))
    assert float(x.min()) >= a and float(x.max()) <= b
    assert st.kstest(x.numpy(), st.truncnorm(a, b).cdf).pvalue > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Schedule options
# ----------------------------------------------------------------------------------------------------------
def test_progress_in_steps():
    mw = MaskingWarmup(MaskingWarmupConfig.dream(steps_per_epoch=100))
    assert mw.mu(step=1800) == pytest.approx(mw.mu(18.0), abs=2 * U64) == pytest.approx(0.5, abs=2 * U64)
    a = mw.sample(step=650, n=8, generator=_gen(1))
    b = mw.sample(6.5, 8, generator=_gen(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        MaskingWarmup().mu(step=10)
    with pytest.raises(ValueError, match="exactly one"):
        mw.mu(1.0, step=10)


def test_cosine_shape_and_warmup_window():
    cfg = MaskingWarmupConfig.dream(shape="cosine", warmup_start=4.0, warmup_end=12.0)
    mw = MaskingWarmup(cfg)
    # a few float64 roundings (a cosine accurate to an ulp, a subtraction, a halving) of values <= 1
    assert mw.mu(0.0) == 0.0 and mw.mu(4.0) == 0.0 and mw.mu(12.0) == pytest.approx(1.0, abs=4 * U64)
    assert mw.mu(8.0) == pytest.approx(0.5, abs=4 * U64)
    assert mw.mu(6.0) == pytest.approx((1 - math.cos(math.pi / 4)) / 2, abs=4 * U64)
    es = torch.linspace(0, 16, 101, dtype=torch.float64)
    assert bool((mw.mu(es).diff() >= 0).all())


def test_moving_bounds():
    cfg = MaskingWarmupConfig.dream(bounds="moving", bound_k=1.0)
    mw = MaskingWarmup(cfg)
    for e in (0.0, 18.0, 36.0):
        lo, hi = mw.bounds(e)
        mu = mw.mu(e)
        assert lo == pytest.approx(max(0.0, mu - 0.45), abs=2 * U64)
        assert hi == pytest.approx(min(1.0, mu + 0.45), abs=2 * U64)
        r = mw.sample(e, 20000, generator=_gen(3))
        assert float(r.min()) >= lo and float(r.max()) <= hi
        assert st.kstest(r.numpy(), _scipy_tn(mu, 0.45, lo, hi).cdf).pvalue > 1e-3


def test_generator_determinism():
    mw = MaskingWarmup()
    a = mw.sample(10.0, 64, generator=_gen(42))
    b = mw.sample(10.0, 64, generator=_gen(42))
    c = mw.sample(10.0, 64, generator=_gen(43))
    assert torch.equal(a, b) and not torch.equal(a, c)
    d1 = mw.draw_masks(10.0, 4, 32, generator=_gen(9))
    d2 = mw.draw_masks(10.0, 4, 32, generator=_gen(9))
    assert all(torch.equal(x, y) for x, y in zip(d1, d2))


def test_batch_vs_sample_granularity_shapes():
    g = _gen(0)
    per_batch = MaskingWarmup(MaskingWarmupConfig.dream())
    r = per_batch.ratios(18.0, 32, generator=g)
    assert r.shape == (32,) and bool((r == r[0]).all())
    draw = per_batch.draw_masks(18.0, 32, 64, generator=g)
    assert draw.mask.shape == (32, 64) and draw.orders.shape == (32, 64)
    assert len(set(draw.mask.sum(1).tolist())) == 1  # same visible count for every row (encoder reshape)
    per_sample = MaskingWarmup(MaskingWarmupConfig.dream(granularity="sample"))
    r = per_sample.ratios(18.0, 32, generator=g)
    assert r.shape == (32,) and len(set(r.tolist())) == 32
    draw = per_sample.draw_masks(18.0, 32, 64, generator=g)
    assert draw.mask.sum(1).tolist() == num_masked(draw.ratio, 64).tolist() == draw.num_masked.tolist()
    assert per_batch.sample(1.0, generator=g).shape == ()


def test_state_dict_round_trip():
    mw = MaskingWarmup(MaskingWarmupConfig.dream(granularity="sample", steps_per_epoch=10))
    mw.sample(3.5, 5, generator=_gen(0))
    state = json.loads(json.dumps(mw.state_dict()))
    other = MaskingWarmup(MaskingWarmupConfig.dream(granularity="sample", steps_per_epoch=10))
    other.load_state_dict(state)
    assert other.state_dict() == mw.state_dict()
    assert other.last_epoch == 3.5 and other.num_draws == 5
    fresh = MaskingWarmup()
    with pytest.raises(ValueError, match="mismatch"):
        fresh.load_state_dict(state)
    fresh.load_state_dict(state, strict=False)
    assert fresh.config == mw.config
    with pytest.raises(KeyError):
        fresh.load_state_dict({"config": state["config"]})


@pytest.mark.parametrize("kwargs", [dict(shape="square"), dict(bounds="wide"), dict(granularity="token"),
                                    dict(std=-0.1), dict(low=0.8, high=0.2), dict(warmup_start=5, warmup_end=1),
                                    dict(steps_per_epoch=0)])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        MaskingWarmupConfig(**kwargs)


def test_config_json_round_trip():
    for cfg in (MaskingWarmupConfig.dream(), MaskingWarmupConfig.fluid(), MaskingWarmupConfig.never()):
        assert MaskingWarmupConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        MaskingWarmupConfig.from_dict({"sigma": 0.4})
