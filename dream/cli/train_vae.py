"""``dream train-vae``: train a small KL-VAE tokenizer on ShapesWorld (see :mod:`dream.train.vae`).

    dream train-vae --config configs/vae_shapes.yaml --out runs/vae_shapes
    dream train-vae --resume runs/vae_shapes          # continue from the last checkpoint
    dream train --config configs/dream_tiny_shapes.yaml --tokenizer runs/vae_shapes/tokenizer ...
"""
from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p):
    from dream.utils import run_logger

    p.add_argument("--config", help="YAML or JSON VAE training config (see configs/vae_shapes.yaml)")
    p.add_argument("--out", help="run folder (checkpoints, metrics.jsonl, loss.png, recon.png, tokenizer/)")
    p.add_argument("--resume", metavar="RUN", help="resume the run in this folder from its last checkpoint")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    run_logger.add_arguments(p)


def run(args) -> int:
    from dream.train.config import run_config
    from dream.train.vae import VAETrainConfig, VAETrainer
    from dream.utils.run_logger import options_from_args

    out, cfg = run_config(VAETrainConfig, "dream train-vae", args, "vae_train_config.json")
    log_to = options_from_args(args)
    cfg = cfg.replace(**{k: getattr(args, k) for k in ("steps", "minutes", "seed") if getattr(args, k) is not None})
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "vae_train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    res = VAETrainer(cfg, out, resume=bool(args.resume), log_to=log_to).fit()
    print(json.dumps(res, indent=2))
    print(f"tokenizer -> {out}/tokenizer  (reconstructions: {out}/recon.png)")
    return 0
