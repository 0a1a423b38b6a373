"""Image sources, feature extraction and feature caching shared by the evaluation tools.

What:
- image streaming from folders (flat or ImageFolder-style class folders), webdataset ``.tar``
  shards (a minimal tar reader: samples are grouped by key, the image is the first member with
  an image extension, labels come from ``.cls`` / ``.json``), tensors, or any iterable of
  batches;
- ADM-style centre crop (box-downsample, bicubic resize, centre crop; Dhariwal & Nichol 2021,
  arXiv 2105.05233) used by MAR / DREAM for reference images;
- DREAM encoder features for the probes (buffer-token mean without ``encoder_norm``, as the
  official ``main_linprobe.py``; all-token mean; or the contrastive embedding);
- a safetensors feature cache keyed by a hash of (model, data, options).

Provenance: re-implemented from the webdataset format description and the ADM / MAR papers.
Conventions: uint8 batches are (B, 3, H, W) in [0, 255]; float images are in ``value_range``
(default [-1, 1], the library convention).
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "to_uint8",
    "to_float",
    "center_crop_adm",
    "load_image",
    "list_images",
    "list_image_folder",
    "expand_shards",
    "iter_tar_samples",
    "iter_image_batches",
    "iter_labeled_batches",
    "count_images",
    "extract_features",
    "dream_image_features",
    "dream_token_features",
    "tokenize_images",
    "FeatureCache",
    "PixelFeatureExtractor",
    "cache_key",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
ImageSource = Union[str, os.PathLike, torch.Tensor, Sequence[str], Iterable]


# ----------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """(B, 3, H, W) float in ``value_range`` (or uint8) -> uint8 in [0, 255], rounded like a PNG save."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a tensor of images, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float, got {images.dtype}")
    lo, hi = value_range
    x = (images.float() - lo) / (hi - lo)
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)


def to_float(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in ``value_range``; float inputs are returned as float32."""
    if images.dtype == torch.uint8:
        lo, hi = value_range
        return images.float() / 255.0 * (hi - lo) + lo
    return images.float()


def center_crop_adm(img: Image.Image, size: int) -> Image.Image:
    """ADM centre crop: box-halve while the short side >= 2*size, bicubic to short side = size, crop."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_image(src: Union[str, os.PathLike, bytes], image_size: Optional[int] = None) -> torch.Tensor:
    """Read an image file (path or encoded bytes) -> uint8 (3, H, W) RGB, optionally ADM-cropped."""
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
        img = img.convert("RGB")
    except Exception as e:  # PIL raises several types
        name = "<bytes>" if isinstance(src, (bytes, bytearray)) else os.fspath(src)
        raise ValueError(f"could not decode image {name}: {e}") from e
    if image_size is not None:
        img = center_crop_adm(img, image_size)
    arr = np.asarray(img, dtype=np.uint8).copy()                  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: Union[str, os.PathLike]) -> list[str]:
    """All image files under ``folder`` (recursive), sorted. Raises if there are none."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder!r}")
    files = []
    for root, _, names in os.walk(folder, followlinks=True):
        files.extend(os.path.join(root, n) for n in names if _is_image(n))
    if not files:
        raise ValueError(f"no images found in {folder!r} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(files)


def list_image_folder(folder: Union[str, os.PathLike]) -> tuple[list[str], list[int], list[str]]:
    """ImageFolder layout ``folder/<class>/**/<image>`` -> (files, labels, class names sorted)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder!r}")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise ValueError(f"{folder!r} has no class sub-folders (expected folder/<class>/<image>)")
    files, labels = [], []
    for idx, c in enumerate(classes):
        found = []
        for root, _, names in os.walk(os.path.join(folder, c), followlinks=True):
            found.extend(os.path.join(root, n) for n in names if _is_image(n))
        files.extend(sorted(found))
        labels.extend([idx] * len(found))
    if not files:
        raise ValueError(f"no images found in the class folders of {folder!r}")
    return files, labels, classes


