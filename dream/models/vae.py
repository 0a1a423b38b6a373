"""KL autoencoders (SD KL-f8 and MAR KL-16) and the image tokenizers built on them.

* :class:`AutoencoderKL`: the convolutional VAE of Latent Diffusion (Rombach et al., 2022, arXiv 2112.10752)
  in the two configurations DREAM (arXiv 2603.02667) and MAR (arXiv 2406.11838) use: Stable Diffusion's
  KL-f8 (``stabilityai/sd-vae-ft-ema``, 4 latent channels, stride 8) and MAR's KL-16 (16 channels,
  stride 16, attention in the lowest encoder level, no attention in the decoder's up path). Re-implemented
  from the behaviour spec (``mar_diffusion_spec.md`` §3-4, ``environment.md`` Appendix A); no code is
  copied. Module names follow the diffusers layout, so ``state_dict()`` keys equal diffusers'
  ``AutoencoderKL`` keys; LDM / MAR checkpoints are converted on load (:mod:`dream.models.vae_convert`).
* :class:`VAETokenizer`: images in [-1, 1] -> posterior -> scaled latents -> tokens ``(B, L, C*p*p)``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dream.models import vae_convert as _conv
from dream.models.patchify import patchify, unpatchify

__all__ = [
    "VAEConfig",
    "AutoencoderKL",
    "DiagonalGaussianDistribution",
    "VAETokenizer",
    "PixelTokenizer",
    "create_tokenizer",
    "load_vae_state_dict",
    "estimate_latent_scale",
]

_RANGE_TOL = 1e-3  # images may exceed [-1, 1] by this much (resampling overshoot, float error)

# --------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------

_ARCH_FIELDS = (
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
    "encoder_attn_levels", "decoder_attn_levels", "mid_block_attention", "use_quant_conv", "use_post_quant_conv",
)


@dataclass(frozen=True)
class VAEConfig:
    """Architecture and latent convention of a KL autoencoder.

    Resolution levels are numbered from the input resolution: level ``i`` works at ``H / 2**i`` with
    ``block_out_channels[i]`` channels; the VAE stride is ``2 ** (len(block_out_channels) - 1)``.
    LDM configs express attention placement as ``attn_resolutions`` (a feature-map size at a given input
    ``resolution``); :meth:`from_ldm_config` converts them to levels (``level = log2(resolution / r)``).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4                                  # C; the encoder emits 2*C moments
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # LDM: ch * ch_mult
    layers_per_block: int = 2                                 # encoder res blocks per level (decoder: +1)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    encoder_attn_levels: tuple[int, ...] = ()                 # levels with self-attention after each res block
    decoder_attn_levels: tuple[int, ...] = ()
    mid_block_attention: bool = True                          # attention between the two mid res blocks
    use_quant_conv: bool = True                               # 1x1 conv on the moments
    use_post_quant_conv: bool = True                          # 1x1 conv on z before the decoder
    scaling_factor: float = 0.18215                           # latents = (z - shift_factor) * scaling_factor
    shift_factor: float = 0.0
    patch_size: int = 2                                       # tokens = patchify(latents, patch_size)
    sample_size: int = 256                                    # nominal image size (the net is convolutional)

    def __post_init__(self) -> None:
        for name in ("block_out_channels", "encoder_attn_levels", "decoder_attn_levels"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups",
                     "patch_size", "sample_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels must not be empty")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} not divisible by norm_num_groups={self.norm_num_groups}")
        n = len(self.block_out_channels)
        for name in ("encoder_attn_levels", "decoder_attn_levels"):
            out = [lv for lv in getattr(self, name) if not 0 <= lv < n]
            if out:
                raise ValueError(f"VAEConfig.{name} has levels {out} outside [0, {n - 1}]")
        if not self.scaling_factor > 0:
            raise ValueError(f"VAEConfig.scaling_factor must be > 0, got {self.scaling_factor}")

    # ---- derived quantities ---------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def stride(self) -> int:
        """Pixels per latent cell along one side."""
        return 2 ** (self.num_levels - 1)

    @property
    def token_dim(self) -> int:
        return self.latent_channels * self.patch_size ** 2

    def architecture(self) -> dict[str, Any]:
        """The fields that determine the weights' names and shapes."""
        return {k: getattr(self, k) for k in _ARCH_FIELDS}

    # ---- presets --------------------------------------------------------------------------------------
    @classmethod
    def sd(cls, **overrides: Any) -> "VAEConfig":
        """Stable Diffusion KL-f8 (``stabilityai/sd-vae-ft-ema``): 4 channels, stride 8, scale 0.18215, p=2."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def mar_kl16(cls, **overrides: Any) -> "VAEConfig":
        """MAR's KL-16 (``kl16.ckpt``): 16 channels, stride 16, ch_mult (1,1,2,2,4), encoder attention at
        the 16x16 level, no attention in the decoder's up path, scale 0.2325, p=1."""
        base = cls(latent_channels=16, block_out_channels=(128, 128, 256, 256, 512), encoder_attn_levels=(4,),
                   scaling_factor=0.2325, patch_size=1)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "VAEConfig":
        """A small random-init config for tests and CI (stride 2; 16x16 images -> 16 tokens of 16 dims)."""
        base = cls(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> "VAEConfig":
        """The preset (:meth:`sd` or :meth:`mar_kl16`) whose architecture the weights (any layout) have.

        Raises:
            ValueError: the inferred architecture matches no preset (pass an explicit config instead).
        """
        arch = _conv.infer_vae_architecture(_conv.to_diffusers_layout(state_dict)[0])
        for preset in (cls.sd(), cls.mar_kl16()):
            if preset.architecture() == arch:
                return preset
        raise ValueError(f"{source}: the weights match no preset VAE config (inferred architecture {arch}); "
                         "pass config=VAEConfig(...) explicitly")

    # ---- serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown VAEConfig keys: {unknown}")
        return cls(**dict(d))

    def to_diffusers_config(self) -> dict[str, Any]:
        """A diffusers ``AutoencoderKL`` ``config.json`` dict (plus ``dream_patch_size``)."""
        return _conv.kwargs_to_diffusers_config(self.to_dict())

    @classmethod
    def from_diffusers_config(cls, d: Mapping[str, Any], patch_size: int | None = None) -> "VAEConfig":
        """Build from a diffusers ``AutoencoderKL`` ``config.json`` dict.

        Args:
            d: the parsed JSON.
            patch_size: token patch size; default ``d["dream_patch_size"]`` if present, else ``16 // stride``
                (DREAM and MAR both use 16x16-pixel tokens) or 1 when the stride exceeds 16.
        """
        return cls(**_conv.diffusers_config_to_kwargs(d, patch_size))

    @classmethod
    def from_ldm_config(cls, ddconfig: Mapping[str, Any], embed_dim: int, **overrides: Any) -> "VAEConfig":
        """Build from an LDM ``ddconfig`` (``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``,
        ``resolution``, ``z_channels``, ...) and the autoencoder's ``embed_dim``.

        LDM applies ``attn_resolutions`` to both encoder and decoder; MAR's KL-16 builds its decoder with
        ``attn_resolutions=()``: pass ``decoder_attn_levels=()`` as an override for that case.
        """
        return cls(**{**_conv.ldm_config_to_kwargs(ddconfig, embed_dim), **overrides})


# --------------------------------------------------------------------------------------------------------
# Building blocks (diffusers module names)
# --------------------------------------------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a (1x1-conv when widths differ) shortcut."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None  # LDM: nin_shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout 0 in every released VAE: omitted)
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions with a residual connection (LDM ``AttnBlock``)."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # index 0 keeps the diffusers key `to_out.0`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (lin(t).unsqueeze(1) for lin in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        # NOTE: one head of width C (up to 512); SDPA directly rather than dream.ops.attention, whose fused
        # kernels target transformer head sizes. Scale C^-1/2 (SDPA default) as in LDM.
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        o = self.to_out[0](o).transpose(1, 2).reshape(b, c, h, w)
        return x + o


class Downsample(nn.Module):
    """Asymmetric pad (left 0, right 1, top 0, bottom 1) then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: res blocks (each optionally followed by attention) and a resampler."""

    def __init__(self, cin: int, cout: int, n: int, attn: bool, resample: str | None, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups, eps) for i in range(n))
        self.attentions = nn.ModuleList(SpatialSelfAttention(cout, groups, eps) for _ in range(n if attn else 0))
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(cout)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.resnets):
            x = res(x)
            if len(self.attentions):
                x = self.attentions[i](x)
        for r in getattr(self, "downsamplers", getattr(self, "upsamplers", ())):
            x = r(x)
        return x


