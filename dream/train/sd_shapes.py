"""Train a small Stable Diffusion model in diffusers' own classes on ShapesWorld (``sd_tiny.shapes``).

The model is a latent diffusion model (Rombach et al., 2022, arXiv 2112.10752) built from stock diffusers /
transformers classes (huggingface/diffusers, huggingface/transformers), so the exported folder loads with
``StableDiffusionPipeline.from_pretrained``:

* ``vae``: the project's ShapesWorld KL-VAE (``shapes_vae``: 32x32 images -> 4x4x16 latents), frozen, exported with
  its latent shift folded into the weights (:func:`dream.models.diffusers_export.vae_to_diffusers`);
* ``text_encoder`` / ``tokenizer``: a small ``CLIPTextModel`` over the CLIP BPE vocabulary (49,408 ids, exported by
  :func:`dream.text.hf_export.export_clip_tokenizer`), trained jointly with the UNet (``train_text_encoder``; off,
  it stays at its seeded random initialisation, "random" text features as in ``dream_tiny.shapes``);
* ``unet``: a ``UNet2DConditionModel`` on the 4x4x16 latents (one down level, cross-attention everywhere);
* ``scheduler``: DPM-Solver++ (Lu et al., arXiv 2211.01095) over the training noise schedule.

Training is DDPM's denoising objective (Ho et al., 2020, arXiv 2006.11239): ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t)
eps`` with ``t`` uniform over the training timesteps, MSE against the scheduler's ``prediction_type`` target (``v =
sqrt(a_t) eps - sqrt(1 - a_t) x_0`` by default, or ``eps``, or ``x_0``); 10 % of captions are
replaced by the empty prompt so classifier-free guidance (Ho & Salimans, arXiv 2207.12598) works; AdamW, warmup +
cosine learning rate, gradient clipping, an EMA of the weights (the exported weights).

Data: the first ``num_images`` images of ShapesWorld's train split are rendered and encoded once into a latent
cache (posterior moments + caption ids, in chunks under ``RUN/latents``); batch ``k`` is a pure function of ``k``
(a seeded permutation per epoch), every random draw comes from one ``torch.Generator`` saved in the checkpoint, so
``--resume`` continues exactly. At the end the EMA weights are exported as a diffusers folder (``RUN/pipeline``),
the guidance scale is chosen on validation prompts, and colour / shape accuracy on held-out single-object prompts
and the GenEval-shapes report are measured on the exported folder (``RUN/sd_training.json``).

    dream train-sd --config configs/sd_tiny_shapes.yaml --out runs/sd_tiny_shapes
    dream train-sd --resume runs/sd_tiny_shapes
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from dream.utils.config import ConfigBase

log = logging.getLogger("dream.train.sd")

__all__ = ["SDTrainConfig", "SDShapesTrainer", "SD_UNET", "SD_TEXT_ENCODER", "single_object_report"]

# UNet2DConditionModel on 4x4x16 latents: 4x4 (64 ch) -> 2x2 (128 ch), cross-attention in every block.
# diffusers' `attention_head_dim` is the number of heads per block here (its documented naming quirk): 32-dim heads.
SD_UNET = {"sample_size": 4, "in_channels": 16, "out_channels": 16, "block_out_channels": [64, 128],
           "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
           "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": [2, 4],
           "norm_num_groups": 32}
# CLIPTextModel over the CLIP BPE vocabulary; the UNet's cross_attention_dim is its hidden_size.
SD_TEXT_ENCODER = {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                   "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
# Training noise: iDDPM's squared-cosine schedule (Nichol & Dhariwal, arXiv 2102.09672; better than the linear ones
# at low resolution) with v-prediction (Salimans & Ho, arXiv 2202.00512): x0 = sqrt(a) x_t - sqrt(1 - a) v stays
# well conditioned where a -> 0 at t -> T, where an epsilon model's x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) blows up.
# clip_sample off: the latents are not in [-1, 1] (schedulers built from this config, e.g. DDIM, inherit it).
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
               "clip_sample": False}
SD_SAMPLER = {"scheduler": "DPMSolverMultistepScheduler", "scheduler_config": {}, "num_inference_steps": 20,
              "guidance_scale": 3.0}


@dataclass(frozen=True)
class SDTrainConfig(ConfigBase):
    unet: dict = field(default_factory=lambda: dict(SD_UNET))                # UNet2DConditionModel kwargs
    text_encoder: dict = field(default_factory=lambda: dict(SD_TEXT_ENCODER))  # CLIPTextConfig kwargs
    train_text_encoder: bool = True
    model_max_length: int = 32               # tokenizer context: every ShapesWorld caption fits (at most ~20 ids)
    vae: str = "shapes_vae"                  # a VAE tokenizer name or folder (create_tokenizer)
    shapes: dict = field(default_factory=dict)   # ShapesConfig overrides
    num_images: int = 40960                  # train-split images 0..num_images-1 in the latent cache
    cache_chunk: int = 4096
    batch_size: int = 64
    steps: int = 4000
    minutes: Optional[float] = None          # wall-clock budget of this invocation's training loop
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999                 # with warmup: min(ema_decay, (1 + step) / (10 + step))
    caption_dropout: float = 0.1
    sample_posterior: bool = True
    schedule: dict = field(default_factory=lambda: dict(SD_SCHEDULE))      # DDPMScheduler kwargs (training noise)
    sampler: dict = field(default_factory=lambda: dict(SD_SAMPLER))        # export / validation sampler
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 250
    val_every: int = 500                     # single-object colour / shape accuracy on val prompts (0: off)
    val_prompts: int = 64
    cfg_grid: tuple[float, ...] = (1.5, 2.0, 3.0, 4.0, 6.0)   # guidance scales tried on val prompts at the end
    select_prompts: int = 128                # val single-object prompts for that choice
    test_prompts: int = 256                  # held-out (test) single-object prompts for the report
    geneval_prompts: int = 300               # held-out GenEval-shapes prompts (0: skip)
    export_dtype: str = "float16"            # UNet / text encoder storage in the exported folder

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1 or self.steps < 0 or self.num_images < 1 or self.cache_chunk < 1:
            raise ValueError("need batch_size, num_images, cache_chunk >= 1 and steps >= 0")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.export_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"export_dtype must be float32, float16 or bfloat16, got {self.export_dtype!r}")


# --------------------------------------------------------------------------------------------------------
# Evaluation helpers (any diffusers text-to-image pipeline)
# --------------------------------------------------------------------------------------------------------

def single_object_report(pipe, n: int, split: str = "test", seed: int = 0, shapes: Optional[dict] = None,
                         **sampler) -> dict:
    """Colour and shape accuracy (with binomial standard errors) of ``pipe`` on ``n`` single-object prompts of
    ``split``: the prompts of :class:`dream.eval.shapes_bench.ShapesBench` (``random_prompt_specs(n, split,
    types=("single",))``), scored by the exact ShapesWorld verifier."""
    from dream.data.shapes import ShapesConfig, ShapesWorld
    from dream.eval.compositional import Verifier
    from dream.models.diffusers_export import sd_generate

    world = ShapesWorld(ShapesConfig.from_dict(shapes or {}))
    prompts = world.random_prompt_specs(n, split, types=("single",))
    t0 = time.time()
    images = sd_generate(pipe, [p.caption for p in prompts], seed=seed, **sampler)
    dt = time.time() - t0
    ver = Verifier(world.config)
    specs = [p.spec for p in prompts]
    c, s = ver.colour_accuracy(images, specs), ver.shape_accuracy(images, specs)
    return {"n": n, "split": split, "colour_acc": c, "colour_acc_se": math.sqrt(c * (1 - c) / n),
            "shape_acc": s, "shape_acc_se": math.sqrt(s * (1 - s) / n), "seconds_per_image": dt / n,
            "sampler": dict(sampler), "seed": seed}


def _saved_max_length(folder: Path) -> Optional[int]:
    """``model_max_length`` of a tokenizer folder written earlier, or None."""
    f = folder / "tokenizer_config.json"
    if not (f.is_file() and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        return None
    try:
        return int(json.loads(f.read_text())["model_max_length"])
    except (ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------

class SDShapesTrainer:
    """Runs an :class:`SDTrainConfig` into a folder: ``latents/`` (cache), ``checkpoint-*.pt``, ``metrics.jsonl``,
    ``loss.png``, ``hf_tokenizer/``, and at the end ``pipeline/`` (the diffusers folder) and ``sd_training.json``."""

    def __init__(self, cfg: SDTrainConfig, out, resume: bool = False, log_to: Optional[dict] = None):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel
        from transformers import CLIPTokenizer as HFCLIPTokenizer

        from dream.data.shapes import ShapesConfig, ShapesWorld
        from dream.models.tokenizers import create_tokenizer
        from dream.text.hf_export import export_clip_tokenizer
        from dream.train.ema import EMA

        from .checkpoint import clean_stale_temp_files

        self.cfg, self.out = cfg, Path(out)
        self.log_to = dict(log_to) if log_to is not None else {"tensorboard": "auto"}
        self.out.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_files(self.out)
        tok_dir = self.out / "hf_tokenizer"
        if _saved_max_length(tok_dir) != cfg.model_max_length:          # written once per run folder
            export_clip_tokenizer(tok_dir, model_max_length=cfg.model_max_length)
        self.tokenizer = HFCLIPTokenizer.from_pretrained(str(tok_dir))
        self.vae_tok = create_tokenizer(cfg.vae)
        self.world = ShapesWorld(ShapesConfig.from_dict(cfg.shapes))
        torch.manual_seed(cfg.seed)                       # module initialisation (diffusers / transformers init)
        te = CLIPTextModel(CLIPTextConfig(**cfg.text_encoder))
        unet_kw = {**cfg.unet, "cross_attention_dim": te.config.hidden_size}
        unet = UNet2DConditionModel(**unet_kw)
        if unet.config.in_channels != self.vae_tok.latent_channels:
            raise ValueError(f"unet in_channels {unet.config.in_channels} != VAE latent channels "
                             f"{self.vae_tok.latent_channels}")
        te.requires_grad_(cfg.train_text_encoder)
        self.model = torch.nn.ModuleDict({"unet": unet, "text_encoder": te})
        self.noise = DDPMScheduler(**cfg.schedule)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        self.ema = EMA(self.model, cfg.ema_decay, trainable_only=True)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.null_ids = self._ids([""])[0]
        self.step, self.history, self.prior_s, self._t0 = 0, [], 0.0, time.time()
        self._perm = (None, None)
        self.cache_s = 0.0
        if resume:
            self.resume()

    # ---- data -------------------------------------------------------------------------------------
    def _ids(self, captions) -> torch.Tensor:
        return self.tokenizer(list(captions), padding="max_length", max_length=self.cfg.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def _cache_meta(self) -> dict:
        c = self.cfg
        return {"vae": c.vae, "shapes": self.world.config.to_dict(), "model_max_length": c.model_max_length,
                "num_images": c.num_images, "cache_chunk": c.cache_chunk, "format": 1}

    def build_cache(self) -> None:
        """Render, encode and tokenize train images ``0..num_images-1`` into ``latents/chunk-*.safetensors`` (a
        chunk already there is reused, so an interrupted build continues), then hold them in memory."""
        from safetensors.torch import load_file, save_file

        from .checkpoint import disk_full_hint

        c, folder = self.cfg, self.out / "latents"
        folder.mkdir(exist_ok=True)
        meta_path, meta = folder / "meta.json", self._cache_meta()
        if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
            log.warning("latent cache in %s was built with other settings: rebuilding it", folder)
            for p in folder.glob("chunk-*.safetensors"):
                p.unlink()
        meta_path.write_text(json.dumps(meta, indent=2))
        t0 = time.time()
        moments, ids = [], []
        for k, a in enumerate(range(0, c.num_images, c.cache_chunk)):
            b = min(c.num_images, a + c.cache_chunk)
            path = folder / f"chunk-{k:05d}.safetensors"
            if path.exists():
                d = load_file(str(path))
                if d["moments"].shape[0] == b - a and d["ids"].shape == (b - a, c.model_max_length):
                    moments.append(d["moments"])
                    ids.append(d["ids"].long())
                    continue
            ms, cs = [], []
            for s in range(a, b, 512):
                imgs, caps, _ = self.world.batch(range(s, min(b, s + 512)), "train")
                x = imgs.float() / 127.5 - 1.0 if imgs.dtype == torch.uint8 else imgs
                ms.append(self.vae_tok.encode_moments(x))
                cs += caps
            d = {"moments": torch.cat(ms).contiguous(), "ids": self._ids(cs).to(torch.int32).contiguous()}
            tmp = path.with_name(path.name + ".tmp")
            with disk_full_hint(path, cleanup=tmp):
                save_file(d, str(tmp))
                tmp.replace(path)
            moments.append(d["moments"])
            ids.append(d["ids"].long())
            log.info("latent cache: %d / %d images (%.0f s)", b, c.num_images, time.time() - t0)
        self.moments, self.cap_ids = torch.cat(moments), torch.cat(ids)
        self.cache_s = time.time() - t0

    def batch_indices(self, k: int) -> torch.Tensor:
        """Cache rows of batch ``k``: positions ``k*B .. k*B+B-1`` of the concatenated per-epoch permutations
        (epoch ``e`` permuted by a generator seeded from ``(seed, e)``)."""
        from dream.data.shapes import seed_for

        n, bs = self.cfg.num_images, self.cfg.batch_size
        pos, parts = k * bs, []
        while sum(len(p) for p in parts) < bs:
            e, off = divmod(pos, n)
            if self._perm[0] != e:
                g = torch.Generator().manual_seed(seed_for(self.cfg.seed, "sd-epoch", e))
                self._perm = (e, torch.randperm(n, generator=g))
            take = min(bs - sum(len(p) for p in parts), n - off)
            parts.append(self._perm[1][off:off + take])
            pos += take
        return torch.cat(parts)

    # ---- schedule and loss -------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        from .optim import warmup_cosine_lr

        c = self.cfg
        return warmup_cosine_lr(step, c.lr, c.min_lr, c.warmup_steps, c.steps)

    def loss(self, k: int) -> torch.Tensor:
        """The epsilon-prediction loss of batch ``k``; draws (in order) caption dropout, the posterior sample,
        the noise and the timesteps from ``self.gen``."""
        c, g = self.cfg, self.gen
        idx = self.batch_indices(k)
        ids = self.cap_ids[idx].clone()
        drop = torch.rand(len(idx), generator=g) < c.caption_dropout
        ids[drop] = self.null_ids
        mean, logvar = self.moments[idx].chunk(2, dim=1)
        eps_post = torch.randn(mean.shape, generator=g)
        z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps_post if c.sample_posterior else mean
        x0 = (z - self.vae_tok.config.shift_factor) * self.vae_tok.config.scaling_factor
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (len(idx),), generator=g)
        xt = self.noise.add_noise(x0, noise, t)
        with torch.set_grad_enabled(c.train_text_encoder):
            ctx = self.model["text_encoder"](ids)[0]
        pred = self.model["unet"](xt, t, encoder_hidden_states=ctx).sample
        kind = self.noise.config.prediction_type
        target = noise if kind == "epsilon" else self.noise.get_velocity(x0, noise, t) if kind == "v_prediction" else x0
        return torch.nn.functional.mse_loss(pred, target)

    # ---- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "step": self.step, "rng_gen": self.gen.get_state(), "rng_torch": torch.get_rng_state(),
                "config": json.loads(json.dumps(self.cfg.to_dict())), "history": self.history,
                "train_s": self.prior_s + time.time() - self._t0, "cache_s": self.cache_s}

    def save(self) -> Path:
        from .checkpoint import save_checkpoint

        return save_checkpoint(self.state(), self.out, self.step, keep=2)

    def _check_resumable(self, st: dict, path: Path) -> None:
        from .checkpoint import require_state

        require_state(st, ("model", "ema", "optimizer", "step", "rng_gen", "rng_torch"), self.model, "model", path)

    def resume(self) -> None:
        """Continue from the newest checkpoint that loads (newer broken ones are skipped with a warning)."""
        from .checkpoint import load_resumable, restore_loop_state

        path, st = load_resumable(self.out, self._check_resumable)
        self.model.load_state_dict(st["model"])
        self.ema.load_state_dict(st["ema"])
        restore_loop_state(self, st)
        self.cache_s = float(st.get("cache_s", 0.0))
        log.info("resumed from %s at step %d", path, self.step)

    # ---- pipelines ---------------------------------------------------------------------------------
    def sampler_scheduler(self):
        """The export / validation sampler over the training noise schedule."""
        import diffusers

        name = self.cfg.sampler.get("scheduler", SD_SAMPLER["scheduler"])
        over = {"steps_offset": 1, **dict(self.cfg.sampler.get("scheduler_config") or {})}   # SD pipelines: offset 1
        return getattr(diffusers, name).from_config(self.noise.config, **over)

    def pipeline(self, ema: bool = True):
        """An in-memory ``StableDiffusionPipeline`` of the current (EMA) weights, for validation."""
        from diffusers import StableDiffusionPipeline

        from dream.models.diffusers_export import vae_to_diffusers

        if not hasattr(self, "_vae_diffusers"):
            self._vae_diffusers = vae_to_diffusers(self.vae_tok)
        m = self.ema.shadow if ema else self.model
        pipe = StableDiffusionPipeline(vae=self._vae_diffusers, text_encoder=m["text_encoder"],
                                       tokenizer=self.tokenizer, unet=m["unet"], scheduler=self.sampler_scheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _sampler_kwargs(self, **over) -> dict:
        s = {k: v for k, v in self.cfg.sampler.items() if k not in ("scheduler", "scheduler_config")}
        return {**s, **over}

    # ---- training ---------------------------------------------------------------------------------
    def fit(self, evaluate: bool = True) -> dict:
        from dream.utils.run_logger import RunLogger

        with RunLogger(self.out, config=self.cfg.to_dict(), resume_step=self.step or None, **self.log_to) as rl:
            if not hasattr(self, "moments"):
                self.build_cache()
            res = self._fit(rl)
            if evaluate:
                res.update(self.export_and_evaluate())
                rl.log_scalars(self.step, {f"final/{k}": v for k, v in res.get("test", {}).items()
                                           if isinstance(v, float)})
        (self.out / "sd_training.json").write_text(json.dumps(res, indent=2))
        return res

    def _fit(self, rl) -> dict:
        from dream.utils.plots import plot_loss_curves

        cfg = self.cfg
        t0 = self._t0 = time.time()
        deadline = t0 + cfg.minutes * 60 if cfg.minutes else None
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        window, stopped_early = {"loss": 0.0, "grad_norm": 0.0, "n": 0}, False
        while self.step < cfg.steps:
            for grp in self.opt.param_groups:
                grp["lr"] = self.lr_at(self.step)
            loss = self.loss(self.step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.opt.step()
            self.ema.decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))     # EMA warmup
            self.ema.update(self.model)
            self.step += 1
            window["loss"] += float(loss.detach())
            window["grad_norm"] += float(gn)
            window["n"] += 1
            out_of_time = deadline is not None and time.time() >= deadline
            if self.step % cfg.log_every == 0 or self.step == cfg.steps or out_of_time:
                n = window.pop("n")
                stats = {k: v / n for k, v in window.items()}
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(f"non-finite loss at or before step {self.step}")
                stats.update(step=self.step, lr=self.opt.param_groups[0]["lr"],
                             train_s=self.prior_s + time.time() - t0)
                if cfg.val_every and (self.step % cfg.val_every == 0 or self.step == cfg.steps):
                    stats.update(self.validate())
                self.history.append(stats)
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(stats) + "\n")
                rl.log_scalars(self.step, {k: v for k, v in stats.items() if k != "step"})
                log.info("step %d  loss %.4f  lr %.2e  %s", self.step, stats["loss"], stats["lr"],
                         " ".join(f"{k} {v:.3f}" for k, v in stats.items() if k.startswith("val_")))
                window = {"loss": 0.0, "grad_norm": 0.0, "n": 0}
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.save()
            if out_of_time:
                stopped_early = True
                break
        self.save()
        plot_loss_curves(self.history, self.out / "loss.png", keys=("loss", "grad_norm"), title="sd_tiny training")
        return {"steps": self.step, "images_seen": self.step * cfg.batch_size, "wall_s_this_run": time.time() - t0,
                "train_s_total": self.prior_s + time.time() - t0, "cache_s": self.cache_s,
                "stopped_early": stopped_early, "params": self.param_counts()}

    def param_counts(self) -> dict:
        return {k: sum(p.numel() for p in m.parameters()) for k, m in self.model.items()}

    @torch.no_grad()
    def validate(self) -> dict:
        """Single-object colour / shape accuracy of the EMA weights on ``val_prompts`` val prompts."""
        r = single_object_report(self.pipeline(), self.cfg.val_prompts, "val", seed=0, shapes=self.cfg.shapes,
                                 **self._sampler_kwargs())
        return {"val_colour_acc": r["colour_acc"], "val_shape_acc": r["shape_acc"]}

    # ---- export and final evaluation ---------------------------------------------------------------
    def export(self, folder: Optional[Path] = None) -> Path:
        """Write the EMA weights as a diffusers ``StableDiffusionPipeline`` folder (default ``RUN/pipeline``)."""
        from dream.models.diffusers_export import save_sd_pipeline

        folder = Path(folder or self.out / "pipeline")
        pipe = self.pipeline()
        dt = getattr(torch, self.cfg.export_dtype)
        return save_sd_pipeline(folder, unet=pipe.unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                vae=pipe.vae, scheduler=pipe.scheduler, dtype=None if dt == torch.float32 else dt)

    @torch.no_grad()
    def export_and_evaluate(self) -> dict:
        """Export, reload the folder with stock diffusers, choose the guidance scale on val prompts, then report
        test-split single-object accuracy and GenEval-shapes with the chosen settings."""
        from dream.models.diffusers_export import load_sd_pipeline, sd_generate

        t0 = time.time()
        folder = self.export()
        pipe = load_sd_pipeline(folder)
        c = self.cfg
        grid = {}
        for gs in c.cfg_grid:
            r = single_object_report(pipe, c.select_prompts, "val", seed=0, shapes=c.shapes,
                                     **self._sampler_kwargs(guidance_scale=float(gs)))
            grid[str(gs)] = {"colour_acc": r["colour_acc"], "shape_acc": r["shape_acc"]}
            log.info("val guidance %.1f: colour %.3f shape %.3f", gs, r["colour_acc"], r["shape_acc"])
        best = max(c.cfg_grid, key=lambda gs: (grid[str(gs)]["colour_acc"] + grid[str(gs)]["shape_acc"], -gs))
        sampler = self._sampler_kwargs(guidance_scale=float(best))
        test = single_object_report(pipe, c.test_prompts, "test", seed=0, shapes=c.shapes, **sampler)
        res = {"pipeline": str(folder), "sampler": {"scheduler": c.sampler.get("scheduler"),
                                                    "scheduler_config": dict(c.sampler.get("scheduler_config") or {}),
                                                    **sampler,
                                                    "chosen_on": f"{c.select_prompts} single-object val prompts",
                                                    "val_grid": grid},
               "test": test}
        if c.geneval_prompts:
            from dream.eval.geneval_shapes import GenEvalShapes, geneval_prompts

            prompts = geneval_prompts(c.geneval_prompts, 0)
            bench = GenEvalShapes()
            res["geneval_shapes"] = bench.run(lambda caps: sd_generate(pipe, caps, seed=0, **sampler), prompts)
        res["eval_s"] = time.time() - t0
        return res
