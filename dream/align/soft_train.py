"""Soft-token training for a frozen DREAM model: SoftREPA (arXiv 2503.08250; softrepa/SoftREPA @ ff92f4b) and AGSM
(arXiv 2605.30038; jaayeon/AGSM @ 5524482) on ShapesWorld hard-negative batches.

Every step draws B distinct captions that are hard negatives of each other (a training prompt and its one-attribute
changes: other counts, colours, shapes, relations, bindings; :func:`dream.data.shapes.hard_negative_specs`),
renders one image per caption, and scores all B x B (image, caption) pairs with the frozen model and the soft
tokens (:class:`~dream.align.soft_pairs.DreamPairs`). Only the bank is optimised (AdamW, cosine warm restarts
stepped every ``lr_interval`` steps, as the authors' ``CosineAnnealingWarmRestarts(T_0=10)``); AGSM keeps an EMA of
the bank as its teacher.

Run folder::

    config.json  checkpoint.pt (bank, EMA, optimiser, scheduler, RNG, step)  metrics.jsonl  val.jsonl
    tokens/ (soft_tokens.safetensors + soft_tokens.json)  snapshots/step_NNNNNN/  captions.json
    loss.png  diagnostics.png  val.png  report.json
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from dream.utils.config import ConfigBase

from .soft_losses import agsm_loss, pair_diagnostics, pair_errors, softrepa_loss
from .soft_tokens import SoftTokenBank, SoftTokenConfig, ema_update_

log = logging.getLogger("dream.align.soft_train")

__all__ = ["SoftTrainConfig", "SoftTokenTrainer", "hard_negative_batch", "positive_pair_error", "load_pipeline",
           "is_diffusers"]

METHODS = ("softrepa", "agsm")


@dataclass(frozen=True)
class SoftTrainConfig(ConfigBase):
    method: str = "agsm"                       # softrepa | agsm
    model: str = "dream_tiny.shapes"           # DREAM pipeline tag or folder, or a diffusers SD 1.x folder / tag
    # --- tokens ---
    n_tokens: int = 4
    time_bins: int = 0                         # 100 = the authors' t // 10 table (DREAM: on the head's condition)
    init: str = "normal"                       # normal (N(0, init_std)) | null (the aligned null prompt's first
    init_std: float = 0.02                     # token, as the authors start SD1.5 tokens from the "" BOS) | zeros
    shared_tokens: bool = False                # AGSM ablation: one set for positives and negatives
    uncon2neg: bool = False                    # sampling: CFG's unconditional branch uses psi-
    groups: tuple = ("down", "mid")            # diffusers UNet: block groups whose cross-attention gets the tokens
    # --- data ---
    batch_size: int = 6                        # B images = B distinct captions (B^2 pairs)
    type_weights: tuple = (0.1, 0.4, 0.1, 0.4)  # anchor prompt types (single, count, pair, relation)
    hard_negatives: bool = True                # False: B random distinct training prompts
    split: str = "train"
    # --- optimisation ---
    steps: int = 2000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lr_interval: int = 200                     # scheduler step unit (the authors' validation interval)
    lr_restart: int = 10                       # T_0 in intervals
    lr_min: float = 1e-5
    grad_clip: float = 0.0                     # 0 = off
    chunk_rows: int = 0                        # rows (images) per backward; 0 = the whole batch
    # --- SoftREPA ---
    tau: float = 0.07
    alpha: float = 4.0
    dweight: float = 10.0
    # --- AGSM ---
    agsm_tau: float = 0.1
    g_pos: float = 1.0
    g_neg: float = 1.0
    ema_decay: float = 0.9999
    ema_init: str = "copy"                     # copy (the online init) | independent (a fresh N(0, std) draw)
    # --- logging / checkpoints ---
    log_every: int = 10
    ckpt_every: int = 100
    val_every: int = 200
    val_batches: int = 8
    snapshot_every: int = 0                    # 0 = none; else tokens saved every N steps (training curves)
    seed: int = 0
    device: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} ({' | '.join(METHODS)})")
        if self.batch_size < 2 or self.steps < 0 or self.n_tokens < 1:
            raise ValueError("need batch_size >= 2, steps >= 0, n_tokens >= 1")
        if self.init not in ("normal", "null", "zeros"):
            raise ValueError(f"unknown init {self.init!r} (normal | null | zeros)")
        if self.ema_init not in ("copy", "independent"):
            raise ValueError(f"unknown ema_init {self.ema_init!r} (copy | independent)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.uncon2neg and self.n_sets < 2:
            raise ValueError("uncon2neg needs AGSM's two token sets")
        if len(self.type_weights) != 4:
            raise ValueError("type_weights: four weights over (single, count, pair, relation)")

    @property
    def n_sets(self) -> int:
        return 2 if self.method == "agsm" and not self.shared_tokens else 1


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------
def hard_negative_batch(world, batch: int, generator: torch.Generator, type_weights=None, split: str = "train",
                        hard: bool = True) -> tuple[torch.Tensor, list, list]:
    """B rendered images (B, 3, H, W) in [-1, 1], their B distinct captions and specs: a prompt of ``split`` and its
    hard negatives (one attribute changed each), topped up with other prompts of the split when it has fewer;
    ``hard=False``: B random distinct prompts."""
    from dream.data.shapes import SAMPLE_TYPES, hard_negative_specs, spec_key, to_float_image

    types = None
    if type_weights is not None:
        w = torch.tensor([float(x) for x in type_weights])
        types = [SAMPLE_TYPES[int(torch.multinomial(w, 1, generator=generator))]]
    anchor = world.random_prompt_specs(1, split, generator=generator, types=types)[0]
    specs, caps = [anchor.spec], [anchor.caption]
    if hard:
        for s in hard_negative_specs(anchor.spec, batch - 1, world.config, generator):
            specs.append(s)
            caps.append(world.prompt_from_spec(s, generator=generator))
    seen = {spec_key(s) for s in specs}
    while len(specs) < batch:
        p = world.random_prompt_specs(1, split, generator=generator)[0]
        if spec_key(p.spec) not in seen:
            seen.add(spec_key(p.spec))
            specs.append(p.spec)
            caps.append(p.caption)
    images = torch.stack([to_float_image(world.render(s, generator)) if world.config.dtype == "uint8"
                          else world.render(s, generator) for s in specs])
    return images, caps, specs


def is_diffusers(pipe) -> bool:
    """A diffusers pipeline (``unet`` + ``scheduler``) rather than a DREAM pipeline."""
    return hasattr(pipe, "unet") and hasattr(pipe, "scheduler")


def load_pipeline(name, device: Optional[str] = None):
    """A DREAM pipeline (tag or folder) or a diffusers pipeline (a folder with ``model_index.json`` or a shipped
    diffusers tag)."""
    from dream.models.pretrained import get_pretrained_cfg, is_pretrained_tag

    folder = None
    if is_pretrained_tag(name) and get_pretrained_cfg(os.fspath(name)).kind == "diffusers":
        folder = get_pretrained_cfg(os.fspath(name)).verify()
    elif Path(name).is_dir() and (Path(name) / "model_index.json").exists():
        folder = Path(name)
    if folder is not None:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder)
        return pipe.to(device) if device else pipe
    from dream.pipeline import DreamPipeline

    return DreamPipeline.from_pretrained(name, device=device)


def dev_of(module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def null_token(pipe) -> torch.Tensor:
    """The null prompt's first token: diffusers, the "" prompt's BOS embedding (the authors' SD 1.5 token init);
    DREAM, the aligned null prompt's first token (its analogue)."""
    if is_diffusers(pipe):
        return pipe.encode_prompt([""], pipe.unet.device, 1, False)[0][0, 0].float().cpu()
    return pipe.model.forward_text_aligner(*pipe.text.null(1))[0, 0].cpu()


def _set_matrix(batch: int, n_sets: int, device) -> torch.Tensor:
    """Token set of each pair: psi+ (0) on the diagonal, psi- (1) elsewhere; all 0 with one set."""
    s = torch.zeros(batch, batch, dtype=torch.long, device=device)
    if n_sets == 2:
        s.fill_(1).fill_diagonal_(0)
    return s


@torch.no_grad()
def positive_pair_error(pairs, bank: Optional[SoftTokenBank], batches: list, generator_seed: int = 0,
                        sets: int = 0) -> dict:
    """Held-out diagnostics on fixed batches (same masks, t and eps for every bank): mean positive-pair error e_ii,
    mean negative error, win rate and margin (softmax_j(-e / 0.1)), all pairs with set ``sets`` (psi+: what sampling
    uses); ``bank=None``: the frozen model without tokens."""
    g = torch.Generator().manual_seed(generator_seed)
    out = {"err_pos": [], "err_neg": [], "win_rate": [], "margin": []}
    for enc in batches:
        pb = pairs.prepare(enc, g)
        B = pb.batch
        s = torch.full((B, B), sets, dtype=torch.long)
        err = pair_errors(pairs.predict(pb, bank, s), pb.target)
        d = pair_diagnostics(err, 0.1)
        for k in out:
            out[k].append(d[k])
    return {k: sum(v) / len(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------------
def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class SoftTokenTrainer:
    """Trains a :class:`SoftTrainConfig` into ``out``. ``pipeline`` may be passed in (a DREAM pipeline), else it is
    loaded from ``config.model``. ``resume=True`` continues from ``out/checkpoint.pt`` (same config)."""

    def __init__(self, config: SoftTrainConfig, out, resume: bool = False, pipeline=None, progress: bool = True,
                 logger=None):
        from dream.data.shapes import ShapesWorld

        from .soft_pairs import DiffusersPairs, DreamPairs
        from .soft_tokens import DiffusersSoftTokens

        self.cfg, self.out, self.progress, self.logger = config, Path(out), progress, logger
        self.out.mkdir(parents=True, exist_ok=True)
        saved = self.out / "config.json"
        if resume and saved.exists() and SoftTrainConfig.load(saved) != config:
            raise ValueError(f"{saved} holds another configuration; resume with the same config or use a new folder")
        if not resume and (self.out / "checkpoint.pt").exists():
            raise FileExistsError(f"{self.out} already holds a run; pass resume=True (--resume) or use a new folder")
        config.save(saved)
        c = config
        self.pipe = pipeline if pipeline is not None else load_pipeline(c.model, c.device)
        diffusers = is_diffusers(self.pipe)
        denoiser = self.pipe.unet if diffusers else self.pipe.model
        for p in denoiser.parameters():
            p.requires_grad_(False)
        self.world = ShapesWorld()
        g = torch.Generator().manual_seed(c.seed)
        dev = next(denoiser.parameters()).device
        if diffusers:
            ucfg = denoiser.config
            tc = SoftTokenConfig(dim=ucfg.cross_attention_dim, backbone="unet", groups=c.groups,
                                 num_timesteps=int(self.pipe.scheduler.config.num_train_timesteps))
        else:
            mc = denoiser.config
            tc = SoftTokenConfig(dim=mc.decoder_embed_dim, backbone="dream", num_timesteps=mc.diffusion_steps)
        # init "null": the null prompt's first token in every set and token slot
        init = null_token(self.pipe) if c.init == "null" else None
        tc = tc.replace(n_tokens=c.n_tokens, n_sets=c.n_sets, time_bins=c.time_bins, init_std=c.init_std,
                        init="given" if init is not None else c.init, uncon2neg=c.uncon2neg, method=c.method)
        self.bank = SoftTokenBank(tc, g, init).to(dev)
        if diffusers:
            self.pairs = DiffusersPairs(self.pipe, DiffusersSoftTokens(denoiser, self.bank))
        else:
            self.pairs = DreamPairs(self.pipe)
        self.ema = None
        if c.method == "agsm":
            self.ema = copy.deepcopy(self.bank) if c.ema_init == "copy" else \
                SoftTokenBank(tc.replace(init="normal"), g).to(dev)
            self.ema.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.bank.parameters(), lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.999),
                                     eps=1e-8)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(self.opt, T_0=c.lr_restart, T_mult=1,
                                                                          eta_min=c.lr_min)
        self.gen = torch.Generator().manual_seed(c.seed * 1_000_003 + 17)
        self.step = 0
        self.seconds = 0.0                      # training time over every session (checkpointed)
        self.captions: set = set()
        if resume and (self.out / "checkpoint.pt").exists():
            self._load()
        log.info("%s", self.bank.describe())
        self._val = None

    # ---- checkpoints -------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"step": self.step, "bank": self.bank.state_dict(), "ema": None if self.ema is None else
                self.ema.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "gen": self.gen.get_state(), "captions": sorted(self.captions), "seconds": self.seconds}

    def _save(self) -> None:
        _atomic_torch_save(self._state(), self.out / "checkpoint.pt")

    def _load(self) -> None:
        st = torch.load(self.out / "checkpoint.pt", weights_only=True, map_location=dev_of(self.bank))
        self.bank.load_state_dict(st["bank"])
        if self.ema is not None:
            self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        self.gen.set_state(st["gen"].cpu())
        self.step = int(st["step"])
        self.seconds = float(st.get("seconds", 0.0))
        self.captions = set(st["captions"])
        for name in ("metrics.jsonl", "val.jsonl"):                    # drop lines the stopped run wrote later
            f = self.out / name
            if f.exists():
                keep = [ln for ln in f.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
                f.write_text("".join(ln + "\n" for ln in keep))

    # ---- one step ----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        c = self.cfg
        images, caps, _ = hard_negative_batch(self.world, c.batch_size, self.gen, c.type_weights, c.split,
                                              c.hard_negatives)
        self.captions.update(caps)
        pb = self.pairs.prepare(self.pairs.encode(images, caps), self.gen)
        B = pb.batch
        sets = _set_matrix(B, c.n_sets, pb.x0.device)
        chunk = c.chunk_rows or B
        self.opt.zero_grad(set_to_none=True)
        total, errs, ema_errs, pos, neg = 0.0, [], [], 0.0, 0.0
        for lo in range(0, B, chunk):
            rows = torch.arange(lo, min(B, lo + chunk), device=pb.x0.device)
            pred = self.pairs.predict(pb, self.bank, sets[rows], rows)
            if c.method == "softrepa":
                err = pair_errors(pred, pb.target[rows])
                loss = softrepa_loss(err, c.tau, c.alpha, c.dweight, rows=rows, batch=B)
            else:
                with torch.no_grad():
                    ema_pred = self.pairs.predict(pb, self.ema, sets[rows], rows)
                loss, info = agsm_loss(pred, ema_pred, pb.target[rows], c.agsm_tau, c.g_pos, c.g_neg, rows=rows,
                                       batch=B)
                err = pair_errors(pred.detach(), pb.target[rows])
                ema_errs.append(info["ema_err"])
                pos, neg = pos + float(info["pos"]), neg + float(info["neg"])
            loss.backward()
            total += float(loss.detach())
            errs.append(err.detach())
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.bank.parameters(), c.grad_clip)
        self.opt.step()
        self.step += 1
        if self.step % c.lr_interval == 0:
            self.sched.step()
        if self.ema is not None:
            ema_update_(self.ema, self.bank, c.ema_decay)
        err = torch.cat(errs)
        rec = {"step": self.step, "loss": total, "t": pb.t, "lr": self.opt.param_groups[0]["lr"]}
        diag_src = torch.cat(ema_errs) if ema_errs else err
        rec.update(pair_diagnostics(diag_src, c.agsm_tau if ema_errs else c.tau))
        online = pair_diagnostics(err)
        rec["err_pos"], rec["err_neg"] = online["err_pos"], online["err_neg"]
        if c.method == "agsm":
            rec["pos"], rec["neg"] = pos, neg
        return rec

    # ---- validation --------------------------------------------------------------------------------
    def val_batches(self) -> list:
        """Fixed held-out batches (the ``val`` split), encoded once."""
        if self._val is None:
            g = torch.Generator().manual_seed(10_007 + self.cfg.seed)
            self._val = [self.pairs.encode(*hard_negative_batch(self.world, self.cfg.batch_size, g,
                                                                 self.cfg.type_weights, "val")[:2])
                         for _ in range(self.cfg.val_batches)]
        return self._val

    def validate(self, bank: Optional[SoftTokenBank] = "online") -> dict:
        bank = self.bank if bank == "online" else bank
        return positive_pair_error(self.pairs, bank, self.val_batches(), generator_seed=4242)

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        c = self.cfg
        t0 = time.time()
        metrics = (self.out / "metrics.jsonl").open("a")
        valf = (self.out / "val.jsonl").open("a")
        if self.step == 0 and c.val_every and c.val_batches:
            valf.write(json.dumps({"step": 0, **self.validate()}) + "\n")
            valf.flush()
        bar = tqdm(total=c.steps, initial=self.step, disable=not self.progress, desc=c.method)
        try:
            while self.step < c.steps:
                ts = time.time()
                rec = self.train_step()
                self.seconds += time.time() - ts
                bar.update(1)
                if self.step % c.log_every == 0 or self.step == c.steps:
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", win=f"{rec['win_rate']:.2f}")
                    if self.logger is not None:
                        self.logger.log_scalars(self.step, {f"train/{k}": v for k, v in rec.items() if k != "step"})
                if c.val_every and c.val_batches and (self.step % c.val_every == 0 or self.step == c.steps):
                    v = {"step": self.step, **self.validate()}
                    valf.write(json.dumps(v) + "\n")
                    valf.flush()
                    if self.logger is not None:
                        self.logger.log_scalars(self.step, {f"val/{k}": x for k, x in v.items() if k != "step"})
                if c.snapshot_every and self.step % c.snapshot_every == 0:
                    self.bank.save(self.out / "snapshots" / f"step_{self.step:06d}", {"step": self.step})
                if self.step % c.ckpt_every == 0 or self.step == c.steps:
                    self._save()
        finally:
            bar.close()
            metrics.close()
            valf.close()
        seconds = time.time() - t0
        self.bank.save(self.out / "tokens", {"step": self.step, "train_config": c.to_dict()})
        (self.out / "captions.json").write_text(json.dumps(sorted(self.captions)))
        report = {"config": c.to_dict(), "steps": self.step, "seconds_this_session": seconds,
                  "train_seconds": self.seconds, "seconds_per_step": self.seconds / max(1, self.step),
                  "parameters": self.bank.num_parameters(), "describe": self.bank.describe(),
                  "tokens": str(self.out / "tokens"), "val": _read_jsonl(self.out / "val.jsonl")[-1:]}
        self._figures()
        (self.out / "report.json").write_text(json.dumps(report, indent=2))
        return report

    def _figures(self) -> None:
        from dream.utils.plots import plot_curves, plot_loss_curves

        hist = _read_jsonl(self.out / "metrics.jsonl")
        if hist:
            title = f"{self.cfg.method}: training"
            plot_loss_curves(hist, self.out / "loss.png", keys=("loss", "err_pos", "err_neg"), title=title)
            plot_loss_curves(hist, self.out / "diagnostics.png", keys=("win_rate", "margin"),
                             title=f"{self.cfg.method}: win rate and margin (batch)")
        val = _read_jsonl(self.out / "val.jsonl")
        if len(val) > 1:
            xs = [v["step"] for v in val]
            plot_curves({k: [v[k] for v in val] for k in ("err_pos", "err_neg", "win_rate")}, self.out / "val.png",
                        x=xs, title=f"{self.cfg.method}: held-out pairs (psi+ on every pair)")


def _read_jsonl(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
