"""``dream train-sd``: train a small Stable Diffusion model (diffusers classes) on ShapesWorld
(:mod:`dream.train.sd_shapes`); the run ends with a diffusers folder in ``OUT/pipeline`` and its measured accuracy.

    dream train-sd --config configs/sd_tiny_shapes.yaml --out runs/sd_tiny_shapes
    dream train-sd --resume runs/sd_tiny_shapes          # continue exactly from the last checkpoint
    dream train-sd --resume runs/sd_tiny_shapes --set steps=6000
"""
from __future__ import annotations

import json
from pathlib import Path

from dream.cli.options import parse_set


def add_arguments(p):
    from dream.utils import run_logger

    p.add_argument("--config", help="YAML or JSON config (see configs/sd_tiny_shapes.yaml)")
    p.add_argument("--out", help="run folder (latents/, checkpoints, metrics.jsonl, loss.png, pipeline/)")
    p.add_argument("--resume", metavar="RUN", help="resume the run in this folder from its last checkpoint")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget of this invocation's training")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override any config field (JSON value)")
    p.add_argument("--no-eval", action="store_true", help="skip the export-time evaluation (export only)")
    run_logger.add_arguments(p)


def run(args) -> int:
    import torch

    from dream.train.config import run_config
    from dream.train.sd_shapes import SDShapesTrainer, SDTrainConfig
    from dream.utils.run_logger import options_from_args

    if args.threads:
        torch.set_num_threads(args.threads)
    out, cfg = run_config(SDTrainConfig, "dream train-sd", args, "sd_train_config.json")
    over = {k: getattr(args, k) for k in ("steps", "minutes", "seed") if getattr(args, k) is not None}
    over.update(parse_set(args.set))
    cfg = cfg.replace(**over)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "sd_train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    trainer = SDShapesTrainer(cfg, out, resume=bool(args.resume), log_to=options_from_args(args))
    res = trainer.fit(evaluate=not args.no_eval)
    print(json.dumps(res, indent=2))
    print(f"diffusers folder -> {out}/pipeline" if not args.no_eval else f"checkpoint -> {out}")
    return 0
