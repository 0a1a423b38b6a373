"""Training-throughput benchmark: images/s and achieved model FLOP/s of one full DREAM training step.

What one timed step is (the official training recipe of arXiv 2603.02667):
``model.train()`` (dropout 0.1 active), batch 64, mask ratio fixed at 0.7 (45 of 64 tokens masked, a
random permutation per image), loss = L_diff + 0.005 L_clip, backward, grad-norm clip 3.0, AdamW(0.9,
0.95) with weight decay 0.04 on the official parameter groups (``dream.train.optim.build_optimizer``),
EMA 0.9999 (``dream.train.ema.EMA``). For bf16, ``torch.autocast`` wraps the forward and the loss only,
as in the trainer. Random weights are perturbed (+0.02 N(0, 1) on every float tensor) so the
zero-initialised adaLN / final layers do real work.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of OUR step (every
mm/addmm/bmm/SDPA; no elementwise ops, norms or optimizer). Our model runs the diffusion MLP only on the
B*45*4 masked rows, and on CPU its timestep MLP only once per distinct timestep; the official code runs
all of it on all B*64*4 rows (and masks the loss afterwards). The "official-equivalent" count is ours
with the per-row timestep MLP and the diffusion-head FLOPs scaled by 64/45; it reproduces the official
count (311.9 GFLOP/step for the reference config). Achieved FLOP/s = official-equivalent FLOPs / our
step time, so the "% of peak" compares like with like with the official implementation's figures.

Every run also measures a plain 2048^3 matmul peak (fp32 and bf16, median of several) in the SAME run,
because machine speed varies ~3x between instances.

Usage::

    python benchmarks/bench_train.py                       # reference config + dream_tiny, fp32 + bf16
    python benchmarks/bench_train.py --configs reference --precisions fp32 --steps 3 --profile
    python benchmarks/bench_train.py --compile             # also time torch.compile of the model
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, fmt_table, reference_config, reference_inputs, write_results  # noqa: E402

# Official implementation on its (AMX) machine, config (a), batch 64 (official_cpu_baseline.md §1).
OFFICIAL = {
    "fp32": {"img_s": 29.0, "ms_step": 2204.0, "gflop_step": 311.9, "gflops": 142.0, "peak_gflops": 316.0,
             "frac_peak": 0.45},
    "bf16": {"img_s": 47.6, "ms_step": 1344.0, "gflop_step": 311.9, "gflops": 232.0, "peak_gflops": 2060.0,
             "frac_peak": 0.11},
    "ema_clip_ms": 23.0,
    "machine": "2 vCPU Xeon with AMX-BF16, torch 2.13, 2 threads; times exclude grad clip + EMA (23 ms)",
}
TARGET_BF16_FRAC = 0.22
MASK_RATIO = 0.7


# -----------------------------------------------------------------------------------------------
# Same-run GEMM peak (wall and CPU time)
# -----------------------------------------------------------------------------------------------
def gemm_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> dict:
    """Median GFLOP/s of an ``n^3`` matmul (2 n^3 FLOPs), by wall time and by process CPU time."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    flop = 2.0 * n ** 3
    return {"wall_gflops": flop / statistics.median(wall) / 1e9, "cpu_gflops": flop / statistics.median(cpu) / 1e9,
            "wall_s": wall, "cpu_s": cpu}


def measure_peaks(repeats: int = 5, n: int = 2048) -> dict:
    """fp32 and bf16 same-run peaks (see :func:`gemm_peak`)."""
    return {"fp32": gemm_peak(torch.float32, n, repeats), "bf16": gemm_peak(torch.bfloat16, n, repeats)}


# -----------------------------------------------------------------------------------------------
# Model, inputs, one step
# -----------------------------------------------------------------------------------------------
def get_config(name: str):
    """``reference`` (the official baseline's config (a)) or a registered model name."""
    if name == "reference":
        return reference_config()
    import dream

    return dream.get_config(name)


