"""``dream eval``: FID / IS, CLIP score, linear probe, few-shot and retrieval from the command line.

    dream eval fid --images gen/ --ref ref_stats.npz --inception-weights pt_inception.pth --out fid.json
    dream eval fid --images imagenet/val --image-size 256 --save-stats ref_stats.npz
    dream eval linprobe --model dream_b --pretrained ckpt/ --tokenizer sd-vae/ --train in1k/train --val in1k/val
    dream eval fewshot --model dream_tiny.shapes --data shapes/ --n-way 5 --k-shot 5
    dream eval retrieval --model dream_tiny.shapes --images val/ --captions captions.jsonl
    dream eval clipscore --images gen/ --captions prompts.txt --hf-clip /weights/clip-vit-large-patch14

A thin layer over :mod:`dream.eval`. Results are printed and written as JSON to ``--out``.
Image features are cached (safetensors under ``--cache-dir``, default ``$DREAM_CACHE_DIR`` or
``~/.cache/dream/eval``) keyed by a hash of (model, weights, tokenizer, data path, options; files
add their size and mtime), so repeated probes are cheap; ``--no-cache`` turns this off.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

import torch

from dream.eval.features import FeatureCache, cache_key

# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=None,
                   help="ADM centre-crop size for decoded images (default: the model's img_size, or keep)")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache folder (default $DREAM_CACHE_DIR or ~/.cache/dream/eval)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", default=None, required=required,
                   help="registered name (dream_b, dream_tiny.shapes, ...) or a model folder")
    p.add_argument("--pretrained", default=None, help="weights: folder, .safetensors or official .pth")
    p.add_argument("--tokenizer", default=None,
                   help="image tokenizer: pixel_p<N>, vae_test, a VAE folder / checkpoint "
                        "(default: pixels when the model uses vae_stride 1)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="LoRA adapter to fuse into the model (peft folder, diffusers or kohya file); repeatable")


def _feature_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--features", choices=["dream", "shapes", "pixels"], default="dream",
                   help="dream: frozen DREAM encoder (needs --model); shapes: the ShapesWorld CNN; "
                        "pixels: downsampled pixels (smoke tests)")
    p.add_argument("--feature-weights", default=None, help="weights for --features shapes (default: shipped)")
    p.add_argument("--pool", choices=["buffer", "mean", "embedding"], default="buffer",
                   help="buffer: mean of the buffer-token outputs (official probe); mean: all tokens; "
                        "embedding: the contrastive embedding")
    p.add_argument("--apply-norm", action="store_true", help="apply encoder_norm before pooling (official: off)")
    p.add_argument("--buffer", choices=["class", "fake_latent"], default="class",
                   help="buffer filler: class_emb(0) as in training, or fake_latent (official probe default)")
    p.add_argument("--fc-norm", action="store_true",
                   help="fresh LayerNorm on the pooled features (the official probe model's fc_norm)")
    p.add_argument("--label-key", default="label", help="json field with the label in shards without .cls")
    p.add_argument("--max-images", type=int, default=None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``fid``, ``clipscore``, ``linprobe``, ``fewshot``, ``retrieval`` and ``geneval-shapes``."""
    sub = parser.add_subparsers(dest="eval_command", metavar="METRIC")

    p = sub.add_parser("fid", help="FID (+ Inception Score) of an image set against a reference")
    p.add_argument("--images", required=True, help="generated images: folder, shard pattern or .npz statistics")
    p.add_argument("--ref", default=None, help="reference: folder, shard pattern or .npz (mu, sigma)")
    p.add_argument("--save-stats", default=None, help="save the --images statistics to this .npz")
    p.add_argument("--features", default="inception", choices=["inception", "shapes", "pixels"],
                   help="inception: FID-InceptionV3 (needs weights); shapes: the ShapesWorld CNN "
                        "(dream.eval.shapes_features); pixels: smoke-test features")
    p.add_argument("--inception-weights", default=None, help="local FID-Inception weights (else $DREAM_FID_WEIGHTS)")
    p.add_argument("--feature-weights", default=None, help="weights for --features shapes (default: shipped)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--max-ref-images", type=int, default=None)
    _common(p)

    p = sub.add_parser("clipscore", help="CLIP score of images vs captions")
    p.add_argument("--images", required=True, help="image folder (sorted file order) or shard pattern")
    p.add_argument("--captions", required=True, help=".txt (one per image, sorted order) or .jsonl/.json")
    p.add_argument("--hf-clip", default=None, help="local Hugging Face CLIP folder (torchmetrics CLIPScore)")
    _model_args(p)
    _common(p)

    for name, help_ in (("linprobe", "linear probe on frozen features"),
                        ("fewshot", "N-way K-shot classification on frozen features")):
        p = sub.add_parser(name, help=help_)
        _feature_args(p)
        _common(p)
        if name == "linprobe":
            p.add_argument("--train", required=True, help="ImageFolder folder or labelled shards")
            p.add_argument("--val", required=True, help="ImageFolder folder or labelled shards")
            p.add_argument("--mode", choices=["lars", "sgd", "lbfgs"], default="lars")
            p.add_argument("--epochs", type=int, default=90)
            p.add_argument("--warmup-epochs", type=int, default=10)
            p.add_argument("--blr", type=float, default=0.1, help="base lr; lr = blr * batch / 256")
            p.add_argument("--weight-decay", type=float, default=0.0)
            p.add_argument("--probe-batch-size", type=int, default=16384)
            p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength for --mode lbfgs")
            p.add_argument("--knn-k", type=int, default=20, help="also report cosine k-NN (0: skip)")
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--data", required=True, help="ImageFolder folder or labelled shards")
            p.add_argument("--n-way", type=int, default=5)
            p.add_argument("--k-shot", type=int, default=5)
            p.add_argument("--n-query", type=int, default=15)
            p.add_argument("--episodes", type=int, default=600)
            p.add_argument("--classifier", choices=["prototype", "logreg"], default="prototype")
            p.add_argument("--seed", type=int, default=0)

    from dream.cli import geneval

    geneval.add_arguments(sub.add_parser("geneval-shapes", help="GenEval's six categories on ShapesWorld prompts "
                                         "(exact verifier), prompt accuracy, over-count rate, FID (CNN)"))

    p = sub.add_parser("retrieval", help="image<->text recall@1/5/10 with the DREAM contrastive head")
    p.add_argument("--images", required=True, help="image folder (sorted order)")
    p.add_argument("--captions", required=True, help=".txt (one per image) or .jsonl/.json (several allowed)")
    _model_args(p, required=True)
    _common(p)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _cache(args) -> Optional[FeatureCache]:
    if args.no_cache:
        return None
    root = args.cache_dir or os.environ.get("DREAM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                                "dream", "eval")
    return FeatureCache(root)


def _load_model(args):
    import dream

    if not args.model:
        raise SystemExit("this command needs --model (or --features pixels)")
    # a shipped tag (dream_tiny.shapes) means its trained weights unless --pretrained says otherwise
    model = dream.create_model(args.model, pretrained=args.pretrained, device=args.device)
    from dream.cli.sample import apply_loras

    apply_loras(model, getattr(args, "lora", []), f"dream eval {args.eval_command}")
    return model.eval()


def _lora_key(args) -> dict:
    """What the feature cache must know of ``--lora``: each weights file (size, mtime via cache_key) and weight
    (nothing without ``--lora``, so earlier cache keys stay valid)."""
    from dream.adapters import detect_format, parse_lora_path

    if not getattr(args, "lora", None):
        return {}
    out = []
    for spec in getattr(args, "lora", []) or []:
        path, weight = parse_lora_path(spec)
        try:
            path = str(detect_format(path)[1])
        except (OSError, ValueError):
            pass                                 # _load_model reports it
        out.append([path, weight])
    return {"lora": out}


def _load_tokenizer(args, model):
    from dream.models.tokenizers import PixelTokenizer, create_tokenizer
    from dream.pipeline import pipeline_tokenizer_spec

    cfg = model.config
    shipped = pipeline_tokenizer_spec(args.model) if args.model else None
    if args.tokenizer:
        tok = create_tokenizer(args.tokenizer)
    elif shipped is not None:          # a shipped tag or pipeline folder names its own tokenizer
        tok = create_tokenizer(shipped)
    elif cfg.vae_stride == 1:
        tok = PixelTokenizer(cfg.patch_size, cfg.img_size, channels=cfg.vae_embed_dim)
    else:
        raise SystemExit(f"model {args.model!r} uses a VAE (vae_stride {cfg.vae_stride}): pass --tokenizer "
                         "(a VAE folder or checkpoint, e.g. stabilityai/sd-vae-ft-ema downloaded locally)")
    if isinstance(tok, torch.nn.Module):
        tok = tok.to(args.device).eval()
    if tok.token_dim != cfg.token_dim:
        raise SystemExit(f"tokenizer token_dim {tok.token_dim} != model token_dim {cfg.token_dim}")
    return tok


def _feature_module(args) -> torch.nn.Module:
    """The non-DREAM feature modules: uint8 (B, 3, H, W) -> (B, D)."""
    from dream.eval.features import PixelFeatureExtractor

    if args.features == "pixels":
        return PixelFeatureExtractor()
    if args.features == "shapes":
        from dream.eval.shapes_features import load_shapes_feature_extractor

        return load_shapes_feature_extractor(args.feature_weights, device=args.device)
    raise ValueError(f"no feature module for --features {args.features!r}")


def _image_size(args, model=None) -> Optional[int]:
    if args.image_size is not None:
        return args.image_size
    return int(model.config.img_size) if model is not None else None


def _labeled_features(args, source: str, model=None, tokenizer=None) -> dict[str, torch.Tensor]:
    """(cached) features + labels of a labelled image source."""
    from dream.eval.features import count_images, dream_image_features, extract_features, iter_labeled_batches, \
        list_image_folder

    size = _image_size(args, model)
    if args.features != "dream":
        module = _feature_module(args)

        def fn(imgs):
            return module(imgs.to(args.device))
    else:
        def fn(imgs):
            return dream_image_features(model, tokenizer, imgs, pool=args.pool, apply_norm=args.apply_norm,
                                        buffer=args.buffer, fc_norm=args.fc_norm)

    def compute():
        total = None
        if os.path.isdir(source) and not source.endswith(".tar"):
            try:
                total = len(list_image_folder(source)[0])
            except ValueError:
                total = count_images(source)
        if total is not None and args.max_images:
            total = min(total, args.max_images)
        batches = iter_labeled_batches(source, batch_size=args.batch_size, image_size=size,
                                       max_images=args.max_images, label_key=args.label_key)
        out = extract_features(fn, batches, total=total, desc=f"features {os.path.basename(source.rstrip('/'))}",
                               progress=not args.quiet)
        return {"features": out["features"], "labels": out["labels"]}

    cache = _cache(args)
    if cache is None:
        return compute()
    key = cache_key(kind="labeled", features=args.features, feature_weights=args.feature_weights,
                    model=args.model, pretrained=args.pretrained, **_lora_key(args),
                    tokenizer=args.tokenizer, pool=args.pool, apply_norm=args.apply_norm, buffer=args.buffer,
                    fc_norm=args.fc_norm, data=source,
                    image_size=size, max_images=args.max_images, label_key=args.label_key)
    return cache.get_or_compute(key, compute, meta={"data": source, "model": str(args.model)})


def _read_captions(path: str, files: list[str]) -> tuple[list[str], list[int]]:
    """Captions and their image index (into ``files``, sorted image paths)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file not found: {path!r}")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            lines = [ln.rstrip("\n") for ln in f if ln.strip()]
        if len(lines) != len(files):
            raise ValueError(f"{path}: {len(lines)} captions for {len(files)} images (one per line expected)")
        return lines, list(range(len(files)))
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows = [json.loads(ln) for ln in f if ln.strip()]
        else:
            rows = json.load(f)
    by_name: dict[str, int] = {}
    for i, fp in enumerate(files):
        by_name.setdefault(os.path.basename(fp), i)
        by_name.setdefault(os.path.splitext(os.path.basename(fp))[0], i)
    texts, t2i = [], []
    for r in rows:
        name = r.get("file", r.get("image"))
        if name is None or os.path.basename(str(name)) not in by_name and os.path.splitext(
                os.path.basename(str(name)))[0] not in by_name:
            raise KeyError(f"{path}: entry {r} names no image of the folder (keys 'file' or 'image')")
        base = os.path.basename(str(name))
        idx = by_name.get(base, by_name.get(os.path.splitext(base)[0]))
        caps = r.get("captions", r.get("caption", r.get("text")))
        for c in ([caps] if isinstance(caps, str) else list(caps or [])):
            texts.append(str(c))
            t2i.append(idx)
    if not texts:
        raise ValueError(f"{path}: no captions")
    return texts, t2i


def _pair_batches(files: list[str], t2i: list[int], batch_size: int, size: Optional[int]):
    from dream.eval.features import load_image

    for s in range(0, len(t2i), batch_size):
        yield torch.stack([load_image(files[i], size) for i in t2i[s:s + batch_size]])


def _emit(args, results: dict[str, Any]) -> int:
    skip = {"_module", "_missing", "command", "eval_command"}
    payload = {"metric": args.eval_command, **results,
               "args": {k: v for k, v in vars(args).items() if k not in skip and not callable(v)}}
    text = json.dumps(payload, indent=2, default=str)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    summary = {k: v for k, v in results.items() if not isinstance(v, (list, dict))}
    print(json.dumps(summary, default=str))
    return 0


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------


def _run_fid(args) -> int:
    from dream.eval.fid import FIDEvaluator, frechet_distance, inception_score, load_statistics, save_statistics

    if args.ref is None and args.save_stats is None:
        raise SystemExit("dream eval fid: give --ref (to compute FID) and/or --save-stats (to store statistics)")
    extractor = "inception" if args.features == "inception" else _feature_module(args)
    ev = FIDEvaluator(extractor, weights_path=args.inception_weights, device=args.device,
                      batch_size=args.batch_size, image_size=args.image_size, progress=not args.quiet)
    logits = None
    if args.images.endswith(".npz"):
        stats = load_statistics(args.images)
    else:
        stats, logits = ev.compute_statistics(args.images, max_images=args.max_images, return_logits=True,
                                              desc="image features")
    res: dict[str, Any] = {"features": args.features, "num_images": stats.num_images}
    if args.save_stats is not None:
        save_statistics(stats, args.save_stats)
        res["saved_stats"] = args.save_stats
    if args.ref is not None:
        ref: Any = args.ref
        cache = _cache(args)
        if cache is not None and not str(ref).endswith(".npz"):
            key = cache_key(kind="fid-ref", features=args.features,
                            weights=args.inception_weights or os.environ.get("DREAM_FID_WEIGHTS")
                            if args.features == "inception" else args.feature_weights,
                            data=ref, image_size=args.image_size, max_images=args.max_ref_images)
            path = os.path.join(cache.root, f"fidstats-{key}.npz")
            if not os.path.isfile(path):
                save_statistics(ev.compute_statistics(ref, max_images=args.max_ref_images,
                                                      desc="reference features"), path)
            ref = path
        r = ev.reference_statistics(ref, args.max_ref_images)
        if r.mu.shape != stats.mu.shape:
            raise SystemExit(f"feature sizes differ: images {stats.mu.shape[0]}, reference {r.mu.shape[0]}")
        res["fid"] = frechet_distance(stats.mu, stats.sigma, r.mu, r.sigma)
        res["num_reference_images"] = r.num_images
    if logits is not None and logits.shape[0] >= 10:
        res["inception_score_mean"], res["inception_score_std"] = inception_score(logits, splits=10)
    return _emit(args, res)


def _run_clipscore(args) -> int:
    from dream.eval.clipscore import dream_clip_score, hf_clip_score
    from dream.eval.features import list_images

    files = list_images(args.images)
    texts, t2i = _read_captions(args.captions, files)
    if args.hf_clip:
        batches = _pair_batches(files, t2i, args.batch_size, args.image_size)
        res = hf_clip_score(batches, texts, args.hf_clip, batch_size=args.batch_size, device=args.device,
                            progress=not args.quiet)
        res["clip_model"] = args.hf_clip
    else:
        from dream.text import CLIPTokenizer

        model = _load_model(args)
        tok = _load_tokenizer(args, model)
        text_tok = CLIPTokenizer(context_length=model.config.clip_context_length)
        batches = _pair_batches(files, t2i, args.batch_size, _image_size(args, model))
        res = dream_clip_score(model, batches, texts, tok, text_tok, batch_size=args.batch_size,
                               progress=not args.quiet)
        res.pop("scores")
        res["clip_model"] = f"dream:{args.model}"
    return _emit(args, res)


def _labeled_sets(args, *sources) -> list[dict]:
    """Features and labels of each labelled image source (a DREAM model and tokenizer loaded once if needed)."""
    model = tok = None
    if args.features == "dream":
        model = _load_model(args)
        tok = _load_tokenizer(args, model)
    return [_labeled_features(args, s, model, tok) for s in sources]


def _run_linprobe(args) -> int:
    from dream.eval.linear_probe import LinearProbeConfig, linear_probe

    tr, va = _labeled_sets(args, args.train, args.val)
    dev = torch.device(args.device)
    cfg = LinearProbeConfig(optimizer=args.mode if args.mode != "lbfgs" else "lars", blr=args.blr,
                            weight_decay=args.weight_decay, epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                            batch_size=args.probe_batch_size)
    res = linear_probe(tr["features"].to(dev), tr["labels"].to(dev), va["features"].to(dev), va["labels"].to(dev),
                       mode=args.mode, config=cfg, C=args.C, knn_k=args.knn_k or None,
                       generator=torch.Generator().manual_seed(args.seed), progress=not args.quiet)
    res["feature_dim"] = int(tr["features"].shape[1])
    return _emit(args, res)


def _run_fewshot(args) -> int:
    from dream.eval.fewshot import few_shot_eval

    (data,) = _labeled_sets(args, args.data)
    res = few_shot_eval(data["features"], data["labels"], n_way=args.n_way, k_shot=args.k_shot,
                        n_query=args.n_query, episodes=args.episodes, classifier=args.classifier, seed=args.seed,
                        progress=not args.quiet)
    res.pop("episode_accuracies")
    return _emit(args, res)


def _run_retrieval(args) -> int:
    from dream.text import CLIPTokenizer

    from dream.eval.features import dream_token_features, extract_features, list_images, load_image, tokenize_images
    from dream.eval.retrieval import retrieval_recall

    files = list_images(args.images)
    texts, t2i = _read_captions(args.captions, files)
    model = _load_model(args)
    tok = _load_tokenizer(args, model)
    size = _image_size(args, model)
    dev = next(model.parameters()).device

    def image_batches():
        for s in range(0, len(files), args.batch_size):
            yield torch.stack([load_image(f, size) for f in files[s:s + args.batch_size]])

    img = extract_features(lambda x: dream_token_features(model, tokenize_images(tok, x, device=dev),
                                                          pool="embedding"),
                           image_batches(), total=len(files), desc="image embeddings", progress=not args.quiet)
    text_tok = CLIPTokenizer(context_length=model.config.clip_context_length)
    with torch.inference_mode():
        txt = torch.cat([model.encode_text(text_tok(texts[s:s + args.batch_size]).to(dev)).float().cpu()
                         for s in range(0, len(texts), args.batch_size)])
    res = retrieval_recall(img["features"], txt, torch.tensor(t2i))
    return _emit(args, res)


def run(args) -> int:
    """Dispatch ``dream eval <metric>``."""
    cmd = getattr(args, "eval_command", None)
    from dream.cli import geneval

    handlers = {"fid": _run_fid, "clipscore": _run_clipscore, "linprobe": _run_linprobe,
                "fewshot": _run_fewshot, "retrieval": _run_retrieval, "geneval-shapes": geneval.run}
    if cmd not in handlers:
        print(f"usage: dream eval {{{','.join(handlers)}}} ... (see --help)", file=sys.stderr)
        return 2
    return handlers[cmd](args)
