"""``dream sample``: prompts -> PNG files plus a captioned grid.

    dream sample --model dream_tiny.shapes "a red square" "two blue circles" --out samples/
    dream sample --model runs/x --prompts prompts.txt --sad 5,8 --seed 0 --out samples/
    dream sample --model dream_tiny.shapes --rerank 5 "a green triangle" --out samples/
    dream sample --model dream_tiny.shapes --lora runs/l/lora --lora style.safetensors:0.5 "a red square"
    dream sample --model dream_tiny.shapes --fast "a red square" --out samples/
    dream sample --model dream_tiny.shapes --soft-tokens runs/agsm/tokens "three red circles" --out samples/
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p):
    p.add_argument("prompts", nargs="*", help="prompts (or use --prompts FILE)")
    p.add_argument("--prompts", dest="prompts_file", help="text file with one prompt per line")
    p.add_argument("--model", default="dream_tiny.shapes", help="pipeline folder or shipped name (dream_tiny.shapes)")
    p.add_argument("--text-encoder", default=None, help="override the text encoder spec (minilm | hf:PATH | random)")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-iter", type=int, default=None, help="AR steps (default: the pipeline's, else 64)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the pipeline's, else 3.0)")
    p.add_argument("--cfg-schedule", default=None, choices=["linear", "constant"],
                   help="default: the pipeline's, else linear (official)")
    p.add_argument("--temperature", type=float, default=None, help="default: the pipeline's, else 1.0")
    p.add_argument("--num-sampling-steps", default=None, help='diffusion steps, e.g. "100", "25", "ddim10"')
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sad", default=None, metavar="K,TAU", help="Semantically Aligned Decoding, e.g. 5,8 or 5,0.125")
    p.add_argument("--rerank", type=int, default=None, metavar="K", help="best-of-K reranking with DREAM's score")
    p.add_argument("--fast", action="store_true",
                   help="fast sampling preset (dream.sampling.FAST_PRESET; approximate, see README 'Fast sampling')")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--device", default=None)
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="LoRA adapter (peft folder, diffusers or kohya file) with a weight (default 1); repeatable; "
                        "the adapters are fused into the weights before sampling")
    add_soft_token_arguments(p)


def add_soft_token_arguments(p) -> None:
    p.add_argument("--soft-tokens", default=None, metavar="PATH",
                   help="SoftREPA / AGSM soft tokens (a tokens folder or soft_tokens.safetensors from `dream align`)")
    p.add_argument("--uncon2neg", action=argparse.BooleanOptionalAction, default=None,
                   help="CFG's unconditional branch uses psi- (AGSM's second token set); default: the tokens' setting")


def apply_soft_tokens(pipe, args, command: str) -> None:
    """Load ``--soft-tokens`` into the pipeline (with ``--uncon2neg``); a bad file ends the command."""
    if not getattr(args, "soft_tokens", None):
        if getattr(args, "uncon2neg", None) is not None:
            raise SystemExit(f"{command}: --uncon2neg needs --soft-tokens")
        return
    try:
        bank = pipe.load_soft_tokens(args.soft_tokens, uncon2neg=args.uncon2neg)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{command} --soft-tokens {args.soft_tokens}: {e}") from None
    print(bank.describe(), file=sys.stderr)


def parse_sad(text: str):
    try:
        k, tau = text.split(",")
        tau_v = float(tau)
        return int(k), (int(tau_v) if tau_v >= 1 else tau_v)
    except ValueError as e:
        raise SystemExit(f"--sad expects K,TAU (e.g. 5,8 or 5,0.125), got {text!r}") from e


def apply_loras(model, specs, command: str) -> None:
    """Load every ``PATH[:WEIGHT]`` LoRA into ``model`` and fuse them (plain weights, no wrapper cost); a bad file
    ends the command with the loader's message."""
    if not specs:
        return
    from dream.adapters import LoraFileError, load_lora, merge_lora, parse_lora_path

    for spec in specs:
        path, weight = parse_lora_path(spec)
        try:
            load_lora(model, path, weight=weight)
        except (LoraFileError, FileNotFoundError, ImportError) as e:
            raise SystemExit(f"{command} --lora {spec}: {e}") from None
    merge_lora(model, unload=True)


def run(args) -> int:
    import torch

    from dream.pipeline import DreamPipeline
    from dream.utils.images import save_grid, save_images

    prompts = list(args.prompts)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.exists():
            raise SystemExit(f"dream sample: prompts file not found: {path}")
        prompts += [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not prompts:
        raise SystemExit("dream sample: no prompts given")
    pipe = DreamPipeline.from_pretrained(args.model, device=args.device, text_encoder=args.text_encoder)
    apply_loras(pipe.model, args.lora, "dream sample")
    apply_soft_tokens(pipe, args, "dream sample")
    sad = parse_sad(args.sad) if args.sad else None
    images, scores = pipe.generate(prompts, num_iter=args.num_iter, cfg=args.cfg, temperature=args.temperature,
                                   seed=args.seed, batch_size=args.batch_size, cfg_schedule=args.cfg_schedule,
                                   num_sampling_steps=args.num_sampling_steps, sad=sad, rerank=args.rerank,
                                   progress=True, return_scores=True,
                                   autocast=torch.bfloat16 if args.bf16 else None, fast=args.fast)
    out = Path(args.out)
    paths = save_images(images, out)
    grid = save_grid(images, prompts, out / "grid.png")
    meta = {"prompts": prompts, "files": [p.name for p in paths], "seed": args.seed, "sad": args.sad,
            "rerank": args.rerank, "lora": list(args.lora), "fast": args.fast, "soft_tokens": args.soft_tokens,
            "scores": None if scores is None else scores.tolist()}
    (out / "samples.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {len(paths)} images and {grid}")
    return 0
