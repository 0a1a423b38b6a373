"""Training-speed paths and the training benchmark.

1. The CPU training fast paths compute the same function as the plain code they replace:
   ``dropout_mask`` / ``FastDropout`` (drop rate, scaling, gradient), ``train_attention`` vs PyTorch SDPA
   (padding, fully padded rows, causal, gradients), the diffusion head's per-distinct-timestep
   embedding and shared SiLU vs the per-row / per-block computation, and the CPU hybrid diffusion loss
   vs an independent ``where``-based re-computation.
2. ``benchmarks/bench_train.py`` runs end to end on ``dream_test`` (one step, tiny peak matmul).
"""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dream.diffusion import create_diffusion
from dream.diffusion.gaussian import discretized_gaussian_log_likelihood, normal_kl
from dream.models.diffloss import SimpleMLPAdaLN, TimestepEmbedder
from dream.models.layers import Attention, FastDropout, dropout_mask, train_attention

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train_under_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -----------------------------------------------------------------------------------------------
# dropout
# -----------------------------------------------------------------------------------------------
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


# -----------------------------------------------------------------------------------------------
# attention
# -----------------------------------------------------------------------------------------------
def _qkv(B=3, H=2, Nq=7, Nk=9, Dh=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, Dh, generator=g, dtype=torch.float64).requires_grad_() for n in (Nq, Nk, Nk)]


def test_train_attention_matches_sdpa_with_padding_and_grads():
    q, k, v = _qkv()
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, :] = True  # fully padded row: SDPA returns 0
    ours = train_attention(q, k, v, 0.0, pad)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None, :])
    assert torch.allclose(ours, ref, atol=1e-12)
    assert float(ours[2].detach().abs().max()) == 0.0
    w = torch.randn_like(ref)
    g1 = torch.autograd.grad((ours * w).sum(), (q, k, v))
    g2 = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-12)


def test_train_attention_causal_matches_sdpa():
    q, k, v = _qkv(Nq=9, Nk=9)
    ours = train_attention(q, k, v, 0.0, None, is_causal=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_train_attention_dropout_is_softmax_times_mask():
    q, k, v = (t.detach().float() for t in _qkv())
    torch.manual_seed(11)
    ours = train_attention(q, k, v, 0.3)
    torch.manual_seed(11)
    mask = dropout_mask((3, 2, 7, 9), 0.3)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16), dim=-1)
    assert torch.allclose(ours, (probs * mask) @ v, atol=1e-6)


def test_attention_module_train_path_equals_eval_path_without_dropout():
    att = Attention(32, 4, attn_drop=0.0, proj_drop=0.0)
    x = torch.randn(2, 5, 32)
    att.eval()
    ref = att(x)
    att.train()
    att.attn_drop = 1e-9  # forces the CPU training path; a drop this rare leaves nothing dropped here
    assert torch.allclose(att(x), ref, atol=1e-5)


