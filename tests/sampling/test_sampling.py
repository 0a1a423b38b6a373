"""Tests of the MAR sampler, the fast diffusion-head sampler, SAD and best-of-K (dream.sampling).

References are independent of the fast path: a straightforward MAR loop written here from the spec
(dream_spec.md §7) on the model's public API and ``dream.diffusion.GaussianDiffusion.p_sample_loop`` /
``ddim_sample_loop`` with ``net.forward`` / ``net.forward_with_cfg`` (the generic, per-step
implementation), the spec's §8.3 table, and noise that depends only on (trajectory, step, call) for
the batched-vs-sequential SAD comparison.

Tolerances (see tests/tolerance.py): a fast path and its reference are two float32 evaluations of the same
math with different reduction orders, so they are compared by flash-attention's 2x rule against the same
math evaluated in float64 (a float64 copy of the model, float64 inputs, the same noise): the fast path's
error must be at most twice the reference's own float32 error plus the rounding of the float64 result.
Both errors scale with the same reduction lengths and epsilon, so no threshold depends on the CPU or thread
count. Paths that run the same ops in the same order are compared exactly.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import dream
from dream.diffusion import create_diffusion
from dream.sampling import (MARSampler, SamplerConfig, SemanticallyAlignedDecoding, TokenDiffusionSampler,
                            best_of_k, critic_scores, resolve_threshold, reveal_counts)
from dream.sampling.schedules import decoded_after
from tolerance import U, assert_2x, gemm_rel_tol, max_rel_err

STEPS = "10"


# -----------------------------------------------------------------------------------------------
# fixtures and helpers
# -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = dream.create_model("dream_test").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the zero-initialised adaLN / final layers would make the head output 0
        for name, p in m.diffloss.net.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def model64(model):
    """The same model in float64: the truth of the 2x-rule comparisons."""
    return copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def prompts(model):
    c = model.config
    g = torch.Generator().manual_seed(2)
    B = 3
    feats = torch.randn(B, c.text_max_len, c.text_embed_dim, generator=g)
    null = torch.randn(1, c.text_max_len, c.text_embed_dim, generator=g)
    ids = torch.randint(1, c.clip_vocab_size - 1, (B, c.clip_context_length), generator=g)
    ids[:, 5] = c.clip_vocab_size - 1                      # EOT = max id (pooled)
    return feats, null, ids


def score_floor(model) -> float:
    """Floor of the 2x rule for the critic scores: a few cosines per test (one per prompt and candidate), so the
    reference's largest error can be small by chance; allow one reduction's probabilistic float32 bound,
    c sqrt(n) u32 with n the model's longest reduction (the MLP hidden width, 256 for dream_test)."""
    c = model.config
    return gemm_rel_tol(torch.float32, int(max(c.encoder_embed_dim, c.decoder_embed_dim) * c.mlp_ratio))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_mar(model, feats, null, orders, *, num_iter, cfg, temperature, noise_fn, steps=STEPS):
    """MAR sampling written from the spec on the model's public API and the generic diffusion loop (in the
    model's dtype: pass a float64 model, features and noise for the float64 truth)."""
    c, net = model.config, model.diffloss.net
    B, L, C = feats.shape[0], c.seq_len, c.token_dim
    diff = create_diffusion(steps, c.noise_schedule, c.diffusion_steps)
    guided = cfg != 1.0
    tokens = torch.zeros(B, L, C, dtype=feats.dtype)
    mask = torch.ones(B, L, dtype=torch.bool)
    with torch.no_grad():
        y = model.forward_text_aligner(feats)
        y0 = model.forward_text_aligner(null.expand(B, -1, -1)) if guided else None
        for step in range(num_iter):
            remaining = int(mask[0].sum())
            n_next = int(np.floor(L * np.cos(np.pi / 2.0 * (step + 1) / num_iter)))
            n_next = max(1, min(remaining - 1, n_next))
            mask_next = torch.zeros(B, L, dtype=torch.bool).scatter(1, orders[:, :n_next], True)
            last = step == num_iter - 1
            to_pred = mask.clone() if last else mask & ~mask_next
            h = model.forward_encoder(tokens, mask)
            if guided:
                z = model.forward_decoder(torch.cat([h, h]), torch.cat([mask, mask]), torch.cat([y, y0]))
                z_sel = z[torch.cat([to_pred, to_pred])]
                w = 1 + (cfg - 1) * (L - n_next) / L
                fn = (lambda x, t, c, w=w: net.forward_with_cfg(x, t, c, w))
            else:
                z_sel = model.forward_decoder(h, mask, y)[to_pred]
                fn = net
            n = int(to_pred.sum())
            x = noise_fn((n, C))
            x = torch.cat([x, x]) if guided else x
            x = diff.p_sample_loop(fn, x, temperature=temperature, noise_fn=noise_fn, c=z_sel)[:n]
            tokens[to_pred] = x
            mask = torch.zeros_like(mask) if last else mask_next
    return tokens


