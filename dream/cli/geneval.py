"""``dream eval geneval-shapes``: GenEval's categories on ShapesWorld (:mod:`dream.eval.geneval_shapes`).

    dream eval geneval-shapes --model dream_tiny.shapes --prompts 300 --prompt-seed 0 --seed 0 --out r.json
    dream eval geneval-shapes --model dream_tiny.shapes --lora runs/ds/round3/lora --sad 4,0.25 --out r.json
    dream eval geneval-shapes --model dream_tiny.shapes --soft-tokens runs/agsm/tokens --prompt-seed 1 --out r.json

Prints a one-line summary and writes the report (every rate with its standard error) as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dream.cli.sample import add_soft_token_arguments

    p.add_argument("--model", required=True,
                   help="a shipped tag (dream_tiny.shapes, sd_tiny.shapes) or a pipeline folder (DREAM or diffusers)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="LoRA adapter(s) to load into the model (repeatable)")
    p.add_argument("--sad", default=None, metavar="K,TAU", help="Semantically Aligned Decoding (default: plain)")
    p.add_argument("--fast", action="store_true", help="fast sampling preset (dream.sampling.FAST_PRESET)")
    add_soft_token_arguments(p)
    p.add_argument("--prompts", type=int, default=300, help="held-out prompts (one image each)")
    p.add_argument("--prompt-seed", type=int, default=0, help="which held-out prompts")
    p.add_argument("--exclude", default=None,
                   help="file of captions (one per line, or a JSON list) that must not be used as prompts")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-real", type=int, default=1000, help="real held-out images for FID (CNN)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write the report here (JSON)")
    p.add_argument("--quiet", action="store_true")


def _read_captions(path: str) -> list[str]:
    text = Path(path).read_text()
    if path.endswith(".json"):
        return list(json.loads(text))
    return [line for line in text.splitlines() if line.strip()]


def run(args) -> int:
    from dream.align.generators import DreamGenerator, load_generator
    from dream.cli.sample import apply_soft_tokens, parse_sad
    from dream.eval.geneval_shapes import GenEvalShapes, geneval_prompts

    gen = load_generator(args.model, device=args.device, batch_size=args.batch_size, progress=not args.quiet)
    for spec in args.lora:
        path, _, w = spec.partition(":")
        gen.load_lora(path, weight=float(w) if w else 1.0)
    exclude = _read_captions(args.exclude) if args.exclude else ()
    prompts = geneval_prompts(args.prompts, args.prompt_seed, exclude=exclude)
    bench = GenEvalShapes(num_real=args.num_real)
    if isinstance(gen, DreamGenerator):
        sad = parse_sad(args.sad) if args.sad else None
        pipe = gen.pipe
        apply_soft_tokens(pipe, args, "dream eval geneval-shapes")

        def generate(caps):
            return pipe.generate(caps, seed=args.seed, sad=sad, batch_size=args.batch_size, progress=not args.quiet,
                                 fast=args.fast)
    else:
        if args.sad or args.fast:
            raise SystemExit("--sad and --fast are DREAM's decoding; the model is a diffusers pipeline")
        apply_soft_tokens(gen, args, "dream eval geneval-shapes")

        def generate(caps):
            return gen.generate(caps, args.seed)
    report = bench.run(generate, prompts)
    report["settings"] = {"model": args.model, "lora": args.lora, "sad": args.sad, "prompt_seed": args.prompt_seed,
                          "seed": args.seed, "fast": args.fast, "soft_tokens": args.soft_tokens,
                          "uncon2neg": args.uncon2neg}
    g = report["geneval"]
    print(f"prompt accuracy {report['prompt_accuracy']:.3f} ±{report['prompt_accuracy_se']:.3f}  GenEval overall "
          f"{g['overall']:.3f}  counting {g['counting']:.3f}  position {g['position']:.3f}  over-count "
          f"{report['over_count_rate']:.3f}  FID (CNN) {report.get('fid_cnn', float('nan')):.1f}  "
          f"({report['n_prompts']} prompts)", file=sys.stderr if args.out is None else sys.stdout)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    else:
        print(json.dumps(report, indent=2))
    return 0