def expand_shards(spec: Union[str, os.PathLike, Sequence[str]]) -> list[str]:
    """Shard list from a brace pattern (``a-{000..009}.tar``), a glob, a directory, a file or a list."""
    if isinstance(spec, (list, tuple)):
        out = []
        for s in spec:
            out.extend(expand_shards(s))
        return out
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        out = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not out:
            raise ValueError(f"no .tar shards in directory {spec!r}")
        return out
    if "{" in spec:
        import braceexpand  # a webdataset dependency

        parts = list(braceexpand.braceexpand(spec))
    elif any(c in spec for c in "*?["):
        parts = sorted(glob.glob(spec))
        if not parts:
            raise FileNotFoundError(f"no shards match {spec!r}")
    else:
        parts = [spec]
    missing = [p for p in parts if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"shard(s) not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return parts


def _is_shard_spec(src: Any) -> bool:
    if isinstance(src, (str, os.PathLike)):
        s = os.fspath(src)
        return s.endswith(".tar") or "{" in s or (os.path.isdir(s) and bool(glob.glob(os.path.join(s, "*.tar"))))
    return isinstance(src, (list, tuple)) and len(src) > 0 and all(
        isinstance(s, (str, os.PathLike)) and os.fspath(s).endswith(".tar") for s in src
    )


def iter_tar_samples(shards: Union[str, Sequence[str]]) -> Iterator[dict[str, Any]]:
    """Stream webdataset samples: dicts ``{"__key__": key, "<ext>": bytes, ...}`` grouped by key."""
    for shard in expand_shards(shards):
        current: Optional[dict[str, Any]] = None
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, base = os.path.split(member.name)
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = os.path.join(dirname, stem)
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__shard__": shard}
                current[ext.lower()] = tar.extractfile(member).read()
        if current is not None:
            yield current


def _sample_image(sample: dict[str, Any]) -> Optional[bytes]:
    for k, v in sample.items():
        if not k.startswith("__") and _is_image("." + k.rsplit(".", 1)[-1]):
            return v
    return None


def _sample_label(sample: dict[str, Any], label_key: str) -> int:
    if "cls" in sample:
        return int(sample["cls"].decode().strip())
    if "json" in sample:
        meta = json.loads(sample["json"])
        if label_key in meta:
            return int(meta[label_key])
        raise KeyError(f"sample {sample['__key__']!r}: json has no {label_key!r} field (keys {sorted(meta)})")
    raise KeyError(f"sample {sample['__key__']!r} has no label (.cls or .json with {label_key!r})")


# ----------------------------------------------------------------------------------------------
# Batch streaming
# ----------------------------------------------------------------------------------------------


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) > 1:
        raise ValueError(
            f"images in one batch have different sizes {sorted(shapes)[:3]}; pass image_size=... "
            "(CLI: --image-size) to centre-crop them to a common size"
        )
    return torch.stack(images)


def _batched(items: Iterable, batch_size: int) -> Iterator[list]:
    buf = []
    for it in items:
        buf.append(it)
        if len(buf) == batch_size:
            yield buf
            buf = []
    if buf:
        yield buf