def randn_fn(seed, dtype=torch.float32):
    """Replayable noise: float32 draws (cast to ``dtype``, so a float64 run sees the same values)."""
    g = gen(seed)
    return lambda shape: torch.randn(shape, generator=g).to(dtype)


# -----------------------------------------------------------------------------------------------
# fast diffusion-head sampler vs the generic loop
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,temperature", [(1.0, 1.0), (3.0, 1.0), (2.5, 0.6)])
def test_token_sampler_matches_generic_ddpm_loop(model, model64, cfg, temperature):
    net = model.diffloss.net
    C, n = model.config.token_dim, 5
    z = torch.randn(2 * n if cfg != 1.0 else n, model.config.decoder_embed_dim, generator=gen(3))
    fast = TokenDiffusionSampler(net, STEPS).sample(z, cfg=cfg, temperature=temperature, noise_fn=randn_fn(4))
    diff = create_diffusion(STEPS)

    def generic(net, dtype):
        noise = randn_fn(4, dtype)
        x = noise((n, C))
        with torch.no_grad():
            if cfg != 1.0:
                return diff.p_sample_loop(lambda x, t, c: net.forward_with_cfg(x, t, c, cfg), torch.cat([x, x]),
                                          temperature=temperature, noise_fn=noise, c=z.to(dtype))[:n]
            return diff.p_sample_loop(net, x, temperature=temperature, noise_fn=noise, c=z.to(dtype))

    assert fast.shape == (n, C) and fast.dtype == torch.float32
    # 2x rule: the generic loop in float32 is the reference, the generic loop in float64 the truth
    assert_2x(fast, generic(net, torch.float32), generic(model64.diffloss.net, torch.float64), "fast DDPM")


def test_token_sampler_ddim_matches_generic_loop_with_fewer_steps(model, model64):
    net, net64 = model.diffloss.net, model64.diffloss.net
    C, n = model.config.token_dim, 4
    s = TokenDiffusionSampler(net, "ddim5", method="ddim")
    assert s.num_steps == 5
    z = torch.randn(2 * n, model.config.decoder_embed_dim, generator=gen(5))
    fast = s.sample(z, cfg=2.0, noise_fn=randn_fn(6))
    x = randn_fn(6)((n, C))

    def generic(net, dtype):
        with torch.no_grad():
            return s.diffusion.ddim_sample_loop(lambda x, t, c: net.forward_with_cfg(x, t, c, 2.0),
                                                torch.cat([x, x]).to(dtype), c=z.to(dtype))[:n]

    assert torch.isfinite(fast).all()
    truth = generic(net64, torch.float64)
    # The generic loop computes its coefficients sqrt(abar), sqrt(1 - abar) in float32 even for float64 input
    # (as the official ddim_sample does), the fast path in float64: the two methods' float64 results differ by
    # those roundings, ~u32 relative per coefficient and step (S = 5 steps, c = 4). That difference is part of
    # what the fast path's error may contain on top of the 2x rule.
    method = max_rel_err(TokenDiffusionSampler(net64, "ddim5", method="ddim").sample(
        z.double(), cfg=2.0, noise_fn=randn_fn(6, torch.float64)), truth)
    assert method <= 4 * s.num_steps * U[torch.float32], method
    assert_2x(fast, generic(net, torch.float32), truth, "fast DDIM", floor=method)


