"""Fast token sampling with the diffusion head: respaced DDPM (official), DDIM or DPM-Solver++(2M).

The hot path of generation: every AR step samples its revealed tokens through ``S`` denoising steps
(64 AR steps x 100 diffusion steps = 6,400 small MLP calls per image batch). The official loop pays
~1.2 ms of per-call overhead for each of them. This sampler computes the same samples
(``DiffLoss.sample`` of MAR arXiv 2406.11838, re-implemented from ``mar_diffusion_spec.md``) with:

1. **Hoisted conditioning.** The adaLN modulations ``SiLU(t_emb[i] + cond_embed(z)) W_ada`` of every
   block depend on the step and the condition only, not on ``x``. They are computed for a chunk of steps
   at once as one large GEMM (all blocks' adaLN weights concatenated, the ``+1`` of ``1 + scale`` folded
   into the bias) instead of 4 small GEMMs per step. The timestep embeddings are computed once per
   sampler, the condition embedding once per call.
2. **Few ops per step.** The step itself is input projection, 3 x (LayerNorm, ``addcmul`` modulation,
   Linear, SiLU, Linear, ``addcmul`` gate), final LayerNorm/modulation/Linear and a fused update with
   per-step coefficients precomputed in float64 as Python scalars; no index tensors, no gathers, no
   host-device syncs inside the step loop. Only the conditional half of the CFG state is carried (the
   official unconditional half is computed and discarded); its input projection is shared.
3. **Mixed precision.** Under ``torch.autocast`` the MLP runs in the autocast dtype with weights cast
   once (cached until a parameter changes), while the diffusion arithmetic (CFG combination, mean,
   variance, noise update) stays in float32.
4. **Optional ``torch.compile``** of the per-step function (``compile=True``); ``compile="reduce-overhead"``
   additionally captures CUDA graphs. NOTE: the CUDA-graph mode is untested on GPU in this project.

Noise is drawn exactly as the official loop draws it (initial ``(n, C)``, then ``(rows, C)`` per step,
the unconditional half unused), so a seeded generator or a replayed noise tape gives the official
samples up to float32 rounding (see ``dream check-parity``).

Few-step solvers (approximate: a different sampler of the same model, quality measured in
``benchmarks/bench_fast_sampling.py``): ``dpm++2m`` is DPM-Solver++(2M) (Lu et al., arXiv 2211.01095), the
multistep second-order solver of the probability-flow ODE in data (x0) prediction, so ``clip_denoised`` is its
thresholding; ``dpm++2m-sde`` is its SDE counterpart (SDE-DPM-Solver++(2M), same paper), which injects fresh
noise every step like DDPM (``temperature`` scales that noise; the ODE solvers, like DDIM with eta = 0,
inject none). Both run on the respaced steps (``num_sampling_steps``) and return the data prediction of the
last one. DDIM: Song et al., arXiv 2010.02502.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from dream.diffusion import GaussianDiffusion, create_diffusion
from dream.utils import rng

NoiseFn = Callable[[tuple], torch.Tensor]
METHODS = ("ddpm", "ddim", "dpm++2m", "dpm++2m-sde")
COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune")


@contextlib.contextmanager
def intra_op_threads(n: Optional[int]):
    """Temporarily lower torch's intra-op CPU threads to ``n`` (no-op for None or n >= current)."""
    cur = torch.get_num_threads()
    if n is None or n >= cur:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(cur)