class MidBlock(nn.Module):
    """Res block -> (attention) -> res block at the lowest resolution."""

    def __init__(self, channels: int, attn: bool, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups, eps) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups, eps)] if attn else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image (B, in, H, W) -> 2*C moments (B, 2C, H/s, W/s) before ``quant_conv``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, eps, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.num_levels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            _Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, i in cfg.encoder_attn_levels,
                   "down" if i < n - 1 else None, g, eps)
            for i in range(n)
        )
        self.mid_block = MidBlock(ch[-1], cfg.mid_block_attention, g, eps)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent z (B, C, h, w) -> image (B, out, h*s, w*s); ``up_blocks[0]`` is the lowest resolution."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, eps, n = cfg.norm_num_groups, cfg.norm_eps, cfg.num_levels
        rev = cfg.block_out_channels[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], cfg.mid_block_attention, g, eps)
        self.up_blocks = nn.ModuleList(
            _Level(rev[max(j - 1, 0)], rev[j], cfg.layers_per_block + 1, (n - 1 - j) in cfg.decoder_attn_levels,
                   "up" if j < n - 1 else None, g, eps)
            for j in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=eps)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------------------------------------
# Posterior
# --------------------------------------------------------------------------------------------------------


class DiagonalGaussianDistribution:
    """Diagonal Gaussian posterior from moments ``(B, 2C, h, w)`` = mean ‖ logvar (logvar clamped to [-30, 20])."""

    def __init__(self, moments: torch.Tensor):
        if moments.dim() != 4 or moments.shape[1] % 2:
            raise ValueError(f"moments must be (B, 2C, h, w), got shape {tuple(moments.shape)}")
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``generator`` (on its own device)."""
        if generator is None:
            eps = torch.randn(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype)
        else:
            eps = torch.randn(self.mean.shape, generator=generator, device=generator.device, dtype=self.mean.dtype)
            eps = eps.to(self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over (C, h, w): shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


# --------------------------------------------------------------------------------------------------------
# Autoencoder
# --------------------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """KL autoencoder with diffusers-layout parameter names (``encoder``, ``quant_conv``, ``post_quant_conv``,
    ``decoder``). Random init is PyTorch's default; real weights come from :meth:`from_pretrained`."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig.sd()
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in, H, W) -> moments (B, 2C, H/s, W/s) (mean ‖ raw logvar)."""
        m = self.encoder(x)
        return self.quant_conv(m) if self.quant_conv is not None else m

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, in, H, W) -> posterior over z (B, C, H/s, W/s)."""
        return DiagonalGaussianDistribution(self.encode_moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent z (B, C, h, w) -> images (B, out, h*s, w*s) (not clamped)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction: encode, take the posterior mode (or a sample), decode."""
        post = self.encode(x)
        return self.decode(post.sample(generator) if sample_posterior else post.mode())

    # ---- weights --------------------------------------------------------------------------------------
    def ldm_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under LDM/CompVis/MAR key names (1x1-conv attention kernels)."""
        return _conv.diffusers_to_ldm(self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: VAEConfig | None = None, *,
                        patch_size: int | None = None, dtype: torch.dtype | None = None) -> "AutoencoderKL":
        """Load local weights (no network).

        Args:
            path: one of
                * a diffusers VAE folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), a
                  pipeline folder with a ``vae/`` subfolder, or a folder written by
                  :meth:`save_pretrained` / :meth:`VAETokenizer.save_pretrained`;
                * a single ``.safetensors`` file (a ``config.json`` next to it is used when present);
                * an LDM / MAR ``.ckpt`` / ``.pth`` file (``torch.load(weights_only=True)``; ``state_dict`` or
                  ``model`` entry; optional ``first_stage_model.`` prefix).
            config: architecture + latent convention; default: from ``config.json``, else inferred from the
                weights when they match a preset (:meth:`VAEConfig.sd`, :meth:`VAEConfig.mar_kl16`).
            patch_size: override the token patch size of the resolved config.
            dtype: cast the loaded model to this dtype.

        Raises:
            FileNotFoundError / ValueError: missing files, unreadable checkpoints, key or shape mismatches
                (all named), or an architecture that matches no preset when ``config`` is None.
        """
        cfg_from_file, weights = _resolve_pretrained(os.fspath(path), patch_size)
        sd = _conv.read_checkpoint(weights)
        if config is None:
            config = cfg_from_file or VAEConfig.from_state_dict(sd, source=weights)
        if patch_size is not None:
            config = dataclasses.replace(config, patch_size=patch_size)
        with torch.device("meta"):  # no random init: the checkpoint tensors become the parameters
            model = cls(config).to(dtype or torch.float32)
        load_vae_state_dict(model, sd, assign=True)
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write a diffusers-compatible folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.config.to_diffusers_config(), f, indent=2)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(sd, os.path.join(directory, "diffusion_pytorch_model.safetensors"))


