"""Evaluate a DREAM (arXiv 2603.02667) checkpoint: FID of its images and a linear probe on its frozen encoder.

FID (Heusel et al. 2017, arXiv 1706.08500): the pipeline draws one image for each caption of ``--real`` (a
folder of images with same-name ``.txt`` captions, the layout ``dream data make-shards`` reads) and the
generated images are compared with the folder's real images. Features come from the FID-InceptionV3 with
local weights (``--inception-weights`` or ``$DREAM_FID_WEIGHTS``: torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` or pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``;
nothing is downloaded). Without a weights file the script falls back to the ShapesWorld CNN shipped with the
library (``dream.eval.shapes_features``), which is meaningful for ShapesWorld images only, and says so.

Linear probe (the MAE / DREAM protocol, arXiv 2111.06377): frozen encoder features of all-visible images
(mean of the buffer-token outputs of the last block) and a classifier fit on ``--probe-train`` and scored on
``--probe-val``, two ImageFolder folders (``root/<class>/<image>``); ``--probe-mode lbfgs`` (default) is a
closed-form logistic regression, ``lars`` the official LARS recipe. A cosine k-NN accuracy is reported too.

Run (a ShapesWorld folder; a class sub-folder per label serves both the FID captions and the probe)::

    python examples/evaluate_checkpoint.py --model dream_tiny.shapes --real data/val --num-images 256 \\
        --probe-train data/train --probe-val data/val --out eval.json
    DREAM_FID_WEIGHTS=/weights/pt_inception-2015-12-05-6726825d.pth python examples/evaluate_checkpoint.py \\
        --model runs/ft/pipeline --real data/val --num-images 1000

``--model`` is a shipped pipeline tag or a pipeline folder (``finetune_on_folder.py`` writes one). Prints a
JSON summary and writes it to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dream_tiny.shapes", help="shipped pipeline tag or pipeline folder")
    p.add_argument("--real", required=True, help="real images with same-name .txt captions (FID reference)")
    p.add_argument("--num-images", type=int, default=256, help="images to generate (one per caption, in order)")
    p.add_argument("--inception-weights", default=None,
                   help="local FID-Inception weights (default $DREAM_FID_WEIGHTS; none: ShapesWorld CNN)")
    p.add_argument("--probe-train", default=None, help="ImageFolder folder for fitting the linear probe")
    p.add_argument("--probe-val", default=None, help="ImageFolder folder for scoring the linear probe")
    p.add_argument("--probe-mode", choices=["lbfgs", "lars", "sgd"], default="lbfgs")
    p.add_argument("--knn-k", type=int, default=20, help="neighbours of the k-NN accuracy")
    p.add_argument("--num-iter", type=int, default=None, help="AR steps (default: the pipeline's)")
    p.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the pipeline's)")
    p.add_argument("--num-sampling-steps", default=None, help='diffusion steps per token, e.g. "50" or "ddim10"')
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write the summary JSON here")
    args = p.parse_args(argv)
    if bool(args.probe_train) != bool(args.probe_val):
        p.error("the linear probe needs both --probe-train and --probe-val")
    return args


def fid_evaluator(weights, device, image_size: int):
    """FID-Inception with local weights, else the shipped ShapesWorld CNN; returns (evaluator, description)."""
    from dream.eval.fid import FIDEvaluator
    from dream.eval.shapes_features import load_shapes_feature_extractor

    if weights:
        return FIDEvaluator("inception", weights_path=weights, device=device, image_size=image_size,
                            progress=False), f"inception ({weights})"
    print("no FID-Inception weights (--inception-weights / $DREAM_FID_WEIGHTS): using the shipped ShapesWorld CNN "
          "features instead; their FID is meaningful for ShapesWorld images only")
    return FIDEvaluator(load_shapes_feature_extractor(), device=device, image_size=image_size,
                        progress=False), "shapes_cnn"


def frozen_features(pipe, folder: str, batch_size: int) -> tuple:
    """(features (N, D), labels (N,), class names) of an ImageFolder folder through the frozen encoder."""
    from dream.eval.features import dream_image_features, extract_features, iter_labeled_batches, list_image_folder

    batches = iter_labeled_batches(folder, batch_size=batch_size, image_size=pipe.model.config.img_size)
    out = extract_features(lambda images: dream_image_features(pipe.model, pipe.tokenizer, images), batches,
                           progress=False)
    return out["features"], out["labels"], list_image_folder(folder)[2]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from dream.data.shards import iter_folder
    from dream.eval.inception import WEIGHTS_ENV_VAR
    from dream.eval.linear_probe import linear_probe
    from dream.pipeline import DreamPipeline

    pipe = DreamPipeline.from_pretrained(args.model, device=args.device)
    size = pipe.model.config.img_size
    prompts = [item.caption.strip() for item in iter_folder(args.real) if item.caption and item.caption.strip()]
    prompts = prompts[:args.num_images]
    if len(prompts) < 2:
        print(f"FID needs at least 2 captioned images in {args.real} (same-name .txt files), found {len(prompts)}")
        return 1
    fake = pipe.generate(prompts, num_iter=args.num_iter, cfg=args.cfg, num_sampling_steps=args.num_sampling_steps,
                         seed=args.seed, batch_size=args.batch_size)
    evaluator, features = fid_evaluator(args.inception_weights or os.environ.get(WEIGHTS_ENV_VAR),
                                        pipe.device, size)
    summary = {"model": str(args.model), "fid_features": features,
               **evaluator.evaluate(fake, args.real),
               "dream_score": pipe.score(fake, prompts).mean().item()}

    if args.probe_train and args.probe_val:
        train_x, train_y, classes = frozen_features(pipe, args.probe_train, args.batch_size)
        val_x, val_y, val_classes = frozen_features(pipe, args.probe_val, args.batch_size)
        if val_classes != classes:
            print(f"the probe folders have different classes: {classes} vs {val_classes}")
            return 1
        probe = linear_probe(train_x, train_y, val_x, val_y, mode=args.probe_mode,
                             knn_k=min(args.knn_k, len(train_y)), generator=torch.Generator().manual_seed(args.seed),
                             progress=False)
        summary["linear_probe"] = {k: probe[k] for k in ("top1", "knn_top1", "num_train", "num_test", "mode")}
        summary["linear_probe"]["classes"] = classes

    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if math.isfinite(summary["fid"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
