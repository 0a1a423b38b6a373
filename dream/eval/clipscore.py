"""CLIP score: DREAM's own image-text score and torchmetrics' CLIPScore with a local CLIP.

What:
- :class:`DreamCLIPScore`: ``100 * cos(model.encode_image(tokens), model.encode_text(ids))`` with
  the DREAM contrastive head, all image tokens visible; reported like torchmetrics' CLIPScore as
  ``max(mean score, 0)`` (Hessel et al. 2021, arXiv 2104.08718, with torchmetrics' weight 100).
- :func:`hf_clip_score`: ``torchmetrics.multimodal.CLIPScore`` fed through the callable route
  (``model_name_or_path=lambda: (CLIPModel, CLIPProcessor)``), so any local CLIP folder works
  offline (torchmetrics would otherwise only accept paths containing "openai"). Needs
  transformers < 5 (5.x returns ModelOutputs from ``get_image_features``).

DREAM's paper reports a CLIP score of 30.1 without naming the CLIP model (spec section 9).
Re-implemented from the definitions; no code copied.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence, Union

import torch
import torch.nn.functional as F

from .features import _is_shard_spec, tokenize_images, to_uint8

__all__ = ["DreamCLIPScore", "dream_clip_score", "load_hf_clip", "hf_clip_score", "iter_image_text_batches"]


def _check_pairs(images: torch.Tensor, texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be strings")
    if images.shape[0] != len(texts):
        raise ValueError(f"{images.shape[0]} images but {len(texts)} captions")
    return texts


def iter_image_text_batches(images: Any, texts: Sequence[str], batch_size: int = 64,
                            value_range: tuple[float, float] = (-1.0, 1.0)):
    """Pair an image source (tensor, folder, shards, iterable of batches) with a caption list, in order.

    Tensors (and batches from an iterable) are passed through unchanged; files are decoded to uint8.
    """
    from .features import iter_image_batches

    texts = list(texts)
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        batches = images.split(batch_size)
    elif isinstance(images, (str, os.PathLike)) or _is_shard_spec(images) or not isinstance(images, Iterable):
        batches = iter_image_batches(images, batch_size=batch_size, value_range=value_range)
    else:
        batches = images
    pos = 0
    for imgs in batches:
        if pos + imgs.shape[0] > len(texts):
            raise ValueError(f"more images than captions ({len(texts)})")
        yield imgs, texts[pos:pos + imgs.shape[0]]
        pos += imgs.shape[0]
    if pos != len(texts):
        raise ValueError(f"{pos} images but {len(texts)} captions")


# ----------------------------------------------------------------------------------------------
# DREAM's own score
# ----------------------------------------------------------------------------------------------


class DreamCLIPScore:
    """Streaming DREAM image-text score.

    Args:
        model: a DREAM model (``encode_image``, ``encode_text``).
        image_tokenizer: ``encode(images in [-1, 1]) -> tokens`` (``PixelTokenizer`` / ``VAETokenizer``).
        text_tokenizer: callable ``texts -> LongTensor (B, ctx)`` (``dream.text.CLIPTokenizer``).
        value_range: range of float image inputs (uint8 images are [0, 255]).
    """

    def __init__(self, model: torch.nn.Module, image_tokenizer: Any, text_tokenizer: Callable,
                 value_range: tuple[float, float] = (-1.0, 1.0)):
        self.model, self.image_tokenizer, self.text_tokenizer = model, image_tokenizer, text_tokenizer
        self.value_range = value_range
        self.reset()

    def reset(self) -> None:
        self.total, self.n = 0.0, 0

    @torch.no_grad()
    def scores(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Per-pair ``100 * cos`` (B,) for images (B, 3, H, W) and B captions."""
        texts = _check_pairs(images, texts)
        dev = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            tokens = tokenize_images(self.image_tokenizer, images, self.value_range, device=dev)
            ids = self.text_tokenizer(texts)
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
                raise TypeError("text_tokenizer must return a LongTensor (B, ctx)")
            e_img = self.model.encode_image(tokens.to(next(self.model.parameters()).dtype), normalize=False)
            e_txt = self.model.encode_text(ids.to(dev), normalize=False)
        finally:
            self.model.train(was_training)
        return 100.0 * F.cosine_similarity(e_img.float(), e_txt.float(), dim=-1)

    def update(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        s = self.scores(images, texts)
        self.total += float(s.double().sum())
        self.n += s.numel()
        return s

    def compute(self) -> float:
        """``max(mean score, 0)`` over all pairs seen."""
        if self.n == 0:
            raise ValueError("no image-text pairs were scored")
        return max(self.total / self.n, 0.0)


def dream_clip_score(model: torch.nn.Module, images: Any, texts: Sequence[str], image_tokenizer: Any,
                     text_tokenizer: Callable, batch_size: int = 64, value_range: tuple[float, float] = (-1.0, 1.0),
                     progress: bool = True) -> dict[str, Any]:
    """DREAM CLIP score over an image source paired in order with ``texts``.

    Returns:
        ``{"clip_score": max(mean, 0), "num_pairs": n, "scores": per-pair list}``.
    """
    from tqdm.auto import tqdm

    metric = DreamCLIPScore(model, image_tokenizer, text_tokenizer, value_range)
    per = []
    with tqdm(total=len(texts), desc="DREAM CLIP score", unit="img", disable=not progress) as bar:
        for imgs, caps in iter_image_text_batches(images, texts, batch_size, value_range):
            per.append(metric.update(imgs, caps).cpu())
            bar.update(len(caps))
    return {"clip_score": metric.compute(), "num_pairs": metric.n, "scores": torch.cat(per).tolist()}


# ----------------------------------------------------------------------------------------------
# torchmetrics CLIPScore with a local CLIP
# ----------------------------------------------------------------------------------------------


def load_hf_clip(path: Union[str, os.PathLike]):
    """Load ``(CLIPModel, CLIPProcessor)`` from a local folder (``save_pretrained`` layout), offline."""
    from transformers import CLIPModel, CLIPProcessor

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CLIP model folder not found: {path!r} (dream never downloads weights)")
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def _resolve_clip(model_name_or_path: Any) -> Callable:
    if callable(model_name_or_path):
        return model_name_or_path
    if isinstance(model_name_or_path, (tuple, list)) and len(model_name_or_path) == 2:
        pair = tuple(model_name_or_path)
        return lambda: pair
    if isinstance(model_name_or_path, (str, os.PathLike)):
        path = os.fspath(model_name_or_path)
        return lambda: load_hf_clip(path)
    raise TypeError("model_name_or_path must be a local folder, a (CLIPModel, CLIPProcessor) pair or a callable")


def hf_clip_score(
    images: Any,
    texts: Sequence[str],
    model_name_or_path: Any,
    batch_size: int = 64,
    value_range: tuple[float, float] = (-1.0, 1.0),
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """torchmetrics ``CLIPScore`` (``max(100 * mean cos, 0)``) with a local Hugging Face CLIP.

    Args:
        images: tensor (N, 3, H, W) (uint8, or float in ``value_range``), image folder, shards or
            an iterable of batches, paired in order with ``texts``.
        texts: N captions.
        model_name_or_path: a local CLIP folder, a ``(CLIPModel, CLIPProcessor)`` pair, or a
            callable returning one.

    Returns:
        ``{"clip_score": float, "num_pairs": n}``.
    """
    from torchmetrics.multimodal.clip_score import CLIPScore
    from tqdm.auto import tqdm

    metric = CLIPScore(model_name_or_path=_resolve_clip(model_name_or_path)).to(device)
    n = 0
    with tqdm(total=len(texts), desc="CLIPScore", unit="img", disable=not progress) as bar:
        for imgs, caps in iter_image_text_batches(images, texts, batch_size, value_range):
            metric.update(to_uint8(imgs, value_range).to(device), list(caps))
            n += len(caps)
            bar.update(len(caps))
    if n == 0:
        raise ValueError("no image-text pairs were scored")
    return {"clip_score": float(metric.compute()), "num_pairs": n}