# -----------------------------------------------------------------------------------------------
# diffusion head
# -----------------------------------------------------------------------------------------------
def test_time_embedding_dedup_equals_per_row_mlp_with_grads():
    te = TimestepEmbedder(32, freq_dim=64)
    t = torch.randint(0, 50, (3000,))  # > dedup_min_rows, many repeats
    assert t.numel() > te.dedup_min_rows
    out = te(t)
    ref = te.mlp(TimestepEmbedder.sinusoid(t, 64))
    assert torch.allclose(out, ref, atol=1e-6)
    w = torch.randn_like(ref)
    g1 = torch.autograd.grad((out * w).sum(), list(te.parameters()))
    g2 = torch.autograd.grad((ref * w).sum(), list(te.parameters()))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_shared_silu_head_equals_block_by_block_forward():
    net = SimpleMLPAdaLN(8, 32, 16, 24, 3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, t, c = torch.randn(10, 8), torch.randint(0, 1000, (10,)), torch.randn(10, 24)
    y = net.time_embed(t) + net.cond_embed(c)
    h = net.input_proj(x)
    for blk in net.res_blocks:
        h = blk(h, y)
    assert torch.equal(net(x, t, c), net.final_layer(h, y))


def test_cpu_hybrid_loss_equals_where_formula_with_t0_rows():
    d = create_diffusion("", "cosine", 1000)
    g = torch.Generator().manual_seed(0)
    N, C = 400, 6
    x0 = torch.rand(N, C, generator=g) * 2 - 1
    x0[:3] = 1.0
    t = torch.randint(0, 1000, (N,), generator=g)
    t[:7] = 0
    noise = torch.randn(N, C, generator=g)
    out = torch.randn(N, 2 * C, generator=g, requires_grad=True)
    terms = d.training_losses(lambda x, tt: out * 1.0, x0, t, noise)
    # independent re-computation (float64 schedule, as in IDDPM)
    ab = torch.cumprod(1 - d.betas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    f = lambda a: a[t].float()[:, None]  # noqa: E731
    x_t = f(ab.sqrt()) * x0 + f((1 - ab).sqrt()) * noise
    eps, v = out[:, :C], out[:, C:]
    pv = d.betas * (1 - ab_prev) / (1 - ab)
    min_log, max_log = f(torch.log(torch.cat([pv[1:2], pv[1:]]))), f(torch.log(d.betas))
    frac = (v + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log
    c1, c2 = d.betas * ab_prev.sqrt() / (1 - ab), (1 - ab_prev) * (1 - d.betas).sqrt() / (1 - ab)
    x0_pred = f((1 / ab).sqrt()) * x_t - f((1 / ab - 1).sqrt()) * eps.detach()
    mean = f(c1) * x0_pred + f(c2) * x_t
    true_mean = f(c1) * x0 + f(c2) * x_t
    kl = normal_kl(true_mean, min_log, mean, log_var).mean(1) / math.log(2)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(1) / math.log(2)
    ref = ((noise - eps) ** 2).mean(1) + torch.where(t == 0, nll, kl)
    assert torch.allclose(terms["loss"], ref, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(terms["loss"].sum(), out)[0]
    gb = torch.autograd.grad(ref.sum(), out)[0]
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)


# -----------------------------------------------------------------------------------------------
# the benchmark script
# -----------------------------------------------------------------------------------------------
def test_step_runner_trains_and_counts_flops():
    bt = _bench()
    r = bt.StepRunner(bt.get_config("dream_test"), "fp32", batch=48)  # 48*12*4 rows > dedup_min_rows
    assert r.model.training
    before = {n: p.detach().clone() for n, p in r.model.named_parameters()}
    ema_before = [p.clone() for p in r.ema.shadow.parameters()]
    stats = r.step()
    assert math.isfinite(stats["loss"]) and stats["diff_gate"] == 1.0 and stats["clip_gate"] == 1.0
    changed = sum(not torch.equal(before[n], p) for n, p in r.model.named_parameters())
    assert changed > 0.9 * len(before)
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, r.ema.shadow.parameters()))
    fl = r.count_flops()
    L, n = r.cfg.seq_len, r.data["n_masked"]
    assert n == math.ceil(0.7 * L)
    assert 0 < fl["diffusion_head_gflop"] < fl["ours_gflop"] < fl["per_row_time_embedding_gflop"]
    extra = fl["diffusion_head_per_row_gflop"] * (L / n - 1)
    assert fl["official_equivalent_gflop"] == pytest.approx(fl["per_row_time_embedding_gflop"] + extra)


def test_bench_main_writes_json(tmp_path):
    bt = _bench()
    out = tmp_path / "bench.json"
    rc = bt.main(["--configs", "dream_test", "--precisions", "fp32", "bf16", "--batch", "4", "--steps", "1",
                  "--warmup", "0", "--peak-repeats", "1", "--peak-n", "128", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["precision"] for r in data["results"]] == ["fp32", "bf16"]
    for r in data["results"]:
        assert r["img_s_cpu"] > 0 and r["median_wall_s"] > 0
        assert r["frac_of_peak_cpu"] == pytest.approx(r["achieved_gflops_cpu"] / r["peak_gflops_cpu"])
        assert r["flops"]["official_equivalent_gflop"] > r["flops"]["ours_gflop"]
