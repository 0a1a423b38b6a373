"""Benchmark: the fast-sampling techniques, alone and combined (``fast=True``), speed and quality, same run.

Techniques (each a :class:`~dream.sampling.SamplerConfig` option; ``fast`` = :func:`dream.sampling.fast_config`):

==================  ===========  ================================================================================
row                 kind         what
==================  ===========  ================================================================================
default             baseline     today's sampler (``fast=False``)
official-loop       baseline     the diffusion head run the official way (``bench_sampling.LegacyHead``)
reuse-text-kv       exact        the decoder's cross-attention keys / values of the text projected once
head-ddpm12         approximate  respaced DDPM with 12 head steps (``num_sampling_steps``; learned variance kept)
head-dpm++2m        approximate  DPM-Solver++(2M), arXiv 2211.01095 (``diffusion_sampler``), 10 steps
head-dpm++2m-sde    approximate  SDE-DPM-Solver++(2M), same paper, 10 steps
cfg-cache{K}        approximate  LazyMAR condition cache, arXiv 2503.12450 (``cfg_refresh=K``)
token-cache         approximate  LazyMAR token cache (``token_refresh=4, token_ratio=0.25``)
cfg-until-{F}       approximate  CFG on the first F of the AR steps only (``cfg_until``, arXiv 2404.07724)
ar-steps            approximate  FAST_AR_SCALE (5/8) of the AR steps (``num_iter``), rounded up
fast                combined     the preset
==================  ===========  ================================================================================

Speed (every row, both configurations): seconds per image from process CPU time and wall time, median of
``--repeats`` runs taken in turn (A B C ... A B C ...) in one process with ``torch.set_num_threads``, and the
ratio to ``default`` and to ``official-loop`` of the same run. Configurations: ``shapes`` (the shipped
``dream_tiny.shapes`` with its own settings: 16 AR steps, CFG 2 constant, 50 head steps; ``--shapes-batch``
prompts per batch) and ``reference`` (``bench_sampling.py``'s: official CPU baseline config (a), random weights,
batch 16, 64 AR steps, CFG 3 linear, 100 head steps).

Quality (``shapes`` only; ``--prompts`` held-out GenEval-shapes prompts of ``--prompt-seeds``, one image each,
same sampling seed for every row): whole-prompt accuracy of the exact verifier, GenEval overall, FID (CNN) against
real held-out images, each with its standard error (binomial; FID: bootstrap over the generated images), and the
PAIRED difference to ``default`` (same prompts and seeds; accuracy difference and FID ratio with their standard
errors: per-prompt differences; a paired bootstrap for FID).

    python benchmarks/bench_fast_sampling.py --threads 1                            # everything (long on 2 cores)
    python benchmarks/bench_fast_sampling.py --configs shapes --rows default fast --prompts 300 --repeats 3
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_model, fmt_table, reference_config, reference_inputs, write_results  # noqa: E402


def techniques() -> dict:
    """name -> (kind, base SamplerConfig -> the row's SamplerConfig) (official-loop: the default config, its head
    run the official way)."""
    from dream.sampling import FAST_AR_SCALE, FAST_PRESET, fast_config

    steps = FAST_PRESET["num_sampling_steps"]
    return {
        "default": ("baseline", lambda b: b),
        "official-loop": ("baseline", lambda b: b),
        "reuse-text-kv": ("exact", lambda b: b.replace(reuse_text_kv=True)),
        f"head-ddpm{steps}": ("approximate", lambda b: b.replace(num_sampling_steps=steps)),
        "head-dpm++2m": ("approximate", lambda b: b.replace(diffusion_sampler="dpm++2m", num_sampling_steps="10")),
        "head-dpm++2m-sde": ("approximate", lambda b: b.replace(diffusion_sampler="dpm++2m-sde",
                                                                num_sampling_steps="10")),
        "cfg-cache2": ("approximate", lambda b: b.replace(cfg_refresh=2)),
        "token-cache": ("approximate", lambda b: b.replace(token_refresh=4, token_ratio=0.25)),
        "cfg-until-0.5": ("approximate", lambda b: b.replace(cfg_until=0.5)),
        "ar-steps": ("approximate", lambda b: b.replace(num_iter=max(1, math.ceil(b.num_iter * FAST_AR_SCALE)))),
        "fast": ("combined", lambda b: fast_config(b)),
    }


def sampler_for(model, name: str, sc):
    from dream.sampling import MARSampler

    s = MARSampler(model, sc)
    if name == "official-loop":
        from bench_sampling import LegacyHead

        s.token_sampler = LegacyHead(s.token_sampler)
    return s


# -----------------------------------------------------------------------------------------------
# speed
# -----------------------------------------------------------------------------------------------
def time_rows(model, base, rows: list, inputs: dict, repeats: int, seed: int) -> dict:
    """Interleaved timing: per row the CPU / wall seconds of each of ``repeats`` full sample calls (plus one
    untimed warm-up call of every row first)."""
    table = techniques()
    configs = {r: table[r][1](base) for r in rows}
    out = {r: {"cpu_s": [], "wall_s": []} for r in rows}
    B = inputs["text_feats"].shape[0]

    def once(r):
        s = sampler_for(model, r, configs[r])
        g = torch.Generator().manual_seed(seed)
        t0, c0 = time.perf_counter(), time.process_time()
        s.sample(inputs["text_feats"], inputs["null_feats"], text_padding_mask=inputs.get("pad"),
                 null_padding_mask=inputs.get("null_pad"), generator=g)
        return time.perf_counter() - t0, time.process_time() - c0

    for r in rows:
        once(r)
    for _ in range(repeats):
        for r in rows:
            w, c = once(r)
            out[r]["wall_s"].append(w / B)
            out[r]["cpu_s"].append(c / B)
    for r in rows:
        out[r]["cpu_s_per_image"] = statistics.median(out[r]["cpu_s"])
        out[r]["wall_s_per_image"] = statistics.median(out[r]["wall_s"])
    for r in rows:
        for ref in ("default", "official-loop"):
            if ref in out:
                for k in ("cpu", "wall"):
                    out[r][f"speedup_vs_{ref}_{k}"] = out[ref][f"{k}_s_per_image"] / out[r][f"{k}_s_per_image"]
    return out


# -----------------------------------------------------------------------------------------------
# quality (shapes)
# -----------------------------------------------------------------------------------------------
def generate(pipe, sc, captions, seed: int, batch: int) -> torch.Tensor:
    """``DreamPipeline.generate``'s plain path with an explicit SamplerConfig (same RNG use: one generator)."""
    from dream.sampling import MARSampler

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(captions), batch):
        chunk = captions[i:i + batch]
        feats, pad = pipe.text.features(chunk)
        null, null_pad = pipe.text.null(len(chunk))
        toks = MARSampler(pipe.model, sc).sample(feats, null, text_padding_mask=pad, null_padding_mask=null_pad,
                                                 generator=g)
        out.append(pipe.tokenizer.decode(toks.float()).clamp(-1, 1).cpu())
    return torch.cat(out)


