"""Image helpers: tensors in [-1, 1] -> uint8, captioned grids saved as PNG."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [-1, 1] (or uint8) -> uint8, the MAR/ADM post-processing (round, clip)."""
    if images.dtype == torch.uint8:
        return images
    return ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(image[None])[0].permute(1, 2, 0).numpy())


def save_images(images: torch.Tensor, folder: os.PathLike, prefix: str = "sample") -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(to_uint8(images)):
        p = folder / f"{prefix}_{i:05d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(p)
        paths.append(p)
    return paths


def save_grid(images: torch.Tensor, captions: Optional[Sequence[str]], path: os.PathLike, ncol: Optional[int] = None,
              scale: int = 4, caption_width: int = 22, row_labels: Optional[Sequence[str]] = None) -> Path:
    """Save a grid of images (upscaled ``scale`` x with nearest neighbour) with a caption under each."""
    imgs = to_uint8(images)
    n = imgs.shape[0]
    ncol = ncol or min(n, 8)
    nrow = (n + ncol - 1) // ncol
    h, w = imgs.shape[-2] * scale, imgs.shape[-1] * scale
    font = ImageFont.load_default()
    lines = 3 if captions else 0
    cap_h = 11 * lines + 4 if captions else 0
    left = 70 if row_labels else 0
    cell_w = max(w, caption_width * 6) + 6
    canvas = Image.new("RGB", (left + ncol * cell_w, nrow * (h + cap_h + 6)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, ncol)
        x0, y0 = left + c * cell_w + (cell_w - w) // 2, r * (h + cap_h + 6) + 3
        tile = Image.fromarray(imgs[i].permute(1, 2, 0).numpy()).resize((w, h), Image.NEAREST)
        canvas.paste(tile, (x0, y0))
        if captions:
            text = "\n".join(textwrap.wrap(captions[i], caption_width)[:lines])
            draw.multiline_text((left + c * cell_w + 3, y0 + h + 2), text, fill=(0, 0, 0), font=font, spacing=1)
    if row_labels:
        for r, lab in enumerate(row_labels[:nrow]):
            draw.text((3, r * (h + cap_h + 6) + h // 2), lab, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
