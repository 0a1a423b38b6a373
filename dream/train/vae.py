"""Train a small KL autoencoder (the project's :class:`~dream.models.autoencoder.AutoencoderKL`) as a DREAM tokenizer.

DREAM, like MAR, models continuous VAE latents rather than pixels. On ShapesWorld no pretrained VAE exists, so
this trains one from scratch: L1 + MSE reconstruction plus a small KL term (``kl_weight`` per latent element),
AdamW with warmup + cosine decay, a wall-clock budget, atomic checkpoints and exact resume. At the end it
measures the latents' mean and standard deviation on held-out images and writes a :class:`VAETokenizer`
folder (``shift_factor`` / ``scaling_factor`` chosen so tokens have zero mean and unit variance, the role of
SD's 0.18215), a reconstruction grid and a loss curve.

    dream train-vae --config configs/vae_shapes.yaml --out runs/vae_shapes
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from dream.utils.config import ConfigBase

if TYPE_CHECKING:
    from dream.utils.run_logger import RunLogger

log = logging.getLogger("dream.train.vae")

# A ShapesWorld tokenizer: stride 8 (32x32 images -> 4x4 latents), 16 channels, p=1 -> 16 tokens of 16 dims.
SHAPES_VAE = {"latent_channels": 16, "block_out_channels": [16, 32, 64, 64], "layers_per_block": 1,
              "norm_num_groups": 8, "patch_size": 1, "sample_size": 32}


@dataclass(frozen=True)
class VAETrainConfig(ConfigBase):
    vae: dict = field(default_factory=lambda: dict(SHAPES_VAE))   # VAEConfig fields
    shapes: dict = field(default_factory=dict)                    # ShapesConfig overrides
    image_size: int = 32
    batch_size: int = 64
    steps: int = 4000
    minutes: Optional[float] = None          # wall-clock budget: stops early, everything is still written
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-4                  # on the per-element mean KL (reconstruction is a per-pixel mean)
    fg_weight: float = 4.0                   # extra weight on non-background pixels (objects are ~10 % of them)
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    num_stat_images: int = 2048              # held-out images for the latent statistics


def vae_loss(vae, images: torch.Tensor, cfg: VAETrainConfig, generator: torch.Generator) -> dict:
    """Weighted L1 + MSE reconstruction of a posterior sample, plus ``kl_weight`` x per-element KL."""
    post = vae.encode(images)
    rec = vae.decode(post.sample(generator))
    w = 1.0 + cfg.fg_weight * (images.amax(dim=1, keepdim=True) > -0.9).float()   # background is black (-1)
    w = w / w.mean()
    l1 = ((rec - images).abs() * w).mean()
    mse = ((rec - images).pow(2) * w).mean()
    kl = post.kl().mean() / post.mean[0].numel()
    loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
    return {"loss": loss, "l1": l1.detach(), "mse": mse.detach(), "kl": kl.detach()}


class VAETrainer:
    """Runs a :class:`VAETrainConfig` into a folder: ``checkpoint-*.pt``, ``metrics.jsonl``, ``loss.png``,
    ``recon.png`` and the tokenizer folder ``tokenizer/`` (usable as ``dream train --tokenizer``); the scalars and
    ``recon.png`` also go to TensorBoard / W&B through :class:`~dream.utils.run_logger.RunLogger` (options ``log_to``)."""

    def __init__(self, cfg: VAETrainConfig, out, resume: bool = False, log_to: Optional[dict] = None):
        from dream.data.shapes import ShapesConfig, ShapesWorld
        from dream.models.autoencoder import AutoencoderKL, VAEConfig

        self.cfg, self.out = cfg, Path(out)
        self.log_to = dict(log_to) if log_to is not None else {"tensorboard": "auto"}
        self.out.mkdir(parents=True, exist_ok=True)
        from .checkpoint import clean_stale_temp_files

        clean_stale_temp_files(self.out)
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.vcfg = VAEConfig.from_dict({**cfg.vae, "scaling_factor": 1.0, "shift_factor": 0.0})
        if cfg.image_size % (self.vcfg.stride * self.vcfg.patch_size):
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of the VAE stride x patch "
                             f"({self.vcfg.stride} x {self.vcfg.patch_size})")
        self.vae = AutoencoderKL(self.vcfg)
        self.opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                     weight_decay=cfg.weight_decay)
        self.world = ShapesWorld(ShapesConfig.from_dict({"image_size": cfg.image_size, **cfg.shapes}))
        self.step, self.history = 0, []
        self.prior_s, self._t0 = 0.0, time.time()      # training seconds of earlier invocations (resume)
        if resume:
            self.resume()

    def lr_at(self, step: int) -> float:
        from .optim import warmup_cosine_lr

        c = self.cfg
        return warmup_cosine_lr(step, c.lr, c.min_lr, c.warmup_steps, c.steps)

    def images(self, k: int, split: str = "train") -> torch.Tensor:
        """Batch ``k`` of the split: a pure function of ``k`` (exact resume)."""
        first = k * self.cfg.batch_size
        imgs, _, _ = self.world.batch(range(first, first + self.cfg.batch_size), split)
        return imgs.float() / 127.5 - 1.0 if imgs.dtype == torch.uint8 else imgs

    # ---- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"vae": self.vae.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                "rng_gen": self.gen.get_state(), "rng_torch": torch.get_rng_state(),
                "config": json.loads(json.dumps(self.cfg.to_dict())), "history": self.history,
                "train_s": self.prior_s + time.time() - self._t0}

    def save(self) -> Path:
        from .checkpoint import save_checkpoint

        return save_checkpoint(self.state(), self.out, self.step, keep=2)

    def _check_resumable(self, st: dict, path: Path) -> None:
        from .checkpoint import require_state

        require_state(st, ("vae", "optimizer", "step", "rng_gen", "rng_torch"), self.vae, "vae", path)

    def resume(self) -> None:
        """Continue from the newest checkpoint that loads (newer broken ones are skipped with a warning)."""
        from .checkpoint import load_resumable, restore_loop_state

        path, st = load_resumable(self.out, self._check_resumable)
        self.vae.load_state_dict(st["vae"])
        restore_loop_state(self, st)
        log.info("resumed from %s at step %d", path, self.step)

    # ---- training ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        from dream.utils.run_logger import RunLogger

        with RunLogger(self.out, config=self.cfg.to_dict(), resume_step=self.step or None, **self.log_to) as rl:
            res = self._fit(rl)
            rl.log_image(self.step, "recon", self.out / "recon.png")
        return res

    def _fit(self, rl: "RunLogger") -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        t0 = self._t0 = time.time()
        deadline = t0 + cfg.minutes * 60 if cfg.minutes else None
        self.vae.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="vae", dynamic_ncols=True)
        window: dict = {}
        stopped_early = False
        while self.step < cfg.steps:
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step)
            out = vae_loss(self.vae, self.images(self.step), cfg, self.gen)
            self.opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            gn = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), cfg.grad_clip)
            self.opt.step()
            self.step += 1
            for k, v in out.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            window["grad_norm"] = window.get("grad_norm", 0.0) + float(gn)
            window["n"] = window.get("n", 0) + 1
            out_of_time = deadline is not None and time.time() >= deadline
            if self.step % cfg.log_every == 0 or self.step == cfg.steps or out_of_time:
                n = window.pop("n")
                stats = {k: v / n for k, v in window.items()}
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(f"non-finite VAE loss at or before step {self.step}")
                stats.update(step=self.step, lr=self.opt.param_groups[0]["lr"], elapsed_s=time.time() - t0)
                self.history.append(stats)
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(stats) + "\n")
                rl.log_scalars(self.step, {k: v for k, v in stats.items() if k != "step"})
                bar.set_postfix(l1=f"{stats['l1']:.4f}", kl=f"{stats['kl']:.2f}")
                window = {}
            bar.update(1)
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.save()
            if out_of_time:
                stopped_early = True
                break
        bar.close()
        self.save()
        res = self.export()
        res.update(steps=self.step, wall_s=time.time() - t0, train_s_total=self.prior_s + time.time() - t0,
                   stopped_early=stopped_early)
        (self.out / "vae_training.json").write_text(json.dumps(res, indent=2))
        return res

    @torch.no_grad()
    def export(self) -> dict:
        """Latent statistics on held-out images -> scaled tokenizer folder; reconstruction grid and metrics."""
        from dream.models.tokenizers import VAETokenizer, estimate_latent_scale
        from dream.utils.images import save_grid
        from dream.utils.plots import plot_loss_curves

        self.vae.eval()
        n = self.cfg.num_stat_images
        imgs, _, metas = self.world.batch(range(n), "val")
        x = imgs.float() / 127.5 - 1.0 if imgs.dtype == torch.uint8 else imgs
        batches = [x[i:i + 256] for i in range(0, n, 256)]
        shift = float(torch.cat([self.vae.encode(b).mode() for b in batches]).mean())
        scale = estimate_latent_scale(self.vae, batches, shift, generator=torch.Generator().manual_seed(0))
        vcfg = dataclasses.replace(self.vcfg, shift_factor=shift, scaling_factor=scale)
        tok = VAETokenizer(self.vae, vcfg)
        tok.save_pretrained(self.out / "tokenizer")
        rec = torch.cat([tok.decode(tok.encode(b, sample=False)) for b in batches])
        rec = rec.clamp(-1, 1)
        from dream.eval.compositional import Verifier

        ver = Verifier(self.world.config)
        score = ver.score(rec, metas, details=False)
        res = {"recon_l1": float((rec - x).abs().mean()), "recon_mse": float((rec - x).pow(2).mean()),
               "psnr_db": float(10 * torch.log10(4.0 / (rec - x).pow(2).mean())),
               "verifier_question_accuracy_on_recon": score["question_accuracy"],
               "verifier_prompt_accuracy_on_recon": score["prompt_accuracy"],
               "shift_factor": shift, "scaling_factor": scale,
               "params": sum(p.numel() for p in self.vae.parameters())}
        save_grid(torch.cat([x[:16], rec[:16]]), None, self.out / "recon.png", ncol=16)
        plot_loss_curves(self.history, self.out / "loss.png", keys=("loss", "l1", "kl"), title="VAE training")
        self.vae.train()
        return res
