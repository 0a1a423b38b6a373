"""DREAM: one model that is a CLIP-style image encoder and a masked-autoregressive text-to-image
generator (arXiv 2603.02667), re-implemented from the paper and the behaviour of the official code
(checked against its fixture in ``tests/fixtures/official_dream_tiny``). MAR parts follow arXiv 2406.11838,
text conditioning FLUID (arXiv 2410.13863).

Data flow (one training forward)::

    tokens (B, L, C) --z_proj--> + buffer(class_emb[0]) + pos --LN--> drop masked --> encoder --> h
    h --mean--> image_projection --> image embedding ---------\
    clip ids --> causal text tower --> EOT --> projection -----+--> filtered InfoNCE   (gated per sample)
    text feats --> text aligner --> y
    h --decoder_embed--> scatter + mask tokens + pos --LN--> cross-attn decoder(y) --> z (B, L, Dd)
    z[masked] --> diffusion head --> hybrid eps-MSE + VLB loss                    (gated on mask ratio)

Parameter names equal the official checkpoints, so official state dicts load without renaming.
Masks are ``bool`` with True = masked. The model is pure: no sampling loops or RNG of its own;
every stochastic step takes an optional ``torch.Generator``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DreamConfig
from .contrastive import ImageProjection, filtered_clip_loss
from .diffloss import DiffLoss
from .layers import Block, CrossAttentionBlock, LayerNorm6, run_blocks
from .patchify import patchify, unpatchify
from .text import TextTransformer


class DREAM(nn.Module):
    """The DREAM model. Build it with :func:`dream.create_model` or ``DREAM(DreamConfig(...))``."""

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = cfg = config
        De, Dd, L, buf = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.seq_len, cfg.buffer_size
        be = cfg.attn_backend

        # ---- encoder (MAE-style) ----
        self.class_emb = nn.Embedding(cfg.class_num, De)
        self.fake_latent = nn.Parameter(torch.zeros(1, De))  # official; unused in DREAM training
        self.z_proj = nn.Linear(cfg.token_dim, De)
        self.z_proj_ln = LayerNorm6(De)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + L, De))
        self.encoder_blocks = nn.ModuleList([
            Block(De, cfg.encoder_num_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout, be)
            for _ in range(cfg.encoder_depth)])
        self.encoder_norm = LayerNorm6(De)

        # ---- decoder (text-conditioned MAR) ----
        self.decoder_embed = nn.Linear(De, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + L, Dd))
        self.decoder_proj_ln = LayerNorm6(Dd)
        self.decoder_blocks = nn.ModuleList([
            CrossAttentionBlock(Dd, Dd, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.attn_dropout,
                                cfg.proj_dropout, be) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = LayerNorm6(Dd)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, Dd))

        # ---- text aligner over frozen text features ----
        self.text_proj = nn.Linear(cfg.text_embed_dim, Dd)
        self.text_pos_emb = nn.Parameter(torch.zeros(1, cfg.text_max_len, Dd))
        self.text_proj_ln = LayerNorm6(Dd)
        self.text_aligner = nn.ModuleList([
            Block(Dd, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout, be)
            for _ in range(cfg.text_aligner_depth)])
        if cfg.text_aligner_norm:  # not official; see DreamConfig.text_aligner_norm
            self.text_aligner_norm = LayerNorm6(Dd)

        # ---- contrastive head: CLIP text tower + image projection ----
        self.token_embedding = nn.Embedding(cfg.clip_vocab_size, cfg.clip_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.clip_context_length, cfg.clip_width))
        self.transformer = TextTransformer(cfg.clip_width, cfg.clip_layers, cfg.clip_heads, cfg.clip_mlp_ratio, be)
        self.ln_final = nn.LayerNorm(cfg.clip_width)  # eps 1e-5 (official)
        self.text_projection = nn.Parameter(torch.empty(cfg.clip_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        self.image_projection = ImageProjection(De, cfg.proj_hidden_dim, cfg.embed_dim)

        self.initialize_weights()
        # NOTE: as in MAR, the diffusion head is built after the backbone init and keeps its own init.
        self.diffloss = DiffLoss(cfg.token_dim, Dd, cfg.diffloss_width, cfg.diffloss_depth,
                                 cfg.diffusion_steps, cfg.noise_schedule, cfg.grad_checkpointing)

    # ------------------------------------------------------------------------------------------
    # init
    # ------------------------------------------------------------------------------------------
    def initialize_weights(self):
        """Official init: N(0, .02) embeddings/pos-embeds/mask token; xavier Linear; LN 1/0;
        CLIP positional N(0, .01), text projection N(0, width^-0.5); token embedding N(0, 1)."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned, self.text_pos_emb):
            nn.init.normal_(p, std=0.02)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.config.clip_width ** -0.5)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------
    # token helpers
    # ------------------------------------------------------------------------------------------
    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        return patchify(latents, self.config.patch_size)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        return unpatchify(tokens, self.config.patch_size, self.config.vae_embed_dim)

    def _check_tokens(self, tokens: torch.Tensor, mask: Optional[torch.Tensor]):
        cfg = self.config
        if tokens.dim() != 3 or tokens.shape[1:] != (cfg.seq_len, cfg.token_dim):
            raise ValueError(f"tokens must have shape (B, {cfg.seq_len}, {cfg.token_dim}), got {tuple(tokens.shape)}")
        if not tokens.is_floating_point():
            raise TypeError(f"tokens must be floating point, got {tokens.dtype}")
        if mask is not None:
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be bool (True = masked), got {mask.dtype}")
            if mask.shape != tokens.shape[:2]:
                raise ValueError(f"mask must have shape {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")

    @staticmethod
    def _keep_index(keep: torch.Tensor):
        """Indices of kept positions in ascending order, padded to the longest row.

        Returns (index (B, K), padding mask (B, K) bool or None when every row keeps K)."""
        counts = keep.sum(1)
        k = int(counts.max())
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
        if bool((counts == k).all()):
            return order, None
        pad = torch.arange(k, device=keep.device)[None, :] >= counts[:, None]
        return order, pad

    # ------------------------------------------------------------------------------------------
    # encoder
    # ------------------------------------------------------------------------------------------
    def buffer_embedding(self, batch: int, kind: str = "class") -> torch.Tensor:
        """The vector that fills every buffer slot: ``class_emb(0)`` (official DREAM) or ``fake_latent``."""
        if kind == "class":
            vec = self.class_emb.weight[0:1]
        elif kind == "fake_latent":
            vec = self.fake_latent
        else:
            raise ValueError(f"unknown buffer kind {kind!r} (class | fake_latent)")
        return vec.expand(batch, -1)

    def forward_encoder(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                        apply_norm: bool = True, buffer: str = "class", return_padding: bool = False):
        """Encode visible tokens with the buffer prepended.

        Args:
            tokens: (B, L, C); mask: (B, L) bool, True = masked (dropped), None = all visible.
        Returns:
            h (B, buffer + n_visible, De): buffer rows first, then visible tokens in position order.
            With ``return_padding`` also the (B, K) padding mask (None when all rows keep as many).
        """
        self._check_tokens(tokens, mask)
        cfg = self.config
        B, L, _ = tokens.shape
        buf = cfg.buffer_size
        x = self.encoder_input(tokens, buffer)                                    # (B, buf + L, De)
        pad = None
        if mask is not None and bool(mask.any()):
            keep = torch.cat([torch.ones(B, buf, dtype=torch.bool, device=mask.device), ~mask], dim=1)
            idx, pad = self._keep_index(keep)
            x = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))   # (B, K, De)
        x = run_blocks(self.encoder_blocks, x, key_padding_mask=pad, checkpointing=cfg.grad_checkpointing)
        if apply_norm:
            x = self.encoder_norm(x)
        return (x, pad) if return_padding else x

    def encoder_input(self, tokens: torch.Tensor, buffer: str = "class") -> torch.Tensor:
        """The encoder's input at every position, before masked tokens are dropped: (B, buffer + L, De)."""
        buf = self.config.buffer_size
        x = self.z_proj(tokens)                                                   # (B, L, De)
        x = torch.cat([self.buffer_embedding(x.shape[0], buffer)[:, None].expand(-1, buf, -1).to(x.dtype), x], dim=1)
        return self.z_proj_ln(x + self.encoder_pos_embed_learned)

    # -- LazyMAR token cache (sampling fast path; see dream.models.layers.TokenCache) -------------------------
    def forward_encoder_cached(self, tokens: torch.Tensor, mask: torch.Tensor, cache, must=None,
                               refresh: bool = False) -> torch.Tensor:
        """``forward_encoder`` in position space through a :class:`~dream.models.layers.TokenCache`: (B, buffer + L,
        De), masked positions excluded as keys (their rows are meaningless). A refresh equals ``forward_encoder``
        scattered to positions (up to float rounding); cached calls recompute ``must`` (B, buffer + L) plus the
        cache's selection."""
        self._check_tokens(tokens, mask)
        buf = self.config.buffer_size
        pad = torch.cat([torch.zeros_like(mask[:, :1]).expand(-1, buf), mask], dim=1)     # True = not a key
        x = cache.run(self.encoder_blocks, self.encoder_input(tokens), must=must, valid=~pad, refresh=refresh,
                      key_padding_mask=pad)
        return self.encoder_norm(x)

    def forward_decoder_cached(self, h: torch.Tensor, mask: torch.Tensor, y: Optional[torch.Tensor],
                               text_padding_mask: Optional[torch.Tensor], rows: torch.Tensor, cache, must=None,
                               refresh: bool = False, y_kv: Optional[list] = None) -> torch.Tensor:
        """``forward_decoder(..., rows=rows)`` from a position-space encoder output ``h`` (B, buffer + L, De) through a
        :class:`~dream.models.layers.TokenCache`; ``rows`` (B, r) token positions must be among the recomputed ones
        (``must``, (B, buffer + L) bool, in buffer-offset positions). Returns (B, r, Dd)."""
        buf = self.config.buffer_size
        x = self.decoder_embed(h)
        keep = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, buf), ~mask], dim=1)
        x = torch.where(keep[..., None], x, self.mask_token.to(x.dtype))
        x = self.decoder_proj_ln(x + self.decoder_pos_embed_learned)
        bk = None if y_kv is None else [{"kv": kv} for kv in y_kv]
        x = cache.run(self.decoder_blocks, x, y, text_padding_mask, must=must, refresh=refresh, block_kwargs=bk)
        x = torch.gather(x, 1, (rows + buf)[..., None].expand(-1, -1, x.shape[-1]))
        return self.decoder_norm(x) + self.diffusion_pos_embed_learned[0][rows]

    def pool(self, h: torch.Tensor, pad: Optional[torch.Tensor] = None, how: str = "mean") -> torch.Tensor:
        """Pool encoder output: ``mean`` over all rows (contrastive, official) or ``buffer`` rows (probe)."""
        if how == "buffer":
            return h[:, : self.config.buffer_size].mean(1)
        if how != "mean":
            raise ValueError(f"unknown pooling {how!r} (mean | buffer)")
        if pad is None:
            return h.mean(1)
        w = (~pad).to(h.dtype)[..., None]
        return (h * w).sum(1) / w.sum(1)

    def encode_image(self, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     normalize: bool = True) -> torch.Tensor:
        """Contrastive image embedding (B, E) from (partially) visible tokens."""
        h, pad = self.forward_encoder(tokens, mask, return_padding=True)
        e = self.image_projection(self.pool(h, pad))
        return F.normalize(e, dim=-1) if normalize else e

    # ------------------------------------------------------------------------------------------
    # text
    # ------------------------------------------------------------------------------------------
    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """CLIP-tower text embedding (B, E) from BPE ids (B, ctx); pooled at the EOT (max id) token."""
        cfg = self.config
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"text ids must be an integer tensor (B, ctx), got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] > cfg.clip_context_length:
            raise ValueError(f"text ids have length {ids.shape[1]} > context length {cfg.clip_context_length}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.clip_vocab_size):
            raise ValueError(f"text ids must be in [0, {cfg.clip_vocab_size})")
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        x = self.ln_final(self.transformer(x))
        x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward_text_aligner(self, text_feats: torch.Tensor,
                             text_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Frozen-encoder features (B, Lt, Dt) -> conditioning y (B, Lt, Dd). No final norm (official) unless
        ``config.text_aligner_norm``."""
        cfg = self.config
        if text_feats.dim() != 3 or text_feats.shape[-1] != cfg.text_embed_dim:
            raise ValueError(f"text features must have shape (B, Lt, {cfg.text_embed_dim}), "
                             f"got {tuple(text_feats.shape)}")
        if text_feats.shape[1] > cfg.text_max_len:
            raise ValueError(f"text features have length {text_feats.shape[1]} > text_max_len {cfg.text_max_len}")
        y = self.text_proj(text_feats) + self.text_pos_emb[:, : text_feats.shape[1]]
        y = self.text_proj_ln(y)
        y = run_blocks(self.text_aligner, y, key_padding_mask=text_padding_mask, checkpointing=cfg.grad_checkpointing)
        return self.text_aligner_norm(y) if cfg.text_aligner_norm else y

    def extend_text_condition(self, y: torch.Tensor, text_padding_mask: Optional[torch.Tensor] = None,
                              branch: str = "cond"):
        """(y, padding mask) with the extra condition tokens of an attached ``soft_text`` module appended (soft
        tokens, :func:`dream.align.soft_tokens.attach_dream`; ``branch`` "cond" or "uncond" picks the CFG branch's
        set); the inputs themselves when none is attached."""
        ext = self._modules.get("soft_text")
        return (y, text_padding_mask) if ext is None else ext(y, text_padding_mask, branch)

    # ------------------------------------------------------------------------------------------
    # decoder
    # ------------------------------------------------------------------------------------------
    def decoder_input(self, h: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Encoder output scattered back to all positions, mask tokens elsewhere, + positions, LN: (B, buf + L, Dd)."""
        cfg = self.config
        B = h.shape[0]
        buf, L = cfg.buffer_size, cfg.seq_len
        x = self.decoder_embed(h)                                                # (B, K, Dd)
        if mask is not None and bool(mask.any()):
            keep = torch.cat([torch.ones(B, buf, dtype=torch.bool, device=mask.device), ~mask], dim=1)
            idx, pad = self._keep_index(keep)
            tok = self.mask_token.to(x.dtype).expand(B, buf + L, -1)
            if pad is not None:
                x = torch.where(pad[..., None], tok[:, : x.shape[1]], x)
            x = tok.scatter(1, idx[..., None].expand(-1, -1, x.shape[-1]), x)  # (B, buf + L, Dd)
        return self.decoder_proj_ln(x + self.decoder_pos_embed_learned)

    def decoder_text_kv(self, y: torch.Tensor) -> list:
        """Every decoder block's cross-attention keys and values of the aligned text ``y`` (B, Lt, Dd): a list of
        (k, v) pairs, each (B, H, Lt, Dh), for ``forward_decoder(..., y_kv=)`` (the text is fixed while a sampler
        runs, so it need not be projected again at every step)."""
        return [blk.cross_attn.project_kv(y) for blk in self.decoder_blocks]

    def forward_decoder(self, h: torch.Tensor, mask: Optional[torch.Tensor], y: Optional[torch.Tensor],
                        text_padding_mask: Optional[torch.Tensor] = None,
                        rows: Optional[torch.Tensor] = None, y_kv: Optional[list] = None) -> torch.Tensor:
        """Encoder output + mask tokens, cross-attending to y -> per-token condition z (B, L, Dd).

        ``rows`` (B, r) long, token positions in [0, L): only those positions' conditions, (B, r, Dd). The last
        decoder block then computes its queries, cross-attention and MLP for those rows only (a sampling step
        needs the few positions it reveals: ~20 % of the decoder at depth 4); same values as the full output
        gathered at ``rows``. ``y_kv``: :meth:`decoder_text_kv` of ``y``, precomputed (``y`` may then be None)."""
        cfg = self.config
        buf = cfg.buffer_size
        if rows is not None and (rows.dim() != 2 or rows.shape[0] != h.shape[0] or rows.dtype != torch.long):
            raise ValueError(f"rows must be a (B, r) long tensor of token positions, got {tuple(rows.shape)} "
                             f"{rows.dtype}")
        if y_kv is not None and len(y_kv) != len(self.decoder_blocks):
            raise ValueError(f"y_kv has {len(y_kv)} entries for {len(self.decoder_blocks)} decoder blocks")
        x = self.decoder_input(h, mask)
        if y_kv is not None:
            last = len(self.decoder_blocks) - 1
            for j, (blk, kv) in enumerate(zip(self.decoder_blocks, y_kv)):
                x = blk(x, None, text_padding_mask, rows=rows + buf if rows is not None and j == last else None, kv=kv)
        elif rows is None:
            x = run_blocks(self.decoder_blocks, x, y, y_padding_mask=text_padding_mask,
                           checkpointing=cfg.grad_checkpointing)
        else:
            x = run_blocks(self.decoder_blocks[:-1], x, y, y_padding_mask=text_padding_mask,
                           checkpointing=cfg.grad_checkpointing)
            x = self.decoder_blocks[-1](x, y, text_padding_mask, rows=rows + buf)     # (B, r, Dd)
        if rows is None:
            return self.decoder_norm(x)[:, buf:] + self.diffusion_pos_embed_learned
        return self.decoder_norm(x) + self.diffusion_pos_embed_learned[0][rows]

    # ------------------------------------------------------------------------------------------
    # losses
    # ------------------------------------------------------------------------------------------
    def clip_eligible(self, mask: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        """Samples with visible fraction >= ``min_visible_ratio_for_clip`` (official rule)."""
        if mask is None:
            return torch.ones(batch, dtype=torch.bool, device=device)
        visible = 1.0 - mask.sum(1).double() / mask.shape[1]
        return visible >= self.config.min_visible_ratio_for_clip

    def diffusion_gate(self, mask: torch.Tensor) -> torch.Tensor:
        """Samples whose masked fraction is >= ``min_masked_ratio_for_diff``.

        NOTE: the official code gates the whole batch on the batch-mean ratio; with one ratio per
        batch (official) both rules agree. With per-sample ratios we gate per sample."""
        return mask.sum(1).double() / mask.shape[1] >= self.config.min_masked_ratio_for_diff

    def forward(self, tokens: torch.Tensor, clip_ids: torch.Tensor, text_feats: torch.Tensor,
                mask: torch.Tensor, *, text_padding_mask: Optional[torch.Tensor] = None,
                diff_t: Optional[torch.Tensor] = None, diff_noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, gather: bool = True) -> dict:
        """One training forward: gated diffusion loss + filtered contrastive loss.

        Args:
            tokens: (B, L, C) clean tokens. clip_ids: (B, ctx) BPE ids for the text tower.
            text_feats: (B, Lt, Dt) frozen-encoder features (already CFG-dropped by the caller).
            mask: (B, L) bool, True = masked.
            diff_t, diff_noise: fixed diffusion timesteps (mul*B*L,) and noise (mul*B*L, C) in the
                official row order (copy-major, then (b, l)); drawn with ``generator`` when None.
            gather: all-gather contrastive features across ranks when distributed.
        Returns:
            dict with ``loss``, ``diff_loss``, ``clip_loss``, ``diff_gate`` (fraction of samples with an
            active diffusion loss), ``clip_gate`` (fraction eligible for the contrastive loss), ``mask_ratio``.
        """
        cfg = self.config
        self._check_tokens(tokens, mask)
        if mask is None:
            raise ValueError("forward needs a mask (B, L) bool; use a MaskingWarmup schedule to draw one")
        B, L, C = tokens.shape
        if clip_ids.shape[0] != B or text_feats.shape[0] != B:
            raise ValueError(f"batch sizes differ: tokens {B}, clip_ids {clip_ids.shape[0]}, "
                             f"text_feats {text_feats.shape[0]}")

        h, pad = self.forward_encoder(tokens, mask, return_padding=True)

        # ---- contrastive branch ----
        eligible = self.clip_eligible(mask, B, tokens.device)
        img = self.image_projection(self.pool(h, pad))
        txt = self.encode_text(clip_ids, normalize=True)
        clip_loss = filtered_clip_loss(img, txt, self.logit_scale.exp(), eligible, gather=gather)

        # ---- generative branch ----
        gate = self.diffusion_gate(mask)
        weight = (mask & gate[:, None]).reshape(-1)                            # (B*L,) rows that count
        if bool(weight.any()):
            y = self.forward_text_aligner(text_feats, text_padding_mask)
            z = self.forward_decoder(h, mask, y, text_padding_mask)            # (B, L, Dd)
            rows = weight.nonzero(as_tuple=True)[0]                            # only masked, gated tokens
            mul = cfg.diffusion_batch_mul
            target = tokens.reshape(B * L, C)[rows].repeat(mul, 1)
            cond = z.reshape(B * L, -1)[rows].repeat(mul, 1)
            t = noise = None
            if diff_t is not None:
                t = diff_t.reshape(mul, B * L)[:, rows].reshape(-1)
            if diff_noise is not None:
                noise = diff_noise.reshape(mul, B * L, C)[:, rows].reshape(-1, C)
            diff_loss = self.diffloss(target, cond, None, t=t, noise=noise, generator=generator)
        else:
            # Zero loss that still touches every generative parameter (zero gradients; DDP-safe),
            # without spending compute on the decoder (the official code computes it and multiplies by 0).
            diff_loss = sum(p.sum() for p in self.generative_parameters()) * 0.0
        loss = cfg.diff_loss_weight * diff_loss + cfg.clip_loss_weight * clip_loss
        # NOTE: official quirk Q3: ``fake_latent`` gets an exactly-zero gradient (label-drop branch), so
        # weight decay still shrinks it; this also keeps every parameter "used" under DDP.
        loss = loss + 0.0 * self.fake_latent.sum()
        return {"loss": loss, "diff_loss": diff_loss, "clip_loss": clip_loss,
                "diff_gate": gate.float().mean(), "clip_gate": eligible.float().mean(),
                "mask_ratio": mask.float().mean()}

    def generative_parameters(self):
        """Parameters used only by the generative branch (aligner, decoder, diffusion head)."""
        prefixes = ("decoder_", "mask_token", "diffusion_pos_embed_learned", "text_proj", "text_pos_emb",
                    "text_aligner", "diffloss")
        return [p for n, p in self.named_parameters() if n.startswith(prefixes)]

    # ------------------------------------------------------------------------------------------
    # optimiser hooks
    # ------------------------------------------------------------------------------------------
    def no_weight_decay(self, official: bool = True) -> set[str]:
        """Names without weight decay. Official rule: 1-D tensors, ``.bias``, anything in ``diffloss``
        (so the 0-dim ``logit_scale`` IS decayed). ``official=False`` also exempts 0-dim and embeddings."""
        out = set()
        for n, p in self.named_parameters():
            if p.ndim == 1 or n.endswith(".bias") or "diffloss" in n:
                out.add(n)
            elif not official and (p.ndim == 0 or "pos_emb" in n or n in ("mask_token", "fake_latent")):
                out.add(n)
        return out

    def set_grad_checkpointing(self, enable: bool = True):
        object.__setattr__(self, "config", self.config.replace(grad_checkpointing=enable))
        self.diffloss.net.grad_checkpointing = enable

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
