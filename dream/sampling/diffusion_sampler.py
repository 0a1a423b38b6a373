"""Fast token sampling with the diffusion head: respaced DDPM (official) or DDIM.

The hot path of generation: every AR step samples its revealed tokens through ``S`` denoising steps.
Compared with a generic loop it (1) embeds the condition once per call, (2) embeds the ``S``
timesteps once per sampler, (3) keeps the schedule as precomputed float32 scalars (no per-step
gathers or allocations of index tensors), and (4) runs only the conditional half of the CFG state
(the unconditional half of the official state is computed and discarded). Results equal the official
``DiffLoss.sample`` (same float32 arithmetic, same noise order when the noise is replayed).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from dream.diffusion import GaussianDiffusion, create_diffusion

NoiseFn = Callable[[tuple], torch.Tensor]


class TokenDiffusionSampler:
    """Samples tokens x (N, C) given conditions z from ``net`` (a ``SimpleMLPAdaLN``)."""

    def __init__(self, net, num_sampling_steps: str = "100", noise_schedule: str = "cosine",
                 diffusion_steps: int = 1000, method: str = "ddpm", eta: float = 0.0):
        if method not in ("ddpm", "ddim"):
            raise ValueError(f"unknown diffusion sampler {method!r} (ddpm | ddim)")
        self.net = net
        self.method = method
        self.eta = eta
        self.diffusion: GaussianDiffusion = create_diffusion(num_sampling_steps, noise_schedule, diffusion_steps)
        self._tables: dict = {}

    @property
    def num_steps(self) -> int:
        return self.diffusion.num_timesteps

    def _coeffs(self, device):
        key = ("coeffs", device)
        if key not in self._tables:
            d = self.diffusion
            names = ("posterior_log_variance_clipped", "log_betas", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
                     "alphas_cumprod", "alphas_cumprod_prev")
            self._tables[key] = {n: getattr(d, n).float().to(device) for n in names}
        return self._tables[key]

    def _time_embeddings(self, device, dtype):
        # recomputed whenever the net's weights may have changed (keyed on the parameter version)
        w = self.net.time_embed.mlp[0].weight
        key = ("temb", device, dtype, w._version, id(w))
        if key not in self._tables:
            for k in [k for k in self._tables if k[0] == "temb"]:
                del self._tables[k]
            t = self.diffusion.timestep_map.to(device)
            with torch.no_grad():
                self._tables[key] = self.net.time_embed(t)  # (S, W)
        return self._tables[key]

    @torch.no_grad()
    def sample(self, z: torch.Tensor, *, cfg: float = 1.0, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None, noise_fn: Optional[NoiseFn] = None) -> torch.Tensor:
        """Sample tokens for conditions ``z``.

        Args:
            z: (N, Dz) conditions; with guidance (cfg != 1) z is (2n, Dz) = [cond; uncond] and n tokens
               are returned.
            noise_fn: replays noise with the official call shapes (initial (n, C), then (rows, C) per step).
        """
        net = self.net
        C = net.in_channels
        guided = cfg != 1.0
        n = z.shape[0] // 2 if guided else z.shape[0]
        rows = z.shape[0]

        def draw(shape):
            if noise_fn is not None:
                return noise_fn(shape).to(device=z.device, dtype=torch.float32)
            return torch.randn(shape, generator=generator, device=z.device, dtype=torch.float32)

        x = draw((n, C))                                              # shared by both CFG halves
        c_emb = net.cond_embed(z)                                     # (rows, W), once per call
        temb = self._time_embeddings(z.device, c_emb.dtype)
        co = self._coeffs(z.device)
        for i in reversed(range(self.num_steps)):
            y = temb[i] + c_emb
            out = net.forward_cond(torch.cat([x, x]) if guided else x, y).float()
            eps, v = out[:n, :C], out[:n, C:]
            if guided:
                eps = out[n:, :C] + cfg * (eps - out[n:, :C])
            if self.method == "ddpm":
                frac = (v + 1) / 2
                log_var = frac * co["log_betas"][i] + (1 - frac) * co["posterior_log_variance_clipped"][i]
                x0 = co["sqrt_recip_alphas_cumprod"][i] * x - co["sqrt_recipm1_alphas_cumprod"][i] * eps
                mean = co["posterior_mean_coef1"][i] * x0 + co["posterior_mean_coef2"][i] * x
                noise = draw((rows, C))[:n]
                x = mean + torch.exp(0.5 * log_var) * noise * temperature if i > 0 else mean
            else:
                abar, abar_prev = co["alphas_cumprod"][i], co["alphas_cumprod_prev"][i]
                x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
                sigma = self.eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
                x = x0 * abar_prev.sqrt() + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
                if i > 0 and self.eta > 0:
                    x = x + sigma * draw((rows, C))[:n] * temperature
        return x
