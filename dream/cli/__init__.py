"""The ``dream`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help). Modules are imported lazily so ``dream --help`` stays fast.
COMMANDS = {
    "check-parity": ("dream.cli.check_parity", "compare the model with an official parity fixture"),
    "train": ("dream.cli.train", "train or fine-tune a DREAM model"),
    "train-vae": ("dream.cli.train_vae", "train a small KL-VAE tokenizer on ShapesWorld"),
    "train-sd": ("dream.cli.train_sd", "train a small Stable Diffusion model (diffusers) on ShapesWorld"),
    "sample": ("dream.cli.sample", "generate images from prompts (plain, SAD, best-of-K)"),
    "eval": ("dream.cli.eval", "FID, CLIP score, linear probe, few-shot, retrieval"),
    "data": ("dream.cli.data", "make webdataset shards (folders, CSV/JSONL, ShapesWorld)"),
    "align": ("dream.cli.align", "align a text-to-image model: DreamSync (LoRA), SoftREPA and AGSM (soft tokens)"),
    "demo": ("dream.cli.demo", "ShapesWorld end-to-end demo (the main job of `make demo`)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dream", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(_module=mod)
        try:
            importlib.import_module(mod).add_arguments(p)
        except ModuleNotFoundError as e:  # a subcommand not built yet
            if e.name != mod:
                raise
            p.set_defaults(_missing=str(e))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"dream {args.command}: not available ({args._missing})", file=sys.stderr)
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
