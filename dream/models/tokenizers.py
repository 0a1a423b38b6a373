"""Image tokenizers: images in [-1, 1] <-> DREAM tokens ``(B, L, C*p*p)``.

* :class:`VAETokenizer`: a frozen :class:`~dream.models.autoencoder.AutoencoderKL` -> posterior -> scaled latents
  -> tokens.
* :class:`PixelTokenizer`: patchified raw pixels, same interface, no weights.

Latent convention (diffusers): ``latents = (z - shift_factor) * scaling_factor`` after sampling the
posterior, and ``z = latents / scaling_factor + shift_factor`` before decoding. SD uses scale 0.18215 and
MAR's KL-16 0.2325 (both with shift 0). Tokens are ``patchify(latents, patch_size)`` in the official
channel-major order (:mod:`dream.models.patchify`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from dream.models import vae_convert as _conv
from dream.models.autoencoder import AutoencoderKL, DiagonalGaussianDistribution, VAEConfig
from dream.models.patchify import patchify, unpatchify
from dream.models.pretrained import is_pretrained_tag, list_pretrained, pretrained_path

__all__ = ["VAETokenizer", "PixelTokenizer", "create_tokenizer", "estimate_latent_scale"]

_RANGE_TOL = 1e-3  # images may exceed [-1, 1] by this much (resampling overshoot, float error)

# --------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------


def _check_images(images: torch.Tensor, channels: int, multiple: int) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, {channels}, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
    b, c, h, w = images.shape
    if c != channels:
        raise ValueError(f"images have {c} channels, expected {channels} (layout (B, C, H, W))")
    if h % multiple or w % multiple:
        raise ValueError(f"image size {h}x{w} is not divisible by {multiple} (VAE stride x patch size)")
    if images.numel():
        finite = torch.isfinite(images.detach())
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(f"images contain {bad} NaN or infinite value(s) (of {images.numel()}); they must be "
                             "finite and lie in [-1, 1]")
        lo, hi = torch.aminmax(images.detach())
        if lo.item() < -1 - _RANGE_TOL or hi.item() > 1 + _RANGE_TOL:
            raise ValueError(f"images must lie in [-1, 1] (got min {lo.item():.4f}, max {hi.item():.4f}); "
                             "map uint8 pixels with x / 127.5 - 1")


def _grid(image_size: int | Sequence[int], multiple: int) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if h % multiple or w % multiple:
        raise ValueError(f"image size {h}x{w} is not divisible by {multiple} (VAE stride x patch size)")
    return h // multiple, w // multiple


class VAETokenizer(nn.Module):
    """Frozen VAE + latent scaling + patchify: images in [-1, 1] <-> tokens ``(B, L, C*p*p)``.

    ``encode``: posterior sample (or mode) ``z`` -> ``latents = (z - shift) * scale`` -> ``patchify(latents, p)``.
    ``decode``: ``unpatchify`` -> ``z = latents / scale + shift`` -> VAE decoder. The VAE is put in eval mode
    with ``requires_grad=False``; ``encode`` runs without autograd, ``decode`` keeps gradients w.r.t. tokens.
    Tokens are returned as float32; the VAE may run in another dtype.
    """

    def __init__(self, vae: AutoencoderKL, config: VAEConfig | None = None):
        super().__init__()
        config = config or vae.config
        if config.architecture() != vae.config.architecture():
            raise ValueError(f"tokenizer config architecture {config.architecture()} differs from the VAE's "
                             f"{vae.config.architecture()}")
        self.vae = vae.eval().requires_grad_(False)
        self.config = config

    def train(self, mode: bool = True) -> "VAETokenizer":
        super().train(mode)
        self.vae.eval()  # the VAE stays frozen
        return self

    # ---- geometry -------------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def stride(self) -> int:
        """VAE downsampling factor (pixels per latent cell)."""
        return self.config.stride

    @property
    def token_dim(self) -> int:
        return self.config.token_dim

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def seq_len(self, image_size: int | Sequence[int] | None = None) -> int:
        """Tokens per image of ``image_size`` (int or (H, W); default ``config.sample_size``)."""
        gh, gw = _grid(self.config.sample_size if image_size is None else image_size, self.stride * self.patch_size)
        return gh * gw

    # ---- latents <-> tokens ---------------------------------------------------------------------------
    def latents_to_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled z (B, C, h, w) -> tokens (B, L, C*p*p) float32."""
        latents = (z.float() - self.config.shift_factor) * self.config.scaling_factor
        return patchify(latents, self.patch_size)

    def tokens_to_latents(self, tokens: torch.Tensor, grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens (B, L, C*p*p) -> unscaled z (B, C, h, w) (``grid_hw`` in tokens; default square)."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.token_dim:
            raise ValueError(f"tokens must be (B, L, {self.token_dim}), got {tuple(tokens.shape)}")
        latents = unpatchify(tokens, self.patch_size, self.latent_channels, grid_hw)
        return latents / self.config.scaling_factor + self.config.shift_factor

    # ---- images <-> tokens ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> posterior moments (B, 2C, H/s, W/s) float32 (for latent caches)."""
        _check_images(images, self.vae.config.in_channels, self.stride * self.patch_size)
        p = next(self.vae.parameters())
        return self.vae.encode_moments(images.to(device=p.device, dtype=p.dtype)).float()

    def tokens_from_moments(self, moments: torch.Tensor, sample: bool = True,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """Moments (B, 2C, h, w) -> tokens (B, L, C*p*p): posterior sample (or mode when ``sample=False``)."""
        if moments.dim() != 4 or moments.shape[1] != 2 * self.latent_channels:
            raise ValueError(f"moments must be (B, {2 * self.latent_channels}, h, w), got {tuple(moments.shape)}")
        post = DiagonalGaussianDistribution(moments.float())
        return self.latents_to_tokens(post.sample(generator) if sample else post.mode())

    def encode(self, images: torch.Tensor, sample: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> tokens (B, (H/(s*p))*(W/(s*p)), C*p*p) float32.

        Args:
            images: float images in [-1, 1] (tolerance 1e-3).
            sample: draw from the posterior (MAR/DREAM training) or take its mean (``False``).
            generator: RNG for the posterior sample.
        """
        return self.tokens_from_moments(self.encode_moments(images), sample=sample, generator=generator)

    def decode(self, tokens: torch.Tensor, grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens (B, L, C*p*p) -> images (B, 3, H, W) float32, roughly in [-1, 1] (not clamped)."""
        z = self.tokens_to_latents(tokens, grid_hw)
        p = next(self.vae.parameters())
        return self.vae.decode(z.to(device=p.device, dtype=p.dtype)).float()

    # ---- persistence ----------------------------------------------------------------------------------
    def to_config_dict(self) -> dict[str, Any]:
        return {"tokenizer_type": "vae", "vae": self.config.to_dict()}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` (tokenizer type + :class:`VAEConfig`) and ``model.safetensors`` (VAE weights)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_config_dict(), f, indent=2)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.vae.state_dict().items()}
        save_file(sd, os.path.join(directory, "model.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: VAEConfig | None = None, *,
                        patch_size: int | None = None, dtype: torch.dtype | None = None) -> "VAETokenizer":
        """Load a tokenizer folder, a diffusers VAE folder or an LDM/MAR checkpoint
        (see :meth:`AutoencoderKL.from_pretrained`)."""
        vae = AutoencoderKL.from_pretrained(path, config, patch_size=patch_size, dtype=dtype)
        return cls(vae, vae.config)


class PixelTokenizer(nn.Module):
    """Patchified raw pixels: images in [-1, 1] (B, 3, H, W) <-> tokens (B, L, 3*p*p). No weights, exact.

    The "moments" of a pixel tokenizer are the images themselves, so latent caches work unchanged.
    """

    def __init__(self, patch_size: int, image_size: int | None = None, channels: int = 3):
        super().__init__()
        if patch_size < 1 or channels < 1:
            raise ValueError(f"patch_size and channels must be >= 1, got {patch_size}, {channels}")
        if image_size is not None and image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self._patch_size, self.image_size, self.channels = int(patch_size), image_size, int(channels)

    @property
    def patch_size(self) -> int:
        return self._patch_size

    @property
    def stride(self) -> int:
        return 1

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch_size ** 2

    @property
    def latent_channels(self) -> int:
        return self.channels

    def seq_len(self, image_size: int | Sequence[int] | None = None) -> int:
        size = self.image_size if image_size is None else image_size
        if size is None:
            raise ValueError("PixelTokenizer has no image_size; pass image_size")
        gh, gw = _grid(size, self.patch_size)
        return gh * gw

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.channels, self.patch_size)
        return images.float()

    def tokens_from_moments(self, moments: torch.Tensor, sample: bool = True,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        return patchify(moments.float(), self.patch_size)

    def encode(self, images: torch.Tensor, sample: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> tokens (B, (H/p)*(W/p), C*p*p); ``sample``/``generator`` unused."""
        return self.tokens_from_moments(self.encode_moments(images))

    def decode(self, tokens: torch.Tensor, grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens (B, L, C*p*p) -> images (B, C, H, W) (exact inverse of :meth:`encode`)."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.token_dim:
            raise ValueError(f"tokens must be (B, L, {self.token_dim}), got {tuple(tokens.shape)}")
        return unpatchify(tokens, self.patch_size, self.channels, grid_hw)

    def to_config_dict(self) -> dict[str, Any]:
        return {"tokenizer_type": "pixel", "patch_size": self.patch_size, "image_size": self.image_size,
                "channels": self.channels}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.to_config_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "PixelTokenizer":
        cfg_path = os.path.join(os.fspath(path), "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no config.json in {os.fspath(path)!r}")
        d = _conv.read_json(cfg_path)
        if d.get("tokenizer_type") != "pixel":
            raise ValueError(f"{cfg_path} is not a pixel tokenizer config (tokenizer_type={d.get('tokenizer_type')!r})")
        return cls(d["patch_size"], d.get("image_size"), d.get("channels", 3))


# --------------------------------------------------------------------------------------------------------
# Factory and utilities
# --------------------------------------------------------------------------------------------------------

_PRESETS = {"sd": VAEConfig.sd, "sd_vae": VAEConfig.sd, "mar_kl16": VAEConfig.mar_kl16, "kl16": VAEConfig.mar_kl16,
            "test": VAEConfig.tiny, "vae_test": VAEConfig.tiny}


def create_tokenizer(spec: str | os.PathLike | Mapping[str, Any] | VAEConfig) -> VAETokenizer | PixelTokenizer:
    """Build a tokenizer from a name, a path, a dict or a :class:`VAEConfig`.

    * name: ``"pixel"`` (p=16) or ``"pixel_p{N}"``; ``"shapes_vae"`` (the ShapesWorld KL-f8 shipped in the
      package, trained by ``dream train-vae --config configs/vae_shapes.yaml``); ``"vae_test"`` (tiny random VAE for CI); ``"sd_vae"`` /
      ``"mar_kl16"`` build a **randomly initialised** full-size VAE (with a warning: pass a path for weights).
    * path: a tokenizer / diffusers folder or an LDM/MAR checkpoint (:meth:`VAETokenizer.from_pretrained`).
    * dict: ``{"tokenizer_type": "pixel", "patch_size": 16, "image_size": 256}`` or
      ``{"tokenizer_type": "vae", "preset": "sd", "path": "/weights/sd-vae-ft-ema", "vae": {overrides}}``;
      a saved ``config.json`` (``{"tokenizer_type": "vae", "vae": {...}}``) builds a random-init VAE.
    """
    if isinstance(spec, VAEConfig):
        return VAETokenizer(AutoencoderKL(spec))
    if isinstance(spec, (str, os.PathLike)):
        name = os.fspath(spec)
        if os.path.exists(name):
            return _load_tokenizer(name)
        if m := re.fullmatch(r"pixel(?:_p(\d+))?", name):
            return PixelTokenizer(int(m.group(1) or 16))
        key = name.replace("-", "_").lower()
        if is_pretrained_tag(key, "tokenizer"):                      # shipped, sha256-checked
            return _load_tokenizer(os.fspath(pretrained_path(key, "tokenizer")))
        if key not in _PRESETS:
            raise ValueError(f"unknown tokenizer {name!r} (not a path; names: pixel, pixel_p<N>, "
                             f"{list_pretrained('tokenizer')}, {sorted(_PRESETS)})")
        spec = {"tokenizer_type": "vae", "preset": key}
    spec = dict(spec)
    kind = spec.pop("tokenizer_type", None) or spec.pop("type", None) or "vae"
    allowed = {"pixel": {"patch_size", "image_size", "channels"}, "vae": {"preset", "path", "vae"}}
    if kind not in allowed:
        raise ValueError(f"unknown tokenizer_type {kind!r} (expected 'vae' or 'pixel')")
    unknown = sorted(set(spec) - allowed[kind])
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {kind} tokenizer spec (allowed: {sorted(allowed[kind])})")
    if kind == "pixel":
        return PixelTokenizer(spec.get("patch_size", 16), spec.get("image_size"), spec.get("channels", 3))
    preset, path, overrides = spec.get("preset"), spec.get("path"), dict(spec.get("vae") or {})
    if preset is not None and preset not in _PRESETS:
        raise ValueError(f"unknown VAE preset {preset!r}; choose from {sorted(_PRESETS)}")
    if path:  # overrides may change the latent convention (scale, shift, patch) but not the architecture
        tok = VAETokenizer.from_pretrained(path, _PRESETS[preset]() if preset else None)
        return VAETokenizer(tok.vae, dataclasses.replace(tok.config, **overrides)) if overrides else tok
    if preset is None:
        return VAETokenizer(AutoencoderKL(VAEConfig.from_dict(overrides)))
    if preset not in ("test", "vae_test"):
        warnings.warn(f"create_tokenizer({preset!r}): randomly initialised VAE; pass 'path' to load weights",
                      stacklevel=2)
    return VAETokenizer(AutoencoderKL(_PRESETS[preset](**overrides)))


def _load_tokenizer(path: str) -> VAETokenizer | PixelTokenizer:
    cfg_path = os.path.join(path, "config.json")
    if os.path.isdir(path) and os.path.isfile(cfg_path) and _conv.read_json(cfg_path).get("tokenizer_type") == "pixel":
        return PixelTokenizer.from_pretrained(path)
    return VAETokenizer.from_pretrained(path)


@torch.no_grad()
def estimate_latent_scale(vae: AutoencoderKL, batches: Iterable[torch.Tensor], shift_factor: float = 0.0,
                          generator: torch.Generator | None = None) -> float:
    """``1 / std`` of posterior samples ``z - shift_factor`` over image batches in [-1, 1] (how 0.18215 and
    0.2325 were chosen); pass the result as ``VAEConfig.scaling_factor``."""
    total, sq, n = 0.0, 0.0, 0
    p = next(vae.parameters())
    for images in batches:
        _check_images(images, vae.config.in_channels, vae.config.stride)
        z = vae.encode(images.to(device=p.device, dtype=p.dtype)).sample(generator).double() - shift_factor
        total, sq, n = total + z.sum().item(), sq + z.pow(2).sum().item(), n + z.numel()
    if n < 2:
        raise ValueError("estimate_latent_scale needs at least one non-empty batch")
    var = (sq - total * total / n) / (n - 1)
    return float(var ** -0.5)
