"""Masking Warmup, random generation orders and token masks.

DREAM (arXiv 2603.02667) trains one encoder with a contrastive loss (which wants few masked tokens) and a
masked generative loss (which wants many). *Masking Warmup* resolves this by drawing the mask ratio from a
truncated normal whose mean moves over training:

    r ~ TruncNormal(loc = mu(e), scale = sigma, bounds [lo, hi])
    mu(e) = mu0 + (mu1 - mu0) * shape(clip((e - e0) / (e1 - e0), 0, 1))

with e the fractional epoch. The official recipe (``scripts/train_dream.sh``) is mu 0 -> 1 linearly over
epochs 0-36 of 48, sigma = 0.45, fixed bounds [0, 1], one ratio per GPU batch. The number of masked tokens is
``ceil(L * r)``; the masked positions are the first ones of a per-sample random permutation (the "order").

Re-implemented from the specification (``dream_spec.md`` section 4); the official code draws with
``scipy.stats.truncnorm`` and a numpy shuffle loop, here every draw uses a ``torch.Generator`` (inverse CDF
of the truncated normal in float64), so the *distribution* matches but not the individual numbers.
Masks are ``bool`` with ``True`` = masked.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

import torch

from dream.utils.config import ConfigBase

__all__ = [
    "MaskingWarmupConfig",
    "MaskingWarmup",
    "MaskDraw",
    "num_masked",
    "sample_orders",
    "mask_from_orders",
    "mask_by_order",
    "truncated_normal",
]

_SHAPES = ("linear", "cosine")
_BOUNDS = ("fixed", "moving")
_GRANULARITIES = ("batch", "sample")


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskingWarmupConfig(ConfigBase):
    """Mask-ratio schedule.

    Attributes:
        mu_start: mean of the truncated normal before the warmup (mu0).
        mu_end: mean after the warmup (mu1).
        warmup_start: epoch at which the mean starts moving (e0; official flag ``masking_warmup``).
        warmup_end: epoch at which the mean reaches ``mu_end`` (e1; ``masking_warmup_end``).
        total_epochs: length of training, informational (used by presets and ``describe``).
        std: scale sigma of the truncated normal. ``0`` gives a point mass at ``clip(mu, lo, hi)``.
        shape: ``"linear"`` (official) or ``"cosine"`` (half-cosine ease-in-out) progress curve.
        bounds: ``"fixed"`` truncation to ``[low, high]`` (official) or ``"moving"``:
            ``[mu - bound_k * std, mu + bound_k * std]`` intersected with ``[low, high]``.
        low: lower truncation bound (fixed mode) / outer clip (moving mode).
        high: upper truncation bound (fixed mode) / outer clip (moving mode).
        bound_k: half-width of the moving bounds in units of ``std``.
        granularity: ``"batch"`` (one ratio per forward / GPU batch, official) or ``"sample"``.
        steps_per_epoch: optional; lets callers pass progress in optimizer steps (``step=``).
    """

    mu_start: float = 0.0
    mu_end: float = 1.0
    warmup_start: float = 0.0
    warmup_end: float = 36.0
    total_epochs: float = 48.0
    std: float = 0.45
    shape: str = "linear"
    bounds: str = "fixed"
    low: float = 0.0
    high: float = 1.0
    bound_k: float = 1.0
    granularity: str = "batch"
    steps_per_epoch: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shape not in _SHAPES:
            raise ValueError(f"MaskingWarmupConfig.shape must be one of {_SHAPES}, got {self.shape!r}")
        if self.bounds not in _BOUNDS:
            raise ValueError(f"MaskingWarmupConfig.bounds must be one of {_BOUNDS}, got {self.bounds!r}")
        if self.granularity not in _GRANULARITIES:
            raise ValueError(
                f"MaskingWarmupConfig.granularity must be one of {_GRANULARITIES}, got {self.granularity!r}"
            )
        if not (0.0 <= self.low < self.high <= 1.0):
            raise ValueError(f"mask-ratio bounds must satisfy 0 <= low < high <= 1, got [{self.low}, {self.high}]")
        if not (self.std >= 0.0 and math.isfinite(self.std)):
            raise ValueError(f"MaskingWarmupConfig.std must be a finite value >= 0, got {self.std}")
        if self.bound_k <= 0:
            raise ValueError(f"MaskingWarmupConfig.bound_k must be > 0, got {self.bound_k}")
        if self.warmup_end < self.warmup_start:
            raise ValueError(
                f"warmup_end ({self.warmup_end}) must be >= warmup_start ({self.warmup_start})"
            )
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be a positive int, got {self.steps_per_epoch}")

    # ----- presets -------------------------------------------------------------------------------------
    @classmethod
    def dream(cls, **overrides: Any) -> "MaskingWarmupConfig":
        """Official DREAM recipe: TN(mu(e), 0.45) on [0, 1], mu 0 -> 1 over epochs 0-36 of 48, per batch."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def fluid(cls, **overrides: Any) -> "MaskingWarmupConfig":
        """FLUID / MAR masking: constant TN(1.0, 0.25) on [0.7, 1.0] (E[r] = 0.867)."""
        base = cls(mu_start=1.0, mu_end=1.0, warmup_start=0.0, warmup_end=0.0, std=0.25, low=0.7, high=1.0)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def never(cls, **overrides: Any) -> "MaskingWarmupConfig":
        """No masking (ratio 0 at every step): the CLIP-only baseline."""
        base = cls(mu_start=0.0, mu_end=0.0, warmup_start=0.0, warmup_end=0.0, std=0.0)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def constant(cls, ratio: float, **overrides: Any) -> "MaskingWarmupConfig":
        """A fixed mask ratio ``ratio`` at every step."""
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"constant mask ratio must be in [0, 1], got {ratio}")
        base = cls(mu_start=ratio, mu_end=ratio, warmup_start=0.0, warmup_end=0.0, std=0.0)
        return dataclasses.replace(base, **overrides)