def iter_labeled_batches(
    source: Any,
    batch_size: int = 64,
    image_size: Optional[int] = None,
    labels: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    max_images: Optional[int] = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    label_key: str = "label",
    require_labels: bool = True,
) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Yield ``(uint8 images (B, 3, H, W), int64 labels (B,) or None)`` from any supported source.

    Args:
        source: an ImageFolder-style folder (class sub-folders; a flat folder gives no labels),
            webdataset shard spec(s), an image tensor (N, 3, H, W) (``labels`` given separately),
            or an iterable of image batches / ``(images, labels)`` pairs.
        batch_size: images per batch (folders and shards; tensors are split too).
        image_size: ADM centre-crop size for decoded files (None: keep the file's size).
        labels: labels for a tensor source.
        max_images: stop after this many images.
        value_range: range of float image inputs.
        label_key: json field with the label in shards without ``.cls``.
        require_labels: raise if a folder / shard sample has no label.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seen = 0

    def clip(imgs: torch.Tensor, labs: Optional[torch.Tensor]):
        nonlocal seen
        if max_images is not None:
            keep = max(0, min(imgs.shape[0], max_images - seen))
            imgs = imgs[:keep]
            labs = labs[:keep] if labs is not None else None
        seen += imgs.shape[0]
        return imgs, labs

    def done() -> bool:
        return max_images is not None and seen >= max_images

    if isinstance(source, (str, os.PathLike)) and not _is_shard_spec(source):
        folder = os.fspath(source)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"image source not found: {folder!r}")
        has_classes = any(os.path.isdir(os.path.join(folder, d)) for d in os.listdir(folder))
        if has_classes and require_labels:
            files, labs_all, _ = list_image_folder(folder)
        else:
            if require_labels:
                raise ValueError(f"{folder!r} has no class sub-folders, so no labels (ImageFolder layout needed)")
            files, labs_all = list_images(folder), None
        if max_images is not None:  # first files in sorted (class, name) order
            files = files[:max_images]
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            imgs = _stack([load_image(f, image_size) for f in chunk])
            labs = torch.tensor(labs_all[start:start + len(chunk)]) if labs_all is not None else None
            yield clip(imgs, labs)
            if done():
                return
        return

    if _is_shard_spec(source):
        n = 0
        for group in _batched(iter_tar_samples(source), batch_size):
            imgs, labs = [], []
            for s in group:
                data = _sample_image(s)
                if data is None:
                    continue
                imgs.append(load_image(data, image_size))
                if require_labels:
                    labs.append(_sample_label(s, label_key))
            if not imgs:
                continue
            n += len(imgs)
            yield clip(_stack(imgs), torch.tensor(labs) if require_labels else None)
            if done():
                return
        if n == 0:
            raise ValueError(f"no images found in shards {source!r}")
        return

    if isinstance(source, torch.Tensor):
        imgs_all = to_uint8(source, value_range)
        if labels is not None:
            labels = torch.as_tensor(labels).long().reshape(-1)
            if labels.shape[0] != imgs_all.shape[0]:
                raise ValueError(f"{imgs_all.shape[0]} images but {labels.shape[0]} labels")
        elif require_labels:
            raise ValueError("a tensor image source needs labels=... (or require_labels=False)")
        for start in range(0, imgs_all.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            yield clip(imgs_all[sl], labels[sl] if labels is not None else None)
            if done():
                return
        return

    if isinstance(source, Iterable):
        for item in source:
            if isinstance(item, (tuple, list)) and len(item) == 2:
                imgs, labs = to_uint8(item[0], value_range), torch.as_tensor(item[1]).long().reshape(-1)
                if labs.shape[0] != imgs.shape[0]:
                    raise ValueError(f"a batch has {imgs.shape[0]} images but {labs.shape[0]} labels")
            else:
                if require_labels:
                    raise ValueError("the iterable must yield (images, labels) pairs when labels are required")
                imgs, labs = to_uint8(item, value_range), None
            yield clip(imgs, labs)
            if done():
                return
        return
    raise TypeError(f"unsupported image source of type {type(source).__name__}")


def iter_image_batches(
    source: Any,
    batch_size: int = 64,
    image_size: Optional[int] = None,
    max_images: Optional[int] = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Iterator[torch.Tensor]:
    """Yield uint8 (B, 3, H, W) batches from a folder (recursive), shard spec(s), tensor or iterable."""
    it = iter_labeled_batches(
        source, batch_size=batch_size, image_size=image_size, max_images=max_images,
        value_range=value_range, require_labels=False,
    )
    for imgs, _ in it:
        if imgs.shape[0]:
            yield imgs


def count_images(source: Any) -> Optional[int]:
    """Number of images for a progress bar when it is cheap to know (folders, tensors), else None."""
    if isinstance(source, torch.Tensor):
        return int(source.shape[0])
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source) and not _is_shard_spec(source):
        return len(list_images(source))
    return None


# ----------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------


def extract_features(
    fn: Callable[[torch.Tensor], Any],
    batches: Iterable,
    total: Optional[int] = None,
    desc: str = "features",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Run ``fn`` over batches and concatenate on the CPU.

    ``batches`` yields images or ``(images, labels)``; ``fn(images)`` returns a tensor or a dict
    of tensors. The result maps ``"features"`` (or the dict's keys) and, when given, ``"labels"``
    to concatenated tensors.
    """
    from tqdm.auto import tqdm

    out: dict[str, list[torch.Tensor]] = {}
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress)
    with torch.inference_mode():
        for item in batches:
            labels = None
            if isinstance(item, (tuple, list)):
                item, labels = item
            if item.shape[0] == 0:
                continue
            res = fn(item)
            res = res if isinstance(res, dict) else {"features": res}
            for k, v in res.items():
                out.setdefault(k, []).append(v.detach().float().cpu())
            if labels is not None:
                out.setdefault("labels", []).append(torch.as_tensor(labels).long().cpu())
            bar.update(item.shape[0])
    bar.close()
    if not out:
        raise ValueError("no images were read from the source")
    return {k: torch.cat(v) for k, v in out.items()}


def dream_token_features(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    pool: str = "buffer",
    apply_norm: bool = False,
    buffer: str = "class",
    fc_norm: bool = False,
) -> torch.Tensor:
    """Frozen DREAM features from tokens (B, L, token_dim), ALL tokens visible (no masking).

    Args:
        model: a DREAM model (``forward_encoder``, ``encode_image``, ``config.buffer_size``).
        tokens: (B, L, token_dim) float tokens.
        pool: ``"buffer"`` (official probe: mean of the buffer-token outputs of the last block),
            ``"mean"`` (mean over buffer + image tokens) or ``"embedding"`` (the normalised
            contrastive embedding ``encode_image``, which always applies ``encoder_norm``).
        apply_norm: apply ``encoder_norm`` before pooling (the official probe does not).
        buffer: what fills the buffer slots: ``"class"`` (``class_emb(0)``, as in training) or
            ``"fake_latent"`` (the official ``main_linprobe.py`` default unless ``--use_class_emb``;
            spec quirk Q3).
        fc_norm: apply a freshly initialised LayerNorm (no affine, eps 1e-6) to the pooled
            features, as the official probe model does before the BatchNorm head (spec quirk Q4;
            MAE's probe keeps it frozen, so it is a per-sample standardisation).

    Returns:
        (B, D) float features.
    """
    if pool not in ("buffer", "mean", "embedding"):
        raise ValueError(f"pool must be 'buffer', 'mean' or 'embedding', got {pool!r}")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, L, token_dim), got {tuple(tokens.shape)}")
    p = next(model.parameters())
    tokens = tokens.to(device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()  # no dropout in evaluation features
    try:
        if pool == "embedding":
            return model.encode_image(tokens, normalize=True).float()
        kw = {} if buffer == "class" else {"buffer": buffer}
        h = model.forward_encoder(tokens, apply_norm=apply_norm, **kw)  # (B, buffer + L, De)
        if pool == "mean":
            f = h.mean(1).float()
        else:
            nb = int(model.config.buffer_size)
            if nb <= 0:
                raise ValueError("pool='buffer' needs a model with buffer tokens (config.buffer_size > 0)")
            f = h[:, :nb].mean(1).float()
        return F.layer_norm(f, f.shape[-1:], eps=1e-6) if fc_norm else f
    finally:
        model.train(was_training)


def tokenize_images(tokenizer: Any, images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0),
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """uint8 / float images -> tokens with ``tokenizer.encode(images in [-1, 1])``.

    Tokenizers whose ``encode`` takes ``sample=`` (VAE posteriors) are asked for the posterior
    mean (``sample=False``) so that evaluation features are deterministic.
    """
    import inspect

    if images.dtype == torch.uint8:
        x = to_float(images, (-1.0, 1.0))
    else:
        lo, hi = value_range
        x = (images.float() - lo) / (hi - lo) * 2.0 - 1.0
    if device is not None:
        x = x.to(device)
    try:
        takes_sample = "sample" in inspect.signature(tokenizer.encode).parameters
    except (TypeError, ValueError):
        takes_sample = False
    return tokenizer.encode(x, sample=False) if takes_sample else tokenizer.encode(x)


def dream_image_features(
    model: torch.nn.Module,
    tokenizer: Any,
    images: torch.Tensor,
    pool: str = "buffer",
    apply_norm: bool = False,
    value_range: tuple[float, float] = (-1.0, 1.0),
    buffer: str = "class",
    fc_norm: bool = False,
) -> torch.Tensor:
    """Images -> tokens (``tokenizer.encode``) -> :func:`dream_token_features`.

    Args:
        images: uint8 (B, 3, H, W) or float in ``value_range``.
        tokenizer: object with ``encode(images in [-1, 1]) -> tokens (B, L, token_dim)``
            (``dream.models.tokenizers.PixelTokenizer`` / ``VAETokenizer``).
    """
    dev = next(model.parameters()).device
    tokens = tokenize_images(tokenizer, images, value_range, device=dev)
    return dream_token_features(model, tokens, pool=pool, apply_norm=apply_norm, buffer=buffer, fc_norm=fc_norm)


class PixelFeatureExtractor(torch.nn.Module):
    """Smoke-test features: area-downsampled pixels, flattened. uint8 (B, 3, H, W) -> (B, 3*s*s) in [0, 1].

    Usable anywhere a feature module is (FID, probes) and in torchmetrics' ``feature=`` (it has
    ``num_features``). Not a perceptual metric: for checks and tiny synthetic data only.
    """

    def __init__(self, size: int = 8):
        super().__init__()
        self.size = int(size)
        self.num_features = 3 * self.size * self.size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return torch.nn.functional.adaptive_avg_pool2d(x, self.size).flatten(1)


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


def _fingerprint(value: Any) -> Any:
    if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
        st = os.stat(value)
        return {"path": os.path.abspath(os.fspath(value)), "size": st.st_size, "mtime": st.st_mtime_ns}
    if isinstance(value, (list, tuple)):
        return [_fingerprint(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _fingerprint(v) for k, v in sorted(value.items())}
    if isinstance(value, (int, float, bool, str)) or value is None:
        return value
    return repr(value)


def cache_key(**parts: Any) -> str:
    """A short hash of the given options; existing file paths add their size and mtime."""
    blob = json.dumps(_fingerprint(parts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class FeatureCache:
    """Feature tensors stored as ``<root>/<key>.safetensors`` (written atomically)."""

    root: str

    def path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}.safetensors")

    def get(self, key: str) -> Optional[dict[str, torch.Tensor]]:
        """The cached tensors for ``key``, or None."""
        p = self.path(key)
        if not os.path.isfile(p):
            return None
        from safetensors.torch import load_file

        return load_file(p)

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: Optional[dict[str, str]] = None) -> str:
        """Store tensors (and string metadata) under ``key``; returns the file path."""
        from safetensors.torch import save_file

        os.makedirs(self.root, exist_ok=True)
        p = self.path(key)
        tmp = p + ".tmp"
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in (meta or {}).items()})
        os.replace(tmp, p)
        return p

    def get_or_compute(self, key: str, compute: Callable[[], dict[str, torch.Tensor]],
                       meta: Optional[dict[str, str]] = None) -> dict[str, torch.Tensor]:
        """Load ``key`` or compute, store and return it."""
        hit = self.get(key)
        if hit is not None:
            return hit
        out = compute()
        self.put(key, out, meta)
        return out
