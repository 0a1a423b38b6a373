"""``dream align``: alignment runs.

    dream align dreamsync --config configs/dreamsync_shapes.yaml --out runs/ds        # DreamSync (3 rounds)
    dream align dreamsync --out runs/ds --resume                                      # continue where it stopped
    dream align dreamsync --out runs/ds --set rounds=1 k=4 num_prompts=64             # overrides

Each run folder holds config.json, per-round candidates / scores / selection / adapters / evaluations,
report.json, grid.png (rounds side by side) and accuracy.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="align_command", metavar="METHOD")
    d = sub.add_parser("dreamsync", help="DreamSync: generate -> judge -> select -> LoRA -> merge, for rounds")
    d.add_argument("--config", default=None, help="YAML / JSON with DreamSyncConfig fields")
    d.add_argument("--out", required=True, help="run folder")
    d.add_argument("--resume", action="store_true", help="continue the run in --out (same config)")
    d.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config fields (values parsed as JSON, else strings)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")


def _overrides(pairs) -> dict:
    out = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {kv!r}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def run(args) -> int:
    from pathlib import Path

    from dream.align.dreamsync import DreamSync, DreamSyncConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if getattr(args, "align_command", None) != "dreamsync":
        print("usage: dream align dreamsync --out RUN [--config X] [--resume]", file=sys.stderr)
        return 2
    saved = Path(args.out) / "config.json"
    if args.resume and saved.exists() and not args.config:
        cfg = DreamSyncConfig.load(saved)
    elif args.config:
        cfg = DreamSyncConfig.load(args.config)
    else:
        cfg = DreamSyncConfig()
    if args.set:
        cfg = cfg.replace(**_overrides(args.set))
    report = DreamSync(cfg, args.out, resume=args.resume, progress=not args.quiet).run()
    base, last = report["base"], report["rounds"][-1]["eval"]
    print(f"prompt accuracy {base['prompt_accuracy']:.3f} -> {last['prompt_accuracy']:.3f}; counting "
          f"{base['geneval']['counting']:.3f} -> {last['geneval']['counting']:.3f}; position "
          f"{base['geneval']['position']:.3f} -> {last['geneval']['position']:.3f} (report: {args.out}/report.json)")
    return 0
