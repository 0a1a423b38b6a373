"""Optional latent cache: pre-computed tokenizer outputs and text features in webdataset shards.

The official DREAM code can train from a cache of SD-VAE posterior *moments* of the centre crop and of its
horizontal flip, T5 embeddings (fp16) and captions (``dream_spec.md`` section 6). Caching the moments (not a
latent sample) keeps the training-time posterior sampling; caching both crops keeps RandomHorizontalFlip(0.5).

Writing (:func:`build_latent_cache`): image-text shards -> ADM centre crop (no flip) -> for each sample a
``<key>.safetensors`` member holding

* ``image`` / ``image_flip``: ``tokenizer.encode_moments(x)`` / of ``x.flip(-1)`` (kind ``"moments"``), or
  ``tokenizer.encode(x)`` (kind ``"tokens"``, e.g. a pixel tokenizer without a posterior);
* ``text``: ``text_encoder(captions)[0]`` in float16, and ``text_mask`` (its second output) when not None;
* ``clip_ids``: optional ``clip_tokenizer(captions)`` ids,

plus ``<key>.txt`` (caption) and ``<key>.json`` (``{"caption", "kind", "meta"}``).

Reading (:class:`LatentCacheDataset`, :func:`make_latent_loader`): the same shard / shuffle / resume / skip
accounting machinery as :mod:`dream.data.webdataset`; each sample picks ``image`` or ``image_flip`` with
probability ``flip_prob`` from its own generator. Batches::

    {<kind>: (B, ...) float32, "text": (B, Lt, D) float16, "text_mask": (B, Lt) (if stored),
     "clip_ids": (B, ctx) (if stored), "flipped": (B,) bool, "caption", "key", "meta"}

Written from scratch for ``dream``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dream.data.shards import RotatingShardWriter
from dream.data.transforms import eval_transform
from dream.data.webdataset import (
    ImageTextDataset,
    ImageTextLoader,
    SkipSample,
    WebDatasetConfig,
    check_shape,
    decode_caption,
    make_dataloader,
)

__all__ = ["build_latent_cache", "LatentCacheDataset", "make_latent_loader", "CACHE_KINDS"]

CACHE_KINDS = ("moments", "tokens")


def _resolve_kind(tokenizer: Any, kind: str) -> str:
    if kind == "auto":
        kind = "moments" if hasattr(tokenizer, "encode_moments") else "tokens"
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache kind must be one of {CACHE_KINDS} or 'auto', got {kind!r}")
    method = "encode_moments" if kind == "moments" else "encode"
    if not callable(getattr(tokenizer, method, None)):
        raise TypeError(f"cache kind {kind!r} needs tokenizer.{method}(images)")
    return kind


def _device_of(module: Any) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


@torch.no_grad()
def build_latent_cache(
    urls,
    out_dir: str,
    tokenizer: Any,
    text_encoder: Callable[[List[str]], Any],
    image_size: int = 256,
    batch_size: int = 32,
    shard_size: int = 1000,
    kind: str = "auto",
    clip_tokenizer: Optional[Callable[[List[str]], torch.Tensor]] = None,
    num_workers: int = 0,
    device: Optional[torch.device] = None,
    prefix: str = "cache",
    progress: bool = True,
) -> Dict[str, Any]:
    """Encode image-text shards once and write a latent cache.

    Args:
        urls: source image-text shards (see :func:`dream.data.webdataset.expand_urls`).
        out_dir: output folder.
        tokenizer: object with ``encode_moments(images) -> (B, ...)`` (VAE posterior moments) or
            ``encode(images) -> (B, ...)`` (tokens); images are float in [-1, 1], (B, 3, H, W).
        text_encoder: ``captions -> (feats (B, Lt, D), mask (B, Lt) or None)``; feats are stored as fp16.
        image_size: ADM centre-crop size.
        batch_size: encoding batch size.
        shard_size: samples per output shard.
        kind: ``"moments"``, ``"tokens"`` or ``"auto"`` (moments when the tokenizer has ``encode_moments``).
        clip_tokenizer: optional ``captions -> LongTensor (B, ctx)`` stored as ``clip_ids``.
        num_workers: DataLoader workers for decoding the source.
        device: where images are encoded (default: the tokenizer's parameter device, else CPU).
        prefix: output shard name prefix.
        progress: show a tqdm progress bar.

    Returns:
        dict with ``paths`` (shards), ``written`` (samples), ``kind`` and ``stats`` (source loader stats).
    """
    kind = _resolve_kind(tokenizer, kind)
    encode = tokenizer.encode_moments if kind == "moments" else tokenizer.encode
    device = device if device is not None else _device_of(tokenizer)
    loader = make_dataloader(urls, batch_size, image_size=image_size, num_workers=num_workers, shuffle_buffer=0,
                             shuffle_shards=False, drop_last=False, transform=eval_transform(image_size))
    os.makedirs(out_dir, exist_ok=True)
    writer = RotatingShardWriter(out_dir, shard_size, prefix)
    written = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="latent-cache", unit="img")
    try:
        for batch in loader:
            x = batch["image"].to(device)  # (B, 3, H, W)
            lat = encode(x).float().cpu().contiguous()
            lat_flip = encode(x.flip(-1)).float().cpu().contiguous()
            out = text_encoder(batch["caption"])
            feats, mask = (out if isinstance(out, (tuple, list)) else (out, None))
            feats = feats.half().cpu().contiguous()  # (B, Lt, D)
            mask = mask.cpu().contiguous() if mask is not None else None
            clip_ids = clip_tokenizer(batch["caption"]).cpu().contiguous() if clip_tokenizer is not None else None
            for i, key in enumerate(batch["key"]):
                tensors = {"image": lat[i].clone(), "image_flip": lat_flip[i].clone(), "text": feats[i].clone()}
                if mask is not None:
                    tensors["text_mask"] = mask[i].clone()
                if clip_ids is not None:
                    tensors["clip_ids"] = clip_ids[i].clone()
                meta = {"caption": batch["caption"][i], "kind": kind, "meta": batch["meta"][i]}
                writer.write({"__key__": key, "safetensors": st_save(tensors),
                              "txt": batch["caption"][i].encode("utf-8"),
                              "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
                written += 1
            if bar is not None:
                bar.update(len(batch["key"]))
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return {"paths": writer.paths, "written": written, "kind": kind, "stats": loader.stats}


class LatentCacheDataset(ImageTextDataset):
    """Reads a latent cache written by :func:`build_latent_cache` (same options as the image dataset).

    Args:
        urls: cache shards.
        config: :class:`WebDatasetConfig` (``image_size`` is unused).
        flip_prob: probability of returning the flipped crop's entry.
        rank, world_size, epoch: as in :class:`ImageTextDataset`.
    """

    def __init__(self, urls, config: Optional[WebDatasetConfig] = None, flip_prob: float = 0.5,
                 rank: Optional[int] = None, world_size: Optional[int] = None, epoch: int = 0) -> None:
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        super().__init__(urls, config, transform=None, rank=rank, world_size=world_size, epoch=epoch)
        self.flip_prob = flip_prob

    def decode_sample(self, sample: Dict[str, Any], generator: torch.Generator, shapes: Dict[str, tuple]):
        """Cached members -> one sample dict; the flip coin comes from ``generator``."""
        caption, meta = decode_caption(sample, self.config)
        if "safetensors" not in sample:
            raise SkipSample("missing_latent", "no .safetensors member")
        try:
            tensors = st_load(sample["safetensors"])
        except Exception as exn:  # noqa: BLE001 - safetensors raises several types for corrupt data
            raise SkipSample("corrupt_latent", f"{type(exn).__name__}: {exn}") from None
        missing = {"image", "image_flip", "text"} - set(tensors)
        if missing:
            raise SkipSample("missing_latent", f"missing tensors {sorted(missing)}")
        kind = (meta or {}).get("kind", "moments")
        flipped = bool(torch.rand((), generator=generator) < self.flip_prob)
        item = {kind: tensors["image_flip" if flipped else "image"].float(), "text": tensors["text"]}
        for name in ("text_mask", "clip_ids"):
            if name in tensors:
                item[name] = tensors[name]
        for name, value in item.items():
            shapes.setdefault(name, tuple(value.shape))
            check_shape(name, value.float() if name == "text" else value, shapes[name])
        item.update(flipped=flipped, caption=caption, key=sample["__key__"], meta=(meta or {}).get("meta"))
        return item

    def collate(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Stack tensors, list the rest."""
        batch: Dict[str, Any] = {}
        for name, value in samples[0].items():
            if isinstance(value, torch.Tensor):
                if any(name not in s for s in samples):
                    raise ValueError(f"latent cache: field {name!r} present in some samples only")
                batch[name] = torch.stack([s[name] for s in samples])
            elif name == "flipped":
                batch[name] = torch.tensor([s[name] for s in samples], dtype=torch.bool)
            else:
                batch[name] = [s[name] for s in samples]
        return batch


def make_latent_loader(
    urls,
    batch_size: int,
    num_workers: int = 4,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    epoch: int = 0,
    flip_prob: float = 0.5,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    log_fn: Optional[Callable[[str], None]] = None,
    **config_overrides: Any,
) -> ImageTextLoader:
    """:class:`ImageTextLoader` over a latent cache (resume, stats and epochs as for images)."""
    config = WebDatasetConfig(batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed, **config_overrides)
    dataset = LatentCacheDataset(urls, config, flip_prob=flip_prob, rank=rank, world_size=world_size, epoch=epoch)
    return ImageTextLoader(dataset, num_workers=num_workers, log_fn=log_fn)
