"""Benchmark: MAR sampling speed (seconds per image), eager fp32 vs bf16 autocast vs torch.compile.

Configurations (``--configs``):
    * ``reference``  the official CPU baseline's config (a): width 256, 4 + 4 blocks, 64 pixel tokens of
                     48 dims, diffusion MLP 256 x 3 with 100 steps; batch 16 prompts, 64 iterations,
                     CFG 3.0 linear, temperature 1.0 (see ``benchmarks/common.py``). The targets refer to it.
    * ``dream_tiny`` the registry's ``dream_tiny`` (width 192, its own 50 sampling steps), same protocol.
    * ``b_width``    dream_b's width on CPU: width 768 / 12 heads but only 2 + 2 blocks (dream_b: 12 + 12), its
                     diffusion MLP 1024 x 3, 32x32 pixel tokens; batch 2 prompts, 16 iterations (labelled).

Modes (``--modes``): ``fp32`` (eager), ``bf16`` (``torch.autocast`` bf16; diffusion arithmetic in fp32),
``fp32+compile`` / ``bf16+compile`` (``SamplerConfig(compile=True)``: the diffusion step is compiled; the
compilation time is reported separately and counts against it), ``legacy-fp32`` / ``legacy-bf16`` (the
diffusion head run the generic way, as the official ``DiffLoss.sample`` does: ``forward_with_cfg`` on the
duplicated state every step through ``GaussianDiffusion.p_sample_loop``; shows what the fast path buys).
Methods (``--methods``): ``plain`` sampling and ``sad`` (K = 5, tau = 8, batched).

For every config the same noise (seed) is used in every mode, so the token difference fp32 vs bf16 is
reported. Costs are also normalised by the same-run GEMM peak (2048^3 matmul, median of several, measured
at the start and the end): ``s/image x TFLOP/s``. Official reference (same protocol, idle 2-vCPU AMX
machine, bf16 peak 2.05 TFLOP/s): plain bf16 0.843 s/image -> 1.73, fp32 1.168 s/image x 0.32 -> 0.37.

    python benchmarks/bench_sampling.py --threads 1                      # everything (slow on 2 cores)
    python benchmarks/bench_sampling.py --configs reference --modes fp32 bf16 --repeats 3

On a CPU shared with other processes use ``--threads 1`` or ``OMP_WAIT_POLICY=PASSIVE``: with OpenMP's
default spin-waiting, 2 threads on a loaded 2-core machine made sampling ~20x slower. Compiled rows start
from cold caches (``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` unless ``--compile-cache``), so their warm-up
column includes the full compilation time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if "--compile-cache" not in sys.argv:  # before torch is imported: compile rows measure cold compilation
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (build_model, fmt_table, measure_peaks, reference_config, reference_inputs,  # noqa: E402
                    summarize, write_results)

OFFICIAL = {"plain_bf16_s_per_image": 0.843, "plain_fp32_s_per_image": 1.168, "bf16_peak_tflops": 2.05,
            "fp32_peak_tflops": 0.32, "plain_bf16_cost": 1.73, "plain_fp32_cost": 0.374}
MODES = ("fp32", "bf16", "fp32+compile", "bf16+compile", "legacy-fp32", "legacy-bf16")


def config_specs():
    import dream

    return {
        "reference": dict(config=reference_config(), batch=16, num_iter=64,
                          label="reference: official baseline config (a), width 256, 4+4 blocks, 100 steps"),
        "dream_tiny": dict(config=dream.get_config("dream_tiny"), batch=16, num_iter=64,
                           label="dream_tiny (registry): width 192, 4+4 blocks, 50 steps"),
        "b_width": dict(config=reference_config(encoder_embed_dim=768, decoder_embed_dim=768, encoder_num_heads=12,
                                                decoder_num_heads=12, encoder_depth=2, decoder_depth=2,
                                                diffloss_width=1024),
                        batch=2, num_iter=16,
                        label="dream_b width: 768 wide / 12 heads, 2+2 blocks (dream_b 12+12), diffusion MLP "
                              "1024x3, 100 steps, 32x32 pixels, batch 2, 16 iterations"),
    }


class LegacyHead:
    """The diffusion head sampled the generic (official) way: the full ``[x; x]`` state through
    ``net.forward_with_cfg`` every step (time and condition embeddings recomputed per call)."""

    def __init__(self, fast):
        self.net, self.diffusion = fast.net, fast.diffusion
        self.num_steps = fast.num_steps

    @torch.no_grad()
    def sample(self, z, *, cfg=1.0, temperature=1.0, generator=None, noise_fn=None):
        C = self.net.in_channels
        guided = cfg != 1.0
        n = z.shape[0] // 2 if guided else z.shape[0]
        x = torch.randn(n, C, generator=generator, device=z.device)
        if guided:
            x = torch.cat([x, x])
            fn = (lambda x, t, c: self.net.forward_with_cfg(x, t, c, cfg))
        else:
            fn = self.net
        out = self.diffusion.p_sample_loop(fn, x, temperature=temperature, generator=generator, c=z)
        return out[:n].float()


def make_runner(model, spec, mode, method, inputs, seed):
    from dream.sampling import MARSampler, SamplerConfig, SemanticallyAlignedDecoding

    prec = "bf16" if "bf16" in mode else "fp32"
    base = dict(num_iter=spec["num_iter"], cfg=3.0, cfg_schedule="linear", temperature=1.0, precision=prec,
                compile="compile" in mode)
    feats, null, ids = inputs["text_feats"], inputs["null_feats"], inputs["clip_ids"]

    def build(num_iter):
        sc = SamplerConfig(**{**base, "num_iter": num_iter})
        if method == "plain":
            obj = MARSampler(model, sc)
            sampler = obj
        else:
            obj = SemanticallyAlignedDecoding(model, sc, num_candidates=5, threshold=min(8, num_iter - 1))
            sampler = obj.sampler
        if mode.startswith("legacy"):
            sampler.token_sampler = LegacyHead(sampler.token_sampler)
        return obj

    def run(obj):
        g = torch.Generator().manual_seed(seed)
        if method == "plain":
            return obj.sample(feats, null, generator=g)
        return obj.sample(feats, ids, null, generator=g).tokens

    return build, run


def bench_one(model, spec, mode, method, inputs, args):
    build, run = make_runner(model, spec, mode, method, inputs, args.seed)
    obj = build(spec["num_iter"])
    # warm-up: a short run (2 iterations: two row counts, so a compiled step also gets its dynamic graph)
    # sharing the full run's token sampler (its weight caches and compiled graphs)
    t0 = time.perf_counter()
    warm = build(2)
    (warm if method == "plain" else warm.sampler).token_sampler = \
        (obj if method == "plain" else obj.sampler).token_sampler
    run(warm)
    warm_s = time.perf_counter() - t0
    times, cpu, out = [], [], None
    for r in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        res = run(obj)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if r == 0:
            out = res
    return out, warm_s, times, cpu


def notes(fp32_peak: float, bf16_peak: float, args) -> list[str]:
    out = ["s_per_image = median wall seconds per batch / batch; cpu_s_per_image = process CPU time (robust to "
           "other load on a shared machine); speedups use both."]
    if bf16_peak < fp32_peak:
        out.append("bf16 GEMMs are slower than fp32 on this CPU (no AMX), so bf16 autocast cannot speed sampling "
                   "up here and 's x bf16 peak' is not comparable with the official AMX machine.")
    if not args.compile_cache:
        out.append("compiled rows: warm-up includes cold compilation (inductor caches disabled)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["reference", "dream_tiny", "b_width"],
                   choices=["reference", "dream_tiny", "b_width"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--methods", nargs="+", default=["plain", "sad"], choices=["plain", "sad"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--num-iter", type=int, default=None, help="override the AR iterations of every config")
    p.add_argument("--batch", type=int, default=None, help="override the prompts per batch of every config")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("--compile-cache", action="store_true", help="allow torch.compile's on-disk caches")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/bench_sampling.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    peaks = [measure_peaks(args.peak_repeats)]
    print(f"GEMM peak (start): fp32 {peaks[0]['fp32_tflops'] * 1e3:.1f} GFLOP/s, "
          f"bf16 {peaks[0]['bf16_tflops'] * 1e3:.1f} GFLOP/s, threads {torch.get_num_threads()}")
    specs = config_specs()
    rows, diffs = [], {}
    for name in args.configs:
        spec = dict(specs[name])
        if args.num_iter:
            spec["num_iter"] = args.num_iter
        if args.batch:
            spec["batch"] = args.batch
        model = build_model(spec["config"])
        inputs = reference_inputs(model.config, spec["batch"], seed=args.seed)
        print(f"\n[{name}] {spec['label']} (batch {spec['batch']}, {spec['num_iter']} iterations)")
        for method in args.methods:
            outs = {}
            for mode in args.modes:
                out, warm_s, times, cpu = bench_one(model, spec, mode, method, inputs, args)
                outs[mode] = out
                s = summarize(times)
                row = dict(config=name, label=spec["label"], batch=spec["batch"], num_iter=spec["num_iter"],
                           sampling_steps=model.config.num_sampling_steps, method=method, mode=mode,
                           s_per_batch=s["median_s"], s_per_image=s["median_s"] / spec["batch"],
                           cpu_s_per_image=statistics.median(cpu) / spec["batch"], warmup_s=warm_s, times=s)
                rows.append(row)
                print(f"  {method:5s} {mode:13s} {row['s_per_image']:8.3f} s/image (median of {len(times)}: "
                      f"{', '.join(f'{t:.1f}' for t in times)} s/batch; cpu {row['cpu_s_per_image']:.3f} s/image; "
                      f"warm-up {warm_s:.1f} s)", flush=True)
            ref = outs.get("fp32")
            if ref is not None:
                scale = float(ref.abs().max())
                for mode, o in outs.items():
                    if mode != "fp32":
                        d = float((o - ref).abs().max())
                        diffs[f"{name}/{method}/{mode}"] = dict(max_abs_diff=d, max_abs_fp32=scale,
                                                                rel=d / max(scale, 1e-12))
    peaks.append(measure_peaks(args.peak_repeats))
    fp32_peak = statistics.median([q["fp32_tflops"] for q in peaks])
    bf16_peak = statistics.median([q["bf16_tflops"] for q in peaks])

    # ---- ratios and normalised costs ----
    summary = []
    for r in rows:
        r["cost_x_bf16_peak"] = r["s_per_image"] * bf16_peak
        r["cost_x_fp32_peak"] = r["s_per_image"] * fp32_peak
        base = next((q for q in rows if q["config"] == r["config"] and q["method"] == r["method"]
                     and q["mode"] == "fp32"), None)
        leg = next((q for q in rows if q["config"] == r["config"] and q["method"] == r["method"]
                    and q["mode"] == "legacy-fp32"), None)
        for key, tag in (("s_per_image", ""), ("cpu_s_per_image", "_cpu")):  # wall, and process CPU time
            r["speedup_vs_eager_fp32" + tag] = base[key] / r[key] if base else None
            r["speedup_vs_legacy_fp32" + tag] = leg[key] / r[key] if leg else None
        nan = float("nan")
        summary.append([r["config"], r["method"], r["mode"], r["s_per_image"], r["cpu_s_per_image"],
                        r["speedup_vs_eager_fp32"] or nan, r["speedup_vs_eager_fp32_cpu"] or nan,
                        r["speedup_vs_legacy_fp32"] or nan, r["speedup_vs_legacy_fp32_cpu"] or nan,
                        r["cost_x_bf16_peak"], r["cost_x_fp32_peak"], r["warmup_s"]])
    each = ", ".join("%.0f/%.0f" % (q["fp32_tflops"] * 1e3, q["bf16_tflops"] * 1e3) for q in peaks)
    print(f"\nGEMM peaks (median of start/end): fp32 {fp32_peak * 1e3:.1f} GFLOP/s, bf16 {bf16_peak * 1e3:.1f} "
          f"GFLOP/s (each fp32/bf16: {each})")
    if bf16_peak < fp32_peak:
        print("NOTE: bf16 GEMMs are slower than fp32 on this CPU (no AMX): bf16 autocast cannot speed up "
              "sampling here, and 's/image x bf16 peak' is not comparable with the official AMX machine.")
    print(fmt_table(summary, ["config", "method", "mode", "s/image", "cpu s/img", "x eager32", "(cpu)",
                              "x legacy32", "(cpu)", "s*bf16TF", "s*fp32TF", "warmup s"]))
    for k, v in diffs.items():
        print(f"tokens {k} vs fp32 (same noise): max|diff| {v['max_abs_diff']:.3e} (max|fp32| "
              f"{v['max_abs_fp32']:.3e}, relative {v['rel']:.2e})")
    out = write_results("bench_sampling", dict(
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, peaks=peaks,
        fp32_peak_tflops=fp32_peak, bf16_peak_tflops=bf16_peak, official=OFFICIAL, rows=rows, token_diffs=diffs,
        notes=notes(fp32_peak, bf16_peak, args)),
        args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
