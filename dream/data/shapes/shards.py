"""ShapesWorld as webdataset tar shards (``dream data shapes``)."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile

import torch

from .config import ShapesConfig
from .render import ShapesWorld

# ----------------------------------------------------------------------------------------------------
# Webdataset shards
# ----------------------------------------------------------------------------------------------------

def _png_bytes(image: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0          # reproducible archives
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(out_dir: str, n: int, seed: int = 0, split: str = "train", image_size: int = 32,
                 shard_size: int = 1000, config: ShapesConfig | None = None, start: int = 0,
                 progress: bool = True) -> list[str]:
    """Write ``n`` ShapesWorld samples as webdataset tar shards.

    Each sample ``{key}`` (``f"{split}_{index:08d}"``) has members ``{key}.png`` (RGB image),
    ``{key}.txt`` (caption) and ``{key}.json`` (metadata incl. the prompt spec).

    Args:
        out_dir: output folder (created).
        n: number of samples (indices ``start .. start + n - 1``).
        seed: base seed (overrides ``config.base_seed``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: image side, used when ``config`` is None.
        shard_size: samples per shard.
        config: full generator config (its ``image_size`` wins over ``image_size``).
        start: first sample index.
        progress: show a tqdm progress bar.

    Returns:
        The shard paths, in order (``shapes-{split}-{k:06d}.tar``).
    """
    if n < 0 or shard_size < 1:
        raise ValueError(f"need n >= 0 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    cfg = config if config is not None else ShapesConfig(image_size=image_size)
    cfg = dataclasses.replace(cfg, base_seed=int(seed), dtype="uint8")
    world = ShapesWorld(cfg)
    os.makedirs(out_dir, exist_ok=True)
    from tqdm.auto import tqdm

    paths = []
    bar = tqdm(total=n, desc=f"shapes shards ({split})", disable=not progress, unit="img")
    for k, s0 in enumerate(range(0, n, shard_size)):
        path = os.path.join(out_dir, f"shapes-{split}-{k:06d}.tar")
        tmp = path + ".tmp"
        with tarfile.open(tmp, "w") as tar:
            count = min(shard_size, n - s0)
            for c0 in range(0, count, 256):
                idx = range(start + s0 + c0, start + s0 + min(count, c0 + 256))
                images, captions, metas = world.batch(idx, split)
                for img, cap, meta in zip(images, captions, metas):
                    key = f"{split}_{meta['index']:08d}"
                    _add_member(tar, f"{key}.png", _png_bytes(img))
                    _add_member(tar, f"{key}.txt", cap.encode("utf-8"))
                    _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                bar.update(len(idx))
        os.replace(tmp, path)
        paths.append(path)
    bar.close()
    return paths
