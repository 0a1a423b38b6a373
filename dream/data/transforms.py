"""Image transforms for DREAM training and evaluation.

The official DREAM/MAR training transform is the ADM (guided-diffusion, arXiv 2105.05233) centre crop:

1. while the short side is >= 2 * size: halve the image with a BOX filter (cheap anti-aliasing);
2. resize with BICUBIC so that the short side equals ``size`` (``round`` of the scaled long side);
3. crop the centre ``size x size`` square (offsets ``(dim - size) // 2``);

followed by ``RandomHorizontalFlip(0.5)`` (the caption is not changed) and scaling to ``[-1, 1]``.
Re-implemented from the description in ``dream_spec.md`` section 3.1; flips take a ``torch.Generator``.

Step 2 scales the short side *up* when it is below ``size``: an image with an extreme aspect ratio (a 467-byte
400000x1 PNG) would become gigabytes. The output of every resize step is therefore bounded by ``max_pixels``
(default :data:`DEFAULT_MAX_RESIZE_PIXELS`) and checked before it is allocated (:class:`ImageTooLarge`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

__all__ = [
    "DEFAULT_MAX_RESIZE_PIXELS",
    "ImageTooLarge",
    "adm_center_crop",
    "pil_to_tensor",
    "ImageTransform",
    "train_transform",
    "eval_transform",
]


#: Default bound on the pixels of any image a resize step of :func:`adm_center_crop` makes (2**24: 48 MiB as RGB;
#: at 256 px this allows aspect ratios up to 256:1).
DEFAULT_MAX_RESIZE_PIXELS = 1 << 24


class ImageTooLarge(ValueError):
    """A resize step of the crop would exceed its pixel bound (the message names the limit)."""


def _resize(image: Image.Image, new_size: tuple, resample, original: tuple, max_pixels: Optional[int]) -> Image.Image:
    w, h = new_size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLarge(f"image {original[0]}x{original[1]}: the crop would resize it to {w}x{h} "
                            f"({w * h:,} pixels) > max_resize_pixels ({max_pixels:,}); extreme aspect ratio?")
    return image.resize(new_size, resample=resample)


def adm_center_crop(image: Image.Image, size: int,
                    max_pixels: Optional[int] = DEFAULT_MAX_RESIZE_PIXELS) -> Image.Image:
    """ADM centre crop of a PIL image to ``size x size`` (box-halve, bicubic resize, centre crop).

    Args:
        image: a PIL image (any mode; converted to RGB).
        size: output side length.
        max_pixels: bound on the output of every resize step (None: unbounded).

    Returns:
        RGB PIL image of size ``(size, size)``.

    Raises:
        ImageTooLarge: a resize step would make more than ``max_pixels`` pixels (checked before resizing).
    """
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    if image.width <= 0 or image.height <= 0:
        raise ValueError(f"image has an empty size {image.size}")
    original = image.size
    if image.mode != "RGB":
        image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = _resize(image, tuple(x // 2 for x in image.size), Image.BOX, original, max_pixels)
    scale = size / min(image.size)
    image = _resize(image, tuple(round(x * scale) for x in image.size), Image.BICUBIC, original, max_pixels)
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
        max_resize_pixels: bound on every resize step of the crop (see :func:`adm_center_crop`).
    """

    image_size: int = 256
    flip_prob: float = 0.5
    max_resize_pixels: Optional[int] = DEFAULT_MAX_RESIZE_PIXELS

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")

    def __call__(self, image: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Return the transformed image as a float tensor (3, image_size, image_size) in ``[-1, 1]``."""
        x = pil_to_tensor(adm_center_crop(image, self.image_size, self.max_resize_pixels))
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