class TokenDiffusionSampler:
    """Samples tokens x (n, C) given conditions z from ``net`` (a ``SimpleMLPAdaLN``).

    Args:
        net: the diffusion MLP (``model.diffloss.net``).
        num_sampling_steps: respacing of the training diffusion ("100", "25", "ddim10", ...).
        noise_schedule, diffusion_steps: the training diffusion (cosine, 1000).
        method: ``ddpm`` (official ancestral sampling), ``ddim``, ``dpm++2m`` or ``dpm++2m-sde`` (module docstring).
            eta: DDIM noise (0 = deterministic).
        compile: False (eager), True / a ``torch.compile`` mode to compile the per-step function (``ddpm`` only).
            Dynamic row counts are handled by dynamo's automatic dynamic shapes (at most ~2 compilations
            per guidance setting). ``"reduce-overhead"`` uses CUDA graphs (GPU only; untested here).
        chunk_bytes: memory budget of the precomputed adaLN modulations per chunk of steps.
        clip_denoised: clamp the predicted x0 to [-c, c] at every step (IDDPM ``clip_denoised``). None =
            official (no clipping). Useful for bounded tokens (raw pixels in [-1, 1]): an under-trained
            head's small eps errors at t ~ T are amplified by 1/sqrt(abar_T) ~ 2e4 and blow the sample up.
        loop_threads: intra-op CPU threads inside the step loop (None = unchanged). The per-step ops are
            small (tens of rows), so extra threads gain little, and on a CPU shared with other
            processes every parallel region can wait for a descheduled thread: with 2 threads on a
            loaded 2-core machine one 100-step call was measured 30x slower than with 1. The batched
            adaLN precomputation keeps all threads.
    """

    def __init__(self, net, num_sampling_steps: str = "100", noise_schedule: str = "cosine",
                 diffusion_steps: int = 1000, method: str = "ddpm", eta: float = 0.0, *,
                 compile: Union[bool, str] = False, chunk_bytes: int = 32 << 20,
                 loop_threads: Optional[int] = None, clip_denoised: Optional[float] = None):
        if method not in METHODS:
            raise ValueError(f"unknown diffusion sampler {method!r} ({' | '.join(METHODS)})")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        if eta < 0:
            raise ValueError(f"ddim eta must be >= 0, got {eta}")
        for name in ("time_embed", "cond_embed", "input_proj", "res_blocks", "final_layer"):
            if not hasattr(net, name):
                raise TypeError(f"net must be a SimpleMLPAdaLN (missing {name!r}), got {type(net).__name__}")
        self.net = net
        self.method = method
        self.eta = float(eta)
        self.compile = compile
        self.chunk_bytes = int(chunk_bytes)
        if loop_threads is not None and loop_threads < 1:
            raise ValueError(f"loop_threads must be >= 1 or None, got {loop_threads}")
        self.loop_threads = loop_threads
        if clip_denoised is not None and clip_denoised <= 0:
            raise ValueError(f"clip_denoised must be > 0 or None, got {clip_denoised}")
        self.clip_denoised = clip_denoised
        self.diffusion: GaussianDiffusion = create_diffusion(num_sampling_steps, noise_schedule, diffusion_steps)
        self._coefs = self._step_coefficients()
        self._cache: dict = {}
        self._compiled: dict = {}

    @property
    def num_steps(self) -> int:
        return self.diffusion.num_timesteps

    # ------------------------------------------------------------------------------------------
    # precomputation
    # ------------------------------------------------------------------------------------------
    def _step_coefficients(self) -> list[tuple[float, ...]]:
        """Per step i (float64 -> Python float; the official code casts each gathered value to float32):

        ddpm: (r, rm1, c1, c2, a, b) with x0 = r x - rm1 eps, mean = c1 x0 + c2 x and
              std = exp(0.5 log_var) = exp(a + b v), a = (lb + lp) / 4, b = (lb - lp) / 4
              (log_var = frac lb + (1 - frac) lp, frac = (v + 1) / 2).
        ddim: (x0 = (x - s1 eps) / sa, x = x0 sap + s2 eps + sigma noise): (s1, sa, sap, s2, sigma).
        dpm++2m(-sde): see :meth:`_dpm_coefficients`."""
        if self.method.startswith("dpm"):
            return self._dpm_coefficients()
        d = self.diffusion
        f32 = (lambda t: t.float().double())  # the official float32 value of each table entry
        out = []
        for i in range(d.num_timesteps):
            if self.method == "ddpm":
                lb, lp = float(f32(d.log_betas[i])), float(f32(d.posterior_log_variance_clipped[i]))
                out.append((float(f32(d.sqrt_recip_alphas_cumprod[i])), float(f32(d.sqrt_recipm1_alphas_cumprod[i])),
                            float(f32(d.posterior_mean_coef1[i])), float(f32(d.posterior_mean_coef2[i])),
                            0.25 * (lb + lp), 0.25 * (lb - lp)))
            else:
                abar, prev = float(f32(d.alphas_cumprod[i])), float(f32(d.alphas_cumprod_prev[i]))
                sigma = self.eta * math.sqrt((1 - prev) / (1 - abar)) * math.sqrt(max(1 - abar / prev, 0.0))
                out.append((math.sqrt(1 - abar), math.sqrt(abar), math.sqrt(prev),
                            math.sqrt(max(1 - prev - sigma ** 2, 0.0)), sigma))
        return out

    def _dpm_coefficients(self) -> list[tuple[float, ...]]:
        """Per step i (moving from the respaced step i to i - 1), float64 -> Python floats:
        (1 / alpha_s, sigma_s / alpha_s, a_x, a_d, a_c, s_z) with the data prediction x0 = x / alpha_s - (sigma_s /
        alpha_s) eps and x_next = a_x x + a_d x0 + a_c (x0 - x0_prev) + s_z noise.

        With lambda = log(alpha / sigma) and h = lambda_t - lambda_s (arXiv 2211.01095, eqs. for the 2M solvers):
        ODE a_x = sigma_t / sigma_s, a_d = alpha_t (1 - e^-h); SDE a_x = (sigma_t / sigma_s) e^-h,
        a_d = alpha_t (1 - e^-2h), s_z = sigma_t sqrt(1 - e^-2h). The second-order term uses the previous data
        prediction: a_c = a_d / (2 r), r = h_prev / h; 0 at the first step and on the step into the last one (first
        order there, "lower order final": on the cosine schedule that step's h is several times the previous one and
        the extrapolation is unstable). Step 0 returns x0 (coefficients unused)."""
        abar = self.diffusion.alphas_cumprod
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        lam = (alpha / sigma).log()
        sde = self.method.endswith("sde")
        out, h_prev = [], None
        for i in range(self.num_steps - 1, -1, -1):
            a_s, s_s = float(alpha[i]), float(sigma[i])
            if i == 0:
                out.append((1.0 / a_s, s_s / a_s, 0.0, 0.0, 0.0, 0.0))
                break
            a_t, s_t = float(alpha[i - 1]), float(sigma[i - 1])
            h = float(lam[i - 1] - lam[i])
            if sde:
                a_x, a_d = s_t / s_s * math.exp(-h), -a_t * math.expm1(-2 * h)
                s_z = s_t * math.sqrt(-math.expm1(-2 * h))
            else:
                a_x, a_d, s_z = s_t / s_s, -a_t * math.expm1(-h), 0.0
            a_c = 0.0 if h_prev is None or i == 1 else a_d * h / (2 * h_prev)   # first order into the last step
            out.append((1.0 / a_s, s_s / a_s, a_x, a_d, a_c, s_z))
            h_prev = h
        return out[::-1]                                             # indexed by step i

    def _coef_tensors(self, device: torch.device) -> list[torch.Tensor]:
        key = ("coefs", device)
        if key not in self._cache:
            self._cache[key] = list(torch.tensor(self._coefs, dtype=torch.float32, device=device).unbind(0))
        return self._cache[key]

    def _weights(self, device: torch.device, dtype: torch.dtype) -> dict:
        """The net's fused parameters (:meth:`SimpleMLPAdaLN.fused_params`) for this sampler's timesteps,
        cached until a parameter of the net changes (keyed on parameter versions)."""
        params = list(self.net.parameters())
        key = (device, dtype, tuple((id(p), p._version) for p in params))
        hit = self._cache.get((device, dtype))
        if hit is not None and hit["key"] == key:
            return hit
        entry = {"key": key, **self.net.fused_params(self.diffusion.timestep_map, device, dtype)}
        self._cache[(device, dtype)] = entry
        return entry

    @staticmethod
    def _ddpm_update(out: torch.Tensor, x: torch.Tensor, noise: Optional[torch.Tensor], n: int, C: int,
                     guided: bool, cfg: float, co: tuple, temperature: float,
                     clip: Optional[float] = None) -> torch.Tensor:
        """Float32 ancestral step from the net output (rows, 2C); noise None at the last step."""
        r, rm1, c1, c2, a, b = co
        eps = out[:n, :C]
        if guided:
            un = out[n:, :C]
            eps = torch.add(un, eps - un, alpha=cfg)                 # uncond + cfg (cond - uncond)
        x0 = torch.sub(x * r, eps, alpha=rm1)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        mean = torch.add(x0 * c1, x, alpha=c2)
        if noise is None:
            return mean
        std = out[:n, C:].mul(b).add_(a).exp_()                     # exp(0.5 log_var), float32
        return torch.addcmul(mean, std, noise[:n], value=temperature)

    def _compiled_step(self, guided: bool, wt: dict, C: int) -> Callable:
        """``torch.compile``d step (x, mods, noise, coefs, cfg, tmul) -> next x, all tensor arguments
        (Python floats would be specialised per step). ``tmul`` = temperature, 0 at the last step."""
        key = (guided, id(wt))
        fn = self._compiled.get(key)
        if fn is None:
            self._compiled.clear()  # the weights changed: drop stale graphs
            trunk = self.net.fused_forward

            def step(x, mods, noise, co, cfg, tmul):
                n = x.shape[0]
                out = trunk(x.to(mods.dtype), mods, wt, guided).float()
                eps = out[:n, :C]
                if guided:
                    eps = out[n:, :C] + cfg * (eps - out[n:, :C])
                mean = co[2] * (co[0] * x - co[1] * eps) + co[3] * x
                std = torch.exp(co[4] + co[5] * out[:n, C:])
                return mean + std * noise[:n] * tmul

            mode = None if self.compile in (True, "default") else self.compile
            fn = torch.compile(step, mode=mode, dynamic=None)
            self._compiled[key] = fn
        return fn

    # ------------------------------------------------------------------------------------------
    # sampling
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, z: torch.Tensor, *, cfg: float = 1.0, temperature: float = 1.0,
               generator: Optional[torch.Generator] = None, noise_fn: Optional[NoiseFn] = None) -> torch.Tensor:
        """Sample tokens for conditions ``z``.

        Args:
            z: (N, Dz) conditions; with guidance (cfg != 1) z is (2n, Dz) = [cond; uncond] and n tokens
               are returned, else N.
            cfg: guidance scale on eps. temperature: scales the per-step noise only.
            generator: RNG for the noise (ignored when ``noise_fn`` is given).
            noise_fn: replays noise with the official call shapes (initial (n, C), then (rows, C) per step).
        Returns:
            x: (n, C) float32 tokens.
        """
        if z.dim() != 2:
            raise ValueError(f"conditions z must be (N, Dz), got {tuple(z.shape)}")
        net = self.net
        C = net.in_channels
        guided = cfg != 1.0
        rows = z.shape[0]
        if guided and rows % 2:
            raise ValueError(f"with guidance z must hold [cond; uncond] rows (even count), got {rows}")
        n = rows // 2 if guided else rows
        dev = z.device
        if rows == 0:
            return torch.zeros(0, C, device=dev)

        # float32 diffusion arithmetic (official), float64 throughout for a float64 net (reference runs)
        base = torch.float64 if self.net.input_proj.weight.dtype == torch.float64 else torch.float32

        def draw(shape):
            if noise_fn is not None:
                return noise_fn(shape).to(device=dev, dtype=base)
            return rng.randn(shape, generator, dev, base)

        amp = torch.is_autocast_enabled(dev.type)
        cd = torch.get_autocast_dtype(dev.type) if amp else base
        x = draw((n, C))                                                 # shared by both CFG halves
        with torch.autocast(dev.type, enabled=False) if amp else contextlib.nullcontext():
            wt = self._weights(dev, cd)
            c_emb = F.linear(z.to(cd), *wt["cond"])                      # (rows, W), once per call
            if self.method == "ddim":
                return self._sample_ddim(x, c_emb, wt, n, C, guided, cfg, temperature, draw)
            if self.method != "ddpm":
                return self._sample_dpm(x, c_emb, wt, n, C, guided, cfg, temperature, draw)
            S = self.num_steps
            per_step = rows * (wt["ada"][0].shape[0]) * c_emb.element_size()
            chunk = max(1, min(S, self.chunk_bytes // max(per_step, 1)))
            compiled = bool(self.compile) and self.clip_denoised is None
            if compiled:
                fn = self._compiled_step(guided, wt, C)
                co_t = self._coef_tensors(dev)
                cfg_t = torch.tensor(float(cfg), device=dev)
                tmul = (torch.tensor(float(temperature), device=dev), torch.zeros((), device=dev))
            for hi in range(S - 1, -1, -chunk):
                lo = max(0, hi - chunk + 1)
                mods = self.net.fused_modulations(wt, c_emb, lo, hi)                 # (hi - lo + 1, rows, 11 W)
                with intra_op_threads(self.loop_threads if dev.type == "cpu" else None):
                    for i in range(hi, lo - 1, -1):
                        noise = draw((rows, C))                           # official: drawn at every step
                        if compiled:
                            x = fn(x, mods[i - lo], noise, co_t[i], cfg_t, tmul[i == 0])
                        else:
                            out = self.net.fused_forward(x.to(cd), mods[i - lo], wt, guided).to(base)
                            x = self._ddpm_update(out, x, noise if i > 0 else None, n, C, guided, float(cfg),
                                                  self._coefs[i], float(temperature), self.clip_denoised)
        return x

    def _sample_ddim(self, x, c_emb, wt, n, C, guided, cfg, temperature, draw):
        S = self.num_steps
        for i in reversed(range(S)):
            mods = self.net.fused_modulations(wt, c_emb, i, i)[0]
            out = self.net.fused_forward(x.to(mods.dtype), mods, wt, guided).to(x.dtype)
            eps = out[:n, :C]
            if guided:
                eps = torch.add(out[n:, :C], eps - out[n:, :C], alpha=cfg)
            s1, sa, sap, s2, sigma = self._coefs[i]
            x0 = (x - s1 * eps) / sa
            if self.clip_denoised is not None:
                x0 = x0.clamp(-self.clip_denoised, self.clip_denoised)
                eps = (x - sa * x0) / s1 if s1 > 0 else eps
            x = x0 * sap + s2 * eps
            if i > 0 and self.eta > 0:
                x = x + sigma * draw((2 * n if guided else n, C))[:n] * temperature
        return x

    def _sample_dpm(self, x, c_emb, wt, n, C, guided, cfg, temperature, draw):
        """DPM-Solver++(2M) / SDE-DPM-Solver++(2M) on the respaced steps (coefficients: :meth:`_dpm_coefficients`)."""
        S, clip, prev = self.num_steps, self.clip_denoised, None
        dev = x.device
        per_step = c_emb.shape[0] * wt["ada"][0].shape[0] * c_emb.element_size()
        chunk = max(1, min(S, self.chunk_bytes // max(per_step, 1)))
        for hi in range(S - 1, -1, -chunk):
            lo = max(0, hi - chunk + 1)
            mods = self.net.fused_modulations(wt, c_emb, lo, hi)
            with intra_op_threads(self.loop_threads if dev.type == "cpu" else None):
                for i in range(hi, lo - 1, -1):
                    out = self.net.fused_forward(x.to(mods.dtype), mods[i - lo], wt, guided).to(x.dtype)
                    eps = out[:n, :C]
                    if guided:
                        eps = torch.add(out[n:, :C], eps - out[n:, :C], alpha=cfg)
                    ra, sa, a_x, a_d, a_c, s_z = self._coefs[i]
                    x0 = torch.sub(x * ra, eps, alpha=sa)
                    if clip is not None:
                        x0 = x0.clamp(-clip, clip)
                    if i == 0:
                        return x0
                    nxt = torch.add(x * a_x, x0, alpha=a_d)
                    if prev is not None and a_c:
                        nxt = nxt.add_(x0 - prev, alpha=a_c)
                    if s_z:
                        nxt = nxt.add_(draw((n, C)), alpha=s_z * temperature)
                    x, prev = nxt, x0
        return x
