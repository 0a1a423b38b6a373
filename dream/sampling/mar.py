"""MAR sampler for DREAM: random-order masked autoregressive decoding with a diffusion head.

Follows the official ``sample_tokens`` (MAR arXiv 2406.11838; DREAM text conditioning):
``num_iter`` steps of a cosine reveal schedule along a random order (revealed from the end of the
order), each step re-encoding every known token (no KV cache), decoding with cross-attention to the
aligned text, and sampling the revealed tokens with the diffusion head. CFG uses the null prompt's
text features; conditional and unconditional decoders run as one batch. Because the encoder never sees
text, it runs once per step for both CFG halves (identical results, half the encoder cost).

Speed: the diffusion head makes ``num_iter`` x ``S`` small MLP calls; see
:mod:`dream.sampling.diffusion_sampler` for its fast path. The decoder's last block runs only for the
positions revealed at the step (:func:`decode_rows`; its keys/values still cover every position), which
removes ~20 % of the decoder work at depth 4 (the decoder's own ``rows`` argument). ``SamplerConfig(precision="bf16")`` runs everything under
``torch.autocast`` (the diffusion arithmetic stays float32), ``compile=True`` compiles the diffusion step.
Host-device syncs: a few per AR step (reveal count, row selection), none inside the diffusion loop.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from tqdm.auto import tqdm

from dream.masking import mask_by_order, sample_orders

from .diffusion_sampler import COMPILE_MODES, TokenDiffusionSampler
from .schedules import cfg_at, mask_len_after
from dream.utils.config import ConfigBase


PRECISIONS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SamplerConfig(ConfigBase):
    """Generation settings (defaults: the official README example)."""

    num_iter: int = 64
    cfg: float = 3.0
    cfg_schedule: str = "linear"      # linear (official) | constant
    temperature: float = 1.0          # scales the per-step diffusion noise only
    num_sampling_steps: Optional[str] = None  # None = the model's ("100"); e.g. "25", "ddim10"
    diffusion_sampler: str = "ddpm"   # ddpm (official) | ddim
    ddim_eta: float = 0.0
    precision: str = "auto"           # auto (the caller's autocast state) | fp32 | bf16 | fp16 (autocast)
    compile: Union[bool, str] = False  # torch.compile the diffusion step (True or a torch.compile mode)
    loop_threads: Optional[int] = None  # CPU threads inside the diffusion step loop (None = unchanged)
    clip_denoised: Optional[float] = None  # clamp predicted x0 to [-c, c] (None = official; 1.0 for pixels)

    def __post_init__(self):
        super().__post_init__()
        if self.num_iter < 1:
            raise ValueError(f"num_iter must be >= 1, got {self.num_iter}")
        if self.cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"unknown cfg_schedule {self.cfg_schedule!r} (linear | constant)")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r} ({' | '.join(PRECISIONS)})")
        if self.diffusion_sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown diffusion_sampler {self.diffusion_sampler!r} (ddpm | ddim)")
        if self.loop_threads is not None and self.loop_threads < 1:
            raise ValueError(f"loop_threads must be >= 1 or None, got {self.loop_threads}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")

    def autocast(self, device: Union[str, torch.device]):
        """Context manager applying ``precision`` on ``device`` (a no-op for ``auto``)."""
        dev = torch.device(device).type
        if self.precision == "auto":
            return contextlib.nullcontext()
        if self.precision == "fp32":
            return torch.autocast(dev, enabled=False)
        return torch.autocast(dev, dtype=PRECISIONS[self.precision])


def decode_rows(model, h: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, y_pad: Optional[torch.Tensor],
                rows: torch.Tensor) -> torch.Tensor:
    """``model.forward_decoder(h, mask, y, y_pad)[rows]`` for a boolean row mask, through the decoder's own
    "only these rows" path (``forward_decoder(..., rows=positions)``) when every sample wants as many rows.

    Args:
        h: (N, K, De) encoder output; mask: (N, L) bool, True = masked; y: (N, Lt, Dd) aligned text;
        y_pad: (N, Lt) text padding mask or None; rows: (N, L) bool, the positions wanted.
    Returns:
        (rows.sum(), Dd) in row-major (n, l) order, as boolean indexing returns them.
    """
    counts = rows.sum(1)
    r = int(counts[0]) if rows.shape[0] else 0
    if not bool((counts == r).all()):
        return model.forward_decoder(h, mask, y, y_pad)[rows]
    pos = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)[:, :r]   # (N, r) ascending positions
    z = model.forward_decoder(h, mask, y, y_pad, rows=pos)                     # (N, r, Dd)
    return z.reshape(-1, z.shape[-1])


@dataclass
class DecodeState:
    """Mutable state of a batch of trajectories (N rows)."""

    tokens: torch.Tensor       # (N, L, C), zeros where unknown
    mask: torch.Tensor         # (N, L) bool, True = still unknown
    orders: torch.Tensor       # (N, L) long
    y: torch.Tensor            # (N, Lt, Dd) aligned text (conditional)
    y_null: Optional[torch.Tensor]  # (N, Lt, Dd) aligned null text, or None without CFG
    y_pad: Optional[torch.Tensor] = None
    y_null_pad: Optional[torch.Tensor] = None

    def select(self, idx: torch.Tensor) -> "DecodeState":
        pick = (lambda t: None if t is None else t[idx])
        return DecodeState(self.tokens[idx], self.mask[idx], self.orders[idx], self.y[idx], pick(self.y_null),
                           pick(self.y_pad), pick(self.y_null_pad))

    def repeat(self, k: int) -> "DecodeState":
        rep = (lambda t: None if t is None else t.repeat(k, *([1] * (t.dim() - 1))))
        return DecodeState(rep(self.tokens), rep(self.mask), rep(self.orders), rep(self.y), rep(self.y_null),
                           rep(self.y_pad), rep(self.y_null_pad))


class MARSampler:
    """Plain (and building-block) MAR decoding for a :class:`~dream.models.DREAM` model.

    Example::

        sampler = MARSampler(model, SamplerConfig(num_iter=64, cfg=3.0))
        tokens = sampler.sample(text_feats, null_feats, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, model, config: SamplerConfig = SamplerConfig()):
        from dream.models.dream import DREAM

        if not isinstance(model, DREAM):
            raise TypeError(f"MARSampler needs a dream DREAM model, got {type(model).__name__}")
        self.model = model
        self.config = config
        mc = model.config
        steps = config.num_sampling_steps or mc.num_sampling_steps
        self.token_sampler = TokenDiffusionSampler(model.diffloss.net, steps, mc.noise_schedule,
                                                   mc.diffusion_steps, config.diffusion_sampler, config.ddim_eta,
                                                   compile=config.compile, loop_threads=config.loop_threads,
                                                   clip_denoised=config.clip_denoised)

    # ------------------------------------------------------------------------------------------
    @property
    def guided(self) -> bool:
        return self.config.cfg != 1.0

    @torch.no_grad()
    def init_state(self, text_feats: torch.Tensor, null_feats: Optional[torch.Tensor] = None, *,
                   text_padding_mask=None, null_padding_mask=None, orders: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> DecodeState:
        """Align the text once and set up an all-masked batch."""
        m, mc = self.model, self.model.config
        if text_feats.dim() != 3:
            raise ValueError(f"text_feats must be (B, Lt, D), got {tuple(text_feats.shape)}")
        B = text_feats.shape[0]
        if B == 0:
            raise ValueError("empty batch: no prompts to sample")
        dev = text_feats.device
        if self.guided:
            if null_feats is None:
                raise ValueError("classifier-free guidance (cfg != 1) needs the null prompt's text features")
            if null_feats.dim() != 3 or null_feats.shape[0] not in (1, B):
                raise ValueError(f"null_feats must be (1 or {B}, Lt, D), got {tuple(null_feats.shape)}")
            if null_feats.shape[0] == 1:
                null_feats = null_feats.expand(B, -1, -1)
                if null_padding_mask is not None:
                    null_padding_mask = null_padding_mask.expand(B, -1)
        if orders is not None and tuple(orders.shape) != (B, mc.seq_len):
            raise ValueError(f"orders must be ({B}, {mc.seq_len}), got {tuple(orders.shape)}")
        y_null = None
        with self.config.autocast(dev):
            y = m.forward_text_aligner(text_feats, text_padding_mask)
            y, text_padding_mask = m.extend_text_condition(y, text_padding_mask, "cond")        # soft tokens, if any
            if self.guided:
                y_null = m.forward_text_aligner(null_feats, null_padding_mask)
                y_null, null_padding_mask = m.extend_text_condition(y_null, null_padding_mask, "uncond")
        if orders is None:
            orders = sample_orders(B, mc.seq_len, generator=generator, device=dev)
        tokens = torch.zeros(B, mc.seq_len, mc.token_dim, device=dev, dtype=m.z_proj.weight.dtype)  # model dtype
        mask = torch.ones(B, mc.seq_len, dtype=torch.bool, device=dev)
        return DecodeState(tokens, mask, orders.to(dev), y, y_null, text_padding_mask,
                           null_padding_mask if self.guided else None)

    def condition(self, st: DecodeState, step: int):
        """Run encoder + decoder for one step and pick the positions to reveal.

        Returns (z_sel, mask_to_pred, mask_next, cfg_iter): z_sel holds the conditional rows in row-major
        (b, l) order, then (with CFG) the unconditional rows for the same positions."""
        m, mc, cfg = self.model, self.model.config, self.config
        L = mc.seq_len
        remaining = int(st.mask[0].sum())
        mask_len = mask_len_after(step, cfg.num_iter, L, remaining)
        mask_next = mask_by_order(mask_len, st.orders)
        last = step >= cfg.num_iter - 1
        mask_to_pred = st.mask.clone() if last else (st.mask ^ mask_next)
        h = m.forward_encoder(st.tokens, st.mask)
        if self.guided:
            pad = None
            if st.y_pad is not None or st.y_null_pad is not None:
                pad = torch.cat([st.y_pad if st.y_pad is not None else torch.zeros_like(st.y_null_pad),
                                 st.y_null_pad if st.y_null_pad is not None else torch.zeros_like(st.y_pad)])
            z_sel = decode_rows(m, torch.cat([h, h]), torch.cat([st.mask, st.mask]), torch.cat([st.y, st.y_null]),
                                pad, torch.cat([mask_to_pred, mask_to_pred]))
        else:
            z_sel = decode_rows(m, h, st.mask, st.y, st.y_pad, mask_to_pred)
        cfg_iter = cfg_at(cfg.cfg, cfg.cfg_schedule, mask_len, L) if self.guided else 1.0
        return z_sel, mask_to_pred, mask_next, cfg_iter

    @torch.no_grad()
    def step(self, st: DecodeState, step: int, *, generator=None, noise_fn=None) -> DecodeState:
        """One AR step in place: reveal this step's tokens."""
        with self.config.autocast(st.tokens.device):
            z_sel, mask_to_pred, mask_next, cfg_iter = self.condition(st, step)
            x = self.token_sampler.sample(z_sel, cfg=cfg_iter, temperature=self.config.temperature,
                                          generator=generator, noise_fn=noise_fn)
        tokens = st.tokens.clone()
        tokens[mask_to_pred] = x.to(tokens.dtype)
        last = step >= self.config.num_iter - 1                      # the last step fills everything
        st.tokens, st.mask = tokens, (torch.zeros_like(mask_next) if last else mask_next)
        return st

    @torch.no_grad()
    def run(self, st: DecodeState, start: int = 0, stop: Optional[int] = None, *, generator=None,
            noise_fn=None, progress: bool = False) -> DecodeState:
        stop = self.config.num_iter if stop is None else stop
        for step in tqdm(range(start, stop), disable=not progress, desc="MAR", leave=False):
            self.step(st, step, generator=generator, noise_fn=noise_fn)
        if stop == self.config.num_iter:
            st.mask = torch.zeros_like(st.mask)
        return st

    @torch.no_grad()
    def sample(self, text_feats: torch.Tensor, null_feats: Optional[torch.Tensor] = None, *,
               text_padding_mask=None, null_padding_mask=None, orders=None,
               generator: Optional[torch.Generator] = None, noise_fn: Optional[Callable] = None,
               progress: bool = False) -> torch.Tensor:
        """Generate tokens (B, L, C) for text features (B, Lt, Dt)."""
        st = self.init_state(text_feats, null_feats, text_padding_mask=text_padding_mask,
                             null_padding_mask=null_padding_mask, orders=orders, generator=generator)
        return self.run(st, generator=generator, noise_fn=noise_fn, progress=progress).tokens