def test_token_sampler_follows_weight_updates(model):
    import copy

    net = copy.deepcopy(model.diffloss.net)
    s = TokenDiffusionSampler(net, STEPS)
    z = torch.randn(6, model.config.decoder_embed_dim, generator=gen(7))
    a = s.sample(z, cfg=2.0, generator=gen(8))
    with torch.no_grad():
        net.res_blocks[0].adaLN_modulation[-1].weight.mul_(1.5)     # in place, as an optimiser step would
    b = s.sample(z, cfg=2.0, generator=gen(8))
    fresh = TokenDiffusionSampler(net, STEPS).sample(z, cfg=2.0, generator=gen(8))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, fresh, rtol=0, atol=0)


def test_loop_threads_option_restores_threads(model, model64):
    net = model.diffloss.net
    z = torch.randn(8, model.config.decoder_embed_dim, generator=gen(9))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = TokenDiffusionSampler(net, STEPS).sample(z, cfg=2.0, noise_fn=randn_fn(1))
        b = TokenDiffusionSampler(net, STEPS, loop_threads=1).sample(z, cfg=2.0, noise_fn=randn_fn(1))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    # another thread count is another reduction order: equal up to float32 rounding (2x rule, float64 truth)
    truth = TokenDiffusionSampler(model64.diffloss.net, STEPS).sample(z.double(), cfg=2.0,
                                                                      noise_fn=randn_fn(1, torch.float64))
    assert_2x(b, a, truth, "loop_threads=1 vs 2 threads")
    with pytest.raises(ValueError, match="loop_threads"):
        TokenDiffusionSampler(net, STEPS, loop_threads=0)


# -----------------------------------------------------------------------------------------------
# MAR sampling
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_masked", [16, 9, 2])
def test_decode_rows_equals_full_decoder(model, model64, n_masked):
    from dream.sampling.mar import decode_rows

    c = model.config
    B, L = 4, c.seq_len
    g = gen(90 + n_masked)
    tokens = torch.randn(B, L, c.token_dim, generator=g)
    orders = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    mask = torch.zeros(B, L, dtype=torch.bool).scatter(1, orders[:, :n_masked], True)
    rows = torch.zeros(B, L, dtype=torch.bool).scatter(1, orders[:, : min(2, n_masked)], True)
    feats = torch.randn(B, c.text_max_len, c.text_embed_dim, generator=g)
    y_pad = torch.zeros(B, c.text_max_len, dtype=torch.bool)
    y_pad[:, -2:] = True
    with torch.no_grad():
        y, y64 = model.forward_text_aligner(feats), model64.forward_text_aligner(feats.double())
        h, h64 = model.forward_encoder(tokens, mask), model64.forward_encoder(tokens.double(), mask)
        for pad in (None, y_pad):
            # 2x rule: the full decoder in float32 is the reference, the full decoder in float64 the truth
            assert_2x(decode_rows(model, h, mask, y, pad, rows), model.forward_decoder(h, mask, y, pad)[rows],
                      model64.forward_decoder(h64, mask, y64, pad)[rows], f"decode_rows (pad={pad is not None})")
        uneven = rows.clone()
        uneven[0, orders[0, -1]] = True                       # rows with different counts: full decoder
        torch.testing.assert_close(decode_rows(model, h, mask, y, None, uneven),
                                   model.forward_decoder(h, mask, y)[uneven], rtol=0, atol=0)


@pytest.mark.parametrize("cfg,temperature", [(1.0, 1.0), (3.0, 0.8)])
def test_mar_matches_reference_loop(model, model64, prompts, cfg, temperature):
    feats, null, _ = prompts
    L = model.config.seq_len
    orders = torch.stack([torch.randperm(L, generator=gen(10 + b)) for b in range(feats.shape[0])])
    s = MARSampler(model, SamplerConfig(num_iter=6, cfg=cfg, temperature=temperature, num_sampling_steps=STEPS))
    ours = s.sample(feats, null, orders=orders, noise_fn=randn_fn(11))
    ref = reference_mar(model, feats, null, orders, num_iter=6, cfg=cfg, temperature=temperature,
                        noise_fn=randn_fn(11))
    truth = reference_mar(model64, feats.double(), null.double(), orders, num_iter=6, cfg=cfg,
                          temperature=temperature, noise_fn=randn_fn(11, torch.float64))
    assert ours.shape == ref.shape == (feats.shape[0], L, model.config.token_dim)
    assert_2x(ours, ref, truth, "MAR sampler vs reference loop")