# --------------------------------------------------------------------------------------------------------
# Truncated normal sampling (torch, float64, inverse CDF)
# --------------------------------------------------------------------------------------------------------
_TAIL_LOG_MASS = -700.0  # exp() of this is near float64 underflow: use the exponential tail form


def _as_f64(x: Union[float, torch.Tensor], device=None) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64, device=device)


def truncated_normal(
    loc: Union[float, torch.Tensor],
    scale: Union[float, torch.Tensor],
    low: Union[float, torch.Tensor],
    high: Union[float, torch.Tensor],
    shape: tuple = (),
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Draw from ``N(loc, scale^2)`` truncated to ``[low, high]`` by inverse CDF (float64, CPU/generator device).

    The bounds are mirrored so that most of the mass lies on the lower side, where the log-CDF keeps relative
    precision; when even that underflows (standardized bounds beyond about -37) an exponential-tail
    approximation of the same distribution is used. ``scale == 0`` returns ``clip(loc, low, high)``.

    Args:
        loc, scale, low, high: distribution parameters (floats or tensors broadcastable to ``shape``).
        shape: output shape.
        generator: optional ``torch.Generator``; draws happen on its device.

    Returns:
        float64 tensor of ``shape`` with values in ``[low, high]``.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    loc, scale = _as_f64(loc, device), _as_f64(scale, device)
    low, high = _as_f64(low, device), _as_f64(high, device)
    if bool((scale < 0).any()) or bool((low > high).any()):
        raise ValueError("truncated_normal needs scale >= 0 and low <= high")
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=device)
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    a = (low - loc) / safe_scale
    b = (high - loc) / safe_scale
    # Mirror so that a <= 0 or both bounds are in the lower tail: x = sign * z with z in [a', b'].
    flip = (a + b) > 0
    a2 = torch.where(flip, -b, a)
    b2 = torch.where(flip, -a, b)
    sign = torch.where(flip, -torch.ones_like(a), torch.ones_like(a))
    # NOTE: torch.special.ndtr loses relative precision below z ~ -5 (it underflows at -8.5); log_ndtr and
    # ndtri are accurate, so the CDF is handled in log space: p = Phi(a) (1 - u) + Phi(b) u.
    la, lb = torch.special.log_ndtr(a2), torch.special.log_ndtr(b2)
    log_p = lb + torch.log(u + (1.0 - u) * torch.exp(la - lb))
    z = torch.special.ndtri(torch.exp(log_p))
    # Far lower tail (Phi(b') underflows): density ~ exp(|b'| (z - b')) on [a', b'], a truncated exponential.
    rate = (-b2).clamp(min=1.0)
    width = (b2 - a2) * rate
    e = -torch.log1p(-u * (-torch.expm1(-width)))
    z = torch.where(lb < _TAIL_LOG_MASS, b2 - e / rate, z)
    z = torch.minimum(torch.maximum(z, a2), b2)
    x = loc + safe_scale * sign * z
    x = torch.where(scale > 0, x, torch.minimum(torch.maximum(loc, low), high))  # point mass if scale == 0
    return torch.minimum(torch.maximum(x, low), high)


