"""Tests of the fast-sampling options of :mod:`dream.sampling` and their switches.

Exact technique (``reuse_text_kv``): the same samples as the default sampler for the same seed, up to float
rounding (the method computes the same function; every noise draw is the same). Approximate techniques
(``cfg_refresh``, ``token_refresh`` / ``token_ratio``, ``cfg_until``, the few-step head solvers): checked where they
must agree with the default (the refresh step itself, ratio 1, an interval covering every step, the solver's
first-order part and its many-step limit), and that every option combines with the others, with SAD (both
variants), best-of-K, the linear CFG schedule, padding masks, bf16 autocast and wrapped (LoRA-style) Linear layers.
Their quality cost is measured, not tested: ``benchmarks/bench_fast_sampling.py``.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import dream
from dream.models.layers import TokenCache, run_blocks
from dream.sampling import (FAST_AR_SCALE, FAST_PRESET, MARSampler, SamplerConfig, SemanticallyAlignedDecoding,
                            TokenDiffusionSampler, best_of_k, fast_config)

BASE = SamplerConfig(num_iter=4, cfg=3.0, num_sampling_steps="10", clip_denoised=5.0)


@pytest.fixture(scope="module")
def model():
    """dream_test with every parameter perturbed: the zero-initialised adaLN / final layers would make the head
    ignore its condition, and the text would not move the decoder."""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    torch.manual_seed(0)
    m = dream.create_model("dream_test").eval()
    with torch.no_grad():
        flat = parameters_to_vector(m.parameters())
        vector_to_parameters(flat + 0.05 * torch.randn(flat.shape, generator=gen(1)), m.parameters())
    return m


@pytest.fixture(scope="module")
def prompts(model):
    c = model.config
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(3, c.text_max_len, c.text_embed_dim, generator=g)
    null = torch.randn(1, c.text_max_len, c.text_embed_dim, generator=g)
    ids = torch.randint(1, c.clip_vocab_size - 1, (3, c.clip_context_length), generator=g)
    ids[:, 5] = c.clip_vocab_size - 1
    pad = torch.zeros(3, c.text_max_len, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, 3:] = True
    return feats, null, ids, pad


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def sample(model, sc, prompts, seed=5, padded=True):
    feats, null, _, pad = prompts
    kw = dict(text_padding_mask=pad, null_padding_mask=pad[:1]) if padded else {}
    return MARSampler(model, sc).sample(feats, null if sc.cfg != 1.0 else None, generator=gen(seed), **kw)


# -----------------------------------------------------------------------------------------------
# configuration
# -----------------------------------------------------------------------------------------------
def test_defaults_are_the_default_sampler_and_fast_config_applies_the_preset():
    sc = SamplerConfig()
    assert (sc.reuse_text_kv, sc.cfg_refresh, sc.token_refresh, sc.cfg_until, sc.diffusion_sampler) == \
        (False, 1, 1, 1.0, "ddpm")
    f = fast_config(BASE.replace(num_iter=16))
    for k, v in FAST_PRESET.items():
        assert getattr(f, k) == v
    assert (f.num_iter, f.cfg, f.clip_denoised) == (math.ceil(16 * FAST_AR_SCALE), BASE.cfg, BASE.clip_denoised)
    assert fast_config(BASE, num_sampling_steps="7", num_iter=3).num_sampling_steps == "7"
    assert fast_config(BASE, num_iter=3).num_iter == 3 and fast_config(BASE.replace(num_iter=1)).num_iter == 1
    for bad in (dict(cfg_refresh=0), dict(token_refresh=0), dict(token_ratio=1.5), dict(cfg_until=-0.1),
                dict(diffusion_sampler="euler")):
        with pytest.raises(ValueError):
            SamplerConfig(**bad)


# -----------------------------------------------------------------------------------------------
# exact: the decoder's text keys / values projected once
# -----------------------------------------------------------------------------------------------
def test_decoder_text_kv_is_what_the_decoder_computes(model):
    c = model.config
    g = gen(3)
    tokens = torch.randn(2, c.seq_len, c.token_dim, generator=g)
    mask = torch.zeros(2, c.seq_len, dtype=torch.bool)
    mask[:, ::3] = True
    y = model.forward_text_aligner(torch.randn(2, c.text_max_len, c.text_embed_dim, generator=g))
    pad = torch.zeros(2, c.text_max_len, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        h = model.forward_encoder(tokens, mask)
        kv = model.decoder_text_kv(y)
        ref = model.forward_decoder(h, mask, y, pad)
        assert rel_err(model.forward_decoder(h, mask, None, pad, y_kv=kv), ref) < 1e-6
        rows = torch.tensor([[0, 3], [3, 6]])
        assert rel_err(model.forward_decoder(h, mask, None, pad, rows=rows, y_kv=kv),
                       model.forward_decoder(h, mask, y, pad, rows=rows)) < 1e-6


@pytest.mark.parametrize("cfg,schedule,padded", [(3.0, "linear", True), (3.0, "linear", False),
                                                 (2.0, "constant", True), (1.0, "linear", True)])
def test_reuse_text_kv_gives_the_default_samples(model, prompts, cfg, schedule, padded):
    sc = BASE.replace(cfg=cfg, cfg_schedule=schedule)
    ref = sample(model, sc, prompts, padded=padded)
    out = sample(model, sc.replace(reuse_text_kv=True), prompts, padded=padded)
    assert rel_err(out, ref) < 1e-5


def test_reuse_text_kv_aligns_a_shared_null_prompt_once(model, prompts):
    feats, null, _, pad = prompts
    B = feats.shape[0]
    seen = []
    orig = model.forward_text_aligner
    model.forward_text_aligner = lambda x, p=None: seen.append(x.shape[0]) or orig(x, p)
    try:
        s = MARSampler(model, BASE.replace(reuse_text_kv=True))
        st = s.init_state(feats, null.expand(B, -1, -1), text_padding_mask=pad,
                          null_padding_mask=pad[:1].expand(B, -1), generator=gen(0))
    finally:
        del model.forward_text_aligner
    assert seen == [B, 1]                                    # the expanded null prompt is one prompt
    assert st.y_null.shape[0] == B and st.kv_null[0][0].shape[0] == B
    ref = MARSampler(model, BASE).sample(feats, null.expand(B, -1, -1), text_padding_mask=pad,
                                         null_padding_mask=pad[:1].expand(B, -1), generator=gen(4))
    out = MARSampler(model, BASE.replace(reuse_text_kv=True)).sample(
        feats, null.expand(B, -1, -1), text_padding_mask=pad, null_padding_mask=pad[:1].expand(B, -1),
        generator=gen(4))
    assert rel_err(out, ref) < 1e-5


def test_reuse_text_kv_with_sad_and_best_of_k(model, prompts):
    feats, null, ids, _ = prompts
    for variant in ("once", "per-step"):
        ref = SemanticallyAlignedDecoding(model, BASE, 3, 2, variant=variant).sample(feats, ids, null, generator=gen(7))
        out = SemanticallyAlignedDecoding(model, BASE.replace(reuse_text_kv=True), 3, 2, variant=variant).sample(
            feats, ids, null, generator=gen(7))
        assert torch.equal(out.best, ref.best) and rel_err(out.tokens, ref.tokens) < 1e-5
    ref = best_of_k(MARSampler(model, BASE), feats, ids, null, k=2, generator=gen(8))
    out = best_of_k(MARSampler(model, BASE.replace(reuse_text_kv=True)), feats, ids, null, k=2, generator=gen(8))
    assert torch.equal(out.best, ref.best) and rel_err(out.tokens, ref.tokens) < 1e-5


# -----------------------------------------------------------------------------------------------
# approximate techniques: where they must agree with the default
# -----------------------------------------------------------------------------------------------
def test_block_rows_is_the_full_block_at_those_rows(model):
    blk = model.encoder_blocks[0]
    g = gen(4)
    x = torch.randn(2, 9, model.config.encoder_embed_dim, generator=g)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 7:] = True
    rows = torch.tensor([[1, 4, 8], [0, 2, 5]])
    with torch.no_grad():
        full = blk(x, key_padding_mask=pad)
        part = blk(x, key_padding_mask=pad, rows=rows)
    assert rel_err(part, torch.gather(full, 1, rows[..., None].expand(-1, -1, x.shape[-1]))) < 1e-6


def test_token_cache_refresh_and_full_ratio_are_the_plain_stack(model):
    blocks = model.encoder_blocks
    g = gen(5)
    x = torch.randn(2, 9, model.config.encoder_embed_dim, generator=g)
    cache = TokenCache(full_blocks=1, ratio=1.0)
    with torch.no_grad():
        ref = run_blocks(blocks, x)
        assert rel_err(cache.run(blocks, x, refresh=True), ref) < 1e-6
        assert len(cache.states) == len(blocks)               # inputs of blocks 1.. and the output
        x2 = x + 0.1 * torch.randn(x.shape, generator=g)
        must = torch.zeros(2, 9, dtype=torch.bool)
        must[:, 3] = True
        assert rel_err(cache.run(blocks, x2, must=must), run_blocks(blocks, x2)) < 1e-5   # ratio 1: every row
        part = TokenCache(full_blocks=1, ratio=0.0)
        part.run(blocks, x, refresh=True)
        out = part.run(blocks, x2, must=must)
        assert rel_err(out[:, 3], run_blocks(blocks, x2)[:, 3]) > 1e-4      # row 3 saw stale keys: approximate
        assert torch.equal(out[:, 0], part.states[-1][:, 0])                # untouched rows keep the cache


def test_token_cache_with_every_token_recomputed_is_the_default(model, prompts):
    ref = sample(model, BASE, prompts)
    for kw in (dict(token_refresh=3, token_ratio=1.0), dict(token_refresh=2, token_ratio=1.0, token_full_blocks=0),
               dict(token_refresh=2, token_ratio=1.0, reuse_text_kv=True)):
        assert rel_err(sample(model, BASE.replace(**kw), prompts), ref) < 1e-4, kw
    approx = sample(model, BASE.replace(token_refresh=3, token_ratio=0.0), prompts)
    assert rel_err(approx, ref) > 1e-3                      # a real approximation


def step_once(model, sc, prompts, seed=5):
    feats, null, _, pad = prompts
    s = MARSampler(model, sc)
    st = s.init_state(feats, null, text_padding_mask=pad, null_padding_mask=pad[:1], generator=gen(seed))
    s.step(st, 0, generator=gen(seed + 1))
    return st


@pytest.mark.parametrize("kw", [dict(cfg_refresh=3), dict(cfg_refresh=3, token_refresh=3),
                                dict(cfg_refresh=2, reuse_text_kv=True)])
def test_condition_cache_refresh_step_is_exact(model, prompts, kw):
    """The first step of a condition cache computes both halves: the same tokens as the default sampler, and the
    cached residual is the exact z_uncond - z_cond of the positions the next steps reveal."""
    ref = step_once(model, BASE, prompts)
    st = step_once(model, BASE.replace(**kw), prompts)
    assert torch.equal(st.mask, ref.mask) and rel_err(st.tokens, ref.tokens) < 1e-4
    assert st.cfg_residual is not None and st.cfg_residual.abs().sum() > 0
    approx = sample(model, BASE.replace(**kw), prompts)
    assert rel_err(approx, sample(model, BASE, prompts)) > 1e-4   # later steps reuse the cache: approximate


def test_cfg_until_interval(model, prompts):
    ref = sample(model, BASE, prompts)
    assert torch.equal(sample(model, BASE.replace(cfg_until=1.0), prompts), ref)
    unguided = sample(model, BASE.replace(cfg=1.0), prompts)          # no step guided = cfg 1, same draws
    assert rel_err(sample(model, BASE.replace(cfg_until=0.0), prompts), unguided) < 1e-5
    s = MARSampler(model, BASE.replace(cfg_until=0.5))
    assert [s.guided_at(i) for i in range(4)] == [True, True, False, False]
    out = sample(model, BASE.replace(cfg_until=0.5), prompts)
    assert rel_err(out, ref) > 1e-4 and bool(torch.isfinite(out).all())


def test_dpm_solver_coefficients_and_convergence(model):
    """SDE-DPM-Solver++'s first-order part is DDPM's posterior with the small variance (beta tilde): check the
    coefficients against the diffusion's own tables; DPM-Solver++(2M) solves the same ODE as DDIM (eta 0), so with
    many steps both reach the same samples from the same initial noise."""
    net = model.diffloss.net
    sde = TokenDiffusionSampler(net, "10", method="dpm++2m-sde")
    d = sde.diffusion
    for i in range(1, d.num_timesteps):
        _, _, a_x, a_d, _, s_z = sde._coefs[i]
        assert math.isclose(a_x, float(d.posterior_mean_coef2[i]), rel_tol=1e-9)
        assert math.isclose(a_d, float(d.posterior_mean_coef1[i]), rel_tol=1e-9)
        assert math.isclose(s_z ** 2, float(d.posterior_variance[i]), rel_tol=1e-9)
    z = torch.randn(16, model.config.decoder_embed_dim, generator=gen(6))

    def run(method, steps):
        ts = TokenDiffusionSampler(net, steps, method=method, clip_denoised=5.0)
        return ts.sample(torch.cat([z, z.flip(0)]), cfg=2.0, generator=gen(9))

    rms = (lambda a, b: float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()))     # noqa: E731
    ref = run("ddim", "400")
    assert rms(run("dpm++2m", "400"), ref) < 2e-2
    assert rms(run("dpm++2m", "400"), ref) < rms(run("dpm++2m", "10"), ref) / 3
    for m in ("dpm++2m", "dpm++2m-sde"):
        x = run(m, "10")
        assert x.shape == (16, net.in_channels) and bool(torch.isfinite(x).all()) and float(x.abs().max()) <= 5.0001


# -----------------------------------------------------------------------------------------------
# every option combines
# -----------------------------------------------------------------------------------------------
ALL = dict(reuse_text_kv=True, cfg_refresh=2, token_refresh=3, token_ratio=0.5, cfg_until=0.75,
           diffusion_sampler="dpm++2m-sde")


@pytest.mark.parametrize("kw", [FAST_PRESET, ALL, dict(ALL, cfg_schedule="constant", cfg=2.0),
                                dict(ALL, cfg=1.0), dict(ALL, precision="bf16")])
def test_options_combine_with_sad_best_of_k_and_schedules(model, prompts, kw):
    feats, null, ids, pad = prompts
    sc = BASE.replace(**kw)
    a, b = sample(model, sc, prompts, seed=11), sample(model, sc, prompts, seed=11)
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())            # seeded: reproducible
    for variant in ("once", "per-step"):
        out = SemanticallyAlignedDecoding(model, sc, 3, 2, variant=variant).sample(
            feats, ids, null, text_padding_mask=pad, null_padding_mask=pad[:1], generator=gen(12))
        assert out.tokens.shape == a.shape and bool(torch.isfinite(out.tokens).all())
    out = best_of_k(MARSampler(model, sc), feats, ids, null, k=2, generator=gen(13))
    assert out.tokens.shape == a.shape


class LowRankLinear(nn.Module):
    """A LoRA-style wrapper: base Linear plus a low-rank delta (what an adapter library injects)."""

    def __init__(self, base: nn.Linear, rank: int, g: torch.Generator):
        super().__init__()
        self.base, self.in_features, self.out_features = base, base.in_features, base.out_features
        self.down = nn.Parameter(0.1 * torch.randn(rank, base.in_features, generator=g))
        self.up = nn.Parameter(0.1 * torch.randn(base.out_features, rank, generator=g))

    @property
    def weight(self):                    # the base layer's, as peft's LoRA layers expose it
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return self.base(x) + x @ self.down.T @ self.up.T

    def merged(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features)
        with torch.no_grad():
            lin.weight.copy_(self.base.weight + self.up @ self.down)
            lin.bias.copy_(self.base.bias)
        return lin


def _swap(root: nn.Module, kind: type, fn, prefixes=("diffloss", "decoder_blocks")):
    for pname, parent in list(root.named_modules()):
        if pname.startswith(prefixes) and not isinstance(parent, LowRankLinear):
            for cname, child in list(parent.named_children()):
                if type(child) is kind:
                    setattr(parent, cname, fn(child))


@torch.no_grad()
def test_fast_options_see_wrapped_linear_layers(model, prompts):
    """A model whose diffusion MLP and decoder Linears carry a low-rank delta computes, with every fast option on,
    what the same model with the delta merged into plain Linears computes: the decoder's conditions at a refresh
    step and at a cached step (cached text keys / values, token and condition caches), and the fused head's
    samples. (Whole sampled images are not compared: this random test model amplifies float rounding chaotically
    over the steps, by orders of magnitude more than any of these.)"""
    import copy

    feats, null, _, pad = prompts
    g = gen(14)
    wrapped = copy.deepcopy(model)
    _swap(wrapped, nn.Linear, lambda lin: LowRankLinear(lin, 2, g))
    merged = copy.deepcopy(wrapped)
    _swap(merged, LowRankLinear, lambda w: w.merged())
    sc = BASE.replace(**dict(ALL, cfg_until=1.0))
    zs, xs = [], []
    states = []
    for m in (wrapped, merged, model):
        s = MARSampler(m, sc)
        st = s.init_state(feats, null, text_padding_mask=pad, null_padding_mask=pad[:1], generator=gen(3))
        z0 = s.condition(st, 0)[0]
        states.append((s, st, z0))
    s0, st0, _ = states[0]
    s0.step(st0, 0, generator=gen(4))                         # one state of tokens for all three models
    for s, st, z0 in states:
        if st is not st0:
            s.condition(st, 0)                                # fill this model's own caches at step 0
            st.tokens, st.mask, st.revealed = st0.tokens, st0.mask, st0.revealed
        z1 = s.condition(st, 1)[0]
        zs.append((z0, z1))
        xs.append(s.token_sampler.sample(z1, cfg=2.0, generator=gen(5)))
    for k in range(2):
        assert rel_err(zs[0][k], zs[1][k]) < 1e-5 and rel_err(zs[2][k], zs[1][k]) > 1e-3    # the delta matters
    assert rel_err(xs[0], xs[1]) < 1e-3 and rel_err(xs[2], xs[1]) > 1e-2


def test_decode_state_select_and_repeat_carry_the_caches(model, prompts):
    feats, null, _, pad = prompts
    s = MARSampler(model, BASE.replace(reuse_text_kv=True, cfg_refresh=2, token_refresh=2))
    st = s.init_state(feats, null, text_padding_mask=pad, null_padding_mask=pad[:1], generator=gen(0))
    s.step(st, 0, generator=gen(1))
    rep = st.repeat(2)
    assert rep.kv[0][0].shape[0] == 6 and rep.cfg_residual.shape[0] == 6 and rep.enc_cache.states[0].shape[0] == 6
    sel = rep.select(torch.tensor([4, 0, 2]))
    assert torch.equal(sel.cfg_residual[0], st.cfg_residual[1]) and torch.equal(sel.revealed[0], st.revealed[1])
    assert torch.equal(sel.dec_cache.states[0][0], st.dec_cache.states[0][1])
    s.run(sel, 1, generator=gen(2))
    assert not bool(sel.mask.any())


# -----------------------------------------------------------------------------------------------
# switches: pipeline and CLI
# -----------------------------------------------------------------------------------------------
def test_pipeline_fast_switch():
    from dream.pipeline import DreamPipeline

    pipe = DreamPipeline.from_pretrained("dream_tiny.shapes")
    plain = pipe.sampler_config()
    fast = pipe.sampler_config(fast=True)
    assert fast == fast_config(plain) and plain.cfg_refresh == 1 and not plain.reuse_text_kv
    assert fast.num_iter < plain.num_iter
    explicit = pipe.sampler_config(fast=True, num_sampling_steps="20", num_iter=16)
    assert (explicit.num_sampling_steps, explicit.num_iter, explicit.reuse_text_kv) == ("20", 16, True)
    imgs = pipe.generate(["a red square", "two blue circles"], seed=0, fast=True)
    assert imgs.shape == (2, 3, 32, 32) and float(imgs.abs().max()) <= 1.0
    assert torch.equal(imgs, pipe.generate(["a red square", "two blue circles"], seed=0, fast=True))
    for sad in ((2, 0.25), (2, 14)):           # tau in steps is scaled with the steps (14 of 16 > 10 fast steps)
        out, scores = pipe.generate(["a red square"], seed=0, fast=True, sad=sad, return_scores=True)
        assert out.shape == (1, 3, 32, 32) and scores.shape == (1,)


def test_cli_fast_flags():
    import argparse

    from dream.cli import geneval, sample as sample_cli

    for mod, argv in ((sample_cli, ["--fast", "a red square"]), (geneval, ["--model", "dream_tiny.shapes", "--fast"])):
        p = argparse.ArgumentParser()
        mod.add_arguments(p)
        assert p.parse_args(argv).fast is True
        assert p.parse_args(argv[1:] if mod is sample_cli else argv[:2]).fast is False
