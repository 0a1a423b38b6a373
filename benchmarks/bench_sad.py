"""Benchmark: Semantically Aligned Decoding vs best-of-K reranking vs plain sampling (throughput).

Same model and prompts as ``bench_sampling.py`` (the official CPU baseline's config (a), random weights
perturbed like the baseline; batch 16 prompts, 64 iterations, 100 diffusion steps, CFG 3.0 linear,
temperature 1.0). Methods:

    * ``plain``           one decode per prompt;
    * ``sad-tau{T}``      SAD "once", K = 5 candidates sharing the generation order, scored by DREAM itself after
                          T of 64 steps, the best finished; ``batched`` (the K candidates as one batch) and
                          ``sequential`` (candidate at a time, as the official code);
    * ``best-of-5``       5 independent full decodes as one batch of 5 x 16, each finished image scored with
                          DREAM's own score (cosine of image and prompt embeddings), the best kept.

Reports images/s, s/image, the SAD / best-of-5 throughput ratio (target >= 3x at tau = 8; official
3.31x bf16), the SAD batched / sequential ratio (target >= 1.5x) and the machine-independent cost
``s/image x same-run GEMM peak (TFLOP/s)`` (official, bf16 peak: plain 1.73, SAD tau=8 2.62, best-of-5 8.66).

``--verifier [PIPELINE]`` additionally measures compositional accuracy (ShapesWorld verifier of
``dream.eval.compositional``, DSG-scored) per method with a trained pipeline (default the shipped
``dream_tiny.shapes``) on ShapesWorld test prompts, through ``DreamPipeline.generate`` (the pipeline's text
encoder and ``num_iter``; tau scaled to it); if anything needed is missing it prints why it is unavailable.

    python benchmarks/bench_sad.py --threads 1 --repeats 3
    python benchmarks/bench_sad.py --taus 8 --repeats 1 --num-iter 16       # quick look

On a CPU shared with other processes use ``--threads 1`` or ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP's default
spin-waiting made 2-thread sampling ~20x slower on a loaded 2-core machine). Ratios are reported from wall
time and from process CPU time (``*_cpu``, robust to other load).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import _sync, build_model, fmt_table, measure_peaks, reference_config, reference_inputs, summarize, write_results  # noqa: E402,E501

OFFICIAL = {"bf16": {"plain": 0.843, "sad-tau8": 1.276, "sad-tau32": 2.531, "best-of-5": 4.224},
            "fp32": {"plain": 1.168, "sad-tau8": 1.686, "sad-tau32": 3.310, "best-of-5": 5.855},
            "bf16_peak_tflops": 2.05, "cost_bf16": {"plain": 1.73, "sad-tau8": 2.62, "best-of-5": 8.66},
            "sad_over_best_of_5_tau8": {"bf16": 3.31, "fp32": 3.47}}


def methods(args):
    out = [("plain", None, None)]
    for tau in args.taus:
        out.append((f"sad-tau{tau}", tau, True))
        if not args.no_sequential:
            out.append((f"sad-tau{tau}-sequential", tau, False))
    out.append(("best-of-5", None, None))
    return out


def make_run(model, sc, name, tau, batched, inputs, K):
    from dream.sampling import MARSampler, SemanticallyAlignedDecoding, best_of_k

    feats, null, ids = inputs["text_feats"], inputs["null_feats"], inputs["clip_ids"]
    if name == "plain":
        s = MARSampler(model, sc)
        return lambda g: s.sample(feats, null, generator=g)
    if name.startswith("best-of"):
        s = MARSampler(model, sc)
        return lambda g: best_of_k(s, feats, ids, null, k=K, generator=g).tokens
    sad = SemanticallyAlignedDecoding(model, sc, num_candidates=K, threshold=tau, batched=batched)
    return lambda g: sad.sample(feats, ids, null, generator=g).tokens


def verifier_accuracy(args, K):
    """Compositional accuracy per method with a trained pipeline (``dream_tiny.shapes`` or a pipeline folder)
    on ShapesWorld test prompts, or the reason it is unavailable. Uses the pipeline's own text encoder,
    sampling length (``num_iter`` from its pipeline.json, else ``--num-iter``; tau scaled to it) and decoding."""
    try:
        from dream.data.shapes import ShapesConfig, ShapesWorld
        from dream.eval.compositional import Verifier
        from dream.pipeline import DreamPipeline, pipeline_meta
    except Exception as e:  # noqa: BLE001 - report, do not fail the speed benchmark
        return None, f"imports failed: {type(e).__name__}: {e}"
    try:
        pipe = DreamPipeline.from_pretrained(args.verifier, text_encoder=args.text_encoder)
    except Exception as e:  # noqa: BLE001
        return None, f"no trained pipeline {args.verifier!r}: {type(e).__name__}: {e}"
    meta = pipeline_meta(args.verifier)[1]
    num_iter = int(meta.get("num_iter", args.num_iter))
    size = pipe.model.config.img_size
    try:
        prompts = ShapesWorld(ShapesConfig(image_size=size)).random_prompt_specs(args.verifier_prompts, "test")
        caps, specs = [p.caption for p in prompts], [p.spec for p in prompts]
        ver = Verifier(ShapesConfig(image_size=size))
        runs = [("plain", {})] + [(f"sad-tau{t}", {"sad": (K, max(1, min(num_iter - 1, round(t * num_iter / args.num_iter))))})
                                  for t in args.taus] + [(f"best-of-{K}", {"rerank": K})]
        acc = {"num_iter": num_iter, "prompts": len(caps), "text_encoder": pipe.text_encoder_spec}
        for name, kw in runs:
            t0 = time.perf_counter()
            images = pipe.generate(caps, num_iter=num_iter, cfg=args.cfg, seed=args.seed, batch_size=args.batch,
                                   autocast=torch.bfloat16 if args.precision == "bf16" else None, **kw)
            res = ver.score(images, specs, details=False)
            acc[name] = {"tau_steps": kw.get("sad", (None, None))[1], "prompt_accuracy": res["prompt_accuracy"],
                         "question_accuracy": res["question_accuracy"], "dsg_score": res["dsg_score"],
                         "per_type": res["accuracy"], "s_per_image": (time.perf_counter() - t0) / len(caps)}
        return acc, None
    except Exception as e:  # noqa: BLE001
        return None, f"evaluation failed: {type(e).__name__}: {e}"


def json_dumps(obj) -> str:
    import json

    return json.dumps(obj, indent=2, default=float)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--taus", type=int, nargs="+", default=[8, 16, 32], help="SAD thresholds (steps of num_iter)")
    p.add_argument("--no-sequential", action="store_true", help="skip the candidate-at-a-time SAD rows")
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--num-iter", type=int, default=64)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fp32 by default: bf16 GEMMs are slower than fp32 on CPUs without AMX")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu | cuda[:i] (on a GPU the candidate-at-a-time path is latency-bound)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-repeats", type=int, default=5)
    p.add_argument("--verifier", nargs="?", const="dream_tiny.shapes", default=None,
                   help="measure compositional accuracy with this trained pipeline (default dream_tiny.shapes)")
    p.add_argument("--text-encoder", default=None, help="override the pipeline's text encoder for --verifier")
    p.add_argument("--verifier-prompts", type=int, default=64)
    p.add_argument("--verifier-only", action="store_true",
                   help="skip the timing; write the accuracies to results/bench_sad_verifier.json")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/bench_sad.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from dream.sampling import SamplerConfig

    K = args.candidates
    if args.verifier_only:
        args.verifier = args.verifier or "dream_tiny.shapes"
        acc, why = verifier_accuracy(args, K)
        print(f"compositional accuracy: unavailable ({why})" if acc is None else json_dumps(acc))
        out = write_results("bench_sad_verifier", dict(
            args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            verifier=acc if acc is not None else {"unavailable": why}), args.out)
        print(f"wrote {out}")
        return 0 if acc is not None else 1
    dev = args.device
    peaks = [measure_peaks(args.peak_repeats, device=dev)]
    print(f"GEMM peak (start): fp32 {peaks[0]['fp32_tflops'] * 1e3:.1f} GFLOP/s, bf16 "
          f"{peaks[0]['bf16_tflops'] * 1e3:.1f} GFLOP/s, threads {torch.get_num_threads()}")
    model = build_model(reference_config(), device=dev)
    inputs = reference_inputs(model.config, args.batch, seed=args.seed, device=dev)
    sc = SamplerConfig(num_iter=args.num_iter, cfg=args.cfg, cfg_schedule="linear", temperature=1.0,
                       precision=args.precision)
    warm = SamplerConfig(num_iter=2, cfg=args.cfg, precision=args.precision)
    make_run(model, warm, "plain", None, None, inputs, K)(torch.Generator().manual_seed(0))   # warm-up
    rows = []
    for name, tau, batched in methods(args):
        fn = make_run(model, sc, name, tau, batched, inputs, K)
        times, cpu = [], []
        for r in range(args.repeats):
            g = torch.Generator().manual_seed(args.seed + r)
            t0, c0 = time.perf_counter(), time.process_time()
            fn(g)
            _sync(dev)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        s = summarize(times)
        row = dict(method=name, tau=tau, batched=batched, s_per_batch=s["median_s"],
                   s_per_image=s["median_s"] / args.batch, images_per_s=args.batch / s["median_s"],
                   cpu_s_per_image=statistics.median(cpu) / args.batch, times=s)
        rows.append(row)
        print(f"  {name:22s} {row['s_per_image']:7.3f} s/image  {row['images_per_s']:6.3f} img/s  (runs "
              f"{', '.join(f'{t:.1f}' for t in times)} s/batch; cpu {row['cpu_s_per_image']:.3f} s/image)", flush=True)
    peaks.append(measure_peaks(args.peak_repeats, device=dev))
    fp32_peak = statistics.median([q["fp32_tflops"] for q in peaks])
    bf16_peak = statistics.median([q["bf16_tflops"] for q in peaks])
    by = {r["method"]: r for r in rows}
    bo5 = by["best-of-5"]
    for r in rows:
        r["throughput_vs_best_of_5"] = bo5["s_per_image"] / r["s_per_image"]
        r["time_vs_plain"] = r["s_per_image"] / by["plain"]["s_per_image"]
        r["cost_x_bf16_peak"] = r["s_per_image"] * bf16_peak
        r["cost_x_fp32_peak"] = r["s_per_image"] * fp32_peak
    ratios = {}  # wall-clock ratios, and the same from process CPU time (robust to other load on the machine)
    for tau in args.taus:
        b = by[f"sad-tau{tau}"]
        for key, tag in (("s_per_image", ""), ("cpu_s_per_image", "_cpu")):
            ratios[f"sad_tau{tau}_over_best_of_5{tag}"] = bo5[key] / b[key]
            if f"sad-tau{tau}-sequential" in by:
                ratios[f"sad_tau{tau}_batched_over_sequential{tag}"] = by[f"sad-tau{tau}-sequential"][key] / b[key]
    each = ", ".join("%.0f/%.0f" % (q["fp32_tflops"] * 1e3, q["bf16_tflops"] * 1e3) for q in peaks)
    print(f"\nGEMM peaks (median of start/end): fp32 {fp32_peak * 1e3:.1f}, bf16 {bf16_peak * 1e3:.1f} GFLOP/s "
          f"(each fp32/bf16: {each}); precision {args.precision}, threads {torch.get_num_threads()}")
    print(fmt_table([[r["method"], r["s_per_image"], r["images_per_s"], r["cpu_s_per_image"],
                      r["throughput_vs_best_of_5"], r["time_vs_plain"], r["cost_x_bf16_peak"], r["cost_x_fp32_peak"]]
                     for r in rows], ["method", "s/image", "img/s", "cpu s/img", "x best-of-5", "time/plain",
                                      "s*bf16TF", "s*fp32TF"]))
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    if bf16_peak < fp32_peak:
        print("NOTE: bf16 GEMMs are slower than fp32 on this CPU (no AMX): 's/image x bf16 peak' is not "
              "comparable with the official AMX machine (official costs use its 2.05 TFLOP/s bf16 peak).")
    verifier = None
    if args.verifier:
        acc, why = verifier_accuracy(args, K)
        if acc is None:
            print(f"compositional accuracy: unavailable ({why})")
            verifier = {"unavailable": why}
        else:
            verifier = acc
            print(f"compositional accuracy ({acc['prompts']} ShapesWorld test prompts, {acc['num_iter']} iterations, "
                  f"text encoder {acc['text_encoder']}):")
            for name, a in acc.items():
                if isinstance(a, dict):
                    print(f"  {name:12s} tau {a['tau_steps']}: prompts {a['prompt_accuracy']:.3f}, questions "
                          f"{a['question_accuracy']:.3f}, DSG {a['dsg_score']:.3f} ({a['s_per_image']:.2f} s/image)")
    else:
        print("compositional accuracy: not requested (--verifier [PIPELINE])")
    out = write_results("bench_sad", dict(
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, peaks=peaks,
        fp32_peak_tflops=fp32_peak, bf16_peak_tflops=bf16_peak, official=OFFICIAL, rows=rows, ratios=ratios,
        verifier=verifier, notes=[
            "s_per_image = median wall seconds per batch / batch; cpu_s_per_image = process CPU time",
            *(["bf16 GEMMs are slower than fp32 on this CPU (no AMX): 's x bf16 peak' is not comparable with the "
               "official AMX machine"] if bf16_peak < fp32_peak else [])]), args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
