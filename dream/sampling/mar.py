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
removes ~20 % of the decoder work at depth 4 (the decoder's own ``rows`` argument).
``SamplerConfig(precision="bf16")`` runs everything under ``torch.autocast`` (the diffusion arithmetic stays
float32), ``compile=True`` compiles the diffusion step.
Host-device syncs: a few per AR step (reveal count, row selection), none inside the diffusion loop.

Fast-sampling options (all off by default, so the default is exactly the sampler above; each works alone and
with the others, with SAD, best-of-K and both CFG schedules; :func:`fast_config` is ``fast=True``):

* ``reuse_text_kv`` (exact): the decoder's cross-attention keys / values of the text (and the null prompt, aligned
  once when every row shares it) are projected once per ``sample`` call instead of at every step.
* ``num_sampling_steps`` / ``diffusion_sampler`` (approximate): fewer head steps; respaced DDPM (learned variance
  kept), DDIM (arXiv 2010.02502), DPM-Solver++(2M) or its SDE variant (arXiv 2211.01095).
* ``num_iter`` (approximate): fewer AR steps (more tokens revealed per step).
* ``cfg_refresh`` (approximate): LazyMAR's condition cache (arXiv 2503.12450), :meth:`MARSampler._decode_cfg_cached`.
* ``token_refresh`` / ``token_ratio`` / ``token_full_blocks`` (approximate): LazyMAR's token cache,
  :class:`dream.models.layers.TokenCache`.
* ``cfg_until`` (approximate): guidance on the first steps only (guidance interval, arXiv 2404.07724).

Not implemented: continuous speculative decoding (arXiv 2411.11925) needs a draft model (none is shipped) and
verifies with the target's densities, which for MAR's random-order bidirectional decoding means one target pass
per drafted position set; KV caching is not exact under MAR's bidirectional attention (LazyMAR's token cache is
the approximate form). Measured speed and quality of every option: ``benchmarks/bench_fast_sampling.py``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from tqdm.auto import tqdm

from dream.masking import mask_by_order, sample_orders

from .diffusion_sampler import COMPILE_MODES, METHODS, TokenDiffusionSampler
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
    diffusion_sampler: str = "ddpm"   # ddpm (official) | ddim | dpm++2m | dpm++2m-sde
    ddim_eta: float = 0.0
    precision: str = "auto"           # auto (the caller's autocast state) | fp32 | bf16 | fp16 (autocast)
    compile: Union[bool, str] = False  # torch.compile the diffusion step (True or a torch.compile mode)
    loop_threads: Optional[int] = None  # CPU threads inside the diffusion step loop (None = unchanged)
    clip_denoised: Optional[float] = None  # clamp predicted x0 to [-c, c] (None = official; 1.0 for pixels)
    # fast-sampling techniques (off by default; ``fast_config`` combines them, see the module docstring)
    reuse_text_kv: bool = False       # exact: project the text's cross-attention keys/values once per sample call
    cfg_refresh: int = 1              # approximate (LazyMAR): unconditional decoder every k-th step (1 = every step)
    token_refresh: int = 1            # approximate (LazyMAR): every token recomputed every k-th step (1 = always)
    token_ratio: float = 0.25         # ... in between, this share of the other tokens (least similar) recomputed
    token_full_blocks: int = 1        # ... after this many leading blocks computed for every token
    cfg_until: float = 1.0            # approximate (guidance interval): CFG on the first such share of the steps only

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
        if self.diffusion_sampler not in METHODS:
            raise ValueError(f"unknown diffusion_sampler {self.diffusion_sampler!r} ({' | '.join(METHODS)})")
        if self.loop_threads is not None and self.loop_threads < 1:
            raise ValueError(f"loop_threads must be >= 1 or None, got {self.loop_threads}")
        if self.token_refresh < 1 or not 0.0 <= self.token_ratio <= 1.0 or self.token_full_blocks < 0:
            raise ValueError(f"need token_refresh >= 1, 0 <= token_ratio <= 1, token_full_blocks >= 0; got "
                             f"{self.token_refresh}, {self.token_ratio}, {self.token_full_blocks}")
        if not 0.0 <= self.cfg_until <= 1.0:
            raise ValueError(f"cfg_until must be in [0, 1] (share of the steps with guidance), got {self.cfg_until}")
        if self.cfg_refresh < 1:
            raise ValueError(f"cfg_refresh must be >= 1 (1 = no condition cache), got {self.cfg_refresh}")
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


