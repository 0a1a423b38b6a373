"""``dream train``: train or fine-tune DREAM from a config file (YAML/JSON) with flag overrides.

    dream train --config configs/dream_tiny_shapes.yaml --out runs/x
    dream train --config configs/x.yaml --data 'shards/{000..009}.tar' --out runs/x --steps 2000
    dream train --resume runs/x                      # continue exactly where it stopped
    dream train --config configs/x.yaml --init-from ckpt/ --lora rank=16,alpha=16,targets=decoder_attn --out runs/l
    torchrun --nproc_per_node 2 -m dream.cli train --config ... --out runs/x      # DDP (gloo on CPU)
"""
from __future__ import annotations

import json
from pathlib import Path

from dream.cli.options import parse_set

_FLAGS = {  # flag -> (TrainConfig field, type)
    "--model": ("model", str), "--data": ("data", str), "--tokenizer": ("tokenizer", str),
    "--text-encoder": ("text_encoder", str), "--batch-size": ("batch_size", int), "--grad-accum": ("grad_accum", int),
    "--steps": ("steps", int), "--minutes": ("minutes", float), "--lr": ("lr", float), "--blr": ("blr", float),
    "--warmup-steps": ("warmup_steps", int), "--precision": ("precision", str), "--seed": ("seed", int),
    "--init-from": ("init_from", str), "--ema-decay": ("ema_decay", float), "--ckpt-every": ("ckpt_every", int),
    "--log-every": ("log_every", int), "--num-workers": ("num_workers", int), "--device": ("device", str),
    "--sample-every": ("sample_every", int),
}


def add_arguments(p):
    from dream.utils import run_logger

    p.add_argument("--config", help="YAML or JSON training config (see configs/)")
    p.add_argument("--out", help="run folder (checkpoints, metrics.jsonl, loss.png, samples/)")
    p.add_argument("--resume", metavar="RUN", help="resume the run in this folder from its last checkpoint")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override any config field (JSON value)")
    p.add_argument("--allow-command-urls", action="store_true",
                   help="with --resume: open shard URLs from the run folder's train_config.json that start a program "
                        "(pipe:CMD, or https:// etc. through curl); refused by default unless --data is given again")
    p.add_argument("--lora", default=None, metavar="rank=R,alpha=A,targets=T",
                   help="train a LoRA adapter only (targets: decoder_attn | decoder | text_aligner | diffloss | encoder "
                        "| all, joined with +; also dropout=, use_dora=, use_rslora=); saved to OUT/lora (peft)")
    for flag, (field, typ) in _FLAGS.items():
        p.add_argument(flag, dest=field, type=typ, default=None, help=f"override `{field}`")
    run_logger.add_arguments(p)


def run(args) -> int:
    from dream.train.config import TrainConfig, refuse_command_urls, run_config
    from dream.train.loop import Trainer
    from dream.utils.run_logger import options_from_args

    out, cfg = run_config(TrainConfig, "dream train", args, "train_config.json")
    log_to = options_from_args(args)
    over = {field: getattr(args, field) for _, (field, _) in _FLAGS.items() if getattr(args, field) is not None}
    over.update(parse_set(args.set))
    if args.compile:
        over["compile"] = True
    if args.resume and "data" not in over and not args.allow_command_urls:
        refuse_command_urls(cfg.data, Path(args.resume) / "train_config.json")
    if args.lora:
        from dream.adapters.spec import lora_spec

        try:
            over["lora"] = lora_spec(args.lora)
        except ValueError as e:
            raise SystemExit(f"dream train --lora: {e}") from None
    cfg = cfg.replace(**over)
    Path(out).mkdir(parents=True, exist_ok=True)
    from dream.train import distributed as D

    trainer = Trainer(cfg, out, resume=bool(args.resume), log_to=log_to)
    if D.is_main():
        (Path(out) / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    res = trainer.fit()
    if D.is_main():
        weights = f"{out}/lora (LoRA adapter, peft)" if cfg.lora else f"{out}/model (weights)"
        print(f"trained {res['steps']} steps in {res['wall_s']:.0f} s -> {weights}, {out}/loss.png")
    return 0
