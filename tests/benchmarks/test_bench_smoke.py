"""Training-speed paths and the training benchmark.

1. The CPU training fast paths of the diffusion head compute the same function as the plain code they replace:
   the per-distinct-timestep embedding and shared SiLU vs the per-row / per-block computation, and the CPU
   hybrid diffusion loss vs an independent ``where``-based re-computation. (Dropout and the attention backends
   are tested in tests/ops.)
2. ``benchmarks/bench_train.py`` runs end to end on ``dream_test`` (one step, tiny peak matmul).

Tolerances (tests/tolerance.py): a fast path and the plain code are two float32 evaluations of the same math,
compared by flash-attention's 2x rule against the plain code run in float64.
"""
import copy
import json
import math
from pathlib import Path

import pytest
import torch

from dream.diffusion import create_diffusion
from dream.diffusion.gaussian import discretized_gaussian_log_likelihood, normal_kl
from dream.models.diffloss import SimpleMLPAdaLN, TimestepEmbedder
from helpers import load_script
from tolerance import U, assert_2x

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train.py"


def _bench():
    return load_script(BENCH)


# -----------------------------------------------------------------------------------------------
# diffusion head
# -----------------------------------------------------------------------------------------------
def test_time_embedding_dedup_equals_per_row_mlp_with_grads():
    te = TimestepEmbedder(32, freq_dim=64)
    t = torch.randint(0, 50, (3000,))  # > dedup_min_rows, many repeats
    assert t.numel() > te.dedup_min_rows
    out = te(t)
    ref = te.mlp(TimestepEmbedder.sinusoid(t, 64))
    # the truth: the per-row MLP in float64 on the same (float32) sinusoids
    te64 = copy.deepcopy(te).double()
    ref64 = te64.mlp(TimestepEmbedder.sinusoid(t, 64).double())
    assert_2x(out, ref, ref64, "deduplicated time embedding")
    w = torch.randn_like(ref)
    g1 = torch.autograd.grad((out * w).sum(), list(te.parameters()))
    g2 = torch.autograd.grad((ref * w).sum(), list(te.parameters()))
    g64 = torch.autograd.grad((ref64 * w.double()).sum(), list(te64.parameters()))
    # weight gradients reduce over the 3000 rows: per distinct timestep first on the fast path
    for (name, _), a, b, c in zip(te.named_parameters(), g1, g2, g64):
        assert_2x(a, b, c, f"gradient of {name}")


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

    def reference(out, x0, noise):
        """Independent re-computation (float64 schedule, as in IDDPM; gathered values rounded to float32 as the
        official code does) in the dtype of the inputs: float64 inputs give the truth."""
        ab = torch.cumprod(1 - d.betas, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        f = lambda a: a[t].float().to(out.dtype)[:, None]  # noqa: E731
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
        return ((noise - eps) ** 2).mean(1) + torch.where(t == 0, nll, kl)

    ref = reference(out, x0, noise)
    out64 = out.detach().double().requires_grad_()
    truth = reference(out64, x0.double(), noise.double())
    assert_2x(terms["loss"], ref, truth, "CPU hybrid loss")
    ga = torch.autograd.grad(terms["loss"].sum(), out)[0]
    gb = torch.autograd.grad(ref.sum(), out)[0]
    assert_2x(ga, gb, torch.autograd.grad(truth.sum(), out64)[0], "CPU hybrid loss gradient")


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
    # float64 flop counts combined in another order: a few roundings
    assert fl["official_equivalent_gflop"] == pytest.approx(fl["per_row_time_embedding_gflop"] + extra,
                                                            rel=8 * U[torch.float64])


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
        assert r["frac_of_peak_cpu"] == pytest.approx(r["achieved_gflops_cpu"] / r["peak_gflops_cpu"],
                                                      rel=2 * U[torch.float64])   # one division, maybe rounded JSON
        assert r["flops"]["official_equivalent_gflop"] > r["flops"]["ours_gflop"]