def _config_from_json(d: Mapping[str, Any], patch_size: int | None) -> VAEConfig:
    if d.get("tokenizer_type") == "vae":
        cfg = VAEConfig.from_dict(d["vae"])
        return dataclasses.replace(cfg, patch_size=patch_size) if patch_size else cfg
    if "block_out_channels" in d:
        return VAEConfig.from_diffusers_config(d, patch_size)
    raise ValueError(f"config.json is neither a diffusers AutoencoderKL config nor a dream VAE tokenizer config "
                     f"(keys: {sorted(d)[:12]})")


def _resolve_pretrained(path: str, patch_size: int | None) -> tuple[VAEConfig | None, str]:
    """Return (config from config.json or None, weights file) for a folder or file path."""
    cfg_json, weights, required = _conv.resolve_vae_files(path)
    if cfg_json is None:
        return None, weights
    try:
        return _config_from_json(cfg_json, patch_size), weights
    except ValueError:
        if required:
            raise
        return None, weights  # an unrelated config.json next to a weights file


def _layout_name(arch: Mapping[str, Any]) -> str:
    for name, preset in (("SD KL-f8", VAEConfig.sd()), ("MAR KL-16", VAEConfig.mar_kl16())):
        if dict(arch) == preset.architecture():
            return f" ({name} layout)"
    return ""


