"""Gaussian diffusion: cosine schedule, respacing, hybrid eps-MSE + VLB loss, DDPM/DDIM sampling.

Conventions (as in IDDPM / MAR): eps-prediction, learned-range variance (the net outputs
``[eps, v]`` with ``frac = (v + 1) / 2`` interpolating log beta and the clipped log posterior
variance), no clipping of x0. Schedule arrays are kept in float64 and gathered values are cast to
float32, which is what the official code does (numpy float64 arrays, ``.float()`` after gather).

A respaced diffusion keeps a ``timestep_map``: the net always receives timesteps on the original
0..T-1 scale.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from dream.utils import rng

NoiseFn = Callable[[tuple], torch.Tensor]


# -----------------------------------------------------------------------------------------------
# Schedules
# -----------------------------------------------------------------------------------------------
def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal cosine schedule, float64: beta_i = min(1 - abar((i+1)/T)/abar(i/T), max_beta)."""

    def abar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64, device="cpu")


def linear_betas(num_steps: int = 1000) -> torch.Tensor:
    scale = 1000 / num_steps
    return torch.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=torch.float64, device="cpu")


_RESPACING_FORMS = "a positive step count ('100'), 'ddimN' with N >= 1, or comma-separated section counts ('10,20,30')"


def check_respacing(spec: Union[str, int, Sequence[int], None]) -> None:
    """Raise ValueError unless ``spec`` is a timestep respacing (``num_sampling_steps``) that keeps at least one
    step: ``"100"``, ``"ddim25"``, ``"10,20,30"``, an int or a list of ints; ``None`` / ``""`` mean the default."""
    if spec is None or spec == "":
        return
    if isinstance(spec, str):
        text = spec.strip()
        parts = [text[len("ddim"):]] if text.startswith("ddim") else text.split(",")
    elif isinstance(spec, (list, tuple)):
        parts = list(spec)
    else:
        parts = [spec]
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            break
        try:
            count = int(part)
        except ValueError:
            break
        if count < 1:
            break
    else:
        return
    raise ValueError(f"num_sampling_steps (timestep respacing) must be {_RESPACING_FORMS}, got {spec!r}")


def space_timesteps(num_steps: int, section_counts: Union[str, int, Sequence[int]]) -> list[int]:
    """Timesteps kept when respacing ``num_steps`` into the given section counts.

    ``"100"`` keeps 100 evenly strided steps (Python ``round``, as IDDPM); ``"ddimN"`` keeps
    ``range(0, T, stride)`` with exactly N elements. A spec that keeps no step (``"0"``) raises ValueError.
    """
    check_respacing(section_counts)
    if isinstance(section_counts, str):
        section_counts = section_counts.strip()
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == want:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"cannot create exactly {want} steps with an integer stride from {num_steps}")
        section_counts = [int(x) for x in section_counts.split(",")] if section_counts else [num_steps]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_steps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


# -----------------------------------------------------------------------------------------------
# Small math helpers
# -----------------------------------------------------------------------------------------------
def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of 8-bit-discretised data in [-1, 1] (bins of 2/255) under a Gaussian."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


