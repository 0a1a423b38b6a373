"""Fine-tune DREAM (arXiv 2603.02667) on a folder of captioned images.

The folder layout is the one ``dream data make-shards`` reads: every image (``.jpg .png .webp ...``, searched
recursively) with its caption in a ``.txt`` file of the same name next to it::

    my_images/cat_001.jpg     my_images/cat_001.txt   ("a cat asleep on a red sofa")
    my_images/dogs/d_07.png   my_images/dogs/d_07.txt

The script writes the folder as webdataset shards (``dream.data.shards.make_shards``), fine-tunes a model
with the library's ``Trainer`` for ``--steps`` optimizer steps and writes, under ``--out``:

    shards/            the webdataset shards it trained on
    model/             the fine-tuned weights: ``dream.create_model("OUT/model")``
    pipeline/          model + tokenizer + pipeline.json: ``DreamPipeline.from_pretrained("OUT/pipeline")``
    metrics.jsonl      one line per logged step (loss, diff_loss, clip_loss, lr, ...); loss.png; checkpoints

Run (the shipped ShapesWorld pipeline as the starting point; any pipeline folder or an architecture works)::

    python examples/finetune_on_folder.py --images my_images --out runs/ft --model dream_tiny.shapes \\
        --steps 500 --batch-size 32 --lr 1e-4

``--model`` is a shipped pipeline tag (``dream_tiny.shapes``), a pipeline folder (such as the ``pipeline/``
this script writes) or an architecture name (``dream_tiny``: random init; then pass ``--tokenizer`` and
``--text-encoder``). A pipeline brings its own tokenizer, frozen text encoder and sampler settings.
Images are ADM centre-cropped to the model's resolution (``img_size``).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

# Mask-ratio schedules (dream.masking.MaskingWarmupConfig fields). "post-warmup" keeps the distribution a
# pretrained DREAM ends its Masking Warmup with (truncated normal around mu = 1, sigma 0.45), so fine-tuning
# keeps training both the contrastive encoder and the generator; "dream" replays the whole warmup (from scratch).
MASKING = {"post-warmup": {"preset": "dream", "mu_start": 1.0}, "dream": {"preset": "dream"},
           "fluid": {"preset": "fluid"}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images with same-name .txt captions")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="dream_tiny.shapes",
                   help="shipped pipeline tag, pipeline folder or architecture name (default dream_tiny.shapes)")
    p.add_argument("--tokenizer", default=None, help="image tokenizer (default: the pipeline's)")
    p.add_argument("--text-encoder", default=None, help="minilm | hf:PATH | random (default: the pipeline's)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warmup")
    p.add_argument("--masking", choices=sorted(MASKING), default="post-warmup", help="mask-ratio schedule")
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="EMA of the weights (0: off; the pipeline then uses the trained weights)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out (same flags)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    return p.parse_args(argv)


def starting_point(name: str) -> tuple[str, dict, str | None]:
    """(what ``TrainConfig.model`` loads, the pipeline's settings, its tokenizer spec) of ``--model``."""
    import dream
    from dream.pipeline import pipeline_meta, pipeline_tokenizer_spec

    if name in dream.list_models():                       # an architecture: random init, no pipeline settings
        return name, {}, None
    folder, meta = pipeline_meta(name)                    # a shipped tag or a pipeline folder
    model = folder / "model" if (folder / "model").is_dir() else folder
    return str(model), meta, pipeline_tokenizer_spec(name)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dream.data.shards import make_shards
    from dream.pipeline import SAMPLING_DEFAULTS, DreamPipeline
    from dream.train import TrainConfig
    from dream.train.loop import Trainer

    out = Path(args.out)
    model, meta, tokenizer = starting_point(args.model)
    tokenizer = args.tokenizer or tokenizer or "pixel"
    text_encoder = args.text_encoder or meta.get("text_encoder", "minilm")

    shards = make_shards(args.images, str(out / "shards"), shard_size=args.shard_size, progress=False)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(shards.skipped.items())) or "none"
    print(f"shards: {shards.written} captioned images in {len(shards.paths)} shard(s), skipped: {reasons}")
    if shards.written == 0:
        print(f"no image with a caption in {args.images} (each image needs a same-name .txt file)")
        return 1

    cfg = TrainConfig(model=model, data=shards.pattern, tokenizer=tokenizer, text_encoder=text_encoder,
                      use_text_padding_mask=bool(meta.get("use_padding_mask", False)),
                      batch_size=args.batch_size, steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps,
                      masking=MASKING[args.masking], ema_decay=args.ema_decay, seed=args.seed,
                      log_every=args.log_every, ckpt_every=args.ckpt_every, keep_ckpts=2, device=args.device)
    trainer = Trainer(cfg, out, resume=args.resume)
    result = trainer.fit()
    losses = [h["loss"] for h in trainer.history]
    if not losses or not all(math.isfinite(v) for v in losses):
        print(f"training logged no finite loss: {losses}")
        return 1

    weights = trainer.ema.shadow if trainer.ema else trainer.model
    pipe = DreamPipeline(weights, trainer.tokenizer, text_encoder, cfg.use_text_padding_mask,
                         clip_denoised=meta.get("clip_denoised", "auto"),
                         sampling_defaults={k: meta[k] for k in SAMPLING_DEFAULTS if k in meta})
    pipe.save_pretrained(out / "pipeline")
    print(f"fine-tuned {args.model} for {result['steps']} steps ({result['wall_s']:.0f} s): "
          f"loss {losses[0]:.4f} (step {trainer.history[0]['step']}) -> {losses[-1]:.4f} (step "
          f"{trainer.history[-1]['step']})")
    print(f"weights: {out / 'model'}  pipeline: {out / 'pipeline'}  log: {out / 'metrics.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
