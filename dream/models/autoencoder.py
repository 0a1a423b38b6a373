"""KL autoencoders: the convolutional VAE of Latent Diffusion (Rombach et al., 2022, arXiv 2112.10752) in the
two configurations DREAM (arXiv 2603.02667) and MAR (arXiv 2406.11838) use: Stable Diffusion's KL-f8
(``stabilityai/sd-vae-ft-ema``, 4 latent channels, stride 8) and MAR's KL-16 (16 channels, stride 16, attention
in the lowest encoder level, no attention in the decoder's up path). Re-implemented from the papers and the
behaviour of diffusers' ``AutoencoderKL`` (huggingface/diffusers) and MAR's ``vae.py`` (LTH14/mar @ fe470ac); no
code is copied. Module names follow the diffusers layout, so ``state_dict()`` keys equal diffusers'
``AutoencoderKL`` keys; LDM / MAR checkpoints are converted on load (:mod:`dream.models.vae_convert`).

The tokenizers built on these autoencoders live in :mod:`dream.models.tokenizers`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from dream.models import vae_convert as _conv
from dream.utils.config import ConfigBase

__all__ = ["VAEConfig", "AutoencoderKL", "DiagonalGaussianDistribution", "load_vae_state_dict"]


# --------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------

_ARCH_FIELDS = (
    "in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
    "encoder_attn_levels", "decoder_attn_levels", "mid_block_attention", "use_quant_conv", "use_post_quant_conv",
)


@dataclass(frozen=True)
class VAEConfig(ConfigBase):
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
        super().__post_init__()
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