# -----------------------------------------------------------------------------------------------
# Diffusion process
# -----------------------------------------------------------------------------------------------
class GaussianDiffusion:
    """Discrete-time Gaussian diffusion with learned-range variance and eps prediction.

    Args:
        betas: float64 (T,) betas of this (possibly respaced) process.
        timestep_map: original timestep of each step (identity when not respaced).
    """

    def __init__(self, betas: torch.Tensor, timestep_map: Optional[Sequence[int]] = None):
        betas = betas.to("cpu", torch.float64)
        if betas.dim() != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D tensor in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = torch.tensor(
            list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map), dtype=torch.long,
            device="cpu")
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]) if len(pv) > 1 else pv)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(betas)
        self._cache: dict = {}

    # -- array access ----------------------------------------------------------------------------
    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device)
        return self._cache[key]

    def _table32(self, name: str, device: torch.device) -> torch.Tensor:
        """float32 copy of a float64 schedule array (cast-then-gather == gather-then-cast, exactly)."""
        key = (name, device, torch.float32)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).float().to(device)
        return self._cache[key]

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gather a float64 schedule array at ``t``, cast to float32, broadcast against ``x``."""
        out = self._table32(name, t.device)[t]
        return out.view(-1, *([1] * (x.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Respaced step index -> original timestep passed to the network."""
        return self._table("timestep_map", t.device)[t]

    # -- forward process -------------------------------------------------------------------------
    def q_sample(self, x_start, t, noise):
        return (self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean(self, x_start, x_t, t):
        return (self._extract("posterior_mean_coef1", t, x_t) * x_start
                + self._extract("posterior_mean_coef2", t, x_t) * x_t)

    # -- reverse process -------------------------------------------------------------------------
    def p_mean_variance(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
        """Mean / log-variance / x0 of p(x_{t-1} | x_t) from the net output ``[eps, v]``."""
        c = x.shape[1]
        if model_output.shape[1] != 2 * c:
            raise ValueError(f"expected a net output of {2 * c} channels (eps + variance), got {model_output.shape[1]}")
        eps, v = model_output[:, :c], model_output[:, c:]
        mean, log_variance, pred_xstart = self._p_mean_variance_parts(eps, v, x, t)
        return mean, log_variance, pred_xstart, eps

    def _p_mean_variance_parts(self, eps: torch.Tensor, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
        min_log = self._extract("posterior_log_variance_clipped", t, x)
        max_log = self._extract("log_betas", t, x)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = (self._extract("sqrt_recip_alphas_cumprod", t, x) * x
                       - self._extract("sqrt_recipm1_alphas_cumprod", t, x) * eps)
        mean = self.q_posterior_mean(pred_xstart, x, t)
        return mean, log_variance, pred_xstart

    def training_losses(self, net: Callable, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                        **net_kwargs) -> dict:
        """Hybrid loss per row: ``mse`` (eps) + ``vb`` (bits, stop-gradient on the mean).

        ``vb`` is the decoder NLL for rows with t = 0 and the KL otherwise. On CPU the NLL is evaluated
        only on the t = 0 rows (about 1 in T); elsewhere on every row with a ``where`` (no host sync)."""
        x_t = self.q_sample(x_start, t, noise)
        out = net(x_t, self.model_timesteps(t), **net_kwargs)
        c = x_start.shape[1]
        if out.shape[1] != 2 * c:
            raise ValueError(f"expected a net output of {2 * c} channels (eps + variance), got {out.shape[1]}")
        eps = out[:, :c]
        mean, log_var, _ = self._p_mean_variance_parts(eps.detach(), out[:, c:], x_t, t)
        true_mean = self.q_posterior_mean(x_start, x_t, t)
        true_log_var = self._extract("posterior_log_variance_clipped", t, x_t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        if x_start.device.type == "cpu":
            first = (t == 0).nonzero(as_tuple=True)[0]
            vb = kl
            if first.numel():
                nll = -_mean_flat(discretized_gaussian_log_likelihood(
                    x_start[first], mean[first], 0.5 * log_var[first])) / math.log(2.0)
                vb = kl.index_put((first,), nll)
        else:
            nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_var)) / math.log(2.0)
            vb = torch.where(t == 0, nll, kl)
        mse = _mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb, "x_t": x_t}

    @torch.no_grad()
    def p_sample_loop(self, net: Callable, noise: torch.Tensor, *, temperature: float = 1.0,
                      noise_fn: Optional[NoiseFn] = None, generator: Optional[torch.Generator] = None,
                      **net_kwargs) -> torch.Tensor:
        """Ancestral DDPM sampling from ``noise`` through every step of this (respaced) process.

        ``temperature`` scales only the per-step noise. ``noise_fn(shape)`` overrides the per-step
        noise source (used to replay recorded noise); otherwise ``torch.randn`` with ``generator``.
        """
        x = noise
        n = x.shape[0]
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((n,), i, device=x.device, dtype=torch.long)
            out = net(x, self.model_timesteps(t), **net_kwargs)
            mean, log_var, _, _ = self.p_mean_variance(out, x, t)
            z = noise_fn(tuple(x.shape)) if noise_fn is not None else \
                rng.randn(x.shape, generator, x.device, x.dtype)
            if i > 0:
                x = mean + torch.exp(0.5 * log_var) * z * temperature
            else:
                x = mean + 0.0 * z  # the official loop draws noise at t = 0 and multiplies it by 0
        return x

    @torch.no_grad()
    def ddim_sample_loop(self, net: Callable, noise: torch.Tensor, *, eta: float = 0.0, temperature: float = 1.0,
                         noise_fn: Optional[NoiseFn] = None, generator: Optional[torch.Generator] = None,
                         **net_kwargs) -> torch.Tensor:
        """DDIM sampling (eta = 0: deterministic) over this process's steps."""
        x = noise
        n = x.shape[0]
        c = x.shape[1]
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((n,), i, device=x.device, dtype=torch.long)
            out = net(x, self.model_timesteps(t), **net_kwargs)
            eps = out[:, :c]
            abar = self._extract("alphas_cumprod", t, x)
            abar_prev = self._extract("alphas_cumprod_prev", t, x)
            x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
            sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
            mean = x0 * abar_prev.sqrt() + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
            if i > 0 and eta > 0:
                z = noise_fn(tuple(x.shape)) if noise_fn is not None else \
                    rng.randn(x.shape, generator, x.device, x.dtype)
                x = mean + sigma * z * temperature
            else:
                x = mean
        return x


def create_diffusion(timestep_respacing: Union[str, int, None] = "", noise_schedule: str = "cosine",
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
    """Build the training ("" = all steps) or sampling (e.g. "100", "ddim25") diffusion."""
    if noise_schedule == "cosine":
        base = cosine_betas(diffusion_steps)
    elif noise_schedule == "linear":
        base = linear_betas(diffusion_steps)
    else:
        raise ValueError(f"unknown noise schedule {noise_schedule!r} (cosine | linear)")
    if timestep_respacing in (None, "", diffusion_steps, str(diffusion_steps)):
        return GaussianDiffusion(base)
    keep = space_timesteps(diffusion_steps, timestep_respacing)
    abar = torch.cumprod(1.0 - base, 0)
    new_betas, last, tmap = [], 1.0, []
    keep_set = set(keep)
    for i in range(diffusion_steps):
        if i in keep_set:
            new_betas.append(1 - abar[i].item() / last)
            last = abar[i].item()
            tmap.append(i)
    return GaussianDiffusion(torch.tensor(new_betas, dtype=torch.float64, device="cpu"), tmap)