def make_batch(cfg, batch: int, seed: int = 0, mask_ratio: float = MASK_RATIO) -> dict:
    """Synthetic training batch: N(0,1) tokens (B, L, C), CLIP ids, N(0,1) text features, a fixed-ratio mask."""
    from dream.masking import mask_from_orders, sample_orders

    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randn(batch, cfg.seq_len, cfg.token_dim, generator=g)
    inp = reference_inputs(cfg, batch=batch, seed=seed)
    n_masked = math.ceil(cfg.seq_len * mask_ratio)
    mask = mask_from_orders(sample_orders(batch, cfg.seq_len, generator=g), n_masked)
    return {"tokens": tokens, "clip_ids": inp["clip_ids"], "text_feats": inp["text_feats"], "mask": mask,
            "n_masked": n_masked}


class StepRunner:
    """Holds model, optimizer, EMA and a batch; ``step()`` runs one full training step."""

    def __init__(self, cfg, precision: str = "fp32", batch: int = 64, seed: int = 0, grad_clip: float = 3.0,
                 ema_decay: float = 0.9999, compile: bool = False, fused_adamw: Optional[bool] = None):
        from dream.train.ema import EMA
        from dream.train.optim import build_optimizer

        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.cfg, self.precision, self.batch = cfg, precision, batch
        self.model = build_model(cfg, seed=seed).train()
        self.opt = build_optimizer(self.model, lr=8e-4, weight_decay=0.04, betas=(0.9, 0.95), official=True,
                                   fused=fused_adamw)
        self.ema = EMA(self.model, ema_decay) if ema_decay > 0 else None
        self.grad_clip = grad_clip
        self.data = make_batch(cfg, batch, seed)
        self.gen = torch.Generator().manual_seed(seed + 2)
        self.amp = torch.bfloat16 if precision == "bf16" else None
        self.fwd = self.model
        self.compile_s = None
        if compile:
            self.fwd = torch.compile(self.model)

    def forward(self) -> dict:
        d = self.data
        with torch.autocast("cpu", dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            return self.fwd(d["tokens"], d["clip_ids"], d["text_feats"], d["mask"], generator=self.gen)

    def step(self) -> dict:
        out = self.forward()
        out["loss"].backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return {k: float(v.detach()) for k, v in out.items()}

    def time_steps(self, steps: int, warmup: int) -> tuple[list[float], list[float]]:
        """Wall and process-CPU seconds of ``steps`` steps after ``warmup`` untimed ones.

        CPU time is the robust number on a shared machine: wall time also counts the time this process
        waited for a core. With 1 intra-op thread, CPU seconds ~= the wall seconds of an idle machine."""
        t0 = time.perf_counter()
        for i in range(warmup):
            self.step()
            if i == 0 and self.fwd is not self.model:
                self.compile_s = time.perf_counter() - t0  # first call = compile + one step
        wall, cpu = [], []
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            stats = self.step()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
            if not math.isfinite(stats["loss"]):
                raise FloatingPointError(f"non-finite loss {stats['loss']}")
        return wall, cpu

    def _count(self) -> tuple[float, float]:
        """(total, diffusion-head) FLOPs of one forward + backward."""
        from torch.utils.flop_counter import FlopCounterMode

        self.opt.zero_grad(set_to_none=True)
        fc = FlopCounterMode(display=False)
        with fc:
            out = self.forward()
            out["loss"].backward()
        self.opt.zero_grad(set_to_none=True)
        head = sum(fc.get_flop_counts().get("DREAM.diffloss", {}).values())
        return float(fc.get_total_flops()), float(head)

    def count_flops(self) -> dict:
        """GFLOP of one forward + backward: ours, the diffusion head's share, and the official-equivalent.

        ``ours``: what our step computes. ``official_equivalent``: the same step as the official code does
        it: the diffusion head (including a per-row timestep MLP, which we run only per distinct
        timestep) on all L instead of the n masked tokens per image."""
        total, head = self._count()
        te = getattr(getattr(self.model, "diffloss", None), "net", None)
        te = getattr(te, "time_embed", None)
        saved = getattr(te, "dedup_min_rows", None)
        if saved is not None:
            te.dedup_min_rows = 1 << 62  # per-row timestep MLP, as the official code
        try:
            total_rows, head_rows = self._count()
        finally:
            if saved is not None:
                te.dedup_min_rows = saved
        scale = self.cfg.seq_len / self.data["n_masked"]
        official_eq = total_rows - head_rows + head_rows * scale
        return {"ours_gflop": total / 1e9, "diffusion_head_gflop": head / 1e9,
                "per_row_time_embedding_gflop": total_rows / 1e9, "diffusion_head_per_row_gflop": head_rows / 1e9,
                "official_equivalent_gflop": official_eq / 1e9, "head_row_scale": scale}


# -----------------------------------------------------------------------------------------------
# Benchmark driver
# -----------------------------------------------------------------------------------------------
def bench_one(name: str, precision: str, batch: int = 64, steps: int = 5, warmup: int = 2, seed: int = 0,
              compile: bool = False, flops: bool = True) -> dict:
    """Time ``steps`` training steps (after ``warmup``) of config ``name`` in ``precision``.

    Returns a dict with per-step wall and CPU seconds, their medians, images/s and (with ``flops``)
    the FLOP counts of :meth:`StepRunner.count_flops` and the achieved GFLOP/s."""
    cfg = get_config(name)
    r = StepRunner(cfg, precision, batch, seed, compile=compile)
    n_params = sum(p.numel() for p in r.model.parameters())
    fl = r.count_flops() if flops else None
    wall, cpu = r.time_steps(steps, warmup)
    res = {"config": name, "precision": precision, "batch": batch, "compile": compile, "params": n_params,
           "params_without_clip_token_embedding": n_params - r.model.token_embedding.weight.numel(),
           "n_masked": r.data["n_masked"], "seq_len": cfg.seq_len, "threads": torch.get_num_threads(),
           "wall_s": wall, "cpu_s": cpu, "median_wall_s": statistics.median(wall),
           "median_cpu_s": statistics.median(cpu), "compile_plus_first_step_s": r.compile_s}
    res["img_s_wall"] = batch / res["median_wall_s"]
    res["img_s_cpu"] = batch / res["median_cpu_s"]
    if fl:
        set_flops(res, fl)
    return res


def set_flops(res: dict, fl: dict) -> dict:
    """Attach FLOP counts and achieved GFLOP/s (official-equivalent FLOPs / our step time)."""
    res["flops"] = fl
    for clock in ("wall", "cpu"):
        res[f"achieved_gflops_{clock}"] = fl["official_equivalent_gflop"] / res[f"median_{clock}_s"]
        res[f"achieved_gflops_ours_{clock}"] = fl["ours_gflop"] / res[f"median_{clock}_s"]
    return res


def profile_step(name: str, precision: str, batch: int = 64, steps: int = 2, rows: int = 30, seed: int = 0) -> str:
    """torch.profiler table (self CPU time) over ``steps`` training steps after one warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    r = StepRunner(get_config(name), precision, batch, seed)
    r.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(steps):
            r.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def add_derived(res: dict, peaks: dict) -> dict:
    """% of the same-run peak (same precision, same clock) and the ratio to the official fraction."""
    pk = peaks[res["precision"]]
    for clock in ("wall", "cpu"):
        res[f"peak_gflops_{clock}"] = pk[f"{clock}_gflops"]
        if f"achieved_gflops_{clock}" in res:
            frac = res[f"achieved_gflops_{clock}"] / pk[f"{clock}_gflops"]
            res[f"frac_of_peak_{clock}"] = frac
            res[f"ratio_to_official_frac_{clock}"] = frac / OFFICIAL[res["precision"]]["frac_peak"]
    return res


def _merge_peaks(a: dict, b: dict) -> dict:
    """Per precision and clock, the mean of the before/after peaks (both are medians)."""
    return {p: {f"{c}_gflops": 0.5 * (a[p][f"{c}_gflops"] + b[p][f"{c}_gflops"]) for c in ("wall", "cpu")}
            for p in ("fp32", "bf16")}


def _fmt_peaks(pk: dict) -> str:
    return ", ".join(f"{p} {pk[p]['cpu_gflops']:.0f} (CPU clock) / {pk[p]['wall_gflops']:.0f} (wall)"
                     for p in ("fp32", "bf16"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["reference", "dream_tiny"],
                    help="'reference' (official baseline config (a)) and/or registered model names")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for everything (peak too)")
    ap.add_argument("--peak-repeats", type=int, default=5)
    ap.add_argument("--peak-n", type=int, default=2048, help="matmul size of the same-run peak (n^3)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(model) for 'reference'")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_train_cpu.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    peaks_before = measure_peaks(args.peak_repeats, args.peak_n)
    print(f"same-run {args.peak_n}^3 matmul peak, GFLOP/s ({args.threads} thread(s)): {_fmt_peaks(peaks_before)}",
          flush=True)
    results = []
    for name in args.configs:
        for prec in args.precisions:
            res = bench_one(name, prec, args.batch, args.steps, args.warmup, args.seed)
            results.append(res)
            print(f"  {name} {prec}: {res['median_cpu_s'] * 1e3:.0f} ms/step CPU, "
                  f"{res['median_wall_s'] * 1e3:.0f} ms/step wall", flush=True)
            if args.compile and name == "reference":
                resc = bench_one(name, prec, args.batch, args.steps, args.warmup, args.seed, compile=True,
                                 flops=False)
                set_flops(resc, res["flops"])
                resc["speedup_vs_eager_cpu"] = res["median_cpu_s"] / resc["median_cpu_s"]
                resc["speedup_vs_eager_wall"] = res["median_wall_s"] / resc["median_wall_s"]
                results.append(resc)
                print(f"  {name} {prec} compiled: {resc['median_cpu_s'] * 1e3:.0f} ms/step CPU "
                      f"(compile + first step {resc['compile_plus_first_step_s']:.1f} s wall)", flush=True)
            if args.profile:
                print(profile_step(name, prec, args.batch))
    peaks_after = measure_peaks(args.peak_repeats, args.peak_n)
    peaks = _merge_peaks(peaks_before, peaks_after)
    for r in results:
        add_derived(r, peaks)

    rows = []
    for r in results:
        rows.append([f"{r['config']}{' (compiled)' if r['compile'] else ''}", r["precision"],
                     r["median_cpu_s"] * 1e3, r["median_wall_s"] * 1e3, r["img_s_cpu"], r["img_s_wall"],
                     r["flops"]["official_equivalent_gflop"], r["flops"]["ours_gflop"], r["achieved_gflops_cpu"],
                     r["peak_gflops_cpu"], 100 * r["frac_of_peak_cpu"],
                     100 * OFFICIAL[r["precision"]]["frac_peak"], r["ratio_to_official_frac_cpu"]])
    print()
    print(fmt_table(rows, ["config", "prec", "ms/step cpu", "ms/step wall", "img/s cpu", "img/s wall",
                           "GFLOP/step off-eq", "GFLOP/step ours", "GFLOP/s cpu", "peak cpu", "% peak cpu",
                           "official %", "ratio cpu"]))
    print(f"\nsame-run peaks, GFLOP/s, before: {_fmt_peaks(peaks_before)}; after: {_fmt_peaks(peaks_after)}")
    print("'cpu' columns use process CPU time (robust on a shared machine; with 1 thread ~= an idle machine's "
          "wall time); 'wall' columns use elapsed time (the JSON also has wall-clock % of the wall-clock peak, "
          "meaningful only on an idle machine). GFLOP/s = official-equivalent FLOPs / our step time; "
          "ratio = our % of peak / the official implementation's % of its peak.")
    print(f"official (2-thread AMX machine): fp32 {OFFICIAL['fp32']['img_s']} img/s = 45 % of its fp32 peak, "
          f"bf16 {OFFICIAL['bf16']['img_s']} img/s = 11 % of its bf16 peak. Target: bf16 >= "
          f"{100 * TARGET_BF16_FRAC:.0f} % of the same-run bf16 peak.")
    amx = False
    try:
        amx = bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001
        pass
    if not amx:
        print("NOTE: this CPU has no AMX tiles: bf16 GEMMs run on AVX512-BF16 at about half the fp32 rate, "
              "so bf16 autocast is slower than fp32 here (its % of the low bf16 peak is high for that reason).")
    payload = {"args": vars(args), "amx": amx, "peaks_before": peaks_before, "peaks_after": peaks_after,
               "peaks_used": peaks, "official": OFFICIAL, "target_bf16_frac_of_peak": TARGET_BF16_FRAC,
               "results": results}
    path = write_results("bench_train_cpu", payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
