"""Tests of the MAR sampler, the fast diffusion-head sampler, SAD and best-of-K (dream.sampling).

References are independent of the fast path: a straightforward MAR loop written here from the spec
(dream_spec.md §7) on the model's public API and ``dream.diffusion.GaussianDiffusion.p_sample_loop`` /
``ddim_sample_loop`` with ``net.forward`` / ``net.forward_with_cfg`` (the generic, per-step
implementation), the spec's §8.3 table, and noise that depends only on (trajectory, step, call) for
the batched-vs-sequential SAD comparison.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dream
from dream.diffusion import create_diffusion
from dream.sampling import (MARSampler, SamplerConfig, SemanticallyAlignedDecoding, TokenDiffusionSampler,
                            best_of_k, critic_scores, resolve_threshold, reveal_counts)
from dream.sampling.schedules import decoded_after

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
def prompts(model):
    c = model.config
    g = torch.Generator().manual_seed(2)
    B = 3
    feats = torch.randn(B, c.text_max_len, c.text_embed_dim, generator=g)
    null = torch.randn(1, c.text_max_len, c.text_embed_dim, generator=g)
    ids = torch.randint(1, c.clip_vocab_size - 1, (B, c.clip_context_length), generator=g)
    ids[:, 5] = c.clip_vocab_size - 1                      # EOT = max id (pooled)
    return feats, null, ids


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def reference_mar(model, feats, null, orders, *, num_iter, cfg, temperature, noise_fn, steps=STEPS):
    """MAR sampling written from the spec on the model's public API and the generic diffusion loop."""
    c, net = model.config, model.diffloss.net
    B, L, C = feats.shape[0], c.seq_len, c.token_dim
    diff = create_diffusion(steps, c.noise_schedule, c.diffusion_steps)
    guided = cfg != 1.0
    tokens = torch.zeros(B, L, C)
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


def randn_fn(seed):
    g = gen(seed)
    return lambda shape: torch.randn(shape, generator=g)


# -----------------------------------------------------------------------------------------------
# fast diffusion-head sampler vs the generic loop
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,temperature", [(1.0, 1.0), (3.0, 1.0), (2.5, 0.6)])
def test_token_sampler_matches_generic_ddpm_loop(model, cfg, temperature):
    net = model.diffloss.net
    C, n = model.config.token_dim, 5
    z = torch.randn(2 * n if cfg != 1.0 else n, model.config.decoder_embed_dim, generator=gen(3))
    fast = TokenDiffusionSampler(net, STEPS).sample(z, cfg=cfg, temperature=temperature, noise_fn=randn_fn(4))
    diff = create_diffusion(STEPS)
    noise = randn_fn(4)
    x = noise((n, C))
    with torch.no_grad():
        if cfg != 1.0:
            ref = diff.p_sample_loop(lambda x, t, c: net.forward_with_cfg(x, t, c, cfg), torch.cat([x, x]),
                                     temperature=temperature, noise_fn=noise, c=z)[:n]
        else:
            ref = diff.p_sample_loop(net, x, temperature=temperature, noise_fn=noise, c=z)
    assert fast.shape == (n, C) and fast.dtype == torch.float32
    assert rel_err(fast, ref) < 1e-5


def test_token_sampler_ddim_matches_generic_loop_with_fewer_steps(model):
    net = model.diffloss.net
    C, n = model.config.token_dim, 4
    s = TokenDiffusionSampler(net, "ddim5", method="ddim")
    assert s.num_steps == 5
    z = torch.randn(2 * n, model.config.decoder_embed_dim, generator=gen(5))
    fast = s.sample(z, cfg=2.0, noise_fn=randn_fn(6))
    x = randn_fn(6)((n, C))
    with torch.no_grad():
        ref = s.diffusion.ddim_sample_loop(lambda x, t, c: net.forward_with_cfg(x, t, c, 2.0), torch.cat([x, x]),
                                           c=z)[:n]
    assert torch.isfinite(fast).all()
    assert rel_err(fast, ref) < 1e-4


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