# ``fast=True`` (``DreamPipeline.generate``, ``dream sample --fast``, ``dream eval geneval-shapes --fast``): the
# techniques that measured best on ``dream_tiny.shapes`` (tuned on GenEval-shapes prompt seed 100; speed and
# quality on other prompts in ``benchmarks/bench_fast_sampling.py``, README "Fast sampling"): the exact text key /
# value reuse, 12 respaced DDPM head steps and FAST_AR_SCALE of the AR steps. Each also works alone.
FAST_PRESET = {"reuse_text_kv": True, "num_sampling_steps": "12"}
FAST_AR_SCALE = 0.625          # num_iter x 5/8, rounded up (dream_tiny.shapes 16 -> 10, MAR's 64 -> 40)


def fast_config(config: Optional[SamplerConfig] = None, **overrides) -> SamplerConfig:
    """``config`` (default: ``SamplerConfig()``) with the fast preset: :data:`FAST_PRESET`, ``num_iter`` scaled by
    :data:`FAST_AR_SCALE` (rounded up), then ``overrides`` (e.g. an explicit ``num_iter`` or ``num_sampling_steps``).

    Approximate: fewer head steps and fewer AR steps sample a slightly different distribution; the measured cost on
    ``dream_tiny.shapes`` is in the README (accuracy and FID (CNN) against the default, paired, held-out prompts)."""
    c = config or SamplerConfig()
    return c.replace(**{**FAST_PRESET, "num_iter": max(1, math.ceil(c.num_iter * FAST_AR_SCALE)), **overrides})


def decode_rows(model, h: torch.Tensor, mask: torch.Tensor, y: Optional[torch.Tensor], y_pad: Optional[torch.Tensor],
                rows: torch.Tensor, y_kv: Optional[list] = None) -> torch.Tensor:
    """``model.forward_decoder(h, mask, y, y_pad)[rows]`` for a boolean row mask, through the decoder's own
    "only these rows" path (``forward_decoder(..., rows=positions)``) when every sample wants as many rows.

    Args:
        h: (N, K, De) encoder output; mask: (N, L) bool, True = masked; y: (N, Lt, Dd) aligned text;
        y_pad: (N, Lt) text padding mask or None; rows: (N, L) bool, the positions wanted;
        y_kv: the decoder's cross-attention keys/values of y (``model.decoder_text_kv``), or None.
    Returns:
        (rows.sum(), Dd) in row-major (n, l) order, as boolean indexing returns them.
    """
    counts = rows.sum(1)
    r = int(counts[0]) if rows.shape[0] else 0
    if not bool((counts == r).all()):
        return (model.forward_decoder(h, mask, y, y_pad) if y_kv is None
                else model.forward_decoder(h, mask, y, y_pad, y_kv=y_kv))[rows]
    pos = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)[:, :r]   # (N, r) ascending positions
    z = (model.forward_decoder(h, mask, y, y_pad, rows=pos) if y_kv is None    # (N, r, Dd)
         else model.forward_decoder(h, mask, y, y_pad, rows=pos, y_kv=y_kv))
    return z.reshape(-1, z.shape[-1])


