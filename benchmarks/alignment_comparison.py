"""DREAM vs the small Stable Diffusion model, each base and with every alignment method, on the same held-out prompts.

Rows: ``dream_tiny.shapes`` and ``sd_tiny.shapes``, each plain, with the committed DreamSync adapter
(``benchmarks/results/dreamsync_shapes{,_sd}_lora``), the committed SoftREPA and AGSM tokens
(``benchmarks/results/soft_tokens_shapes{,_sd}/{softrepa,agsm}``), and for DREAM its Semantically Aligned Decoding
(SAD, K 5, tau 8). Every row generates one image for each of the same ``--prompts`` held-out test-split prompts
(GenEval-shapes, ``--prompt-seed``; a seed no experiment used for choosing settings) with the same sampling seed and
is scored by the exact verifier's evaluation variant: whole-prompt accuracy, GenEval-shapes' six categories, the
over-count rate, FID (CNN) against real held-out images, seconds per image; each with its standard error, and the
paired difference (same prompts, same seeds) to its model's base row. A row whose artefact is missing is reported as
missing, not silently dropped.

    python benchmarks/alignment_comparison.py                       # writes results/alignment_comparison.json
    python benchmarks/alignment_comparison.py --prompts 16 --num-real 64 --work /tmp/cmp --out /tmp/cmp.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, write_results  # noqa: E402

R = "benchmarks/results"
ROWS = [  # (model label, row, tag, {lora | soft_tokens | sad})
    ("DREAM", "base", "dream_tiny.shapes", {}),
    ("DREAM", "+DreamSync", "dream_tiny.shapes", {"lora": f"{R}/dreamsync_shapes_lora"}),
    ("DREAM", "+SoftREPA", "dream_tiny.shapes", {"soft_tokens": f"{R}/soft_tokens_shapes/softrepa"}),
    ("DREAM", "+AGSM", "dream_tiny.shapes", {"soft_tokens": f"{R}/soft_tokens_shapes/agsm"}),
    ("DREAM", "+SAD", "dream_tiny.shapes", {"sad": [5, 8]}),
    ("SD", "base", "sd_tiny.shapes", {}),
    ("SD", "+DreamSync", "sd_tiny.shapes", {"lora": f"{R}/dreamsync_shapes_sd_lora"}),
    ("SD", "+SoftREPA", "sd_tiny.shapes", {"soft_tokens": f"{R}/soft_tokens_shapes_sd/softrepa"}),
    ("SD", "+AGSM", "sd_tiny.shapes", {"soft_tokens": f"{R}/soft_tokens_shapes_sd/agsm"}),
]
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=300)
    p.add_argument("--prompt-seed", type=int, default=3)
    p.add_argument("--seed", type=int, default=3, help="sampling seed (the same for every row)")
    p.add_argument("--num-real", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=150)
    p.add_argument("--rows", nargs="*", default=None, help="only these rows, e.g. 'DREAM base' 'SD +AGSM'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=str(ROOT / "runs" / "alignment_comparison"), help="per-row reports (resume)")
    p.add_argument("--out", default=str(RESULTS / "alignment_comparison.json"))
    return p.parse_args(argv)


def _generator(tag: str, extra: dict, batch_size: int):
    """(generate(captions, seed), loaded generator) for one row; artefact paths are relative to the repository."""
    from dream.align.generators import DreamGenerator, load_generator

    gen = load_generator(tag, batch_size=batch_size)
    dream = isinstance(gen, DreamGenerator)
    if "lora" in extra:
        gen.load_lora(ROOT / extra["lora"])
    if "soft_tokens" in extra:
        (gen.pipe if dream else gen).load_soft_tokens(ROOT / extra["soft_tokens"])
    if dream:
        sad = tuple(extra["sad"]) if "sad" in extra else None
        return lambda caps, seed: gen.pipe.generate(caps, seed=seed, sad=sad, batch_size=batch_size)
    if "sad" in extra:
        raise ValueError("SAD is DREAM's decoding")
    return lambda caps, seed: gen.generate(caps, seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from dream.eval.geneval_shapes import GenEvalShapes, geneval_prompts, paired_difference

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prompts = geneval_prompts(args.prompts, args.prompt_seed)
    bench = GenEvalShapes(num_real=args.num_real)
    reports, missing = {}, {}
    unknown = sorted(set(args.rows or ()) - {f"{m} {r}" for m, r, _, _ in ROWS})
    if unknown:
        raise SystemExit(f"unknown rows {unknown}")
    for model, row, tag, extra in ROWS:
        key = f"{model} {row}"
        if args.rows and key not in args.rows:
            continue
        art = extra.get("lora") or extra.get("soft_tokens")
        if art and not (ROOT / art).exists():
            missing[key] = f"{art} not found"
            print(f"{key}: missing ({art})", flush=True)
            continue
        f = work / (key.replace(" ", "_").replace("+", "") + ".json")
        if f.exists():
            reports[key] = json.loads(f.read_text())
            continue
        t0 = time.time()
        generate = _generator(tag, extra, args.batch_size)
        rep = bench.run(lambda caps: generate(caps, args.seed), prompts)
        rep["settings"] = {"model": tag, **extra, "wall_s": time.time() - t0}
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(rep))
        tmp.replace(f)
        reports[key] = rep
        print(f"{key}: prompt accuracy {rep['prompt_accuracy']:.3f}, overall {rep['geneval']['overall']:.3f}, "
              f"{rep['seconds_per_image']:.3f} s/image", flush=True)

    rows = {}
    for key, rep in reports.items():
        model = key.split(" ")[0]
        base = reports.get(f"{model} base")
        out = {k: v for k, v in rep.items() if k != "per_prompt"}
        if base is not None and base is not rep:
            out["paired_vs_base"] = {}
            for k in ("prompt_pass", *CATEGORIES, "over_count"):
                try:
                    out["paired_vs_base"][k] = paired_difference(base, rep, k)
                except ValueError:                # no prompt of that category among these prompts
                    pass
        rows[key] = out
    result = {"settings": {"prompts": len(prompts), "prompt_seed": args.prompt_seed, "seed": args.seed,
                           "split": "test", "num_real": args.num_real, "rows": args.rows or [f"{m} {r}" for m, r, _, _ in ROWS]},
              "rows": rows, "missing": missing}
    out = write_results("alignment_comparison", result, args.out)
    print(table(result))
    print(f"wrote {out}")
    return 0


def table(result: dict) -> str:
    head = ("| model | prompt accuracy | Δ vs base | single | two | counting | colours | position | colour attr. | "
            "over-count | FID (CNN) | s/image |")
    lines = [head, "|" + "---|" * 12]
    for key, r in result["rows"].items():
        g, d = r["geneval"], r.get("paired_vs_base", {}).get("prompt_pass")
        delta = f"{d['mean']:+.3f} ± {d['se']:.3f}" if d else "–"
        lines.append(f"| {key} | {r['prompt_accuracy']:.3f} ± {r['prompt_accuracy_se']:.3f} | {delta} | "
                     + " | ".join(f"{g[c]:.3f}" for c in CATEGORIES)
                     + f" | {r['over_count_rate']:.3f} | {r.get('fid_cnn', float('nan')):.0f} | "
                       f"{r['seconds_per_image']:.3f} |")
    for key, why in result["missing"].items():
        lines.append(f"| {key} | missing: {why} |" + " |" * 10)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
