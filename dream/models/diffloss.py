"""Diffusion head: ``SimpleMLPAdaLN`` denoiser and the per-token diffusion loss (MAR, arXiv 2406.11838).

The denoiser maps a noisy token x_t (N, C), its timestep t (N,) on the original 0..T-1 scale and
the decoder condition c (N, Dz) to ``[eps, v]`` (N, 2C). Re-implemented from the spec
(``mar_diffusion_spec.md`` §8); state-dict names follow the official checkpoints
(``time_embed.mlp.{0,2}``, ``cond_embed``, ``input_proj``, ``res_blocks.{j}``, ``final_layer``).

Init (documented as in DiT): xavier-uniform Linear weights, zero biases; the time-embedding MLP
weights N(0, 0.02); every adaLN modulation and the final linear layer zero, so the head outputs 0
at initialisation.

Training-speed notes (same function, fewer passes): SiLU(y) is computed once and shared by every
adaLN modulation (each block's ``adaLN_modulation[0]`` is that SiLU; ``forward_silu`` takes it
precomputed), and the timestep embedding runs per distinct timestep on CPU (see
:meth:`TimestepEmbedder.forward`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dream.diffusion import GaussianDiffusion, create_diffusion
from dream.utils import rng


def _affine_params(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of an affine layer: a plain ``nn.Linear``'s own tensors; for anything else that acts as an
    affine map (e.g. a Linear wrapped by a LoRA adapter, in eval mode) the effective ones, read off its outputs
    on the zero vector and the unit vectors, so fused paths see what ``forward`` computes."""
    if type(m) is nn.Linear:
        bias = m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=m.weight.dtype,
                                                              device=m.weight.device)
        return m.weight, bias
    p = next(m.parameters())
    n_in = m.in_features if hasattr(m, "in_features") else p.shape[-1]
    with torch.no_grad():
        probe = torch.cat([torch.zeros(1, n_in), torch.eye(n_in)]).to(device=p.device, dtype=p.dtype)
        out = m(probe)                                               # (1 + n_in, n_out)
        bias = out[0]
        return (out[1:] - bias).T.contiguous(), bias


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding ([cos, sin], 256 frequencies, max period 10000) -> Linear-SiLU-Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.dedup_min_rows = 2048  # above this many rows, embed each distinct timestep once
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (N,) -> (N, hidden). On CPU with many rows (training: N = 4 x masked tokens, t in 0..999),
        the MLP runs once per distinct timestep and the rows are gathered: the same values (up to GEMM
        rounding), ~10x fewer FLOPs. On CUDA the direct path avoids ``unique``'s host sync."""
        if t.device.type == "cpu" and t.dim() == 1 and t.numel() > self.dedup_min_rows \
                and not t.is_floating_point():
            uniq, inverse = torch.unique(t, return_inverse=True)
            return torch.index_select(self.mlp(self._freqs(uniq)), 0, inverse)
        return self.mlp(self._freqs(t))

    def _freqs(self, t: torch.Tensor) -> torch.Tensor:
        """The float32 sinusoid (as the official code computes it), in the MLP's dtype."""
        return self.sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype)