def _map_rows(v, fn):
    """``fn`` on a per-row tensor, or on every tensor of a list of tuples (cached keys/values); None stays None."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        return fn(v)
    if hasattr(v, "map_rows"):                    # a TokenCache
        return v.map_rows(fn)
    return [tuple(fn(t) for t in pair) for pair in v]


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
    kv: Optional[list] = None       # reuse_text_kv: the decoder's cross-attention (k, v) per block of y
    kv_null: Optional[list] = None  # ... and of y_null
    cfg_residual: Optional[torch.Tensor] = None  # cfg_refresh > 1: (N, L, Dd) z_uncond - z_cond at the last refresh
    revealed: Optional[torch.Tensor] = None      # (N, L) bool, the positions the last step revealed
    enc_cache: Optional[object] = None           # token_refresh > 1: the encoder's / decoder's TokenCache
    dec_cache: Optional[object] = None
    kv_both: Optional[list] = None      # [kv; kv_null] concatenated once per state (rebuilt after select / repeat)

    _ROWS = ("tokens", "mask", "orders", "y", "y_null", "y_pad", "y_null_pad", "kv", "kv_null", "cfg_residual",
             "revealed", "enc_cache", "dec_cache")

    def select(self, idx: torch.Tensor) -> "DecodeState":
        return DecodeState(*[_map_rows(getattr(self, f), lambda t: t[idx]) for f in self._ROWS])

    def repeat(self, k: int) -> "DecodeState":
        rep = (lambda t: t.repeat(k, *([1] * (t.dim() - 1))))
        return DecodeState(*[_map_rows(getattr(self, f), rep) for f in self._ROWS])


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

    def guided_at(self, step: int) -> bool:
        """Whether ``step`` uses CFG: every step, or the first ``ceil(cfg_until * num_iter)`` with ``cfg_until``
        (guidance in a limited interval, Kynkaanniemi et al. arXiv 2404.07724, here over the AR steps)."""
        c = self.config
        return self.guided and (c.cfg_until >= 1.0 or step < math.ceil(c.cfg_until * c.num_iter))

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
        shared_null = False        # reuse_text_kv: one null prompt for every row is aligned and projected once
        if self.guided:
            if null_feats is None:
                raise ValueError("classifier-free guidance (cfg != 1) needs the null prompt's text features")
            if null_feats.dim() != 3 or null_feats.shape[0] not in (1, B):
                raise ValueError(f"null_feats must be (1 or {B}, Lt, D), got {tuple(null_feats.shape)}")
            one = (lambda t: t is None or t.shape[0] == 1 or t.stride(0) == 0)  # one row, or one row expanded
            shared_null = self.config.reuse_text_kv and one(null_feats) and one(null_padding_mask)
            if shared_null:
                null_feats = null_feats[:1]
                null_padding_mask = None if null_padding_mask is None else null_padding_mask[:1]
            elif null_feats.shape[0] == 1:
                null_feats = null_feats.expand(B, -1, -1)
                if null_padding_mask is not None:
                    null_padding_mask = null_padding_mask.expand(B, -1)
        if orders is not None and tuple(orders.shape) != (B, mc.seq_len):
            raise ValueError(f"orders must be ({B}, {mc.seq_len}), got {tuple(orders.shape)}")
        y_null = kv = kv_null = None
        with self.config.autocast(dev):
            y = m.forward_text_aligner(text_feats, text_padding_mask)
            y, text_padding_mask = m.extend_text_condition(y, text_padding_mask, "cond")        # soft tokens, if any
            if self.guided:
                y_null = m.forward_text_aligner(null_feats, null_padding_mask)
                y_null, null_padding_mask = m.extend_text_condition(y_null, null_padding_mask, "uncond")
            if self.config.reuse_text_kv:
                kv = m.decoder_text_kv(y)
                if self.guided:
                    kv_null = m.decoder_text_kv(y_null)
        if shared_null:                                          # (1, ...) -> (B, ...) views
            y_null, kv_null = y_null.expand(B, -1, -1), _map_rows(kv_null, lambda t: t.expand(B, *t.shape[1:]))
            if null_padding_mask is not None:
                null_padding_mask = null_padding_mask.expand(B, -1)
        if orders is None:
            orders = sample_orders(B, mc.seq_len, generator=generator, device=dev)
        tokens = torch.zeros(B, mc.seq_len, mc.token_dim, device=dev, dtype=m.z_proj.weight.dtype)  # model dtype
        mask = torch.ones(B, mc.seq_len, dtype=torch.bool, device=dev)
        return DecodeState(tokens, mask, orders.to(dev), y, y_null, text_padding_mask,
                           null_padding_mask if self.guided else None, kv, kv_null)

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
        if cfg.reuse_text_kv and st.kv is None:                  # a state built elsewhere (e.g. concatenated)
            st.kv = m.decoder_text_kv(st.y)
            st.kv_null = m.decoder_text_kv(st.y_null) if self.guided else None
        guided = self.guided_at(step)
        cfg_iter = cfg_at(cfg.cfg, cfg.cfg_schedule, mask_len, L) if guided else 1.0
        if cfg.token_refresh > 1:
            return self._decode_token_cached(st, step, mask_to_pred, guided), mask_to_pred, mask_next, cfg_iter
        h = m.forward_encoder(st.tokens, st.mask)
        if guided and cfg.cfg_refresh > 1:
            z_sel = self._decode_cfg_cached(st, h, step, mask_to_pred)
        elif guided:
            z_sel = self._decode_both(st, h, mask_to_pred)
        else:
            z_sel = decode_rows(m, h, st.mask, st.y, st.y_pad, mask_to_pred, y_kv=st.kv)
        return z_sel, mask_to_pred, mask_next, cfg_iter

    def _decode_both(self, st: DecodeState, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Decoder outputs at ``rows`` (N, L) bool for both CFG halves as one batch: [cond rows; uncond rows]."""
        m, pad = self.model, self._pad_both(st)
        if st.kv is None:
            return decode_rows(m, torch.cat([h, h]), torch.cat([st.mask, st.mask]), torch.cat([st.y, st.y_null]), pad,
                               torch.cat([rows, rows]))
        return decode_rows(m, torch.cat([h, h]), torch.cat([st.mask, st.mask]), None, pad, torch.cat([rows, rows]),
                           y_kv=self._kv_both(st))

    @staticmethod
    def _pad_both(st: DecodeState) -> Optional[torch.Tensor]:
        """The text padding masks of both CFG halves, [cond; uncond] rows (None when neither half has one)."""
        if st.y_pad is None and st.y_null_pad is None:
            return None
        return torch.cat([st.y_pad if st.y_pad is not None else torch.zeros_like(st.y_null_pad),
                          st.y_null_pad if st.y_null_pad is not None else torch.zeros_like(st.y_pad)])

    def _window(self, st: DecodeState, step: int, mask_to_pred: torch.Tensor) -> torch.Tensor:
        """(N, L) bool: the positions revealed in this step and the next ``cfg_refresh - 1`` ones."""
        cfg, L = self.config, self.model.config.seq_len
        rem = int(st.mask[0].sum())                            # positions still masked after the window
        for s in range(step, min(step + cfg.cfg_refresh, cfg.num_iter)):
            rem = 0 if s >= cfg.num_iter - 1 else mask_len_after(s, cfg.num_iter, L, rem)
        return (st.mask & ~mask_by_order(rem, st.orders) if rem > 0 else st.mask.clone()) | mask_to_pred

    @staticmethod
    def _kv_both(st: DecodeState) -> Optional[list]:
        """The decoder's text keys / values of both CFG halves, [cond; uncond] rows, concatenated once per state."""
        if st.kv is None:
            return None
        if st.kv_both is None:
            st.kv_both = [(torch.cat([kc, ku]), torch.cat([vc, vu])) for (kc, vc), (ku, vu) in zip(st.kv, st.kv_null)]
        return st.kv_both

    def _decode_token_cached(self, st: DecodeState, step: int, mask_to_pred: torch.Tensor,
                             guided: bool) -> torch.Tensor:
        """Encoder and decoder through LazyMAR's token cache (:class:`~dream.models.layers.TokenCache`,
        arXiv 2503.12450): every ``token_refresh``-th step (and with no cache) every token is computed; in between
        the tokens revealed at the last step and those revealed now, plus the ``token_ratio`` share of the others
        whose shallow features moved most. Combines with ``cfg_refresh`` (its refresh steps then recompute every
        token of both halves) and ``reuse_text_kv``. Approximate: quality measured in ``bench_fast_sampling.py``."""
        from dream.models.layers import TokenCache

        m, cfg, mc = self.model, self.config, self.model.config
        N, buf = st.mask.shape[0], mc.buffer_size
        new = lambda: TokenCache(cfg.token_full_blocks, cfg.token_ratio)     # noqa: E731
        st.enc_cache, st.dec_cache = st.enc_cache or new(), st.dec_cache or new()
        both = guided and (cfg.cfg_refresh == 1 or st.cfg_residual is None or step % cfg.cfg_refresh == 0)
        refresh = st.revealed is None or step % cfg.token_refresh == 0 or (both and cfg.cfg_refresh > 1)
        nobuf = torch.zeros(N, buf, dtype=torch.bool, device=st.mask.device)
        prev = st.revealed if st.revealed is not None else torch.zeros_like(st.mask)
        h = m.forward_encoder_cached(st.tokens, st.mask, st.enc_cache, must=torch.cat([nobuf, prev], 1),
                                     refresh=refresh)
        want = self._window(st, step, mask_to_pred) if both and cfg.cfg_refresh > 1 else mask_to_pred
        r = int(want[0].sum())
        rows = torch.argsort((~want).to(torch.int8), dim=1, stable=True)[:, :r]    # (N, r) ascending positions
        must = torch.cat([nobuf, prev | want], 1)
        if both:
            kv = self._kv_both(st)
            two = (lambda t: torch.cat([t, t]))                                 # noqa: E731
            z = m.forward_decoder_cached(two(h), two(st.mask), None if kv else torch.cat([st.y, st.y_null]),
                                         self._pad_both(st), two(rows), st.dec_cache, must=two(must),
                                         refresh=refresh, y_kv=kv)
            if cfg.cfg_refresh == 1:
                return z.reshape(2 * N * r, -1)
            st.dec_cache = st.dec_cache.map_rows(lambda t: t[:N])              # the conditional half goes on
            return self._keep_residual(st, z.reshape(2 * N * r, -1), want, mask_to_pred)
        if st.dec_cache.states is not None and st.dec_cache.states[0].shape[0] == 2 * N:   # guidance just ended
            st.dec_cache = st.dec_cache.map_rows(lambda t: t[:N])
        zc = m.forward_decoder_cached(h, st.mask, None if st.kv else st.y, st.y_pad, rows, st.dec_cache, must=must,
                                      refresh=refresh, y_kv=st.kv).reshape(N * r, -1)
        if not guided:
            return zc
        return torch.cat([zc, zc + st.cfg_residual[mask_to_pred].to(zc.dtype)])

    def _decode_cfg_cached(self, st: DecodeState, h: torch.Tensor, step: int, mask_to_pred: torch.Tensor):
        """LazyMAR's condition cache (arXiv 2503.12450): the difference between the unconditional and the
        conditional decoder outputs changes little from one step to the next. Every ``cfg_refresh``-th step (and
        whenever there is no cache) both halves run, for the positions revealed in this step and the next
        ``cfg_refresh - 1`` ones, and their difference is cached; the steps in between run the conditional half
        only and add the cached difference. Approximate: quality measured in ``bench_fast_sampling.py``."""
        m, cfg = self.model, self.config
        if st.cfg_residual is not None and step % cfg.cfg_refresh:
            zc = decode_rows(m, h, st.mask, st.y, st.y_pad, mask_to_pred, y_kv=st.kv)
            return torch.cat([zc, zc + st.cfg_residual[mask_to_pred].to(zc.dtype)])
        window = self._window(st, step, mask_to_pred)
        return self._keep_residual(st, self._decode_both(st, h, window), window, mask_to_pred)

    @staticmethod
    def _keep_residual(st: DecodeState, z: torch.Tensor, window: torch.Tensor, mask_to_pred: torch.Tensor):
        """Cache z_uncond - z_cond of the ``window`` rows (z: [cond; uncond] rows, row-major) and return the rows of
        this step's positions, [cond; uncond]."""
        zc, zu = z.chunk(2)
        res = torch.zeros(*st.mask.shape, z.shape[-1], device=z.device, dtype=z.dtype)
        res[window] = zu - zc
        st.cfg_residual = res
        sel = mask_to_pred[window]                              # this step's rows among the window's (row-major)
        return torch.cat([zc[sel], zu[sel]])

    @torch.no_grad()
    def step(self, st: DecodeState, step: int, *, generator=None, noise_fn=None) -> DecodeState:
        """One AR step in place: reveal this step's tokens."""
        with self.config.autocast(st.tokens.device):
            z_sel, mask_to_pred, mask_next, cfg_iter = self.condition(st, step)
            x = self.token_sampler.sample(z_sel, cfg=cfg_iter, temperature=self.config.temperature,
                                          generator=generator, noise_fn=noise_fn)
        tokens = st.tokens.clone()
        tokens[mask_to_pred] = x.to(tokens.dtype)
        if self.config.token_refresh > 1:
            st.revealed = mask_to_pred
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