def fid_from_features(real, feats: torch.Tensor) -> float:
    from dream.eval.fid import frechet_distance

    f = feats.double()
    return float(frechet_distance(*real, f.mean(0), torch.cov(f.T)))


def quality(pipe, bench, base, rows, prompts, seed: int, batch: int, boot: int) -> dict:
    """Per row: the GenEval-shapes report plus per-prompt pass / fail and the CNN features, then the paired
    comparison with ``default``."""
    table = techniques()
    caps = [p.caption for p in prompts]
    specs = [p.spec for p in prompts]
    res, passed, feats = {}, {}, {}
    for r in rows:
        t0 = time.process_time()
        imgs = generate(pipe, table[r][1](base), caps, seed, batch)
        dt = time.process_time() - t0
        rep = bench.evaluate(imgs, prompts)
        det = bench.verifier.score(imgs, specs, details=True)["details"]
        passed[r] = torch.tensor([float(all(d["passed"])) for d in det])
        with torch.no_grad():
            feats[r] = bench._fid(imgs).double()
        res[r] = {"prompt_accuracy": rep["prompt_accuracy"], "prompt_accuracy_se": rep["prompt_accuracy_se"],
                  "geneval_overall": rep["geneval"]["overall"], "geneval_overall_se": rep["geneval_se"]["overall"],
                  "geneval": rep["geneval"], "fid_cnn": rep["fid_cnn"], "generation_cpu_s_per_image": dt / len(caps)}
        print(f"    {r:18s} accuracy {rep['prompt_accuracy']:.3f} ±{rep['prompt_accuracy_se']:.3f}  GenEval "
              f"{rep['geneval']['overall']:.3f}  FID(CNN) {rep['fid_cnn']:.1f}", flush=True)
    n = len(prompts)
    g = torch.Generator().manual_seed(12345)
    idx = [torch.randint(0, n, (n,), generator=g) for _ in range(boot)]
    boot_fid = {r: torch.tensor([fid_from_features(bench._real, feats[r][i]) for i in idx]) for r in rows}
    for r in rows:
        res[r]["fid_cnn_se"] = float(boot_fid[r].std())
        if "default" in rows:
            d = passed[r] - passed["default"]
            res[r]["paired_accuracy_diff"] = float(d.mean())
            res[r]["paired_accuracy_diff_se"] = float(d.std() / math.sqrt(n))
            ratio = boot_fid[r] / boot_fid["default"]
            res[r]["fid_ratio"] = res[r]["fid_cnn"] / res["default"]["fid_cnn"]
            res[r]["fid_ratio_se"] = float(ratio.std())
    return res


