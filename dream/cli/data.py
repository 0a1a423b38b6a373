"""``dream data``: build webdataset shards.

Subcommands::

    dream data make-shards SOURCE --out DIR [--shard-size N] [--prefix shard]
                           [--path-key path] [--caption-key caption] [--no-verify]
        SOURCE is a folder of images with same-name .txt captions, or a .csv / .jsonl table.

    dream data shapes --out DIR --n N [--seed 0] [--split train] [--image-size 32] [--shard-size 1000]
        Synthetic ShapesWorld shards (``dream.data.shapes.write_shards``).
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``data`` sub-subcommands on ``parser``."""
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    p = sub.add_parser("make-shards", help="folder of images + .txt captions, or a CSV/JSONL, -> tar shards")
    p.add_argument("source", help="folder, or .csv / .jsonl table with image paths and captions")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--prefix", default="shard", help="shard file-name prefix (default 'shard')")
    p.add_argument("--path-key", default="path", help="table column with the image path (default 'path')")
    p.add_argument("--caption-key", default="caption", help="table column with the caption (default 'caption')")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="fully decode every image to catch truncated files (default on)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")

    s = sub.add_parser("shapes", help="synthetic ShapesWorld shards")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, required=True, help="number of samples")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--split", default="train", choices=("train", "val", "test"))
    s.add_argument("--image-size", type=int, default=32)
    s.add_argument("--shard-size", type=int, default=1000)


def run(args: argparse.Namespace) -> int:
    """Execute ``dream data <subcommand>``; returns the exit code."""
    command = getattr(args, "data_command", None)
    if command == "make-shards":
        from dream.data.shards import make_shards

        try:
            result = make_shards(args.source, args.out, shard_size=args.shard_size, prefix=args.prefix,
                                 path_key=args.path_key, caption_key=args.caption_key, verify=args.verify,
                                 progress=args.progress)
        except (OSError, ValueError) as exn:
            print(f"dream data make-shards: {exn}", file=sys.stderr)
            return 1
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(result.skipped.items())) or "none"
        print(f"wrote {result.written} samples in {len(result.paths)} shard(s): {result.pattern or '-'}")
        print(f"skipped {result.skipped_total} ({reasons})")
        return 0 if result.written > 0 else 1
    if command == "shapes":
        from dream.data.shapes import write_shards

        paths = write_shards(args.out, args.n, seed=args.seed, split=args.split, image_size=args.image_size,
                             shard_size=args.shard_size)
        print(f"wrote {args.n} ShapesWorld samples ({args.split}) in {len(paths)} shard(s) under {args.out}")
        return 0
    print("dream data: choose a subcommand: make-shards, shapes (see `dream data --help`)", file=sys.stderr)
    return 2
