"""Image transforms for DREAM training and evaluation.

The official DREAM/MAR training transform is the ADM (guided-diffusion, arXiv 2105.05233) centre crop:

1. while the short side is >= 2 * size: halve the image with a BOX filter (cheap anti-aliasing);
2. resize with BICUBIC so that the short side equals ``size`` (``round`` of the scaled long side);
3. crop the centre ``size x size`` square (offsets ``(dim - size) // 2``);

followed by ``RandomHorizontalFlip(0.5)`` (the caption is not changed) and scaling to ``[-1, 1]``.
Re-implemented from the description in ``dream_spec.md`` section 3.1; flips take a ``torch.Generator``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

__all__ = [
    "adm_center_crop",
    "pil_to_tensor",
    "ImageTransform",
    "train_transform",
    "eval_transform",
]


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM centre crop of a PIL image to ``size x size`` (box-halve, bicubic resize, centre crop).

    Args:
        image: a PIL image (any mode; converted to RGB).
        size: output side length.

    Returns:
        RGB PIL image of size ``(size, size)``.
    """
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    if image.width <= 0 or image.height <= 0:
        raise ValueError(f"image has an empty size {image.size}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    # numpy arithmetic (single-threaded): avoids torch intra-op threads contending with loader workers
    x = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)  # (3, H, W)
    np.divide(x, 127.5, out=x)
    x -= 1.0
    return torch.from_numpy(x)


@dataclass(frozen=True)
class ImageTransform:
    """ADM centre crop + optional random horizontal flip -> tensor in ``[-1, 1]``.

    Call as ``transform(pil_image, generator)``; the flip coin is drawn from ``generator`` so data order and
    augmentation are reproducible (and resumable) from a seed.

    Attributes:
        image_size: output side length.
        flip_prob: probability of a horizontal flip (0.5 for training, 0 for evaluation).
    """

    image_size: int = 256
    flip_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")

    def __call__(self, image: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Return the transformed image as a float tensor (3, image_size, image_size) in ``[-1, 1]``."""
        x = pil_to_tensor(adm_center_crop(image, self.image_size))
        if self.flip_prob > 0:
            coin = torch.rand((), generator=generator)
            if float(coin) < self.flip_prob:
                x = x.flip(-1)
        return x


def train_transform(image_size: int = 256) -> ImageTransform:
    """Official training transform: ADM centre crop + RandomHorizontalFlip(0.5)."""
    return ImageTransform(image_size=image_size, flip_prob=0.5)


def eval_transform(image_size: int = 256) -> ImageTransform:
    """Evaluation / caching transform: ADM centre crop, no flip."""
    return ImageTransform(image_size=image_size, flip_prob=0.0)
