"""``DreamConfig``: every hyper-parameter of a DREAM model, frozen, JSON round-trippable."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Union

from dream.utils.config import ConfigBase, ConfigError


@dataclass(frozen=True)
class DreamConfig(ConfigBase):
    """DREAM architecture and loss settings (defaults: DREAM-B with the official recipe).

    Token layout: images of ``img_size`` go through a tokenizer of stride ``vae_stride`` with
    ``vae_embed_dim`` channels, patchified by ``patch_size``: ``seq_len`` tokens of ``token_dim``.
    """

    _ignored_keys: ClassVar[frozenset] = frozenset({"arch", "dream_version", "model_type"})

    # --- tokens ---
    img_size: int = 256
    vae_stride: int = 8             # 8 for SD-VAE, 16 for MAR KL-16, 1 for raw pixels
    patch_size: int = 2
    vae_embed_dim: int = 4          # latent channels (3 for raw pixels)
    buffer_size: int = 64           # buffer tokens, all filled with class_emb(0)
    class_num: int = 1000           # size of the (unused but official) class-embedding table
    # --- image encoder (MAE-style ViT) ---
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    # --- text-conditioned MAR decoder ---
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    mlp_ratio: float = 4.0          # MLP hidden = int(width * mlp_ratio); DREAM-G uses 8192/1664
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    # --- text aligner over frozen text-encoder features (T5-Large in the paper) ---
    text_embed_dim: int = 1024      # width of the frozen text features
    text_max_len: int = 128
    text_aligner_depth: int = 6
    # Final LayerNorm on the aligner output y (NOT official: the official aligner has none). Without it the
    # residual stream of y can grow without bound (measured: per-token norm ~7e3 after 1.3M images of dream_tiny
    # on ShapesWorld), the cross-attention then adds a huge prompt-independent vector to every decoder row and
    # the decoder output collapses to a constant (the diffusion head ignores its condition). Off by default, so
    # official checkpoints keep their keys and outputs; on for dream_tiny.
    text_aligner_norm: bool = False
    # --- contrastive head: CLIP-style text tower + image projection MLP ---
    clip_context_length: int = 77
    clip_vocab_size: int = 49408
    clip_width: int = 512
    clip_heads: int = 8
    clip_layers: int = 12
    clip_mlp_ratio: float = 4.0
    embed_dim: int = 256            # joint embedding size
    proj_hidden_dim: int = 1024     # image projection MLP hidden size (official ssl_mlp_dim)
    logit_scale_init: float = 2.659260036932778  # ln(1 / 0.07); unclamped, as official
    # --- diffusion head ---
    diffloss_depth: int = 3
    diffloss_width: int = 1024
    diffusion_batch_mul: int = 4
    diffusion_steps: int = 1000
    noise_schedule: str = "cosine"
    num_sampling_steps: str = "100"
    # --- loss recipe and gating ---
    diff_loss_weight: float = 1.0
    clip_loss_weight: float = 0.005
    min_visible_ratio_for_clip: float = 0.25   # contrastive loss only for samples with >= 25 % visible
    min_masked_ratio_for_diff: float = 0.5     # diffusion loss only when >= 50 % masked
    text_drop_prob: float = 0.1                # CFG caption drop (applied by the trainer)
    # --- runtime ---
    attn_backend: str = "auto"
    grad_checkpointing: bool = False

    # derived ------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.grid_size ** 2

    @property
    def token_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size ** 2

    def __post_init__(self):
        super().__post_init__()
        if self.img_size % (self.vae_stride * self.patch_size):
            raise ValueError(f"img_size {self.img_size} is not divisible by vae_stride*patch_size "
                             f"= {self.vae_stride}*{self.patch_size}")
        for name in ("encoder", "decoder"):
            w, h = getattr(self, f"{name}_embed_dim"), getattr(self, f"{name}_num_heads")
            if w % h:
                raise ValueError(f"{name}_embed_dim {w} is not divisible by {name}_num_heads {h}")
        if self.clip_width % self.clip_heads:
            raise ValueError(f"clip_width {self.clip_width} is not divisible by clip_heads {self.clip_heads}")
        from dream.ops.attention import BACKENDS

        if self.attn_backend not in BACKENDS:
            raise ValueError(f"unknown attn_backend {self.attn_backend!r} ({' | '.join(BACKENDS)})")
        from dream.diffusion.gaussian import check_respacing

        try:
            check_respacing(self.num_sampling_steps)
        except ValueError as e:
            raise ConfigError(f"DreamConfig.{e}") from None

    # serialisation ------------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike], arch: Optional[str] = None) -> Path:
        """Atomic ``config.json`` with ``model_type``, ``dream_version`` and (optionally) ``arch`` beside the fields."""
        from dream.version import __version__

        return super().save(path, {"model_type": "dream", "dream_version": __version__, **({"arch": arch} if arch else {})})
