"""Semantically Aligned Decoding (SAD, DREAM arXiv 2603.02667 §SAD) and the best-of-K baseline.

SAD ("once", the main variant): K candidates per prompt share the generation order and run the first
``tau`` AR steps; each partial candidate is scored by DREAM itself - the encoder on the decoded tokens
only, projected and normalised, cosine with the CLIP-tower embedding of the prompt (no logit scale) -
and only the best candidate per prompt is finished. The official code loops over candidates; here the
K candidates run as one batch (candidate-major rows), which gives the same choices.

"per-step" variant: plain decoding until ``tau``; from then on every step draws K samples for the
revealed tokens and keeps the best-scoring partial image per prompt.

Best-of-K reranking: K full decodes (one batch), each finished image scored by DREAM's own score or by
any external scorer, best kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .mar import DecodeState, MARSampler, SamplerConfig
from .schedules import reveal_counts


@dataclass
class SADOutput:
    """Result of SAD or best-of-K."""

    tokens: torch.Tensor     # (B, L, C) the finished samples
    scores: torch.Tensor     # (K, B) critic scores at the selection step (once) / last selection (per-step)
    best: torch.Tensor       # (B,) chosen candidate per prompt
    threshold: int           # tau in steps


def resolve_threshold(threshold: Union[int, float], num_iter: int, seq_len: int) -> int:
    """tau in steps. An int is a step count in [1, num_iter - 1]; a float in (0, 1) is the fraction of
    tokens that must be decoded before scoring (smallest tau reaching it)."""
    if isinstance(threshold, bool):
        raise TypeError("threshold must be an int (steps) or a float fraction of decoded tokens")
    if isinstance(threshold, float) and threshold < 1:
        if threshold <= 0:
            raise ValueError(f"a fractional threshold must be in (0, 1), got {threshold}")
        done = 0
        for tau, c in enumerate(reveal_counts(num_iter, seq_len)[:-1], start=1):
            done += c
            if done >= threshold * seq_len - 1e-9:
                return tau
        raise ValueError(f"threshold {threshold} leaves no step to finish (num_iter {num_iter})")
    if isinstance(threshold, float) and not threshold.is_integer():
        raise ValueError(f"threshold {threshold} is neither a fraction in (0, 1) nor a whole step count")
    tau = int(threshold)
    if not 1 <= tau <= num_iter - 1:
        raise ValueError(f"threshold must be a step in [1, {num_iter - 1}], got {tau}")
    return tau


@torch.no_grad()
def critic_scores(model, tokens: torch.Tensor, mask: Optional[torch.Tensor], text_emb: torch.Tensor) -> torch.Tensor:
    """DREAM's own alignment score: cosine between the normalised image embedding of the known tokens
    (masked positions dropped, as in training) and the normalised text embedding.

    Args:
        tokens: (N, L, C); mask: (N, L) bool, True = not decoded yet (None = all known);
        text_emb: (N, E) CLIP-tower embeddings of the prompts.
    Returns:
        (N,) scores in float32, or float64 for a float64 model (the float64 reference runs of the tests and
        ``dream check-parity``). Computed outside autocast (one encoder pass), so that a bf16 sampling run
        ranks its candidates with float32 scores.
    """
    if text_emb.dim() != 2 or text_emb.shape[0] != tokens.shape[0]:
        raise ValueError(f"text_emb must be ({tokens.shape[0]}, E), got {tuple(text_emb.shape)}")
    with torch.autocast(tokens.device.type, enabled=False):
        img = model.encode_image(tokens, mask, normalize=True)
        dt = torch.promote_types(img.dtype, torch.float32)          # never below float32, float64 stays
        return (img.to(dt) * F.normalize(text_emb.to(dt), dim=-1)).sum(-1)


class SemanticallyAlignedDecoding:
    """Batched SAD over a :class:`MARSampler`.

    Args:
        model: a DREAM model. config: sampling settings.
        num_candidates: K >= 1. threshold: tau in steps (int) or a decoded-token fraction (float).
        variant: ``"once"`` (official main variant) or ``"per-step"``.
        batched: run the K candidates as one batch (default); False runs them one at a time as the
            official code does (for parity checks and the speed comparison).
    """

    def __init__(self, model, config: SamplerConfig = SamplerConfig(), num_candidates: int = 5,
                 threshold: Union[int, float] = 8, variant: str = "once", batched: bool = True):
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
            raise ValueError(f"num_candidates must be an int >= 1, got {num_candidates!r}")
        if variant not in ("once", "per-step"):
            raise ValueError(f"unknown SAD variant {variant!r} (once | per-step)")
        self.sampler = MARSampler(model, config)
        self.model = model
        self.K = num_candidates
        self.tau = resolve_threshold(threshold, config.num_iter, model.config.seq_len)
        self.variant = variant
        self.batched = batched

    @torch.no_grad()
    def sample(self, text_feats: torch.Tensor, clip_ids: torch.Tensor, null_feats: Optional[torch.Tensor] = None,
               *, text_padding_mask=None, null_padding_mask=None, orders=None,
               generator: Optional[torch.Generator] = None, noise_fn: Optional[Callable] = None,
               progress: bool = False) -> SADOutput:
        """Generate one image per prompt with SAD.

        Args:
            text_feats: (B, Lt, D) prompt features; clip_ids: (B, ctx) prompt ids for the critic;
            null_feats: (1 or B, Lt, D) null-prompt features (CFG). orders: (B, L) generation orders
            shared by the K candidates (drawn with ``generator`` when None).
            noise_fn: replays diffusion noise (see :class:`MARSampler`); batched runs ask for the K
            candidates' noise at once, rows candidate-major, CFG halves [cond of all k; uncond of all k].
        Returns:
            :class:`SADOutput` (tokens (B, L, C), scores (K, B), best (B,), tau).
        """
        s, K, tau = self.sampler, self.K, self.tau
        if text_feats.dim() != 3 or text_feats.shape[0] == 0:
            raise ValueError(f"text_feats must be a non-empty (B, Lt, D) batch, got {tuple(text_feats.shape)}")
        B = text_feats.shape[0]
        if clip_ids.shape[0] != B:
            raise ValueError(f"clip_ids has {clip_ids.shape[0]} rows for {B} prompts")
        text_emb = self.model.encode_text(clip_ids, normalize=True)             # (B, E)
        st = s.init_state(text_feats, null_feats, text_padding_mask=text_padding_mask,
                          null_padding_mask=null_padding_mask, orders=orders, generator=generator)
        if self.variant == "per-step":
            return self._per_step(st, text_emb, generator, noise_fn, progress)
        rows = torch.arange(B, device=text_feats.device)
        if self.batched:
            cand = st.repeat(K)                                                  # rows (k, b): k * B + b
            s.run(cand, 0, tau, generator=generator, noise_fn=noise_fn, progress=progress)
        else:
            cands = [st.repeat(1) for _ in range(K)]
            for step in tqdm(range(tau), disable=not progress, desc="SAD (sequential)", leave=False):
                for c in cands:
                    s.step(c, step, generator=generator, noise_fn=noise_fn)
            cand = DecodeState(*[None if getattr(cands[0], f) is None else torch.cat([getattr(c, f) for c in cands])
                                 for f in ("tokens", "mask", "orders", "y", "y_null", "y_pad", "y_null_pad")])
        scores = critic_scores(self.model, cand.tokens, cand.mask, text_emb.repeat(K, 1)).view(K, B)
        best = scores.argmax(dim=0)                                              # first index on ties
        st = cand.select(best * B + rows)
        s.run(st, tau, None, generator=generator, noise_fn=noise_fn, progress=progress)
        return SADOutput(st.tokens, scores, best, tau)

    def _per_step(self, st: DecodeState, text_emb, generator, noise_fn, progress) -> SADOutput:
        s, K, tau = self.sampler, self.K, self.tau
        B = st.tokens.shape[0]
        rows = torch.arange(B, device=st.tokens.device)
        s.run(st, 0, tau, generator=generator, noise_fn=noise_fn, progress=progress)
        scores = best = None
        for step in tqdm(range(tau, s.config.num_iter), disable=not progress, desc="SAD per-step", leave=False):
            cand = s.step(st.repeat(K), step, generator=generator, noise_fn=noise_fn)
            scores = critic_scores(self.model, cand.tokens, cand.mask, text_emb.repeat(K, 1)).view(K, B)
            best = scores.argmax(dim=0)
            st = cand.select(best * B + rows)
        st.mask = torch.zeros_like(st.mask)
        return SADOutput(st.tokens, scores, best, tau)


@torch.no_grad()
def best_of_k(sampler: MARSampler, text_feats: torch.Tensor, clip_ids: Optional[torch.Tensor] = None,
              null_feats: Optional[torch.Tensor] = None, *, k: int = 5,
              scorer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
              text_padding_mask: Optional[torch.Tensor] = None, null_padding_mask: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None, progress: bool = False) -> SADOutput:
    """Decode K full samples per prompt in one batch and keep the best (the reranking baseline).

    Each candidate is an independent decode (its own generation order and noise), as K separate
    calls of the sampler would be.

    Args:
        sampler: a :class:`MARSampler`. text_feats: (B, Lt, D); clip_ids: (B, ctx) prompt ids for
            DREAM's own score; null_feats: (1 or B, Lt, D) for CFG.
        k: candidates per prompt. scorer: ``scorer(tokens (K*B, L, C)) -> (K*B,)`` scores finished
            candidates (rows candidate-major: row k * B + b); default DREAM's own score (cosine of the
            image and prompt embeddings, needs ``clip_ids``).
        text_padding_mask / null_padding_mask: (B, Lt) / (1 or B, Lt) text padding masks, or None.
    Returns:
        :class:`SADOutput` with the best tokens (B, L, C), all scores (K, B) and the argmax (B,)
        (first index on ties); ``threshold`` is ``num_iter``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if text_feats.dim() != 3 or text_feats.shape[0] == 0:
        raise ValueError(f"text_feats must be a non-empty (B, Lt, D) batch, got {tuple(text_feats.shape)}")
    B = text_feats.shape[0]
    if scorer is None and clip_ids is None:
        raise ValueError("best_of_k needs clip_ids for DREAM's own score, or a scorer callable")
    if clip_ids is not None and clip_ids.shape[0] != B:
        raise ValueError(f"clip_ids has {clip_ids.shape[0]} rows for {B} prompts")
    # K independent decodes (own generation order each) as one batch, rows candidate-major (k, b)
    rep = (lambda t: None if t is None else t.repeat(k, *([1] * (t.dim() - 1))))
    null = null_feats if null_feats is None or null_feats.shape[0] == 1 else rep(null_feats)
    null_pad = null_padding_mask if null_padding_mask is None or null_padding_mask.shape[0] == 1 \
        else rep(null_padding_mask)
    st = sampler.init_state(rep(text_feats), null, text_padding_mask=rep(text_padding_mask),
                            null_padding_mask=null_pad, generator=generator)
    sampler.run(st, generator=generator, progress=progress)
    if scorer is None:
        text_emb = sampler.model.encode_text(clip_ids, normalize=True).repeat(k, 1)
        scores = critic_scores(sampler.model, st.tokens, None, text_emb)
    else:
        scores = torch.as_tensor(scorer(st.tokens))
        if scores.shape != (k * B,):
            raise ValueError(f"scorer must return ({k * B},) scores, got {tuple(scores.shape)}")
    scores = scores.to(st.tokens.device).view(k, B)
    best = scores.argmax(0)
    return SADOutput(st.tokens[best * B + torch.arange(B, device=best.device)], scores, best,
                     sampler.config.num_iter)