def test_loop_threads_option_restores_threads(model):
    net = model.diffloss.net
    z = torch.randn(8, model.config.decoder_embed_dim, generator=gen(9))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = TokenDiffusionSampler(net, STEPS).sample(z, cfg=2.0, generator=gen(1))
        b = TokenDiffusionSampler(net, STEPS, loop_threads=1).sample(z, cfg=2.0, generator=gen(1))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert rel_err(b, a) < 1e-5
    with pytest.raises(ValueError, match="loop_threads"):
        TokenDiffusionSampler(net, STEPS, loop_threads=0)


# -----------------------------------------------------------------------------------------------
# MAR sampling
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_masked", [16, 9, 2])
def test_decode_rows_equals_full_decoder(model, n_masked):
    from dream.sampling.mar import decode_rows

    c = model.config
    B, L = 4, c.seq_len
    g = gen(90 + n_masked)
    tokens = torch.randn(B, L, c.token_dim, generator=g)
    orders = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    mask = torch.zeros(B, L, dtype=torch.bool).scatter(1, orders[:, :n_masked], True)
    rows = torch.zeros(B, L, dtype=torch.bool).scatter(1, orders[:, : min(2, n_masked)], True)
    y = model.forward_text_aligner(torch.randn(B, c.text_max_len, c.text_embed_dim, generator=g))
    y_pad = torch.zeros(B, c.text_max_len, dtype=torch.bool)
    y_pad[:, -2:] = True
    with torch.no_grad():
        h = model.forward_encoder(tokens, mask)
        for pad in (None, y_pad):
            ref = model.forward_decoder(h, mask, y, pad)[rows]
            torch.testing.assert_close(decode_rows(model, h, mask, y, pad, rows), ref, rtol=1e-5, atol=1e-5)
        uneven = rows.clone()
        uneven[0, orders[0, -1]] = True                       # rows with different counts: full decoder
        torch.testing.assert_close(decode_rows(model, h, mask, y, None, uneven),
                                   model.forward_decoder(h, mask, y)[uneven], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg,temperature", [(1.0, 1.0), (3.0, 0.8)])
def test_mar_matches_reference_loop(model, prompts, cfg, temperature):
    feats, null, _ = prompts
    L = model.config.seq_len
    orders = torch.stack([torch.randperm(L, generator=gen(10 + b)) for b in range(feats.shape[0])])
    s = MARSampler(model, SamplerConfig(num_iter=6, cfg=cfg, temperature=temperature, num_sampling_steps=STEPS))
    ours = s.sample(feats, null, orders=orders, noise_fn=randn_fn(11))
    ref = reference_mar(model, feats, null, orders, num_iter=6, cfg=cfg, temperature=temperature,
                        noise_fn=randn_fn(11))
    assert ours.shape == ref.shape == (feats.shape[0], L, model.config.token_dim)
    assert rel_err(ours, ref) < 1e-4


def test_cfg_scale_one_is_unguided(model, prompts):
    """cfg = 1 ignores the null prompt and consumes the generator exactly like unguided sampling; and
    guidance with a null prompt equal to the prompt (uncond == cond) equals unguided sampling when the
    noise used by the conditional rows is the same."""
    feats, null, _ = prompts
    cfg1 = SamplerConfig(num_iter=5, cfg=1.0, num_sampling_steps=STEPS)
    a = MARSampler(model, cfg1).sample(feats, None, generator=gen(20))
    b = MARSampler(model, cfg1).sample(feats, null, generator=gen(20))
    torch.testing.assert_close(a, b, rtol=0, atol=0)

    class RowNoise:  # call k returns the first rows of one fixed (2n_max, C) draw: cond rows agree
        def __init__(self):
            self.g, self.k = gen(21), 0

        def __call__(self, shape):
            self.k += 1
            base = torch.randn(64, shape[1], generator=self.g)
            return base[: shape[0]]

    L = model.config.seq_len
    orders = torch.stack([torch.randperm(L, generator=gen(30 + b)) for b in range(feats.shape[0])])
    plain = MARSampler(model, cfg1).sample(feats, orders=orders, noise_fn=RowNoise())
    guided = MARSampler(model, SamplerConfig(num_iter=5, cfg=4.0, num_sampling_steps=STEPS)).sample(
        feats, feats, orders=orders, noise_fn=RowNoise())
    assert rel_err(guided, plain) < 1e-5


def test_seeds(model, prompts):
    feats, null, _ = prompts
    s = MARSampler(model, SamplerConfig(num_iter=4, cfg=3.0, num_sampling_steps=STEPS))
    a = s.sample(feats, null, generator=gen(1))
    b = s.sample(feats, null, generator=gen(1))
    c = s.sample(feats, null, generator=gen(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-3
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
def test_bf16_autocast_end_to_end(model, prompts, precision):
    feats, null, ids = prompts
    base = dict(num_iter=4, cfg=3.0, num_sampling_steps=STEPS)
    ref = MARSampler(model, SamplerConfig(**base)).sample(feats, null, generator=gen(5))
    if precision == "bf16":
        out = MARSampler(model, SamplerConfig(**base, precision="bf16")).sample(feats, null, generator=gen(5))
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = MARSampler(model, SamplerConfig(**base)).sample(feats, null, generator=gen(5))
            sad = SemanticallyAlignedDecoding(model, SamplerConfig(**base), 2, 2).sample(
                feats, ids, null, generator=gen(5))
        assert sad.tokens.dtype == torch.float32 and sad.scores.dtype == torch.float32
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.equal(out, ref)          # it did run in bf16 ...
    assert rel_err(out, ref) < 0.1            # ... and stays close to the fp32 samples (same noise)


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
def test_batched_sad_equals_sequential(model, prompts, cfg):
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
    assert a.scores.shape == (K, B) and a.tokens.shape == (B, L, model.config.token_dim)
    assert (a.scores.max(0).values - a.scores.min(0).values).min() > 1e-6   # candidates really differ
    torch.testing.assert_close(a.best, b.best, rtol=0, atol=0)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert rel_err(a.tokens, b.tokens) < 1e-5
    # the selection is the argmax of DREAM's own score of the partial candidates
    assert torch.equal(a.best, a.scores.argmax(0))


def test_sad_scores_are_the_critic_of_the_partial_candidates(model, prompts):
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
        ref = (img * text).sum(-1)
        torch.testing.assert_close(out.scores[k], ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(critic_scores(model, st.tokens, st.mask, text), ref, rtol=1e-5, atol=1e-6)
        # the finished image continues the chosen candidate: its tokens decoded before tau are kept
        chosen = out.best == k
        known = ~st.mask[chosen]
        torch.testing.assert_close(out.tokens[chosen][known], st.tokens[chosen][known], rtol=1e-5, atol=1e-5)


def test_sad_single_candidate_equals_plain_sampling(model, prompts):
    feats, null, ids = prompts
    sc = SamplerConfig(num_iter=5, cfg=3.0, num_sampling_steps=STEPS)
    plain = MARSampler(model, sc).sample(feats, null, generator=gen(60))
    for batched in (True, False):
        out = SemanticallyAlignedDecoding(model, sc, 1, 2, batched=batched).sample(feats, ids, null, generator=gen(60))
        torch.testing.assert_close(out.tokens, plain, rtol=0, atol=0)
        assert (out.best == 0).all()


def test_sad_per_step_variant_shapes(model, prompts):
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
    torch.testing.assert_close(out.scores.max(0).values, ref, rtol=1e-5, atol=1e-6)


def test_best_of_k_with_external_scorer_picks_the_argmax(model, prompts):
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
    torch.testing.assert_close(critic_scores(model, own.tokens, None, model.encode_text(ids)),
                               own.scores.max(0).values, rtol=1e-5, atol=1e-6)


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
def test_compiled_step_matches_eager(model):
    net = model.diffloss.net
    eager, comp = TokenDiffusionSampler(net, STEPS), TokenDiffusionSampler(net, STEPS, compile=True)
    for rows in (6, 10):                                       # a second shape exercises dynamic shapes
        z = torch.randn(rows, model.config.decoder_embed_dim, generator=gen(rows))
        a = eager.sample(z, cfg=3.0, temperature=0.9, generator=gen(1))
        b = comp.sample(z, cfg=3.0, temperature=0.9, generator=gen(1))
        assert rel_err(b, a) < 1e-5