def load_vae_state_dict(vae: AutoencoderKL, state_dict: Mapping[str, torch.Tensor], assign: bool = False) -> list[str]:
    """Strictly load a diffusers- or LDM/MAR-layout VAE state dict into ``vae``.

    ``module.`` / ``_orig_mod.`` / ``first_stage_model.`` prefixes are stripped; ``loss.*`` keys and the
    non-VAE keys of a full Stable Diffusion checkpoint are ignored (see :mod:`dream.models.vae_convert`).
    Everything else must match exactly. With ``assign=True`` (for a model built on the meta device) the
    checkpoint tensors, cast to the model's parameter dtypes, replace the parameters.

    Returns:
        The sorted list of ignored key names.

    Raises:
        ValueError: naming the missing, unexpected and mis-shaped keys, and the architecture the checkpoint
            appears to have when it differs from ``vae.config``.
    """
    sd, ignored = _conv.to_diffusers_layout(state_dict)
    missing, unexpected, shapes = _conv.compare_state_dicts(vae.state_dict(), sd)
    if missing or unexpected or shapes:
        msg = [f"VAE checkpoint does not match the model config "
               f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} mis-shaped keys)"]
        try:
            arch = _conv.infer_vae_architecture(sd)
        except ValueError:
            arch = None
        want = vae.config.architecture()
        if arch is not None and arch != want:
            diff = {k: arch[k] for k in arch if arch[k] != want[k]}
            msg.append(f"wrong layout: checkpoint looks like {diff}{_layout_name(arch)}, model expects "
                       f"{ {k: want[k] for k in diff} }{_layout_name(want)}")
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if keys:
                more = f" ... (+{len(keys) - 20} more)" if len(keys) > 20 else ""
                msg.append(f"{title}: {keys[:20]}{more}")
        raise ValueError("\n".join(msg))
    if assign:
        own = vae.state_dict()
        sd = {k: v.to(own[k].dtype).contiguous() for k, v in sd.items()}
    vae.load_state_dict(sd, strict=True, assign=assign)
    return ignored


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

# Trained tokenizers shipped inside the package: name -> folder (config.json + model.safetensors).
SHIPPED_TOKENIZERS = {"shapes_vae": Path(__file__).resolve().parents[1] / "assets" / "shapes_vae"}

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
        if key in SHIPPED_TOKENIZERS:
            return _load_tokenizer(os.fspath(SHIPPED_TOKENIZERS[key]))
        if key not in _PRESETS:
            raise ValueError(f"unknown tokenizer {name!r} (not a path; names: pixel, pixel_p<N>, "
                             f"{sorted(SHIPPED_TOKENIZERS)}, {sorted(_PRESETS)})")
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