# -----------------------------------------------------------------------------------------------
def shapes_setup(batch: int, prompt_seed: int):
    from dream.eval.geneval_shapes import geneval_prompts
    from dream.pipeline import DreamPipeline

    pipe = DreamPipeline.from_pretrained("dream_tiny.shapes")
    caps = [p.caption for p in geneval_prompts(batch, prompt_seed)]
    feats, pad = pipe.text.features(caps)
    null, null_pad = pipe.text.null(len(caps))
    return pipe, {"text_feats": feats, "null_feats": null, "pad": pad, "null_pad": null_pad}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["shapes", "reference"], choices=["shapes", "reference"])
    p.add_argument("--rows", nargs="+", default=None, help=f"rows (default all: {', '.join(techniques())})")
    p.add_argument("--quality-rows", nargs="+", default=None,
                   help="rows whose quality is measured (default: every row but official-loop)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes-batch", type=int, default=128, help="prompts per timed shapes batch")
    p.add_argument("--reference-batch", type=int, default=16)
    p.add_argument("--reference-num-iter", type=int, default=64)
    p.add_argument("--prompts", type=int, default=1000, help="held-out prompts per prompt seed (0: no quality)")
    p.add_argument("--prompt-seeds", type=int, nargs="+", default=[0],
                   help="GenEval-shapes prompt seeds to report on (the preset was tuned on seed 100)")
    p.add_argument("--tune-prompt-seed", type=int, default=100, help="the prompt seed the timed batch comes from")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same for every row)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for FID standard errors")
    p.add_argument("--num-real", type=int, default=1000, help="real held-out images for FID (CNN)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/bench_fast_sampling.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    table = techniques()
    rows = args.rows or list(table)
    unknown = sorted(set(rows) - set(table))
    if unknown:
        raise SystemExit(f"unknown rows {unknown} (known: {', '.join(table)})")
    result = {"rows": {r: {"kind": table[r][0]} for r in rows}, "configs": {}}
    from dream.sampling import FAST_PRESET

    result["fast_preset"] = FAST_PRESET
    for name in args.configs:
        if name == "shapes":
            pipe, inputs = shapes_setup(args.shapes_batch, args.tune_prompt_seed)
            model, base = pipe.model, pipe.sampler_config()
            label = (f"dream_tiny.shapes, its own settings (num_iter {base.num_iter}, CFG {base.cfg} "
                     f"{base.cfg_schedule}, 50 head steps), batch {args.shapes_batch}")
        else:
            from dream.sampling import SamplerConfig

            model = build_model(reference_config())
            inputs = reference_inputs(model.config, args.reference_batch, seed=args.seed)
            base = SamplerConfig(num_iter=args.reference_num_iter, cfg=3.0, cfg_schedule="linear")
            label = (f"reference (bench_sampling.py): official baseline config (a), batch {args.reference_batch}, "
                     f"{args.reference_num_iter} AR steps, CFG 3 linear, 100 head steps")
        print(f"\n[{name}] {label}: timing {len(rows)} rows x {args.repeats} (interleaved)", flush=True)
        speed = time_rows(model, base, rows, inputs, args.repeats, args.seed)
        entry = {"label": label, "speed": speed, "configs": {r: table[r][1](base).to_dict() for r in rows}}
        summary = [[r, table[r][0], speed[r]["cpu_s_per_image"], speed[r]["wall_s_per_image"],
                    speed[r].get("speedup_vs_default_cpu", float("nan")),
                    speed[r].get("speedup_vs_default_wall", float("nan")),
                    speed[r].get("speedup_vs_official-loop_cpu", float("nan")),
                    speed[r].get("speedup_vs_official-loop_wall", float("nan"))] for r in rows]
        print(fmt_table(summary, ["row", "kind", "cpu s/img", "wall s/img", "x default", "(wall)", "x official",
                                  "(wall)"]), flush=True)
        if name == "shapes" and args.prompts > 0:
            from dream.eval.geneval_shapes import GenEvalShapes, geneval_prompts

            bench = GenEvalShapes(num_real=args.num_real)
            qrows = args.quality_rows or [r for r in rows if r != "official-loop"]
            entry["quality"] = {}
            for ps in args.prompt_seeds:
                print(f"  quality: {args.prompts} held-out prompts, prompt seed {ps}, sampling seed {args.seed}",
                      flush=True)
                q = quality(pipe, bench, base, qrows, geneval_prompts(args.prompts, ps), args.seed,
                            args.shapes_batch, args.bootstrap)
                entry["quality"][str(ps)] = q
                print(fmt_table([[r, q[r]["prompt_accuracy"], q[r]["prompt_accuracy_se"],
                                  q[r].get("paired_accuracy_diff", float("nan")),
                                  q[r].get("paired_accuracy_diff_se", float("nan")), q[r]["geneval_overall"],
                                  q[r]["fid_cnn"], q[r]["fid_cnn_se"], q[r].get("fid_ratio", float("nan")),
                                  q[r].get("fid_ratio_se", float("nan"))] for r in qrows],
                                ["row", "accuracy", "se", "paired diff", "se", "GenEval", "FID", "se", "FID ratio",
                                 "se"]), flush=True)
        result["configs"][name] = entry
    result["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out = write_results("bench_fast_sampling", result, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
