"""Raw webdataset samples and their decoding, within size limits.

* :func:`iter_shard` groups the members of one tar shard into samples (webdataset's ``key.ext`` convention). A
  member larger than ``max_member_bytes``, or one that would take a sample's members past ``max_sample_bytes``,
  is never read into memory (the tar stream skips over it) and its sample is marked too large.
* :func:`decode_caption` and :func:`decode_image` turn members into a caption and a PIL image;
  :func:`decode_image` reads the image's size from its header and refuses more than ``max_image_pixels`` before
  decoding. (The ADM crop bounds the output of each of its resize steps, ``max_resize_pixels``: see
  :func:`dream.data.transforms.adm_center_crop`.)
* Anything wrong raises :class:`SkipSample` with one of :data:`SKIP_REASONS`; the dataset counts and skips it.

The limits are fields of :class:`~dream.data.webdataset.WebDatasetConfig`. Written from scratch for ``dream``.
"""
from __future__ import annotations

import collections
import io
import json
import logging
import os
import tarfile
import warnings
from typing import Any, Dict, Iterator, Optional
from urllib.parse import urlparse

import torch
from PIL import Image

__all__ = ["SKIP_REASONS", "SkipSample", "iter_shard", "decode_caption", "decode_image", "check_shape",
           "runs_a_command", "command_urls"]

logger = logging.getLogger("dream.data")

#: Reasons a sample (or shard) can be skipped, in the order they are checked.
SKIP_REASONS = (
    "too_large",  # a member, the sample's members together, the image's pixels or a resize step over its limit
    "missing_image",
    "missing_caption",
    "empty_caption",
    "bad_caption",  # not UTF-8
    "bad_json",  # invalid json member, when the caption had to come from it
    "corrupt_image",
    "transform_error",
    "bad_shape",  # wrong shape / dtype or non-finite values after decoding
    "missing_latent",  # latent cache: no ``safetensors`` member or missing tensors
    "corrupt_latent",  # latent cache: unreadable ``safetensors`` member
    "shard_error",  # counts shards (or the tail of a shard) that could not be read, not samples
)

TOO_LARGE = "__too_large__"  # raw-sample key: why the sample was not read in full


class SkipSample(Exception):
    """Raised by ``decode_sample`` to skip a sample; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


# --------------------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------------------
def has_scheme(url: str) -> bool:
    """True for a URL opened with webdataset's ``gopen`` (``pipe:``, ``https://``, ...), False for a local path."""
    return url.startswith("pipe:") or "://" in url


def runs_a_command(url: str) -> bool:
    """True if opening ``url`` with webdataset's ``gopen`` starts a program: ``pipe:CMD`` runs ``CMD`` in a
    shell, and every other scheme but ``file:`` runs a downloader (curl, gsutil, ais) with the URL."""
    if url.startswith("pipe:"):
        return True
    scheme = urlparse(url).scheme
    return len(scheme) > 1 and scheme != "file"          # (a one-letter scheme is a Windows drive)


def command_urls(spec: str) -> list:
    """The URLs of a shard spec (brace patterns, ``::``-joined) that :func:`runs_a_command`."""
    import braceexpand  # dependency of webdataset

    return [u for part in str(spec).split("::") if part for u in braceexpand.braceexpand(part) if runs_a_command(u)]