def _truncnorm_cdf(x: torch.Tensor, loc: torch.Tensor, scale: float, low: torch.Tensor, high: torch.Tensor):
    """CDF of the truncated normal at ``x`` (float64); step function when ``scale == 0``."""
    if scale == 0:
        return (x >= torch.minimum(torch.maximum(loc, low), high)).to(torch.float64)
    a, b = (low - loc) / scale, (high - loc) / scale
    z = ((x - loc) / scale).clamp(min=a, max=b)
    return (torch.special.ndtr(z) - torch.special.ndtr(a)) / (torch.special.ndtr(b) - torch.special.ndtr(a))


# --------------------------------------------------------------------------------------------------------
# Orders and masks
# --------------------------------------------------------------------------------------------------------
def num_masked(ratio: Union[float, torch.Tensor], seq_len: int) -> Union[int, torch.Tensor]:
    """Number of masked tokens ``ceil(seq_len * ratio)`` (official rule), clamped to ``[0, seq_len]``.

    ``seq_len * ratio`` is rounded to 9 decimals before the ceil so that float fuzz does not add a token
    (``0.07 * 100 = 7.000000000000001`` gives 7), while genuine fractions round up (``0.6 * 16 = 9.6 -> 10``).

    Args:
        ratio: a float, or a tensor of ratios (e.g. one per sample).
        seq_len: number of tokens L.

    Returns:
        ``int`` for a float ratio, a ``LongTensor`` of the same shape for a tensor ratio.
    """
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    # NOTE: the official code has no fuzz guard (np.ceil(L * r)); the two differ only when L*r is within
    # 1e-9 of an integer, which has probability ~0 for continuous draws.
    if isinstance(ratio, torch.Tensor):
        x = ratio.to(torch.float64) * seq_len
        n = torch.ceil(torch.round(x * 1e9) / 1e9)
        return n.clamp(0, seq_len).long()
    x = float(ratio) * seq_len
    return int(min(max(math.ceil(round(x, 9)), 0), seq_len))


def sample_orders(
    batch: int,
    seq_len: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """One uniformly random permutation of ``range(seq_len)`` per row (argsort of uniform noise).

    Args:
        batch: number of rows B.
        seq_len: permutation length L.
        generator: optional ``torch.Generator``; noise is drawn on its device, then moved to ``device``.
        device: output device (defaults to the generator's device, else CPU).

    Returns:
        ``LongTensor`` (B, L).
    """
    gen_device = generator.device if generator is not None else (device or "cpu")
    noise = torch.rand(batch, seq_len, generator=generator, device=gen_device)  # (B, L)
    orders = torch.argsort(noise, dim=1)
    return orders.to(device) if device is not None else orders


def mask_from_orders(orders: torch.Tensor, num_masked: Union[int, torch.Tensor]) -> torch.Tensor:
    """Mask the first ``num_masked`` positions of each order.

    Args:
        orders: ``LongTensor`` (B, L), each row a permutation of ``range(L)``.
        num_masked: an int (same count for every row) or a tensor (B,) of per-row counts.

    Returns:
        ``bool`` tensor (B, L), ``True`` = masked; ``mask[b, orders[b, i]] = i < num_masked[b]``.
    """
    if orders.dim() != 2 or orders.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"orders must be an integer tensor (B, L), got {tuple(orders.shape)} {orders.dtype}")
    bsz, seq_len = orders.shape
    n = torch.as_tensor(num_masked, device=orders.device).long().reshape(-1)
    if n.numel() not in (1, bsz):
        raise ValueError(f"num_masked must be a scalar or have B={bsz} entries, got {n.numel()}")
    if bool((n < 0).any()) or bool((n > seq_len).any()):
        raise ValueError(f"num_masked must be in [0, {seq_len}], got {n.tolist()}")
    in_order = torch.arange(seq_len, device=orders.device)[None, :] < n[:, None]  # (B or 1, L)
    in_order = in_order.expand(bsz, seq_len)
    return torch.zeros(bsz, seq_len, dtype=torch.bool, device=orders.device).scatter(1, orders.long(), in_order)


