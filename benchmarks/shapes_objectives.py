"""Lab-scale reproduction: DREAM vs CLIP-only vs FLUID-only on ShapesWorld, same architecture and budget.

Three ``dream_tiny`` models are trained from scratch with the project's own trainer, for the same number of
steps (same images seen), from ``configs/dream_tiny_shapes.yaml`` (shipped KL-VAE tokens; ``--config`` picks
another recipe, e.g. ``configs/dream_tiny_shapes_pixel.yaml``):

    * ``DREAM``       Masking Warmup (TN(mu, 0.45), mu 0 -> 1), diffusion + contrastive losses with gating;
    * ``CLIP-only``   never masked, contrastive loss only (``masking: never``; the diffusion loss never fires);
    * ``FLUID-only``  MAR masking (TN(1, 0.25) on [0.7, 1]), diffusion loss only (``clip_loss_weight: 0``).

Each is then evaluated exactly like ``dream demo``: image<->text retrieval (R@1), a linear probe on object
colour from frozen encoder features, FID against real ShapesWorld images (ShapesWorld CNN features) and the
verifier's compositional accuracy (single-object colour / shape, per question type, whole prompts). A model
without a trained branch is still measured (CLIP-only generates with an untrained decoder; FLUID-only
retrieves with an untrained text tower): those numbers are the floor of the missing objective.

    python benchmarks/shapes_objectives.py --steps 1500            # ~25 min per model on 2 CPU cores
    python benchmarks/shapes_objectives.py --steps 3 --num-prompts 4 --num-real 32 --num-iter 4   # smoke

Writes ``benchmarks/results/shapes_objectives.json`` and prints a markdown table (pasted into the README).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, write_results  # noqa: E402

VARIANTS = {
    "DREAM": {"masking": {"preset": "dream"}, "model_overrides": {}},
    "CLIP-only": {"masking": {"preset": "never"}, "model_overrides": {"diff_loss_weight": 0.0}},
    "FLUID-only": {"masking": {"preset": "fluid"}, "model_overrides": {"clip_loss_weight": 0.0}},
}


def train_variant(name: str, spec: dict, args, out: Path):
    from dream.train import TrainConfig
    from dream.train.loop import Trainer

    cfg = TrainConfig.load(args.config)
    cfg = cfg.replace(steps=args.steps, steps_per_epoch=max(1, args.steps // 48), minutes=None, ckpt_every=0,
                      sample_every=0, sample_prompts=(), log_every=max(1, min(25, args.steps)), seed=args.seed,
                      warmup_steps=min(cfg.warmup_steps, max(1, args.steps // 10)),
                      masking=spec["masking"], model_overrides={**cfg.model_overrides, **spec["model_overrides"]})
    trainer = Trainer(cfg, out / name.replace("-", "_").lower())
    res = trainer.fit()
    return trainer, cfg, res


def table(results: dict) -> str:
    head = ["objective", "steps", "R@1 i2t", "R@1 t2i", "probe colour", "colour acc", "shape acc",
            "question acc", "prompt acc", "FID (CNN)", "train min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        u, g = r["understanding"], r["generation"]["plain"]
        lines.append("| " + " | ".join([
            name, str(r["training"]["steps"]), f"{u['retrieval']['i2t_R@1']:.3f}", f"{u['retrieval']['t2i_R@1']:.3f}",
            f"{u['linear_probe_colour_acc']:.3f}", f"{g['single_object_colour_acc']:.3f}",
            f"{g['single_object_shape_acc']:.3f}", f"{g['question_accuracy']:.3f}", f"{g['prompt_accuracy']:.3f}",
            f"{g['fid_shapes_cnn']:.1f}", f"{r['training']['wall_s'] / 60:.1f}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="training steps per model (batch 64)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--num-single", type=int, default=128, help="single-object prompts for colour / shape accuracy")
    p.add_argument("--num-real", type=int, default=256)
    p.add_argument("--num-iter", type=int, default=16)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "dream_tiny_shapes.yaml",
                   help="training recipe shared by the three models (only masking / loss weights change)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "shapes_objectives", help="run folders")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/shapes_objectives.json)")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if not args.config.exists():
        p.error(f"--config {args.config} does not exist")

    from dream.eval.shapes_bench import ShapesBench
    from dream.pipeline import DreamPipeline

    torch.manual_seed(args.seed)
    bench = ShapesBench(args.num_prompts, args.num_real, num_single=args.num_single)
    results = {}
    for name in names:
        print(f"[objectives] training {name} for {args.steps} steps ...", flush=True)
        trainer, cfg, res = train_variant(name, VARIANTS[name], args, args.work)
        pipe = DreamPipeline(trainer.model, trainer.tokenizer, cfg.text_encoder, cfg.use_text_padding_mask,
                             clip_denoised=cfg.sample_clip_denoised or "auto")
        t0 = time.time()
        r, _ = bench.evaluate(pipe, args.num_iter, args.cfg, args.temperature, (4, 0.25), args.seed)
        r["training"] = {"steps": res["steps"], "wall_s": res["wall_s"], "images_seen": res["steps"] * cfg.batch_size,
                         "final": trainer.history[-1] if trainer.history else {}, "masking": cfg.masking,
                         "model_overrides": cfg.model_overrides}
        r["eval_s"] = time.time() - t0
        results[name] = r
        print(table({name: r}).splitlines()[-1], flush=True)
    md = table(results)
    payload = {"machine": machine_info(), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                       for k, v in vars(args).items()},
               "results": results, "markdown": md}
    path = write_results("shapes_objectives", payload, args.out)
    print("\n" + md + f"\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
