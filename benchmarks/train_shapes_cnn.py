"""Train the ShapesWorld FID feature CNN (``dream/eval/shapes_features.py``) reproducibly on CPU.

Generates ShapesWorld train / val / test data with a fixed seed, trains the attribute heads (count, colours,
shapes, colour-shape pairs, positions, sizes) on clean renders (optional degradations with
``--augment-prob``; off by default so that the FID features stay sensitive to blur and noise), and writes
``shapes_cnn.safetensors`` (weights + config metadata) and ``shapes_cnn.json`` (command, seed, wall time,
held-out accuracies).

    python benchmarks/train_shapes_cnn.py --out dream/assets/shapes_cnn.safetensors
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dream.data.shapes import ShapesWorld
from dream.eval.shapes_features import (ShapesCNNConfig, ShapesFeatureCNN, attribute_accuracy, attribute_targets,
                                        shapes_config_for)


def degrade(x: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    """Randomly degrade float images in [-1, 1]: brightness jitter, 3x3 blur, Gaussian noise."""
    B = x.shape[0]
    u = torch.rand(B, 4, generator=gen)
    y = (x + 1) / 2
    jit = 1 + 0.15 * (2 * torch.rand(B, 1, 1, 1, generator=gen) - 1)
    y = torch.where((u[:, 0] < p).view(B, 1, 1, 1), y * jit, y)
    blurred = F.avg_pool2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), 3, 1)
    y = torch.where((u[:, 1] < p).view(B, 1, 1, 1), blurred, y)
    sigma = 0.08 * torch.rand(B, 1, 1, 1, generator=gen)
    noisy = y + sigma * torch.randn(y.shape, generator=gen)
    y = torch.where((u[:, 2] < p).view(B, 1, 1, 1), noisy, y)
    return y.clamp(0, 1) * 2 - 1


def make_data(world: ShapesWorld, n: int, split: str, desc: str):
    images, metas = [], []
    for i in tqdm(range(0, n, 500), desc=desc, unit="x500"):
        imgs, _, m = world.batch(range(i, min(n, i + 500)), split)
        images.append(imgs)
        metas += m
    return torch.cat(images), metas


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="dream/assets/shapes_cnn.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-samples", type=int, default=24000)
    ap.add_argument("--val-samples", type=int, default=1000)
    ap.add_argument("--test-samples", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    # Off by default: FID features should *see* blur / noise / colour shifts, not be trained to ignore them.
    ap.add_argument("--augment-prob", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=32)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    cfg = ShapesCNNConfig(image_size=args.image_size)
    world = ShapesWorld(dataclasses.replace(shapes_config_for(cfg), base_seed=args.seed))
    train_x, train_m = make_data(world, args.train_samples, "train", "train data")
    val_x, val_m = make_data(world, args.val_samples, "val", "val data")
    test_x, test_m = make_data(world, args.test_samples, "test", "test data")
    t_data = time.time() - t0
    tgt = attribute_targets(train_m, cfg)

    model = ShapesFeatureCNN(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    gen = torch.Generator().manual_seed(args.seed)
    history = []
    bar = tqdm(total=total, desc="train", unit="step")
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            x = degrade(model.preprocess(train_x[idx]), gen, args.augment_prob)
            out = model.forward_heads(model.forward_features(x))
            # multi-label heads: BCE summed over labels (a mean over 28 rare labels barely trains)
            loss = F.cross_entropy(out["count"], tgt["count"][idx]) + sum(
                F.binary_cross_entropy_with_logits(out[k], tgt[k][idx], reduction="sum") / len(idx)
                for k in ("colour", "shape", "combo", "position", "size"))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        acc = attribute_accuracy(model, val_x, val_m)
        history.append({"epoch": epoch + 1, "loss": round(loss.item(), 5),
                        **{k: round(v, 4) for k, v in acc.items()}})
        tqdm.write(json.dumps(history[-1]))
    bar.close()
    model.eval()
    test_acc = attribute_accuracy(model, test_x, test_m)
    wall = time.time() - t0

    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, args.out, metadata={"config": json.dumps(cfg.to_dict()), "seed": str(args.seed),
                                         "format": "dream.shapes_cnn.v1"})
    record = {
        "command": "python " + " ".join([os.path.relpath(__file__, os.getcwd())] + sys.argv[1:]
                                        if argv is None else [__file__] + list(argv)),
        "args": vars(args), "seed": args.seed, "wall_time_s": round(wall, 1), "data_time_s": round(t_data, 1),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_features": cfg.num_features, "config": cfg.to_dict(),
        "test_accuracy": {k: round(v, 4) for k, v in test_acc.items()},
        "val_history": history,
        "chance": {"count": 1 / cfg.max_objects, "single_colour": 1 / len(cfg.colours),
                   "single_shape": 1 / len(cfg.shapes)},
        "torch": torch.__version__, "python": platform.python_version(),
    }
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record["test_accuracy"], indent=2))
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB) in {wall:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
