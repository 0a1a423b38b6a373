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
    tau = int(threshold)
    if not 1 <= tau <= num_iter - 1:
        raise ValueError(f"threshold must be a step in [1, {num_iter - 1}], got {tau}")
    return tau


@torch.no_grad()
def critic_scores(model, tokens: torch.Tensor, mask: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine between normalised image embeddings of the known tokens and normalised text embeddings."""
    img = model.encode_image(tokens, mask, normalize=True)
    return (img * F.normalize(text_emb, dim=-1)).sum(-1)


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
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
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
        s, K, tau = self.sampler, self.K, self.tau
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
              generator: Optional[torch.Generator] = None, progress: bool = False) -> SADOutput:
    """Decode K full samples per prompt in one batch and keep the best.

    ``scorer(tokens (K*B, L, C)) -> (K*B,)`` scores finished candidates (rows candidate-major); by
    default DREAM's own score (cosine of image and prompt embeddings, needs ``clip_ids``)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    B = text_feats.shape[0]
    st = sampler.init_state(text_feats, null_feats, generator=generator).repeat(k)
    sampler.run(st, generator=generator, progress=progress)
    if scorer is None:
        if clip_ids is None:
            raise ValueError("best_of_k needs clip_ids for DREAM's own score, or a scorer callable")
        text_emb = sampler.model.encode_text(clip_ids, normalize=True).repeat(k, 1)
        scores = critic_scores(sampler.model, st.tokens, None, text_emb)
    else:
        scores = scorer(st.tokens)
    scores = scores.view(k, B)
    best = scores.argmax(0)
    return SADOutput(st.tokens[best * B + torch.arange(B, device=best.device)], scores, best,
                     sampler.config.num_iter)