def test_cfg_scale_one_is_unguided(model, model64, prompts):
    """cfg = 1 ignores the null prompt and consumes the generator exactly like unguided sampling; and
    guidance with a null prompt equal to the prompt (uncond == cond) equals unguided sampling when the
    noise used by the conditional rows is the same."""
    feats, null, _ = prompts
    cfg1 = SamplerConfig(num_iter=5, cfg=1.0, num_sampling_steps=STEPS)
    a = MARSampler(model, cfg1).sample(feats, None, generator=gen(20))
    b = MARSampler(model, cfg1).sample(feats, null, generator=gen(20))
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    class RowNoise:  # call k returns the first rows of one fixed (2n_max, C) draw: cond rows agree
        def __init__(self, dtype=torch.float32):
            self.g, self.k, self.dtype = gen(21), 0, dtype

        def __call__(self, shape):
            self.k += 1
            base = torch.randn(64, shape[1], generator=self.g)
            return base[: shape[0]].to(self.dtype)

    L = model.config.seq_len
    orders = torch.stack([torch.randperm(L, generator=gen(30 + b)) for b in range(feats.shape[0])])
    plain = MARSampler(model, cfg1).sample(feats, orders=orders, noise_fn=RowNoise())
    guided = MARSampler(model, SamplerConfig(num_iter=5, cfg=4.0, num_sampling_steps=STEPS)).sample(
        feats, feats, orders=orders, noise_fn=RowNoise())
    # the guided batch is twice as large (another reduction order): 2x rule against the plain float64 run
    truth = MARSampler(model64, cfg1).sample(feats.double(), orders=orders, noise_fn=RowNoise(torch.float64))
    assert_2x(guided, plain, truth, "cfg with null = prompt vs unguided")


