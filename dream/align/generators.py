"""Text-to-image generators behind one small protocol, so DreamSync (:mod:`dream.align.dreamsync`) is
model-agnostic: generate images for prompts with a seed, fine-tune a LoRA on (prompt, image) pairs with the model's
own loss, merge it, save it.

* :class:`DreamGenerator` wraps a :class:`~dream.pipeline.DreamPipeline`: MAR sampling (its own settings), and
  LoRA fine-tuning with DREAM's diffusion loss at MAR mask ratios (the masking of MAR / FLUID, arXiv 2406.11838 /
  2410.13863: a truncated normal around 1 on [0.7, 1]; captions dropped for CFG with the model's
  ``text_drop_prob``). Candidates can also be scored part-way with DREAM's own critic (as Semantically Aligned
  Decoding does) and only the best ``keep`` of ``k`` finished (:meth:`DreamGenerator.candidates`).
* Stable Diffusion pipelines in diffusers: :mod:`dream.align.sd`.

:func:`load_generator` picks the right class for a name or folder.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from tqdm.auto import tqdm

from dream.utils.config import ConfigBase

__all__ = ["T2IGenerator", "LoraTrainConfig", "DreamGenerator", "load_generator"]


@dataclass(frozen=True)
class LoraTrainConfig(ConfigBase):
    """LoRA fine-tuning on (prompt, image) pairs (DreamSync's per-round step)."""

    rank: int = 8
    alpha: Optional[float] = None            # None = rank (scale 1)
    targets: str = "decoder"                 # a preset of dream.adapters (DREAM) or diffusers; or names / regexes
    dropout: float = 0.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: float = 2.0                      # passes over the kept pairs (DreamSync spec: ~2 per round)
    min_steps: int = 50
    max_steps: int = 2000
    batch_size: int = 16
    grad_clip: float = 1.0

    def steps_for(self, n_pairs: int) -> int:
        return int(min(self.max_steps, max(self.min_steps, math.ceil(self.epochs * n_pairs / self.batch_size))))


@runtime_checkable
class T2IGenerator(Protocol):
    """What DreamSync needs from a text-to-image model."""

    def generate(self, prompts: Sequence[str], seed: int) -> torch.Tensor:
        """One image per prompt, (N, 3, H, W) in [-1, 1]; the same for the same seed."""

    def finetune_lora(self, prompts: Sequence[str], images: torch.Tensor, config: LoraTrainConfig,
                      generator: torch.Generator, progress: bool = False) -> dict:
        """Add a fresh LoRA, train it on the pairs with the model's own loss, leave it active (unmerged)."""

    def save_lora(self, path, format: str = "peft") -> Path: ...

    @property
    def lora_module(self) -> "torch.nn.Module":
        """The module the adapters are added to (reading adapter files needs it)."""

    def merge_lora(self) -> None:
        """Fuse the active adapter into the weights (the next round starts from the merged model)."""

    def load_lora(self, path, weight: float = 1.0) -> None: ...


class LoraFiles:
    """``save_lora`` / ``merge_lora`` for a generator whose adapters live in ``self.lora_module``."""

    def save_lora(self, path, format: str = "peft") -> Path:
        """The adapter as a peft folder, a diffusers file or a kohya file (``format``)."""
        from dream.adapters import save_lora

        return Path(save_lora(self.lora_module, path, format=format))

    def merge_lora(self) -> None:
        """Fuse the active adapters into the weights and drop the wrappers (plain modules again)."""
        from dream.adapters import merge_lora

        merge_lora(self.lora_module, unload=True)


class DreamGenerator(LoraFiles):
    """A DREAM pipeline as a DreamSync generator. ``sampler`` overrides the pipeline's sampler settings
    (``num_iter``, ``cfg``, ``temperature``, ``cfg_schedule``, ``num_sampling_steps``)."""

    def __init__(self, pipeline, batch_size: int = 128, sampler: Optional[dict] = None, progress: bool = False):
        self.pipe = pipeline
        self.batch_size = int(batch_size)
        self.sampler = dict(sampler or {})
        self.progress = progress

    @property
    def model(self):
        return self.pipe.model

    @property
    def lora_module(self):
        return self.pipe.model

    # ---- generation ----------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], seed: int) -> torch.Tensor:
        return self.pipe.generate(list(prompts), seed=seed, batch_size=self.batch_size, progress=self.progress,
                                  **self.sampler)

    @torch.no_grad()
    def candidates(self, prompts: Sequence[str], k: int, seed: int, keep: Optional[int] = None,
                   tau: Union[int, float] = 0.25) -> tuple[torch.Tensor, dict]:
        """``k`` candidates per prompt: images (P, keep or k, 3, H, W) and stats (seconds, AR-step rows run).

        With ``keep < k`` every candidate runs the first ``tau`` AR steps (an int, or a fraction of the tokens),
        DREAM scores the partial images (:func:`~dream.sampling.critic_scores`, the SAD critic) and only the best
        ``keep`` per prompt are finished: the cost of the remaining steps falls by ``keep / k``."""
        from dream.sampling import MARSampler, critic_scores, resolve_threshold

        prompts = list(prompts)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        keep = k if keep is None else int(keep)
        if not 1 <= keep <= k:
            raise ValueError(f"keep must be in [1, {k}], got {keep}")
        t0 = time.time()
        if keep == k:
            imgs = self.generate([p for p in prompts for _ in range(k)], seed)
            return imgs.view(len(prompts), k, *imgs.shape[1:]), {"seconds": time.time() - t0, "finished": k}
        pipe, model = self.pipe, self.pipe.model
        scfg = pipe.sampler_config(**self.sampler)
        sampler = MARSampler(model, scfg)
        tau_steps = resolve_threshold(tau, scfg.num_iter, model.config.seq_len)
        g = torch.Generator().manual_seed(int(seed))
        per_chunk = max(1, self.batch_size // k)
        out = []
        for i in tqdm(range(0, len(prompts), per_chunk), disable=not self.progress, desc="candidates"):
            chunk = prompts[i: i + per_chunk]
            rep = [p for p in chunk for _ in range(k)]                                  # prompt-major rows
            feats, pad = pipe.text.features(rep)
            null, null_pad = pipe.text.null(len(rep))
            st = sampler.init_state(feats, null, text_padding_mask=pad, null_padding_mask=null_pad, generator=g)
            sampler.run(st, 0, tau_steps, generator=g)
            score = critic_scores(model, st.tokens, st.mask, model.encode_text(pipe.text.clip_ids(rep)))
            best = score.view(len(chunk), k).topk(keep, dim=1).indices                  # (P, keep)
            rows = (best + torch.arange(len(chunk))[:, None] * k).flatten().to(st.tokens.device)
            st = sampler.run(st.select(rows), tau_steps, generator=g)
            img = pipe.tokenizer.decode(st.tokens.float()).clamp(-1, 1).cpu()
            out.append(img.view(len(chunk), keep, *img.shape[1:]))
        return torch.cat(out), {"seconds": time.time() - t0, "finished": keep, "tau": tau_steps}

    # ---- LoRA ----------------------------------------------------------------------------------------
    def finetune_lora(self, prompts: Sequence[str], images: torch.Tensor, config: LoraTrainConfig,
                      generator: torch.Generator, progress: bool = False) -> dict:
        """Fresh LoRA on the pairs, trained with DREAM's diffusion loss at MAR mask ratios; stays active."""
        from dream.adapters import add_lora, lora_parameters
        from dream.masking import MaskingWarmup, MaskingWarmupConfig

        pipe, model = self.pipe, self.pipe.model
        prompts = list(prompts)
        if len(prompts) != images.shape[0] or not prompts:
            raise ValueError(f"need one image per prompt and at least one pair, got {len(prompts)} prompts and "
                             f"{images.shape[0]} images")
        with torch.no_grad():
            tokens = torch.cat([pipe.tokenizer.encode(images[i: i + 256].to(pipe.device), sample=False)
                                for i in range(0, len(prompts), 256)])
        with torch.random.fork_rng(devices=[]):      # peft inits A from the global RNG: seed it from generator
            torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
            add_lora(model, rank=config.rank, alpha=config.alpha, targets=config.targets, dropout=config.dropout)
        params = lora_parameters(model)
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        masking = MaskingWarmup(MaskingWarmupConfig.fluid())
        steps = config.steps_for(len(prompts))
        drop = float(model.config.text_drop_prob)
        model.eval()                       # the frozen base without dropout; only the adapter learns
        losses = []
        n = len(prompts)
        for step in tqdm(range(steps), disable=not progress, desc="lora"):
            idx = torch.randint(n, (min(config.batch_size, n),), generator=generator)
            batch = [prompts[i] for i in idx.tolist()]
            feats, pad = pipe.text.features(batch, drop_prob=drop, generator=generator)
            mask = masking.draw_masks(epoch=0.0, batch_size=len(batch), seq_len=model.config.seq_len,
                                      generator=generator).mask.to(pipe.device)
            with torch.enable_grad():
                out = model(tokens[idx.to(tokens.device)], pipe.text.clip_ids(batch), feats, mask,
                            text_padding_mask=pad, generator=generator, gather=False)
                loss = out["diff_loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
            losses.append(float(loss.detach()))
        return {"steps": steps, "pairs": n, "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
                "losses": losses}

    def load_lora(self, path, weight: float = 1.0) -> None:
        self.pipe.load_lora(path, weight=weight)


def load_generator(name_or_path: Union[str, os.PathLike], device: Optional[str] = None, **kw):
    """A generator for a shipped tag or a folder: a diffusers pipeline folder (``model_index.json``) or a shipped
    diffusers tag gives a Stable Diffusion generator, anything else a :class:`DreamGenerator`."""
    from dream.models.pretrained import get_pretrained_cfg, is_pretrained_tag

    if (is_pretrained_tag(name_or_path) and get_pretrained_cfg(os.fspath(name_or_path)).kind == "diffusers") or \
            (Path(name_or_path).is_dir() and (Path(name_or_path) / "model_index.json").exists()):
        from .sd import DiffusersGenerator

        return DiffusersGenerator.from_pretrained(name_or_path, device=device, **kw)
    from dream.pipeline import DreamPipeline

    return DreamGenerator(DreamPipeline.from_pretrained(name_or_path, device=device), **kw)