def mask_by_order(mask_len: Union[int, torch.Tensor], orders: torch.Tensor) -> torch.Tensor:
    """Sampler-side alias of :func:`mask_from_orders` (MAR argument order): first ``mask_len`` masked."""
    return mask_from_orders(orders, mask_len)


class MaskDraw(NamedTuple):
    """Result of :meth:`MaskingWarmup.draw_masks`."""

    mask: torch.Tensor  # (B, L) bool, True = masked
    orders: torch.Tensor  # (B, L) long
    ratio: torch.Tensor  # (B,) float64 sampled ratios
    num_masked: torch.Tensor  # (B,) long


# --------------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------------
class MaskingWarmup:
    """Masking Warmup schedule and sampler.

    Progress is the fractional epoch ``e`` (the trainer passes ``epoch + step_in_epoch / steps_per_epoch``),
    or an optimizer step via ``step=`` when ``config.steps_per_epoch`` is set.

    Example:
        >>> mw = MaskingWarmup(MaskingWarmupConfig.dream())
        >>> g = torch.Generator().manual_seed(0)
        >>> r = mw.ratios(12.5, batch_size=64, generator=g)      # (64,), all equal ("batch" granularity)
        >>> draw = mw.draw_masks(12.5, 64, 256, generator=g)     # draw.mask: (64, 256) bool

    Args:
        config: a :class:`MaskingWarmupConfig` (defaults to the official DREAM recipe).
    """

    def __init__(self, config: Optional[MaskingWarmupConfig] = None) -> None:
        self.config = config if config is not None else MaskingWarmupConfig.dream()
        self.last_epoch: Optional[float] = None
        self.num_draws = 0

    def __repr__(self) -> str:
        return f"MaskingWarmup({self.config})"

    # ----- progress --------------------------------------------------------------------------------------
    def _epoch(self, epoch: Optional[Union[float, torch.Tensor]], step: Optional[Union[int, float]]):
        if (epoch is None) == (step is None):
            raise ValueError("pass exactly one of the fractional epoch `epoch` or `step=`")
        if step is not None:
            if self.config.steps_per_epoch is None:
                raise ValueError("progress in steps needs MaskingWarmupConfig.steps_per_epoch")
            return step / self.config.steps_per_epoch
        return epoch

    def progress(self, epoch=None, *, step=None):
        """Warmup progress ``shape(clip((e - e0) / (e1 - e0), 0, 1))`` in [0, 1] (float or float64 tensor)."""
        e = self._epoch(epoch, step)
        c = self.config
        e_t = _as_f64(e)
        if c.warmup_end > c.warmup_start:
            t = ((e_t - c.warmup_start) / (c.warmup_end - c.warmup_start)).clamp(0.0, 1.0)
        else:  # degenerate warmup: a step at warmup_start
            t = (e_t >= c.warmup_start).to(torch.float64)
        if c.shape == "cosine":
            # NOTE: the official "cosine" option is unused and its exact form unknown; half-cosine ease.
            t = 0.5 * (1.0 - torch.cos(math.pi * t))
        return t if isinstance(e, torch.Tensor) else float(t)

    def mu(self, epoch=None, *, step=None):
        """Mean ``mu(e) = mu0 + (mu1 - mu0) * progress(e)`` (float, or float64 tensor for tensor input)."""
        c = self.config
        t = self.progress(epoch, step=step)
        return c.mu_start + (c.mu_end - c.mu_start) * t

    def bounds(self, epoch=None, *, step=None):
        """Truncation bounds ``(lo, hi)`` at progress ``e`` (floats, or tensors for tensor input)."""
        c = self.config
        if c.bounds == "fixed":
            if isinstance(epoch, torch.Tensor):
                return torch.full_like(epoch, c.low, dtype=torch.float64), torch.full_like(
                    epoch, c.high, dtype=torch.float64
                )
            return c.low, c.high
        mu = _as_f64(self.mu(epoch, step=step))
        half = c.bound_k * c.std
        lo = (mu - half).clamp(c.low, c.high)
        hi = (mu + half).clamp(c.low, c.high)
        if isinstance(epoch, torch.Tensor):
            return lo, hi
        return float(lo), float(hi)

    # ----- distribution ----------------------------------------------------------------------------------
    def cdf(self, x, epoch=None, *, step=None) -> torch.Tensor:
        """``P(r <= x)`` at progress ``e`` (exact, float64)."""
        mu = _as_f64(self.mu(epoch, step=step))
        lo, hi = (_as_f64(v) for v in self.bounds(epoch, step=step))
        return _truncnorm_cdf(_as_f64(x), mu, self.config.std, lo, hi)

    def mean(self, epoch=None, *, step=None) -> float:
        """``E[r]`` at progress ``e`` (exact truncated-normal mean)."""
        mu = float(self.mu(epoch, step=step))
        lo, hi = (float(v) for v in self.bounds(epoch, step=step))
        s = self.config.std
        if s == 0:
            return min(max(mu, lo), hi)
        a, b = _as_f64((lo - mu) / s), _as_f64((hi - mu) / s)
        pdf = lambda z: torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # noqa: E731
        mass = torch.special.ndtr(b) - torch.special.ndtr(a)
        return float(mu + s * (pdf(a) - pdf(b)) / mass)

    # ----- sampling --------------------------------------------------------------------------------------
    def sample(self, epoch=None, n: Optional[int] = None, generator: Optional[torch.Generator] = None, *, step=None):
        """Independent mask-ratio draws at progress ``e`` (granularity-agnostic).

        Args:
            epoch: fractional epoch e (or pass ``step=``).
            n: number of draws; ``None`` gives a 0-dim tensor.
            generator: optional ``torch.Generator``.

        Returns:
            float64 tensor, shape ``()`` or ``(n,)``, values in the truncation bounds.
        """
        e = self._epoch(epoch, step)
        mu = self.mu(e)
        lo, hi = self.bounds(e)
        shape = () if n is None else (int(n),)
        r = truncated_normal(mu, self.config.std, lo, hi, shape, generator=generator)
        self.last_epoch = float(e)
        self.num_draws += 1 if n is None else int(n)
        return r

    def ratios(self, epoch=None, batch_size: int = 1, generator: Optional[torch.Generator] = None, *, step=None):
        """Per-sample mask ratios for one forward, following ``config.granularity``.

        ``"batch"``: one draw shared by all rows (official); ``"sample"``: one draw per row.

        Returns:
            float64 tensor (batch_size,).
        """
        if self.config.granularity == "batch":
            return self.sample(epoch, None, generator, step=step).expand(batch_size).clone()
        return self.sample(epoch, batch_size, generator, step=step)

    def draw_masks(
        self,
        epoch=None,
        batch_size: int = 1,
        seq_len: int = 256,
        generator: Optional[torch.Generator] = None,
        device: Optional[Union[str, torch.device]] = None,
        *,
        step=None,
    ) -> MaskDraw:
        """Ratios -> ``ceil(L * r)`` -> random orders -> mask, all with ``generator``.

        Returns:
            :class:`MaskDraw` with ``mask`` (B, L) bool on ``device``, ``orders`` (B, L), ``ratio`` (B,),
            ``num_masked`` (B,).
        """
        ratio = self.ratios(epoch, batch_size, generator, step=step)
        n = num_masked(ratio, seq_len)
        orders = sample_orders(batch_size, seq_len, generator=generator, device=device)
        mask = mask_from_orders(orders, n.to(orders.device))
        return MaskDraw(mask=mask, orders=orders, ratio=ratio, num_masked=n)

    # ----- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Config and counters (JSON-friendly)."""
        return {"config": self.config.to_dict(), "last_epoch": self.last_epoch, "num_draws": self.num_draws}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore counters; with ``strict`` the stored config must equal ``self.config``, else it is adopted."""
        missing = {"config", "last_epoch", "num_draws"} - set(state)
        if missing:
            raise KeyError(f"MaskingWarmup state_dict is missing keys {sorted(missing)}")
        cfg = MaskingWarmupConfig.from_dict(dict(state["config"]))
        if strict and cfg != self.config:
            diff = {
                k: (v, getattr(self.config, k)) for k, v in cfg.to_dict().items() if getattr(self.config, k) != v
            }
            raise ValueError(f"MaskingWarmup config mismatch (stored, current): {diff}")
        self.config = cfg
        self.last_epoch = state["last_epoch"]
        self.num_draws = int(state["num_draws"])