def test_seeds(model, prompts):
    feats, null, _ = prompts
    s = MARSampler(model, SamplerConfig(num_iter=4, cfg=3.0, num_sampling_steps=STEPS))
    a = s.sample(feats, null, generator=gen(1))
    b = s.sample(feats, null, generator=gen(1))
    c = s.sample(feats, null, generator=gen(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3          # another seed gives another sample (O(1) apart, not rounding)
    assert torch.isfinite(a).all()


def test_masks_shrink_and_everything_is_filled(model, prompts):
    feats, null, _ = prompts
    num_iter = 7
    s = MARSampler(model, SamplerConfig(num_iter=num_iter, cfg=2.0, num_sampling_steps=STEPS))
    st = s.init_state(feats, null, generator=gen(3))
    L = model.config.seq_len
    counts = reveal_counts(num_iter, L)
    left = L
    for step in range(num_iter):
        old_mask, old_tokens = st.mask.clone(), st.tokens.clone()
        s.step(st, step, generator=gen(100 + step))
        assert not (st.mask & ~old_mask).any(), "a revealed token was masked again"
        left -= counts[step]
        assert (st.mask.sum(1) == left).all()
        known = ~old_mask
        torch.testing.assert_close(st.tokens[known], old_tokens[known], rtol=0, atol=0)
        revealed = old_mask & ~st.mask
        assert (st.tokens[revealed] != 0).any(-1).all()
    assert not st.mask.any() and left == 0
    assert (st.tokens != 0).any(-1).all()


@pytest.mark.parametrize("precision", ["bf16", "caller"])
def test_bf16_autocast_end_to_end(model, model64, prompts, precision):
    feats, null, ids = prompts
    L = model.config.seq_len
    orders = torch.stack([torch.randperm(L, generator=gen(80 + b)) for b in range(feats.shape[0])])
    base = dict(num_iter=4, cfg=3.0, num_sampling_steps=STEPS)
    run = (lambda sc: MARSampler(model, sc).sample(feats, null, orders=orders, noise_fn=randn_fn(5)))
    ref = run(SamplerConfig(**base))
    if precision == "bf16":
        out = run(SamplerConfig(**base, precision="bf16"))
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(SamplerConfig(**base))
            sad = SemanticallyAlignedDecoding(model, SamplerConfig(**base), 2, 2).sample(
                feats, ids, null, generator=gen(5))
        assert sad.tokens.dtype == torch.float32 and sad.scores.dtype == torch.float32
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.equal(out, ref)          # it did run in bf16 ...
    # ... with no more than twice the bf16 error of the reference loop run under the same autocast (2x rule,
    # float64 truth; the error is ~1e-2 here, ~1e5 times the float32 run's)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref16 = reference_mar(model, feats, null, orders, num_iter=4, cfg=3.0, temperature=1.0, noise_fn=randn_fn(5))
    truth = reference_mar(model64, feats.double(), null.double(), orders, num_iter=4, cfg=3.0, temperature=1.0,
                          noise_fn=randn_fn(5, torch.float64))
    assert_2x(out, ref16.float(), truth, f"bf16 autocast ({precision})")


def test_fp32_precision_disables_caller_autocast(model, prompts):
    feats, null, _ = prompts
    cfg = SamplerConfig(num_iter=3, cfg=3.0, num_sampling_steps=STEPS, precision="fp32")
    ref = MARSampler(model, cfg).sample(feats, null, generator=gen(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MARSampler(model, cfg).sample(feats, null, generator=gen(6))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_ddim_option_runs_with_fewer_steps(model, prompts):
    feats, null, _ = prompts
    s = MARSampler(model, SamplerConfig(num_iter=4, cfg=3.0, num_sampling_steps="ddim5", diffusion_sampler="ddim"))
    assert s.token_sampler.num_steps == 5
    out = s.sample(feats, null, generator=gen(7))
    assert out.shape == (feats.shape[0], model.config.seq_len, model.config.token_dim)
    assert torch.isfinite(out).all()


# -----------------------------------------------------------------------------------------------
# SAD
# -----------------------------------------------------------------------------------------------
class TrajectoryNoise:
    """Diffusion noise that depends only on (trajectory, AR step, call within the step, row).

    Trajectories 0..K-1 are the candidates before tau, trajectory K the finished (selected) one. The
    batched sampler asks for all K candidates at once with rows candidate-major and the CFG halves
    [cond of all k; uncond of all k] (its documented layout); the sequential one asks per candidate,
    step-major. Both therefore see identical noise per trajectory, whatever order they draw it in."""

    def __init__(self, B, S, K, tau, guided, batched, seed=0):
        self.B, self.per, self.K, self.tau, self.guided, self.batched = B, 1 + S, K, tau, guided, batched
        self.seed, self.calls = seed, 0

    def entry(self, traj, step, j, shape):
        g = gen(self.seed * 1_000_003 + traj * 10_007 + step * 101 + j)
        return torch.randn(shape, generator=g)

    def __call__(self, shape):
        c, (rows, C) = self.calls, shape
        self.calls += 1
        before = self.tau * self.per * (1 if self.batched else self.K)
        if c >= before:                                      # after the selection: one trajectory
            c -= before
            out = self.entry(self.K, self.tau + c // self.per, c % self.per, shape)
        elif self.batched:
            step, j = divmod(c, self.per)
            parts = [self.entry(k, step, j, (rows // self.K, C)) for k in range(self.K)]
            if j == 0 or not self.guided:
                out = torch.cat(parts)
            else:
                half = rows // (2 * self.K)
                out = torch.cat([p[:half] for p in parts] + [p[half:] for p in parts])
        else:
            step, within = divmod(c, self.K * self.per)
            k, j = divmod(within, self.per)
            out = self.entry(k, step, j, shape)
        assert tuple(out.shape) == tuple(shape), (out.shape, shape)
        return out


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_batched_sad_equals_sequential(model, model64, prompts, cfg):
    feats, null, ids = prompts
    B, L, K, tau, num_iter = feats.shape[0], model.config.seq_len, 3, 3, 6
    sc = SamplerConfig(num_iter=num_iter, cfg=cfg, num_sampling_steps=STEPS)
    orders = torch.stack([torch.randperm(L, generator=gen(40 + b)) for b in range(B)])
    S = MARSampler(model, sc).token_sampler.num_steps
    res = {}
    for batched in (True, False):
        noise = TrajectoryNoise(B, S, K, tau, cfg != 1.0, batched, seed=9)
        sad = SemanticallyAlignedDecoding(model, sc, num_candidates=K, threshold=tau, batched=batched)
        res[batched] = sad.sample(feats, ids, null, orders=orders, noise_fn=noise)
        assert noise.calls == (tau * (K if not batched else 1) + num_iter - tau) * (1 + S)
    a, b = res[True], res[False]
    # the truth: the sequential (official) order in float64 (the noise is cast to the model's dtype)
    truth = SemanticallyAlignedDecoding(model64, sc, num_candidates=K, threshold=tau, batched=False).sample(
        feats.double(), ids, null.double(), orders=orders, noise_fn=TrajectoryNoise(B, S, K, tau, cfg != 1.0,
                                                                                    False, seed=9))
    assert a.scores.shape == (K, B) and a.tokens.shape == (B, L, model.config.token_dim)
    e_a, e_b = assert_2x(a.scores, b.scores, truth.scores, "batched SAD scores", floor=score_floor(model))
    # the selection is decided by more than rounding (so best must agree exactly): for every prompt the two
    # best candidates' true scores are further apart than both runs' score errors together
    top2 = truth.scores.topk(2, dim=0).values
    gap = float((top2[0] - top2[1]).min()) / float(truth.scores.abs().max())
    assert gap > 2 * (e_a + e_b), (gap, e_a, e_b)
    torch.testing.assert_close(a.best, b.best, rtol=0, atol=0)
    assert torch.equal(b.best, truth.best)
    assert_2x(a.tokens, b.tokens, truth.tokens, "batched SAD tokens")
    # the selection is the argmax of DREAM's own score of the partial candidates
    assert torch.equal(a.best, a.scores.argmax(0))


def test_sad_scores_are_the_critic_of_the_partial_candidates(model, model64, prompts):
    """Recompute the K partial candidates independently up to tau with the plain sampler: the scores
    are DREAM's critic of them, and each output continues its chosen candidate."""
    feats, null, ids = prompts
    B, L, K, tau = feats.shape[0], model.config.seq_len, 2, 2
    sc = SamplerConfig(num_iter=5, cfg=3.0, num_sampling_steps=STEPS)
    orders = torch.stack([torch.randperm(L, generator=gen(50 + b)) for b in range(B)])
    S = MARSampler(model, sc).token_sampler.num_steps
    out = SemanticallyAlignedDecoding(model, sc, K, tau, batched=False).sample(
        feats, ids, null, orders=orders, noise_fn=TrajectoryNoise(B, S, K, tau, True, False, seed=3))
    text = model.encode_text(ids)
    assert (out.best == 0).any() and (out.best == 1).any(), "pick a seed where both candidates win somewhere"
    for k in range(K):
        s = MARSampler(model, sc)
        noise = TrajectoryNoise(B, S, K, tau, True, False, seed=3)
        st = s.init_state(feats, null, orders=orders)
        for step in range(tau):                              # trajectory k only
            noise.calls = (step * K + k) * (1 + S)
            s.step(st, step, noise_fn=noise)
        assert int(st.mask[0].sum()) == L - decoded_after(tau, 5, L)
        with torch.no_grad():
            img = model.encode_image(st.tokens, st.mask)
            # the truth: the same cosine in float64 from the same (float32) partial tokens
            truth = (model64.encode_image(st.tokens.double(), st.mask) * model64.encode_text(ids)).sum(-1)
        ref = (img * text).sum(-1)
        # scores of all K candidates in one batch vs this candidate alone (another reduction order): 2x rule
        assert_2x(out.scores[k], ref, truth, f"SAD score of candidate {k}", floor=score_floor(model))
        assert_2x(critic_scores(model, st.tokens, st.mask, text), ref, truth, f"critic_scores, candidate {k}",
                  floor=score_floor(model))
        # the finished image continues the chosen candidate: its tokens decoded before tau are kept -- copied,
        # and computed by the same ops on the same batch as here, so exactly equal
        chosen = out.best == k
        known = ~st.mask[chosen]
        torch.testing.assert_close(out.tokens[chosen][known], st.tokens[chosen][known], rtol=0, atol=0)


def test_sad_single_candidate_equals_plain_sampling(model, prompts):
    feats, null, ids = prompts
    sc = SamplerConfig(num_iter=5, cfg=3.0, num_sampling_steps=STEPS)
    plain = MARSampler(model, sc).sample(feats, null, generator=gen(60))
    for batched in (True, False):
        out = SemanticallyAlignedDecoding(model, sc, 1, 2, batched=batched).sample(feats, ids, null, generator=gen(60))
        torch.testing.assert_close(out.tokens, plain, rtol=0, atol=0)
        assert (out.best == 0).all()


def test_sad_per_step_variant_shapes(model, model64, prompts):
    feats, null, ids = prompts
    B, L, C = feats.shape[0], model.config.seq_len, model.config.token_dim
    sad = SemanticallyAlignedDecoding(model, SamplerConfig(num_iter=5, cfg=3.0, num_sampling_steps=STEPS),
                                      num_candidates=3, threshold=2, variant="per-step")
    out = sad.sample(feats, ids, null, generator=gen(61))
    assert out.tokens.shape == (B, L, C) and out.scores.shape == (3, B) and out.best.shape == (B,)
    assert out.threshold == 2 and torch.isfinite(out.tokens).all() and (out.tokens != 0).any(-1).all()
    assert torch.equal(out.best, out.scores.argmax(0))
    # the last selection scored complete images: the chosen one's score is DREAM's score of the output
    ref = critic_scores(model, out.tokens, None, model.encode_text(ids))
    truth = critic_scores(model64, out.tokens.double(), None, model64.encode_text(ids))
    # scored in the K-candidate batch vs alone (another reduction order): 2x rule, float64 truth
    assert_2x(out.scores.max(0).values, ref, truth, "per-step SAD score of the output", floor=score_floor(model))


def test_best_of_k_with_external_scorer_picks_the_argmax(model, model64, prompts):
    feats, null, ids = prompts
    B, k = feats.shape[0], 4
    s = MARSampler(model, SamplerConfig(num_iter=3, cfg=3.0, num_sampling_steps=STEPS))
    scorer = (lambda toks: toks[:, :, 0].mean(1))           # any callable (K*B, L, C) -> (K*B,)
    out = best_of_k(s, feats, None, null, k=k, scorer=scorer, generator=gen(70))
    assert out.scores.shape == (k, B) and out.tokens.shape == (B,) + tuple(out.tokens.shape[1:])
    assert torch.equal(out.best, out.scores.argmax(0))
    torch.testing.assert_close(scorer(out.tokens), out.scores.max(0).values, rtol=0, atol=0)
    assert len(set(out.scores[:, 0].tolist())) == k         # the candidates are different decodes
    own = best_of_k(s, feats, ids, null, k=k, generator=gen(70))
    truth = critic_scores(model64, own.tokens.double(), None, model64.encode_text(ids))
    # scored in the K-candidate batch vs alone (another reduction order): 2x rule, float64 truth
    assert_2x(own.scores.max(0).values, critic_scores(model, own.tokens, None, model.encode_text(ids)), truth,
              "best-of-K score of the output", floor=score_floor(model))


def test_best_of_k_honours_text_padding_masks(model, prompts):
    feats, null, ids = prompts
    B, Lt = feats.shape[:2]
    pad = torch.zeros(B, Lt, dtype=torch.bool)
    pad[:, Lt // 2:] = True
    null_pad = torch.zeros(1, Lt, dtype=torch.bool)
    null_pad[:, 2:] = True
    s = MARSampler(model, SamplerConfig(num_iter=3, cfg=3.0, num_sampling_steps=STEPS))
    one = best_of_k(s, feats, ids, null, k=1, text_padding_mask=pad, null_padding_mask=null_pad, generator=gen(5))
    plain = s.sample(feats, null, text_padding_mask=pad, null_padding_mask=null_pad, generator=gen(5))
    torch.testing.assert_close(one.tokens, plain, rtol=0, atol=0)   # K = 1 is one plain decode, masks included
    unmasked = s.sample(feats, null, generator=gen(5))
    assert not torch.allclose(unmasked, plain)                     # the masks change the result


# -----------------------------------------------------------------------------------------------
# schedules and thresholds (dream_spec.md §7, §8.3)
# -----------------------------------------------------------------------------------------------
SPEC_TABLE = {8: 8, 16: 20, 20: 31, 21: 34, 24: 44, 28: 59, 29: 63, 30: 67, 32: 75, 48: 159}


def test_threshold_table_of_the_spec():
    counts = reveal_counts(64, 256)
    assert sum(counts) == 256
    assert counts[:13] == [1] * 13 and counts[13] > 1
    # independent: floor(256 cos(pi/2 (k+1)/64)) with the >= 1 reveal clamp, in numpy float64
    left, ref = 256, []
    for k in range(63):
        nxt = max(1, min(left - 1, int(np.floor(256 * np.cos(np.pi / 2 * (k + 1) / 64)))))
        ref.append(left - nxt)
        left = nxt
    assert counts == ref + [left]
    for tau, decoded in SPEC_TABLE.items():
        assert decoded_after(tau, 64, 256) == decoded
        assert resolve_threshold(decoded / 256, 64, 256) == tau       # the smallest tau reaching it
        assert resolve_threshold(tau, 64, 256) == tau
    assert resolve_threshold(0.125, 64, 256) == 21                     # 12.5 % of the tokens
    assert max(counts) == 7


def test_resolve_threshold_rejects_bad_values():
    for bad in (0, 64, -1, 1.5, 0.0, True):
        with pytest.raises((ValueError, TypeError)):
            resolve_threshold(bad, 64, 256)


# -----------------------------------------------------------------------------------------------
# bad input
# -----------------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors(model, prompts):
    feats, null, ids = prompts
    sc = SamplerConfig(num_iter=4, cfg=3.0, num_sampling_steps=STEPS)
    s = MARSampler(model, sc)
    with pytest.raises(ValueError, match="empty"):
        s.sample(feats[:0], null)
    with pytest.raises(ValueError, match="null prompt"):
        s.sample(feats, None)
    with pytest.raises(ValueError, match="text_feats"):
        s.sample(feats[0], null)
    with pytest.raises(ValueError, match="orders"):
        s.sample(feats, null, orders=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="DREAM"):
        MARSampler(torch.nn.Linear(2, 2), sc)
    with pytest.raises(ValueError, match="num_candidates"):
        SemanticallyAlignedDecoding(model, sc, num_candidates=0)
    for tau in (0, 4, 10):
        with pytest.raises(ValueError, match="threshold"):
            SemanticallyAlignedDecoding(model, sc, num_candidates=2, threshold=tau)
    with pytest.raises(ValueError, match="variant"):
        SemanticallyAlignedDecoding(model, sc, 2, 2, variant="greedy")
    with pytest.raises(ValueError, match="empty"):
        SemanticallyAlignedDecoding(model, sc, 2, 2).sample(feats[:0], ids[:0], null)
    with pytest.raises(ValueError, match="clip_ids"):
        SemanticallyAlignedDecoding(model, sc, 2, 2).sample(feats, ids[:1], null)
    with pytest.raises(ValueError, match="k must be"):
        best_of_k(s, feats, ids, null, k=0)
    with pytest.raises(ValueError, match="scorer"):
        best_of_k(s, feats, None, null, k=2)
    for bad in (dict(num_iter=0), dict(cfg_schedule="cosine"), dict(temperature=-1.0), dict(precision="int8"),
                dict(diffusion_sampler="euler")):
        with pytest.raises(ValueError):
            SamplerConfig(**bad)
    with pytest.raises(ValueError, match="compile"):
        TokenDiffusionSampler(model.diffloss.net, STEPS, compile="fast")
    with pytest.raises(TypeError, match="SimpleMLPAdaLN"):
        TokenDiffusionSampler(torch.nn.Linear(2, 2), STEPS)
    with pytest.raises(ValueError, match="even"):
        TokenDiffusionSampler(model.diffloss.net, STEPS).sample(torch.randn(3, 64), cfg=2.0)


# -----------------------------------------------------------------------------------------------
# torch.compile (slow: compilation takes ~0.5-1 min on 2 CPU cores)
# -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_step_matches_eager(model, model64):
    net = model.diffloss.net
    eager, comp = TokenDiffusionSampler(net, STEPS), TokenDiffusionSampler(net, STEPS, compile=True)
    for rows in (6, 10):                                       # a second shape exercises dynamic shapes
        z = torch.randn(rows, model.config.decoder_embed_dim, generator=gen(rows))
        a = eager.sample(z, cfg=3.0, temperature=0.9, noise_fn=randn_fn(1))
        b = comp.sample(z, cfg=3.0, temperature=0.9, noise_fn=randn_fn(1))
        # inductor fuses the step into other kernels (another rounding order): 2x rule, eager float64 truth
        truth = TokenDiffusionSampler(model64.diffloss.net, STEPS).sample(
            z.double(), cfg=3.0, temperature=0.9, noise_fn=randn_fn(1, torch.float64))
        assert_2x(b, a, truth, f"compiled step ({rows} rows)")
