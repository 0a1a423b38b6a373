"""Model registry: name -> :class:`DreamConfig`, plus ``create_model`` with pretrained loading.

Sizes ``dream_b/l/h/g`` are the official ``dream_{base,large,huge,giant}_txt_conditional`` models
(parameter counts excluding T5 and the VAE: 329,357,857 / 635,989,793 / 1,128,416,289 /
2,432,714,657). ``dream_test`` is the tiny CI model (the official parity fixture's configuration);
``dream_tiny`` is the CPU-scale ShapesWorld model used by ``dream demo``.

Pretrained names use ``arch.tag`` (the public table is :mod:`dream.models.pretrained`); ``dream_tiny.shapes``
ships inside the package.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .config import DreamConfig
from .pretrained import get_pretrained_cfg, is_pretrained_tag, list_pretrained, pretrained_path

_REGISTRY: dict[str, Callable[[], DreamConfig]] = {}


def register_model(fn: Callable[[], DreamConfig]) -> Callable[[], DreamConfig]:
    _REGISTRY[fn.__name__] = fn
    return fn


def _paper(width, depth, heads, mlp_ratio=4.0) -> DreamConfig:
    return DreamConfig(encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads,
                       decoder_embed_dim=width, decoder_depth=depth, decoder_num_heads=heads, mlp_ratio=mlp_ratio)


@register_model
def dream_b() -> DreamConfig:
    return _paper(768, 12, 12)


@register_model
def dream_l() -> DreamConfig:
    return _paper(1024, 16, 16)


@register_model
def dream_h() -> DreamConfig:
    return _paper(1280, 20, 16)


@register_model
def dream_g() -> DreamConfig:
    return _paper(1664, 24, 16, mlp_ratio=8192 / 1664)


@register_model
def dream_test() -> DreamConfig:
    """Tiny CI model: the configuration of the official parity fixture (64 px, SD-style tokens)."""
    return DreamConfig(img_size=64, vae_stride=8, patch_size=2, vae_embed_dim=4, buffer_size=8,
                       encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                       decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                       text_embed_dim=32, text_max_len=8, text_aligner_depth=2,
                       clip_context_length=12, clip_vocab_size=100, clip_width=32, clip_heads=4, clip_layers=2,
                       embed_dim=24, proj_hidden_dim=48, diffloss_depth=2, diffloss_width=64)


@register_model
def dream_tiny() -> DreamConfig:
    """CPU-scale model for 32x32 ShapesWorld: 4x4 pixel patches (64 tokens of 48 dims), width 192,
    4 + 4 layers, MiniLM (384-d) text features, a 2-layer CLIP text tower of width 48 (bf16 weights <= 20 MB).
    Not official: a final LayerNorm on the text aligner (``text_aligner_norm``), without which y grows until the
    decoder collapses."""
    return DreamConfig(img_size=32, vae_stride=1, patch_size=4, vae_embed_dim=3, buffer_size=16,
                       encoder_embed_dim=192, encoder_depth=4, encoder_num_heads=3,
                       decoder_embed_dim=192, decoder_depth=4, decoder_num_heads=3,
                       text_embed_dim=384, text_max_len=32, text_aligner_depth=2,
                       clip_context_length=32, clip_width=48, clip_heads=2, clip_layers=2,
                       embed_dim=128, proj_hidden_dim=256, diffloss_depth=3, diffloss_width=256,
                       num_sampling_steps="50", text_aligner_norm=True)


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered architecture names, or (``pretrained=True``) shipped ``arch.tag`` names, matching ``pattern``."""
    names = list_pretrained("pipeline") if pretrained else list(_REGISTRY)
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def _check_name(name: str) -> None:
    if is_pretrained_tag(name, "pipeline"):
        return
    arch, dot, tag = name.partition(".")
    if dot:
        raise KeyError(f"unknown pretrained tag {name!r}; shipped tags: "
                       f"{', '.join(list_pretrained('pipeline')) or 'none'}")
    if arch not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; architectures: {', '.join(list_models())}; "
                       f"pretrained tags: {', '.join(list_pretrained('pipeline')) or 'none'}")


def get_config(name: str) -> DreamConfig:
    """The config of an architecture (``dream_b``) or of a shipped tag (``dream_tiny.shapes``: its own config.json)."""
    _check_name(name)
    if is_pretrained_tag(name, "pipeline"):
        return DreamConfig.load(pretrained_path(name) / "model" / "config.json")
    return _REGISTRY[name]()


def _default_tag(arch: str) -> Optional[str]:
    tags = [t for t in list_pretrained("pipeline") if get_pretrained_cfg(t).arch == arch]
    return tags[0] if tags else None


def create_model(name_or_config: Union[str, DreamConfig, dict, os.PathLike], pretrained: Union[None, bool, str,
                 os.PathLike] = None, *, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None, **overrides):
    """Build a DREAM model.

    Args:
        name_or_config: an architecture (``"dream_b"``: random init), a shipped tag (``"dream_tiny.shapes"``:
            its weights, sha256-checked), a DreamConfig, a dict, or a folder holding ``config.json`` (and
            ``model.safetensors``, loaded unless ``pretrained=False``).
        pretrained: None (the default for the name: weights for a tag or folder, random for an architecture),
            False (random init, the tag's architecture), True (weights required: an architecture gets its
            default shipped tag), or a path (a folder with ``model.safetensors`` + ``config.json``, a
            ``.safetensors`` file or an official ``.pth`` checkpoint). Loading is strict: missing, unexpected
            or mis-shaped keys raise, and the model is never returned half-loaded.
        **overrides: DreamConfig fields to change (e.g. ``attn_backend="math"``).
    """
    from .convert import load_checkpoint_into
    from .dream import DREAM

    weights: Optional[Path] = None
    if isinstance(name_or_config, DreamConfig):
        cfg = name_or_config
    elif isinstance(name_or_config, dict):
        cfg = DreamConfig.from_dict(name_or_config)
    elif isinstance(name_or_config, (str, os.PathLike)) and Path(name_or_config).is_dir():
        cfg = DreamConfig.load(Path(name_or_config) / "config.json")
        if pretrained is None or pretrained is True:
            weights = Path(name_or_config)
    else:
        name = os.fspath(name_or_config)
        _check_name(name)
        if pretrained is True and not is_pretrained_tag(name):
            tag = _default_tag(name)
            if tag is None:
                raise KeyError(f"no shipped weights for {name!r}; pretrained tags: "
                               f"{', '.join(list_pretrained('pipeline')) or 'none'} (or pass a path)")
            name = tag
        cfg = get_config(name)
        if is_pretrained_tag(name) and pretrained in (None, True):
            weights = pretrained_path(name) / "model"
    if isinstance(pretrained, (str, os.PathLike)) and not isinstance(pretrained, bool):
        weights = Path(pretrained)
        if not weights.exists():
            raise FileNotFoundError(f"pretrained path does not exist: {weights}")
        if weights.is_dir() and (weights / "config.json").exists() and not isinstance(name_or_config, DreamConfig):
            cfg = DreamConfig.load(weights / "config.json")
    if overrides:
        cfg = cfg.replace(**overrides)
    model = DREAM(cfg)
    if weights is not None:
        load_checkpoint_into(model, weights)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model