# --------------------------------------------------------------------------------------------------------
# Raw samples
# --------------------------------------------------------------------------------------------------------
def _split_key(name: str):
    """``dir/key.ext1.ext2`` -> (``dir/key``, ``ext1.ext2``); webdataset's key convention."""
    base = os.path.basename(name)
    if "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    prefix = name[: len(name) - len(base)] + stem
    return prefix, ext.lower()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def iter_shard(url: str, counts: collections.Counter, max_member_bytes: int,
               max_sample_bytes: int) -> Iterator[Dict[str, Any]]:
    """Grouped raw samples ``{"__key__", "__url__", ext: bytes}`` of one tar shard (local path or ``gopen`` URL).

    Read errors are counted (``shard_error``) and end the shard. A member over ``max_member_bytes``, or past
    ``max_sample_bytes`` for its sample, is skipped unread and the sample keeps only ``__too_large__`` (why).
    """
    stream = None
    current: Optional[Dict[str, Any]] = None
    size = 0  # bytes read into ``current``
    try:
        if has_scheme(url):
            from webdataset.gopen import gopen

            stream = gopen(url, "rb")
        else:
            stream = open(url, "rb")
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                prefix, ext = _split_key(info.name)
                if prefix is None or os.path.basename(prefix).startswith("__"):
                    continue  # no extension, or webdataset metadata
                if current is not None and current["__key__"] != prefix:
                    yield current
                    current = None
                if current is None:
                    current, size = {"__key__": prefix, "__url__": url}, 0
                if TOO_LARGE in current:
                    continue  # the rest of a sample already refused: not read
                if info.size > max_member_bytes:
                    why = f"member {info.name} is {_mib(info.size)} > max_member_bytes ({_mib(max_member_bytes)})"
                elif size + info.size - len(current.get(ext, b"")) > max_sample_bytes:
                    why = (f"members of {prefix} add up to more than max_sample_bytes ({_mib(max_sample_bytes)}) "
                           f"at {info.name}")
                else:
                    data = tar.extractfile(info).read()
                    size += len(data) - len(current.get(ext, b""))
                    current[ext] = data  # a duplicate extension keeps the last member
                    continue
                current = {"__key__": prefix, "__url__": url, TOO_LARGE: why}  # drop what was read of it
        if current is not None:
            yield current
            current = None
    except Exception as exn:  # noqa: BLE001 - any read failure of a shard is counted, never fatal
        counts["shard_error"] += 1
        logger.warning("shard %s: read error (%s: %s); continuing with the next shard", url, type(exn).__name__, exn)
        # NOTE: the sample being assembled when the error happened may be incomplete; it is dropped.
    finally:
        if stream is not None:
            stream.close()


def check_size(sample: Dict[str, Any]) -> None:
    """Raise ``SkipSample("too_large")`` for a sample that :func:`iter_shard` did not read in full."""
    if TOO_LARGE in sample:
        raise SkipSample("too_large", sample[TOO_LARGE])


# --------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------
def decode_caption(sample: Dict[str, Any], cfg):
    """Caption and json metadata of a raw sample: returns ``(caption, meta or None)``, raises SkipSample.

    ``cfg`` has ``caption_keys`` and ``json_caption_fields`` (a ``WebDatasetConfig``). An invalid json member
    only skips the sample when the caption had to come from it; otherwise the sample keeps its caption and its
    ``meta`` is None.
    """
    meta, json_error = None, None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exn:
            json_error = str(exn)
        else:
            if not isinstance(meta, dict):
                meta = {"value": meta}
    found_empty = False
    for key in cfg.caption_keys:
        if key not in sample:
            continue
        if key == "json":
            if json_error is not None:
                raise SkipSample("bad_json", json_error)
            values = [meta.get(f) for f in cfg.json_caption_fields if meta is not None]
            values = [v for v in values if isinstance(v, str)]
            if not values:
                continue
            text = next((v for v in values if v.strip()), "")
        else:
            try:
                text = sample[key].decode("utf-8")
            except UnicodeDecodeError as exn:
                raise SkipSample("bad_caption", str(exn)) from None
        text = text.strip()
        if text:
            return text, meta
        found_empty = True
    raise SkipSample("empty_caption" if found_empty else "missing_caption")


def decode_image(sample: Dict[str, Any], cfg) -> Image.Image:
    """Fully decode the first image member (``cfg.image_keys``), at most ``cfg.max_image_pixels`` (width x height,
    read from the header before decoding). Raises SkipSample."""
    key = next((k for k in cfg.image_keys if k in sample), None)
    if key is None:
        raise SkipSample("missing_image", f"members: {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(sample[key]))
    except Exception as exn:  # noqa: BLE001 - PIL raises many types for bad data
        raise SkipSample("corrupt_image", f"{type(exn).__name__}: {exn}") from None
    w, h = image.size
    if w * h > cfg.max_image_pixels:
        raise SkipSample("too_large", f"image {w}x{h} has {w * h:,} pixels > max_image_pixels "
                                      f"({cfg.max_image_pixels:,})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()  # decodes everything: truncated data raises here
    except Exception as exn:  # noqa: BLE001
        raise SkipSample("corrupt_image", f"{type(exn).__name__}: {exn}") from None
    return image


def check_shape(name: str, x: Any, expected: tuple) -> None:
    """Raise ``SkipSample("bad_shape")`` unless ``x`` is a finite tensor of shape ``expected``."""
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(expected) or not bool(torch.isfinite(x).all()):
        detail = f"{name}: got {getattr(x, 'shape', type(x))}, expected finite {tuple(expected)}"
        raise SkipSample("bad_shape", detail)
