"""Benchmark: dream's Triton flash attention vs PyTorch SDPA vs plain math at DREAM shapes.

Shapes (B x H x Nq x Nk x Dh, defaults B=8, H=12, Dh=64):
    * self-attention over 64 buffer + 256 image tokens (320 x 320), as in the MAR decoder;
    * the encoder's ragged lengths 64 + n_vis for several visible-token counts;
    * the same 320-token self-attention with 25 % of the keys padded (key-padding mask);
    * cross-attention 320 queries x 128 text tokens.
Modes: forward, and forward + backward. Reports median milliseconds, TFLOP/s (forward 4*B*H*Nq*Nk*Dh
FLOPs, backward 2.5x forward) and the speed relative to SDPA measured in the same run
(``vs_sdpa`` = t_sdpa / t_provider; > 1 means faster than SDPA).

On CPU only SDPA and math run (the Triton rows need a GPU; the interpreter is for correctness only).
Results go to ``benchmarks/results/bench_attention_<device>.json``.

    python benchmarks/bench_attention.py                      # GPU if present, else CPU
    python benchmarks/bench_attention.py --device cpu --iters 3 --batch 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dream.ops.attention import attention_ref

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RESULTS = Path(__file__).resolve().parent / "results"


def _kernels():
    try:
        from dream import kernels

        return kernels
    except Exception:  # noqa: BLE001 - a broken triton must not stop the SDPA/math rows
        return None


def build_cases(args):
    """List of (name, Nq, Nk, padded_fraction)."""
    cases = [("self 64+256", 320, 320, 0.0)]
    cases += [(f"encoder 64+{n}", 64 + n, 64 + n, 0.0) for n in args.n_vis]
    cases += [("self 64+256, 25% keys padded", 320, 320, 0.25), ("cross 320x128", 320, 128, 0.0)]
    return cases


def make_providers(device: torch.device):
    """name -> fn(q, k, v, mask) and a reason for each provider that cannot run."""
    providers, skipped = {}, {}
    kern = _kernels()
    if device.type == "cuda" and kern is not None and kern.is_available() \
            and os.environ.get("TRITON_INTERPRET", "0") != "1":
        providers["triton"] = lambda q, k, v, m: kern.flash_attention(q, k, v, key_padding_mask=m)
    elif device.type != "cuda":
        skipped["triton"] = "the Triton rows need a GPU (the CPU interpreter is for correctness tests only)"
    else:
        why = "dream.kernels failed to import" if kern is None else kern.unavailable_reason()
        skipped["triton"] = why or "TRITON_INTERPRET=1 is set; unset it to time the compiled kernel"

    def sdpa(q, k, v, m):
        attn_mask = None if m is None else ~m[:, None, None, :]  # SDPA: True = attend
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    providers["sdpa"] = sdpa
    providers["math"] = lambda q, k, v, m: attention_ref(q, k, v, key_padding_mask=m, upcast=False)
    return providers, skipped


def _timer(device: torch.device, fn, warmup: int, iters: int) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_case(args, device, dtype, providers, name, nq, nk, pad_frac):
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.heads)
    q = torch.randn(*shape, nq, args.head_dim, generator=g).to(device, dtype)
    k = torch.randn(*shape, nk, args.head_dim, generator=g).to(device, dtype)
    v = torch.randn(*shape, nk, args.head_dim, generator=g).to(device, dtype)
    mask = None
    if pad_frac > 0:
        keep = nk - int(pad_frac * nk)
        mask = (torch.arange(nk) >= keep)[None, :].expand(args.batch, nk).contiguous().to(device)
    do = torch.randn(*shape, nq, args.head_dim, generator=g).to(device, dtype)
    flops_fwd = 4.0 * args.batch * args.heads * nq * nk * args.head_dim

    ref = providers["sdpa"](q, k, v, mask).float()
    rows = []
    for mode in args.modes:
        for prov, fn in providers.items():
            if mode == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        return fn(q, k, v, mask)
                flops = flops_fwd
            else:
                qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

                def step(fn=fn, qg=qg, kg=kg, vg=vg):
                    qg.grad = kg.grad = vg.grad = None
                    fn(qg, kg, vg, mask).backward(do)
                flops = 3.5 * flops_fwd
            with torch.no_grad():
                max_diff = (fn(q, k, v, mask).float() - ref).abs().max().item()
            ms = _timer(device, step, args.warmup, args.iters)
            rows.append(dict(case=name, nq=nq, nk=nk, padded_fraction=pad_frac, mode=mode, provider=prov,
                             ms=ms, tflops=flops / (ms * 1e-3) / 1e12, max_abs_diff_vs_sdpa=max_diff))
    for mode in args.modes:  # ratio against SDPA from the same run
        t_sdpa = next(r["ms"] for r in rows if r["mode"] == mode and r["provider"] == "sdpa")
        for r in rows:
            if r["mode"] == mode:
                r["vs_sdpa"] = t_sdpa / r["ms"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp16 on GPU, fp32 on CPU")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--n-vis", type=int, nargs="+", default=[64, 128, 192, 256],
                   help="visible-token counts for the encoder rows (length 64 + n_vis)")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 50 GPU / 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 10 GPU / 1 CPU)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/bench_attention_<dev>.json)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("fp16" if gpu else "fp32")]
    args.iters = args.iters or (50 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    providers, skipped = make_providers(device)
    for prov, why in skipped.items():
        print(f"[{prov}] skipped: {why}")

    rows = []
    for name, nq, nk, pad in tqdm(build_cases(args), desc="attention shapes"):
        rows += run_case(args, device, dtype, providers, name, nq, nk, pad)

    dev_name = torch.cuda.get_device_name(device) if gpu else (platform.processor() or platform.machine())
    print(f"\n{dev_name}, {str(dtype)[6:]}, B={args.batch} H={args.heads} Dh={args.head_dim}, "
          f"median of {args.iters} (vs_sdpa = t_sdpa / t; > 1 is faster)")
    print(f"{'case':32s} {'mode':7s} {'provider':8s} {'ms':>9s} {'TFLOP/s':>8s} {'vs_sdpa':>8s} {'max|d|':>9s}")
    for r in rows:
        print(f"{r['case']:32s} {r['mode']:7s} {r['provider']:8s} {r['ms']:9.3f} {r['tflops']:8.3f} "
              f"{r['vs_sdpa']:8.2f} {r['max_abs_diff_vs_sdpa']:9.2e}")
    for prov, why in skipped.items():
        print(f"[{prov}] rows not measured: {why}")

    tag = "cuda" if gpu else "cpu"
    out = args.out or RESULTS / f"bench_attention_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=dev_name, device_type=device.type, dtype=str(dtype)[6:], batch=args.batch,
                heads=args.heads, head_dim=args.head_dim, iters=args.iters, warmup=args.warmup,
                torch=torch.__version__, threads=torch.get_num_threads(), skipped=skipped,
                flops_note="fwd 4*B*H*Nq*Nk*Dh; fwd+bwd 3.5x fwd; vs_sdpa = t_sdpa / t")
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        meta["triton"] = None
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