class ResBlock(nn.Module):
    """h + gate * MLP(modulate(LN(h), shift, scale)), (shift, scale, gate) from SiLU(y)."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x, y):
        return self.forward_silu(x, self.adaLN_modulation[0](y))

    def forward_silu(self, x, silu_y):
        """Same as ``forward`` with SiLU(y) precomputed (shared by every block of the net)."""
        shift, scale, gate = self.adaLN_modulation[1](silu_y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x, y):
        return self.forward_silu(x, self.adaLN_modulation[0](y))

    def forward_silu(self, x, silu_y):
        shift, scale = self.adaLN_modulation[1](silu_y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """AdaLN residual MLP denoiser used as the per-token diffusion head."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.grad_checkpointing = grad_checkpointing
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for blk in self.res_blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_cond(self, x, y):
        """Run the trunk given a precomputed conditioning vector y = time_embed(t) + cond_embed(c)."""
        x = self.input_proj(x)
        sy = F.silu(y)  # SiLU(y) once for every adaLN modulation (each block's adaLN_modulation[0])
        for blk in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk.forward_silu, x, sy, use_reentrant=False)
            else:
                x = blk.forward_silu(x, sy)
        return self.final_layer.forward_silu(x, sy)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (N, C) noisy tokens, t (N,) original-scale timesteps, c (N, Dz) -> (N, out). An attached
        ``time_condition`` module (t -> (N, Dz), e.g. a soft-token time table) is added to c first."""
        tc = self._modules.get("time_condition")
        if tc is not None:
            c = c + tc(t).to(c.dtype)
        return self.forward_cond(x, self.time_embed(t) + self.cond_embed(c))

    # ------------------------------------------------------------------------------------------
    # fused sampling path (used by dream.sampling.diffusion_sampler; same function as ``forward``)
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fused_params(self, timesteps: torch.Tensor, device: torch.device, dtype: torch.dtype) -> dict:
        """Weights for :meth:`fused_forward`, cast once to the compute ``dtype``: every block's Linear weights,
        all adaLN projections concatenated into one (the ``+1`` of ``1 + scale`` folded into its bias) and the
        time embeddings of ``timesteps`` (S,) (the original-scale steps a sampler visits)."""
        cast = (lambda x: None if x is None else x.detach().to(device=device, dtype=dtype))
        W = self.input_proj.out_features
        blocks = []
        for b in self.res_blocks:
            w1, b1 = _affine_params(b.mlp[0])
            w2, b2 = _affine_params(b.mlp[2])
            blocks.append((cast(b.in_ln.weight), cast(b.in_ln.bias), cast(w1), cast(b1), cast(w2), cast(b2)))
        ada_w, ada_b = [], []
        for m in [b.adaLN_modulation[-1] for b in self.res_blocks] + [self.final_layer.adaLN_modulation[-1]]:
            w, bias = _affine_params(m)
            bias = bias.detach().double().clone()
            bias[W: 2 * W] += 1.0                      # (shift, scale + 1[, gate])
            ada_w.append(w.detach())
            ada_b.append(bias.to(w.dtype))
        te = self.time_embed                           # (S, W) in the net's own dtype (float32 normally)
        temb = te.mlp(te.sinusoid(timesteps.to(device), te.freq_dim).to(te.mlp[0].weight.dtype)).float()
        tc = self._modules.get("time_condition")
        if tc is not None:   # cond_embed(z + d(t)) = cond_embed(z) + W_c d(t): a per-step shift of the time embedding
            w_c = _affine_params(self.cond_embed)[0]
            temb = temb + F.linear(tc(timesteps.to(device)).to(w_c.dtype), w_c).float()
        return {"W": W,
                "cond": tuple(cast(v) for v in _affine_params(self.cond_embed)),
                "inp": tuple(cast(v) for v in _affine_params(self.input_proj)),
                "blocks": blocks,
                "final": tuple(cast(v) for v in _affine_params(self.final_layer.linear)),
                "ada": (cast(torch.cat(ada_w)), cast(torch.cat(ada_b))),
                "temb": temb.to(dtype),
                "eps": self.res_blocks[0].in_ln.eps if len(self.res_blocks) else 1e-6,
                "eps_final": self.final_layer.norm_final.eps}

    @staticmethod
    def fused_modulations(params: dict, c_emb: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """adaLN outputs for steps lo..hi given ``c_emb = cond_embed(z)`` (rows, W):
        (hi - lo + 1, rows, (3 depth + 2) W) in the compute dtype."""
        y = params["temb"][lo: hi + 1, None, :] + c_emb[None]       # (s, rows, W)
        return F.linear(F.silu(y), *params["ada"])

    @staticmethod
    def fused_forward(x: torch.Tensor, mods: torch.Tensor, params: dict, duplicate: bool = False) -> torch.Tensor:
        """The net given one step's precomputed modulations: x (n, C) -> out (rows, 2C). ``duplicate``: the rows
        are [cond; uncond] halves sharing ``x`` (CFG), so the input projection runs once for both."""
        W = params["W"]
        m = mods.split(W, dim=-1)                                    # shift, scale+1, gate per block; final 2
        h = F.linear(x, *params["inp"])                              # (n, W)
        if duplicate:
            h = torch.cat([h, h])                                    # (rows, W)
        eps = params["eps"]
        for j, (lw, lb, w1, b1, w2, b2) in enumerate(params["blocks"]):
            a = F.layer_norm(h, (W,), lw, lb, eps)
            a = torch.addcmul(m[3 * j], a, m[3 * j + 1])            # LN(h) * (1 + scale) + shift
            a = F.linear(F.silu(F.linear(a, w1, b1)), w2, b2)
            h = torch.addcmul(h, m[3 * j + 2], a)                    # h + gate * mlp
        k = 3 * len(params["blocks"])
        a = torch.addcmul(m[k], F.layer_norm(h, (W,), None, None, params["eps_final"]), m[k + 1])
        return F.linear(a, *params["final"])

    def forward_with_cfg(self, x, t, c, cfg_scale: float):
        """Classifier-free guidance on eps: rows [cond; uncond] share the first half of ``x``."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


class DiffLoss(nn.Module):
    """Per-token diffusion loss around a :class:`SimpleMLPAdaLN` (``net``).

    Holds the training diffusion (all T steps). Sampling lives in :mod:`dream.sampling`.
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, diffusion_steps: int = 1000,
                 noise_schedule: str = "cosine", grad_checkpointing: bool = False):
        super().__init__()
        self.token_dim = token_dim
        self.net = SimpleMLPAdaLN(token_dim, width, token_dim * 2, cond_dim, depth, grad_checkpointing)
        self.train_diffusion: GaussianDiffusion = create_diffusion("", noise_schedule, diffusion_steps)

    def forward(self, target: torch.Tensor, z: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
                t: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, return_terms: bool = False):
        """Hybrid eps-MSE + VLB loss, averaged over rows with ``weight`` (e.g. the mask) as weights.

        Args:
            target: (N, C) clean tokens; z: (N, Dz) conditions; weight: (N,) row weights or None.
            t, noise: fixed timesteps (N,) and noise (N, C); drawn with ``generator`` when None.
        """
        n = target.shape[0]
        if t is None:
            t = rng.randint(self.train_diffusion.num_timesteps, (n,), generator, target.device)
        if noise is None:
            noise = rng.randn(target.shape, generator, target.device, target.dtype)
        terms = self.train_diffusion.training_losses(self.net, target, t, noise, c=z)
        loss = terms["loss"]
        if weight is None:
            out = loss.mean()
        else:
            out = (loss * weight).sum() / weight.sum()
        return (out, terms) if return_terms else out
