"""The DREAM trainer: Masking Warmup, gated losses, AdamW, EMA, autocast, DDP, exact resume.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` per process. Everything random is
drawn from one ``torch.Generator`` per process (seed + rank) whose state is checkpointed together with
the global torch RNG (dropout), so ``--resume`` continues exactly. For ShapesWorld the data position is
a pure function of the step; for shards the loader's position is checkpointed. Neither loader draws from the
global RNG (their DataLoaders get their own generators), so rebuilding one on resume leaves dropout unchanged.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from . import distributed as D
from .checkpoint import clean_stale_temp_files, disk_full_hint, load_checkpoint, load_resumable, save_checkpoint
from .config import TrainConfig
from .ema import EMA
from .optim import LRSchedule, build_optimizer, scaled_lr, set_lr

log = logging.getLogger("dream.train")


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r} (auto | bf16 | fp16 | fp32)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls beat fp32 on CPUs with AMX tiles; with AVX512-BF16 alone PyTorch's bf16 GEMM is often
    slower than fp32 (measured here: 52 vs 97 GFLOP/s per core), so ``auto`` picks fp32 there."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001
        return False


def build_masking(spec: dict, steps_per_epoch: int):
    from dream.masking import MaskingWarmup, MaskingWarmupConfig

    spec = dict(spec)
    preset = spec.pop("preset", "dream")
    if preset == "dream":
        base = MaskingWarmupConfig.dream()
    elif preset == "fluid":
        base = MaskingWarmupConfig.fluid()
    elif preset == "never":
        base = MaskingWarmupConfig.never()
    elif preset == "constant":
        base = MaskingWarmupConfig.constant(spec.pop("ratio"))
    else:
        raise ValueError(f"unknown masking preset {preset!r} (dream | fluid | never | constant)")
    d = base.to_dict()
    d.update(spec)
    d["steps_per_epoch"] = steps_per_epoch
    return MaskingWarmup(MaskingWarmupConfig.from_dict(d))


class _ShapesSteps(torch.utils.data.Dataset):
    """Index ``k`` (a global micro-batch number) -> that micro-batch; a pure function, so workers can render ahead."""

    def __init__(self, source: "ShapesBatches"):
        self.source = source

    def __len__(self) -> int:
        return 2 ** 62

    def __getitem__(self, k: int) -> dict:
        return self.source.render(k)


class _From(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


class ShapesBatches:
    """ShapesWorld batches whose content is a pure function of (step, micro-step, rank): exact resume.

    With ``num_workers > 0`` the batches are rendered ahead in DataLoader worker processes (same content, in
    order); a request out of sequence (resume) restarts the workers at the requested position.
    """

    def __init__(self, overrides: dict, image_size: int, batch: int, accum: int, rank: int, world: int, seed: int,
                 num_workers: int = 0, pin_memory: bool = False):
        from dream.data.shapes import ShapesConfig, ShapesWorld

        d = {"image_size": image_size, **overrides}
        self.world = ShapesWorld(ShapesConfig.from_dict(d))
        self.batch, self.accum, self.rank, self.nproc, self.seed = batch, accum, rank, world, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._it, self._next = None, None

    def render(self, k: int) -> dict:
        first = (k * self.nproc + self.rank) * self.batch
        images, captions, metas = self.world.batch(range(first, first + self.batch), "train")
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        return {"image": images, "caption": captions, "meta": metas}

    def get(self, step: int, micro: int) -> dict:
        k = step * self.accum + micro
        if self.num_workers <= 0:
            return self.render(k)
        if self._it is None or self._next != k:
            # own generator: creating the iterator must not draw from the global RNG (dropout; exact resume)
            from dream.data.webdataset import mix_seed

            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, k))
            loader = torch.utils.data.DataLoader(_ShapesSteps(self), batch_size=None, sampler=_From(k),
                                                 num_workers=self.num_workers, pin_memory=self.pin_memory,
                                                 prefetch_factor=4, persistent_workers=False, generator=gen)
            self._it = iter(loader)
        self._next = k + 1
        return next(self._it)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        self._it = None


class ShardBatches:
    """Webdataset shards through :mod:`dream.data.webdataset` (position checkpointed)."""

    def __init__(self, urls: str, image_size: int, batch: int, cfg: TrainConfig, rank: int, world: int):
        from dream.data.webdataset import make_dataloader

        self.loader = make_dataloader(urls, batch, image_size, num_workers=cfg.num_workers,
                                      shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, rank=rank,
                                      world_size=world, log_fn=log.info, **cfg.data_options)
        self.it = None

    def get(self, step: int, micro: int) -> dict:
        while True:
            if self.it is None:
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:  # epoch done: the loader logged its summary and advanced its epoch
                if self.loader.stats.get("samples", 0) == 0:
                    raise RuntimeError(f"no usable samples in the shards (skipped: {self.loader.stats})")
                self.it = None

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self.it = None


def build_tokenizer(spec: str, model_cfg):
    from dream.models.tokenizers import PixelTokenizer, create_tokenizer

    if spec == "pixel":
        if model_cfg.vae_stride != 1 or model_cfg.vae_embed_dim != 3:
            raise ValueError("tokenizer 'pixel' needs a model with vae_stride=1 and vae_embed_dim=3")
        return PixelTokenizer(model_cfg.patch_size, model_cfg.img_size)
    tok = create_tokenizer(spec)   # a VAE folder / checkpoint path, or a shipped name such as "shapes_vae"
    if tok.token_dim != model_cfg.token_dim or tok.stride != model_cfg.vae_stride:
        raise ValueError(f"tokenizer {spec!r} makes {tok.token_dim}-dim tokens at stride {tok.stride} but the model "
                         f"expects {model_cfg.token_dim} dims at stride {model_cfg.vae_stride} (set model_overrides "
                         f"vae_stride / vae_embed_dim / patch_size to match)")
    return tok


class Trainer:
    """Runs a :class:`TrainConfig` into an output folder (metrics.jsonl, loss.png, samples, checkpoints, and
    TensorBoard / W&B logs through :class:`~dream.utils.run_logger.RunLogger` with the options ``log_to``)."""

    def __init__(self, cfg: TrainConfig, out: os.PathLike, resume: bool = False,
                 on_step: Optional[Callable[[int, dict], None]] = None, log_to: Optional[dict] = None):
        import dream

        self.cfg, self.out, self.on_step = cfg, Path(out), on_step
        self.log_to = dict(log_to) if log_to is not None else {"tensorboard": "auto"}
        self.device = D.init_from_env(cfg.device)
        self.rank, self.world = D.rank(), D.world_size()
        self.out.mkdir(parents=True, exist_ok=True)
        if D.is_main():
            clean_stale_temp_files(self.out)    # debris of a write that was killed or hit a full disk
        torch.manual_seed(cfg.seed + self.rank)
        self.gen = torch.Generator().manual_seed(cfg.seed + self.rank)

        model = dream.create_model(cfg.model, **cfg.model_overrides)
        if cfg.init_from:
            from dream.models.convert import load_checkpoint_into

            load_checkpoint_into(model, cfg.init_from, prefer_ema=True)
        self.lora = None
        if cfg.lora:  # LoRA fine-tuning: only the adapter trains, checkpoints and EMA hold only it (dream.adapters)
            from dream.adapters.training import LoraTraining

            self.lora = LoraTraining(model, cfg.lora)
        self.mcfg = model.config
        model.to(self.device)
        if self.world > 1:
            D.convert_batchnorm(model)
        self.model = model
        self.ema = EMA(model, cfg.ema_decay, trainable_only=self.lora is not None) if cfg.ema_decay > 0 else None
        global_batch = cfg.batch_size * cfg.grad_accum * self.world
        self.lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, global_batch)
        self.opt = build_optimizer(model, self.lr, cfg.weight_decay, tuple(cfg.betas), cfg.official_weight_decay,
                                   tuple(cfg.frozen))
        self.sched = LRSchedule(self.lr, cfg.warmup_steps, cfg.steps, cfg.lr_schedule, cfg.min_lr)
        self.steps_per_epoch = cfg.steps_per_epoch or max(1, math.ceil(cfg.steps / 48))
        self.masking = build_masking(cfg.masking, self.steps_per_epoch)
        self.ddp = model
        if self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.fwd = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.amp = autocast_dtype(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)

        self.tokenizer = build_tokenizer(cfg.tokenizer, self.mcfg)
        if hasattr(self.tokenizer, "to"):
            self.tokenizer = self.tokenizer.to(self.device)
        from dream.text.inputs import TextInputs

        self.text = TextInputs(cfg.text_encoder, self.mcfg.text_embed_dim, self.mcfg.text_max_len,
                               self.mcfg.clip_context_length, self.device, cfg.use_text_padding_mask,
                               clip_vocab_size=self.mcfg.clip_vocab_size)
        if cfg.data == "shapes":
            self.data = ShapesBatches(cfg.shapes, self.mcfg.img_size, cfg.batch_size, cfg.grad_accum,
                                      self.rank, self.world, cfg.seed, num_workers=cfg.num_workers,
                                      pin_memory=self.device.type == "cuda")
        else:
            self.data = ShardBatches(cfg.data, self.mcfg.img_size, cfg.batch_size, cfg, self.rank, self.world)
        self.step = 0
        self.history: list[dict] = []
        self._elapsed_before = 0.0      # training seconds of earlier invocations (resume): elapsed_s is cumulative
        if resume:
            self.resume()

    # ------------------------------------------------------------------------------------------
    def state(self) -> dict:
        model = self.lora.state_dict(self.model) if self.lora else self.model.state_dict()
        return {"model": model, "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "masking": self.masking.state_dict(), "rng_torch": torch.get_rng_state(),
                "rng_gen": self.gen.get_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "data": self.data.state_dict(), "train_config": json.loads(json.dumps(self.cfg.to_dict())),
                "model_config": self.mcfg.to_dict(), "history": self.history}

    def save(self) -> Optional[Path]:
        if not D.is_main():
            return None
        return save_checkpoint(self.state(), self.out, self.step, self.cfg.keep_ckpts)

    _STATE_KEYS = ("model", "optimizer", "scaler", "step", "masking", "rng_torch", "rng_gen", "data")

    def _check_resumable(self, st: dict, path: Path) -> None:
        """Raise unless ``st`` is a complete training state for this model (before anything is changed)."""
        from dream.models.convert import check_state_dict

        missing = [k for k in self._STATE_KEYS if k not in st]
        if missing:
            raise KeyError(f"training state without {missing}")
        if self.lora:
            self.lora.check_state_dict(self.model, st["model"])
        else:
            check_state_dict(self.model, st["model"], path)

    def _check_same_data(self, st: dict, path: Path) -> None:
        saved = (st.get("train_config") or {}).get("data")
        if saved is None or saved == self.cfg.data:
            return
        if (saved == "shapes") != (self.cfg.data == "shapes"):
            raise ValueError(f"--resume: {path} was trained on data {saved!r} but this run reads {self.cfg.data!r}; "
                             f"the data position cannot carry over to another kind of source. Resume with the same "
                             f"data, or start a new run from these weights with --init-from {path}")
        log.warning("--resume: the data changed from %r to %r; the saved position is applied to the new shards",
                    saved, self.cfg.data)

    def resume(self, path: Optional[os.PathLike] = None) -> None:
        """Continue from ``path``, or from the newest checkpoint in the run folder that loads (newer ones that do
        not, e.g. truncated by a crash, are skipped with a warning naming them and why)."""
        if path is not None:
            path = Path(path)
            st = load_checkpoint(path)
            self._check_resumable(st, path)
        else:
            path, st = load_resumable(self.out, self._check_resumable)
        self._check_same_data(st, path)
        from dream.models.convert import load_state_dict_strict

        if self.lora:
            self.lora.load_state_dict(self.model, st["model"])
        else:
            load_state_dict_strict(self.model, st["model"], path)
        if self.ema and st.get("ema") is not None:
            self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        self.masking.load_state_dict(st["masking"], strict=False)
        self.step = int(st["step"])
        torch.set_rng_state(st["rng_torch"])
        self.gen.set_state(st["rng_gen"])
        if torch.cuda.is_available() and st.get("rng_cuda"):
            torch.cuda.set_rng_state_all(st["rng_cuda"])
        self.data.load_state_dict(st["data"])
        self.history = list(st.get("history", []))
        self._elapsed_before = float(self.history[-1].get("elapsed_s", 0.0)) if self.history else 0.0
        if D.is_main():
            # metrics.jsonl may hold lines logged after this checkpoint by the run that stopped; rewrite it from
            # the checkpoint's history so the file and the resumed run agree (no duplicated steps)
            metrics = self.out / "metrics.jsonl"
            tmp = metrics.with_name(metrics.name + f".tmp{os.getpid()}")
            with disk_full_hint(metrics, cleanup=tmp):
                tmp.write_text("".join(json.dumps(h) + "\n" for h in self.history))
                os.replace(tmp, metrics)
            log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------------------
    def micro_step(self, micro: int) -> dict:
        cfg, m = self.cfg, self.mcfg
        batch = self.data.get(self.step, micro)
        images = batch["image"].to(self.device, non_blocking=True)
        with torch.no_grad():
            tokens = self.tokenizer.encode(images, generator=self.gen) if cfg.tokenizer != "pixel" else \
                self.tokenizer.encode(images)
        ids = self.text.clip_ids(batch["caption"])
        feats, pad = self.text.features(batch["caption"], m.text_drop_prob, self.gen)
        epoch = (self.step + micro / cfg.grad_accum) / self.steps_per_epoch
        draw = self.masking.draw_masks(epoch, tokens.shape[0], m.seq_len, generator=self.gen, device=self.device)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            out = self.fwd(tokens.float(), ids, feats, draw.mask, text_padding_mask=pad, generator=self.gen)
        self.scaler.scale(out["loss"] / cfg.grad_accum).backward()
        return {k: v.detach().float() if torch.is_tensor(v) else float(v) for k, v in out.items()}

    def train_step(self) -> dict:
        cfg = self.cfg
        set_lr(self.opt, self.sched(self.step))
        stats: dict = {}
        for micro in range(cfg.grad_accum):
            ctx = self.ddp.no_sync() if (self.world > 1 and micro < cfg.grad_accum - 1) else _null()
            with ctx:
                s = self.micro_step(micro)
            for k, v in s.items():
                stats[k] = stats.get(k, 0.0) + v / cfg.grad_accum
        self.scaler.unscale_(self.opt)
        if cfg.grad_clip > 0:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip).detach()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.model)
        self.step += 1
        return stats

    def fit(self) -> dict:
        """Train to ``cfg.steps`` (or the time budget); the run's scalars and sample grids also go to ``log_to``."""
        from dream.utils.run_logger import RunLogger

        opts = self.log_to if D.is_main() else {"tensorboard": False}
        with RunLogger(self.out, config=self.cfg.to_dict(), resume_step=self.step or None, **opts) as self.run_log:
            return self._fit()

    def _fit(self) -> dict:
        cfg = self.cfg
        t0 = time.time()
        deadline = t0 + cfg.minutes * 60 if cfg.minutes else None
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not D.is_main(), desc="train", dynamic_ncols=True)
        metrics_path = self.out / "metrics.jsonl"
        last_t, images_since = time.time(), 0
        stopped_early = False
        window: dict = {}
        n_window = 0
        sampled_at = -1
        while self.step < cfg.steps:
            # Statistics stay on the device and are summed over the log window; reading them (one host-device
            # sync) happens only when a line is logged, so GPU steps queue up without waiting.
            step_stats = self.train_step()
            for k, v in step_stats.items():
                window[k] = window.get(k, 0.0) + v
            n_window += 1
            images_since += cfg.batch_size * cfg.grad_accum * self.world
            out_of_time = deadline is not None and time.time() >= deadline
            logging_now = self.step % cfg.log_every == 0 or self.step == cfg.steps or out_of_time
            if logging_now or self.on_step:
                stats = {k: float(v) / n_window for k, v in window.items()}
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(f"non-finite loss {stats['loss']} at or before step {self.step}")
            if logging_now:
                window, n_window = {}, 0
                now = time.time()
                stats.update(step=self.step, lr=self.opt.param_groups[0]["lr"],
                             epoch=self.step / self.steps_per_epoch,
                             images_per_s=images_since / max(now - last_t, 1e-9),
                             elapsed_s=self._elapsed_before + now - t0)
                last_t, images_since = now, 0
                self.history.append(stats)
                if D.is_main():
                    with disk_full_hint(metrics_path), open(metrics_path, "a") as f:
                        f.write(json.dumps(stats) + "\n")
                    self.run_log.log_scalars(self.step, {k: v for k, v in stats.items() if k != "step"})
                bar.set_postfix(loss=f"{stats['loss']:.3f}", diff=f"{stats['diff_loss']:.3f}",
                                clip=f"{stats['clip_loss']:.3f}", ips=f"{stats['images_per_s']:.0f}")
            bar.update(1)
            if self.on_step:
                self.on_step(self.step, {k: float(v) for k, v in step_stats.items()})
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.save()
            if cfg.sample_every and self.step % cfg.sample_every == 0 and D.is_main():
                self._log_samples(self.write_samples())
                sampled_at = self.step
            if out_of_time:
                stopped_early = True
                break
        bar.close()
        self.save()
        if D.is_main():
            self.export()
            self.plot_loss()
            if cfg.sample_prompts and sampled_at != self.step:    # (not again if the loop just drew them)
                self._log_samples(self.write_samples())
        D.barrier()
        return {"steps": self.step, "wall_s": time.time() - t0, "stopped_early": stopped_early}

    # ------------------------------------------------------------------------------------------
    def export(self) -> None:
        from dream.models.convert import save_pretrained

        if self.lora:  # the adapter only, in the peft format: <out>/lora (and <out>/lora_ema)
            self.lora.export(self.out, self.model, self.ema.shadow if self.ema else None)
            return
        save_pretrained(self.model, self.out / "model", arch=self.cfg.model)
        if self.ema:
            save_pretrained(self.ema.shadow, self.out / "ema", arch=self.cfg.model)

    def plot_loss(self) -> Optional[Path]:
        from dream.utils.plots import plot_loss_curves

        return plot_loss_curves(self.history, self.out / "loss.png")

    def _log_samples(self, path: Optional[Path]) -> None:
        if path is not None:
            self.run_log.log_image(self.step, "samples", path)

    @torch.no_grad()
    def write_samples(self, prompts=None) -> Optional[Path]:
        from dream.sampling import MARSampler, SamplerConfig
        from dream.utils.images import save_grid

        prompts = list(prompts or self.cfg.sample_prompts)
        if not prompts:
            return None
        model = (self.ema.shadow if self.ema and self.step >= 1000 else self.model).eval()
        g = torch.Generator().manual_seed(1234)
        feats, pad = self.text.features(prompts)
        null, null_pad = self.text.null(len(prompts))
        from dream.models.tokenizers import PixelTokenizer

        clip = 1.0 if isinstance(self.tokenizer, PixelTokenizer) else self.cfg.sample_clip_denoised  # pixels: [-1, 1]
        s = MARSampler(model, SamplerConfig(num_iter=self.cfg.sample_num_iter, cfg=self.cfg.sample_cfg,
                                            clip_denoised=clip))
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            toks = s.sample(feats, null, text_padding_mask=pad, null_padding_mask=null_pad, generator=g)
        images = self.tokenizer.decode(toks.float())
        self.model.train()
        path = self.out / "samples" / f"step{self.step:08d}.png"
        save_grid(images, prompts, path)
        return path


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
