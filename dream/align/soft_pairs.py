"""Pair predictions for soft-token training: the frozen model's noise prediction for image i under caption j, for a
block of rows i and all B captions j, with the soft-token set of each pair.

One timestep t and one noise draw per step for the whole pair matrix (SoftREPA arXiv 2503.08250 and AGSM
arXiv 2605.30038 draw one t and one eps per step), so a row differs only by its captions.

* :class:`DreamPairs` (DREAM, arXiv 2603.02667): image i's tokens are masked with MAR's mask ratios (TN(1, 0.25) on
  [0.7, 1], one ratio per batch as MAR draws it, so every image has the same number M of masked tokens) and the
  same mask is used with every caption. The encoder runs once per image, the decoder once per pair (B x r rows in
  one batch, only the masked positions through its last block), the diffusion head once per (pair, masked token).
  t is one timestep for the whole step; eps is one draw per (image, masked token), shared by all captions. The
  soft tokens join the decoder's text stream after the aligned text; the time table's row for t is added to the
  head's condition z (see :mod:`dream.align.soft_tokens`). e_ij is the eps-MSE over image i's M x C masked values.
* :class:`UNetPairs` (diffusers UNet / SD3 transformer): x_t of image i repeated over captions, the text embeddings
  of caption j, the set index of each pair through :class:`~dream.align.soft_tokens.DiffusersSoftTokens`; the
  target the model was trained on (DDPM-style schedulers: eps, v or x0 as ``prediction_type`` says) or eps - x0
  (flow matching, sigma = t / T).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dream.utils import rng

from .soft_tokens import DiffusersSoftTokens, SoftTokenBank

__all__ = ["PairBatch", "DreamPairs", "UNetPairs", "DiffusersPairs"]


@dataclass
class PairBatch:
    """One step's data: ``x0`` (B, ...) clean targets, ``target`` (B, ...) the score-matching target, ``t`` (one
    timestep), ``cond`` model-specific tensors (dict)."""

    x0: torch.Tensor
    target: torch.Tensor
    t: int
    cond: dict

    @property
    def batch(self) -> int:
        return self.x0.shape[0]


class DreamPairs:
    """B x B eps predictions of a frozen DREAM model (a :class:`~dream.pipeline.DreamPipeline`).

    Args:
        pipeline: the pipeline (model, tokenizer, text inputs); the model is put in eval mode (no dropout).
        masking: mask-ratio config (default MAR / FLUID: TN(1, 0.25) on [0.7, 1], one ratio per batch).
    """

    def __init__(self, pipeline, masking=None):
        from dream.masking import MaskingWarmup, MaskingWarmupConfig

        self.pipe = pipeline
        self.model = pipeline.model.eval()
        cfg = masking or MaskingWarmupConfig.fluid()
        if cfg.granularity != "batch":
            raise ValueError("DreamPairs needs one mask ratio per batch (granularity 'batch')")
        self.masking = MaskingWarmup(cfg)
        if "soft_text" in self.model._modules or "time_condition" in self.model.diffloss.net._modules:
            raise ValueError("detach the soft tokens attached to the model first (dream.align.soft_tokens.detach_dream)")

    @property
    def device(self):
        return self.pipe.device

    @torch.no_grad()
    def encode(self, images: torch.Tensor, captions: list) -> dict:
        """Tokens (B, L, C) and aligned text (B, Lt, Dd) + padding mask: the deterministic part of a batch."""
        p, m = self.pipe, self.model
        tokens = p.tokenizer.encode(images.to(p.device), sample=False)
        feats, pad = p.text.features(list(captions))
        y = m.forward_text_aligner(feats, pad)
        if pad is not None:          # padding is trailing: drop the columns every caption pads (masked keys anyway)
            n = max(1, int((~pad).sum(1).max()))
            y, pad = y[:, :n], pad[:, :n]
        return {"tokens": tokens, "y": y, "pad": pad}

    @torch.no_grad()
    def prepare(self, enc: dict, generator: torch.Generator, t: Optional[int] = None) -> PairBatch:
        """Draw the mask, t and eps, run the encoder once per image."""
        m = self.model
        tokens = enc["tokens"]
        B, L, C = tokens.shape
        mask = self.masking.draw_masks(epoch=0.0, batch_size=B, seq_len=L, generator=generator).mask.to(tokens.device)
        M = int(mask[0].sum())
        pos = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :M]          # (B, M) masked positions
        x0 = torch.gather(tokens, 1, pos[..., None].expand(-1, -1, C))                  # (B, M, C)
        T = m.diffloss.train_diffusion.num_timesteps
        if t is None:
            t = int(rng.randint(T, (1,), generator))
        noise = rng.randn(x0.shape, generator, x0.device, x0.dtype)
        h = m.forward_encoder(tokens, mask)
        return PairBatch(x0, noise, int(t), {"h": h, "mask": mask, "pos": pos, "y": enc["y"], "pad": enc["pad"],
                                              "noise": noise})

    def predict(self, batch: PairBatch, bank: Optional[SoftTokenBank], sets: torch.Tensor,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """eps predictions (r, B, M, C) of images ``rows`` (default all) under every caption, pair (i, j) with token
        set ``sets[i, j]`` ((r, B) long); ``bank=None``: no soft tokens."""
        m, c = self.model, batch.cond
        B = batch.batch
        dev = batch.x0.device
        rows = torch.arange(B, device=dev) if rows is None else rows.to(dev)
        r = rows.numel()
        rep = (lambda x: x[rows].repeat_interleave(B, 0))                              # image i, B times
        h, mask, pos = rep(c["h"]), rep(c["mask"]), rep(c["pos"])
        y = c["y"].repeat(r, 1, 1)                                                      # caption j, for each i
        pad = None if c["pad"] is None else c["pad"].repeat(r, 1)
        if bank is not None:                                                            # None: the plain model
            soft = bank(sets.reshape(-1).to(dev)).to(y.dtype)                           # (r B, n, Dd)
            y = torch.cat([y, soft], dim=1)
            if pad is not None:
                pad = torch.cat([pad, pad.new_zeros(r * B, soft.shape[1])], dim=1)
        z = m.forward_decoder(h, mask, y, pad, rows=pos)                                # (r B, M, Dd)
        M, C = batch.x0.shape[1:]
        t = torch.full((r * B * M,), batch.t, dtype=torch.long, device=dev)
        z = z.reshape(-1, z.shape[-1])
        tt = None if bank is None else bank.time_term(t[:1])
        if tt is not None:
            z = z + tt.to(z.dtype)
        diff = m.diffloss.train_diffusion
        x_t = diff.q_sample(batch.x0[rows], t[:r], c["noise"][rows])                    # (r, M, C)
        x_t = x_t.repeat_interleave(B, 0).reshape(-1, C)
        out = m.diffloss.net.forward_cond(x_t, m.diffloss.net.time_embed(t) + m.diffloss.net.cond_embed(z))
        return out[:, :C].reshape(r, B, M, C)


class UNetPairs:
    """B x B predictions of a frozen diffusers denoiser with soft tokens (:class:`DiffusersSoftTokens`).

    Args:
        tokens: the soft tokens installed in the denoiser (``tokens.model``).
        scheduler: a diffusers scheduler with ``add_noise`` (target: eps, v or x0 as its ``prediction_type``), or None for
            rectified flow (x_t = (1 - s) x0 + s eps, s = t / T, target eps - x0; SD3).
        num_timesteps: T.
    """

    def __init__(self, tokens: DiffusersSoftTokens, scheduler=None, num_timesteps: int = 1000):
        self.tokens, self.model, self.scheduler, self.T = tokens, tokens.model, scheduler, int(num_timesteps)

    @torch.no_grad()
    def prepare(self, x0: torch.Tensor, text: torch.Tensor, generator: torch.Generator, t: Optional[int] = None,
                added_cond: Optional[dict] = None) -> PairBatch:
        """x0 (B, C, H, W) latents, text (B, Lt, D) caption embeddings (cacheable by the caller); ``added_cond``:
        extra per-caption keyword tensors of every denoiser call (e.g. SD3's ``pooled_projections`` (B, P))."""
        if t is None:
            t = int(rng.randint(self.T, (1,), generator))
        noise = rng.randn(x0.shape, generator, x0.device, x0.dtype)
        tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
        if self.scheduler is None:
            s = t / self.T
            x_t, target = (1 - s) * x0 + s * noise, noise - x0
        else:
            x_t = self.scheduler.add_noise(x0, noise, tt)
            kind = getattr(self.scheduler.config, "prediction_type", "epsilon")
            if kind == "epsilon":
                target = noise
            elif kind == "v_prediction":
                target = self.scheduler.get_velocity(x0, noise, tt)
            elif kind == "sample":
                target = x0
            else:
                raise ValueError(f"unknown prediction_type {kind!r} in the scheduler config")
        return PairBatch(x0, target, int(t), {"x_t": x_t, "text": text, "added": dict(added_cond or {})})

    def predict(self, batch: PairBatch, bank: Optional[SoftTokenBank], sets: torch.Tensor,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predictions (r, B, C, H, W) with ``bank`` (the bank installed in ``tokens`` or its EMA twin; None: the
        model without tokens)."""
        c, B = batch.cond, batch.batch
        dev = batch.x0.device
        rows = torch.arange(B, device=dev) if rows is None else rows.to(dev)
        r = rows.numel()
        x = c["x_t"][rows].repeat_interleave(B, 0)
        text = c["text"].repeat(r, *([1] * (c["text"].dim() - 1)))
        added = {k: v.repeat(r, *([1] * (v.dim() - 1))) for k, v in c["added"].items()}
        t = torch.full((r * B,), batch.t, dtype=torch.long, device=dev)
        old = self.tokens.bank
        self._swap(old if bank is None else bank)
        try:
            with self.tokens.use(sets.reshape(-1), enabled=bank is not None):
                if self.scheduler is None:
                    out = self.model(hidden_states=x, encoder_hidden_states=text, timestep=t, **added).sample
                else:
                    out = self.model(x, t, encoder_hidden_states=text, **added).sample
        finally:
            self._swap(old)
        return out.reshape(r, B, *out.shape[1:])

    def _swap(self, bank: SoftTokenBank) -> None:
        """Point every installed processor at ``bank`` (the online tokens or the EMA teacher)."""
        self.tokens.bank = bank
        for name, proc in self.model.attn_processors.items():
            if name in self.tokens.names:
                proc.bank = bank


class DiffusersPairs(UNetPairs):
    """:class:`UNetPairs` for a Stable Diffusion 1.x-style diffusers pipeline (``unet``, ``scheduler``,
    ``encode_prompt``, an optional ``vae``): images are encoded to ``latent_dist.mean * scaling_factor`` (pixels as
    they are without a VAE), captions with ``encode_prompt``. SDXL / SD3 need extra conditioning (pooled text,
    time ids) that this class does not build: use :class:`UNetPairs` with ``added_cond`` for them."""

    def __init__(self, pipe, tokens: DiffusersSoftTokens):
        from diffusers import DDPMScheduler

        # the training-time forward process of the pipeline's schedule (a sampling scheduler such as DPM-Solver
        # looks its noise levels up in the inference timesteps and has no get_velocity)
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        super().__init__(tokens, sched, int(sched.config.num_train_timesteps))
        self.pipe = pipe

    @property
    def device(self):
        return self.model.device

    @torch.no_grad()
    def encode(self, images: torch.Tensor, captions: list) -> dict:
        p = self.pipe
        x = images.to(self.device, self.model.dtype)
        vae = getattr(p, "vae", None)
        if vae is not None:
            x = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        text = p.encode_prompt(list(captions), self.device, 1, False)[0]
        return {"x0": x, "text": text}

    def prepare(self, enc: dict, generator: torch.Generator, t: Optional[int] = None) -> PairBatch:
        return super().prepare(enc["x0"], enc["text"], generator, t)
