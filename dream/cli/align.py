"""``dream align``: alignment runs.

    dream align dreamsync --config configs/dreamsync_shapes.yaml --out runs/ds        # DreamSync (3 rounds)
    dream align dreamsync --out runs/ds --resume                                      # continue where it stopped
    dream align dreamsync --out runs/ds --set rounds=1 k=4 num_prompts=64             # overrides
    dream align agsm --config configs/soft_tokens_shapes.yaml --out runs/agsm          # AGSM soft tokens
    dream align softrepa --out runs/softrepa --set steps=800                           # SoftREPA soft tokens

A DreamSync run folder holds config.json, per-round candidates / scores / selection / adapters / evaluations,
report.json, grid.png (rounds side by side) and accuracy.png. A soft-token run folder (:mod:`dream.align.soft_train`)
holds config.json, checkpoint.pt, metrics.jsonl, val.jsonl, tokens/ (safetensors + JSON; load with
``dream sample --soft-tokens RUN/tokens``), loss.png, diagnostics.png, val.png and report.json.
"""
from __future__ import annotations

import argparse
import logging
import sys

from dream.cli.options import parse_set

SOFT_METHODS = ("softrepa", "agsm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dream.utils import run_logger

    sub = p.add_subparsers(dest="align_command", metavar="METHOD")
    d = sub.add_parser("dreamsync", help="DreamSync: generate -> judge -> select -> LoRA -> merge, for rounds")
    for name, help_ in (("softrepa", "SoftREPA: contrastive soft text tokens (arXiv 2503.08250)"),
                        ("agsm", "AGSM: alignment-guided score matching with dual soft tokens (arXiv 2605.30038)")):
        s = sub.add_parser(name, help=help_)
        _common(s, "SoftTrainConfig")
        run_logger.add_arguments(s)
    _common(d, "DreamSyncConfig")


def _common(d: argparse.ArgumentParser, what: str) -> None:
    d.add_argument("--config", default=None, help=f"YAML / JSON with {what} fields")
    d.add_argument("--out", required=True, help="run folder")
    d.add_argument("--resume", action="store_true", help="continue the run in --out (same config)")
    d.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config fields (values parsed as JSON, else strings)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")


def _config(cls, args, **fixed):
    from pathlib import Path

    saved = Path(args.out) / "config.json"
    if args.resume and saved.exists() and not args.config:
        cfg = cls.load(saved)
    elif args.config:
        cfg = cls.load(args.config)
    else:
        cfg = cls()
    return cfg.replace(**{**parse_set(args.set), **fixed})


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cmd = getattr(args, "align_command", None)
    if cmd in SOFT_METHODS:
        return _run_soft(args, cmd)
    if cmd != "dreamsync":
        print("usage: dream align {dreamsync,softrepa,agsm} --out RUN [--config X] [--resume]", file=sys.stderr)
        return 2
    from dream.align.dreamsync import DreamSync, DreamSyncConfig

    cfg = _config(DreamSyncConfig, args)
    report = DreamSync(cfg, args.out, resume=args.resume, progress=not args.quiet).run()
    base, last = report["base"], report["rounds"][-1]["eval"]
    print(f"prompt accuracy {base['prompt_accuracy']:.3f} -> {last['prompt_accuracy']:.3f}; counting "
          f"{base['geneval']['counting']:.3f} -> {last['geneval']['counting']:.3f}; position "
          f"{base['geneval']['position']:.3f} -> {last['geneval']['position']:.3f} (report: {args.out}/report.json)")
    return 0


def _run_soft(args, method: str) -> int:
    from pathlib import Path

    from dream.align.soft_train import SoftTokenTrainer, SoftTrainConfig
    from dream.utils.config import ConfigError
    from dream.utils.run_logger import RunLogger, options_from_args

    try:
        cfg = _config(SoftTrainConfig, args, method=method)
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"dream align {method}: {e}") from None
    opts = options_from_args(args)
    out = Path(args.out)
    if not args.resume and (out / "checkpoint.pt").exists():
        raise SystemExit(f"dream align {method}: {out} already holds a run; pass --resume or use a new --out")
    trainer = SoftTokenTrainer(cfg, out, resume=args.resume, progress=not args.quiet)
    print(trainer.bank.describe())
    with RunLogger(out, config=cfg.to_dict(), resume_step=trainer.step if args.resume else None, **opts) as rl:
        trainer.logger = rl
        report = trainer.run()
    val = report["val"][-1] if report["val"] else {}
    print(f"{method}: {report['steps']} steps; held-out positive-pair error {val.get('err_pos', float('nan')):.4f}, "
          f"win rate {val.get('win_rate', float('nan')):.3f}; tokens: {report['tokens']} (report: {out}/report.json)")
    return 0
