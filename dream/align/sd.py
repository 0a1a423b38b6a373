"""Stable Diffusion pipelines in diffusers as DreamSync generators (the :class:`~dream.align.generators.T2IGenerator`
protocol), so DreamSync (Sun et al., arXiv 2311.17946) runs on SD the way the paper does: sample ``k`` images per
prompt, fine-tune a LoRA on the kept pairs with the model's own denoising loss, fuse it, repeat.

* Loading: a ``StableDiffusionPipeline`` folder (``model_index.json``; UNet2DConditionModel, CLIPTextModel,
  CLIPTokenizer, a scheduler and an optional AutoencoderKL) with stock diffusers, offline, no safety checker. A
  folder whose ``vae`` entry is empty (or missing) is a *pixel-space* model: the UNet denoises the images
  themselves (3 channels, values in [-1, 1]).
* Sampling (:meth:`DiffusersGenerator.generate`): the loop of diffusers' ``StableDiffusionPipeline.__call__``
  written out (text embeddings, classifier-free guidance against the empty prompt, ``scheduler.set_timesteps``,
  ``scale_model_input``, ``scheduler.step`` with a ``torch.Generator``), then the VAE decoder when there is one. One
  loop for both kinds of model; on a latent model it gives the stock pipeline's images (tested).
* Fine-tuning (:meth:`DiffusersGenerator.finetune_lora`): a fresh LoRA on the UNet (:mod:`dream.adapters`, peft
  underneath; the text encoder and the VAE stay frozen) trained with the loss of diffusers' LoRA script
  ``examples/text_to_image/train_text_to_image_lora.py``: latents ``z = vae.encode(x).latent_dist.sample() *
  scaling_factor`` (the pixels for a pixel-space model), Gaussian noise, timesteps uniform over the training
  scheduler's ``num_train_timesteps`` (a ``DDPMScheduler`` with the folder's scheduler config), ``z_t =
  add_noise(z, noise, t)``, and the MSE of the UNet's prediction against the noise (``epsilon``), the velocity
  (``v_prediction``) or ``z`` (``sample``) as the scheduler's ``prediction_type`` says; AdamW, gradient clipping.
  That script does not drop captions; ``caption_dropout > 0`` replaces a caption by the empty prompt with that
  probability (the usual way to keep classifier-free guidance working; off by default). Min-SNR weighting and
  noise offset are not implemented.
* LoRA targets: ``LoraTrainConfig.targets`` names DREAM presets by default (``"decoder"``); on a UNet a target that
  consists only of DREAM preset names (``decoder``, ``decoder_attn``, ``text_aligner``, ...) means the UNet's
  default, diffusers' ``to_q, to_k, to_v, to_out.0`` (:data:`dream.adapters.DIFFUSERS_PRESETS`); ``all`` means every
  ``nn.Linear`` of the UNet, as on DREAM. Module names, suffixes and regexes are passed through.
* Files: :meth:`~DiffusersGenerator.save_lora` writes peft folders and diffusers files (``unet.``-prefixed keys;
  they load with the stock ``StableDiffusionPipeline.load_lora_weights``) and kohya files.

    from dream.align import DreamSync, DreamSyncConfig
    DreamSync(DreamSyncConfig(model="path/to/sd_folder", sampler={"num_inference_steps": 25}), "runs/ds_sd").run()
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .generators import LoraFiles, LoraTrainConfig

__all__ = ["DiffusersGenerator", "SAMPLER_DEFAULTS", "unet_targets"]

# The stock StableDiffusionPipeline.__call__ defaults (height / width: the UNet's sample size x the VAE's factor).
SAMPLER_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 7.5, "eta": 0.0, "negative_prompt": "",
                    "height": None, "width": None}
# Components DreamSync never uses, not loaded (stock loading wants them passed as None when a folder lacks them).
_UNUSED = {"safety_checker": None, "feature_extractor": None, "image_encoder": None}


def unet_targets(targets: Union[None, str, Sequence[str]], unet: Optional[torch.nn.Module] = None):
    """LoRA targets for a UNet from a :class:`LoraTrainConfig` ``targets``: DREAM-only presets (alone or joined by
    ``+``) become None (the UNet's default, diffusers' attention projections), ``"all"`` every ``nn.Linear`` of
    ``unet`` (as on DREAM); anything else is kept."""
    from dream.adapters import DREAM_PRESETS

    if targets == "all":
        if unet is None:
            raise ValueError('targets="all" needs the UNet to list its Linear layers')
        return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)]
    if isinstance(targets, str) and all(p in DREAM_PRESETS and p != "all" for p in targets.split("+")):
        return None
    return targets


def _resolve(name_or_path) -> tuple[Path, dict]:
    """The pipeline folder and the shipped sampler settings for a tag (``{}`` for a folder)."""
    from dream.models.pretrained import get_pretrained_cfg, is_pretrained_tag, pretrained_path

    if is_pretrained_tag(name_or_path, "diffusers"):
        tag = os.fspath(name_or_path)
        return pretrained_path(tag, "diffusers"), dict(get_pretrained_cfg(tag).sampler)
    folder = Path(name_or_path)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json) nor a shipped "
                                "diffusers tag")
    return folder, {}


class DiffusersGenerator(LoraFiles):
    """A diffusers ``StableDiffusionPipeline`` (latent, or pixel-space with ``vae=None``) as a DreamSync generator.

    Args:
        pipe: the pipeline (``unet``, ``text_encoder``, ``tokenizer``, ``scheduler``, ``vae`` or None).
        batch_size: images per sampling batch.
        sampler: overrides of :data:`SAMPLER_DEFAULTS` (``num_inference_steps``, ``guidance_scale`` (CFG only when
            > 1, as diffusers), ``eta``, ``negative_prompt``, ``height``, ``width``).
        caption_dropout: probability of training on the empty prompt instead of the caption (0: as diffusers'
            LoRA script).
    """

    def __init__(self, pipe, batch_size: int = 16, sampler: Optional[dict] = None, progress: bool = False,
                 caption_dropout: float = 0.0):
        unknown = sorted(set(sampler or {}) - set(SAMPLER_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown sampler settings {unknown} for a diffusers generator "
                             f"({', '.join(SAMPLER_DEFAULTS)})")
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.pipe = pipe
        self.batch_size = int(batch_size)
        self.sampler = {**SAMPLER_DEFAULTS, **(sampler or {})}
        self.progress = progress
        self.caption_dropout = float(caption_dropout)
        for m in (pipe.unet, pipe.text_encoder, pipe.vae):
            if m is not None:
                m.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, name_or_path, device: Optional[str] = None, batch_size: int = 16,
                        sampler: Optional[dict] = None, progress: bool = False, **kw) -> "DiffusersGenerator":
        """Load a pipeline folder (or a shipped ``diffusers`` tag, whose sampler settings are the defaults) offline
        with stock ``StableDiffusionPipeline.from_pretrained``; components listed as empty load as None."""
        from diffusers import StableDiffusionPipeline

        folder, shipped = _resolve(name_or_path)
        index = json.loads((folder / "model_index.json").read_text())
        vae = index.get("vae")
        skip = dict(_UNUSED, **({} if isinstance(vae, list) and vae[0] is not None else {"vae": None}))
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True,
                                                       requires_safety_checker=False, **skip)
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(torch.device(device or "cpu"))
        return cls(pipe, batch_size=batch_size, sampler={**shipped, **(sampler or {})}, progress=progress, **kw)

    # ---- components ----------------------------------------------------------------------------------
    @property
    def unet(self):
        return self.pipe.unet

    @property
    def lora_module(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (1 in pixel space)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings (N, L, D) as the stock pipeline computes them (padded to the tokenizer's length)."""
        tok, te = self.pipe.tokenizer, self.pipe.text_encoder
        enc = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        mask = enc.attention_mask.to(self.device) if getattr(te.config, "use_attention_mask", False) else None
        return te(enc.input_ids.to(self.device), attention_mask=mask)[0].to(self.dtype)

    # ---- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _sample(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        s, unet, sched = self.sampler, self.unet, self.pipe.scheduler
        f = self.vae_scale_factor
        h = (s["height"] or unet.config.sample_size * f) // f
        w = (s["width"] or unet.config.sample_size * f) // f
        cfg = s["guidance_scale"] > 1 and unet.config.time_cond_proj_dim is None
        cond = self.encode_prompts(prompts)
        if cfg:
            cond = torch.cat([self.encode_prompts([s["negative_prompt"]] * len(prompts)), cond])
        sched.set_timesteps(s["num_inference_steps"], device=self.device)
        shape = (len(prompts), unet.config.in_channels, h, w)
        x = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device) * sched.init_noise_sigma
        params = inspect.signature(sched.step).parameters
        extra = {k: v for k, v in (("eta", s["eta"]), ("generator", generator)) if k in params}
        for t in tqdm(sched.timesteps, disable=not self.progress, desc="denoise", leave=False):
            inp = sched.scale_model_input(torch.cat([x, x]) if cfg else x, t)
            pred = unet(inp, t, encoder_hidden_states=cond, return_dict=False)[0]
            if cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + s["guidance_scale"] * (text - uncond)
            x = sched.step(pred, t, x, **extra, return_dict=False)[0]
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        return x.float().clamp(-1, 1).cpu()

    def generate(self, prompts: Sequence[str], seed: int) -> torch.Tensor:
        """One image per prompt, (N, 3, H, W) float in [-1, 1], in batches of ``batch_size`` drawing from one
        ``torch.Generator`` seeded with ``seed`` (the same prompts, seed and batch size give the same images)."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("empty prompt list")
        g = torch.Generator().manual_seed(int(seed))
        return torch.cat([self._sample(prompts[i: i + self.batch_size], g)
                          for i in range(0, len(prompts), self.batch_size)])

    # ---- LoRA ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _latent_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Mean and std of the scaled VAE posterior per image (the pixels and None in pixel space)."""
        x = images.to(self.device, self.dtype)
        if self.vae is None:
            return x, None
        means, stds = [], []
        for i in range(0, x.shape[0], self.batch_size):
            d = self.vae.encode(x[i: i + self.batch_size]).latent_dist
            means.append(d.mean)
            stds.append(d.std)
        sf = self.vae.config.scaling_factor
        return torch.cat(means) * sf, torch.cat(stds) * sf

    def finetune_lora(self, prompts: Sequence[str], images: torch.Tensor, config: LoraTrainConfig,
                      generator: torch.Generator, progress: bool = False) -> dict:
        """Fresh LoRA on the UNet, trained on the (prompt, image) pairs with the denoising loss of diffusers' LoRA
        script (see the module docstring); the adapter stays active (unmerged). Every draw (adapter init, pairs,
        VAE posterior samples, noise, timesteps, caption dropout, dropout) comes from ``generator``."""
        from diffusers import DDPMScheduler

        from dream.adapters import add_lora, lora_parameters

        prompts = list(prompts)
        if len(prompts) != images.shape[0] or not prompts:
            raise ValueError(f"need one image per prompt and at least one pair, got {len(prompts)} prompts and "
                             f"{images.shape[0]} images")
        unet = self.unet
        train_sched = DDPMScheduler.from_config(self.pipe.scheduler.config)
        kind = train_sched.config.prediction_type
        if kind not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {kind!r} in the scheduler config")
        uniq = sorted(set(prompts))
        emb = torch.cat([self.encode_prompts(uniq[i: i + 256]) for i in range(0, len(uniq), 256)])
        emb = emb[torch.tensor([uniq.index(p) for p in prompts])]
        empty = self.encode_prompts([""]) if self.caption_dropout > 0 else None
        mean, std = self._latent_moments(images)
        n, steps, T = len(prompts), config.steps_for(len(prompts)), train_sched.config.num_train_timesteps
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        rng_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        losses = []
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)                      # peft's adapter init and LoRA dropout draw from here
            add_lora(unet, rank=config.rank, alpha=config.alpha, targets=unet_targets(config.targets, unet),
                     dropout=config.dropout)
            params = lora_parameters(unet)
            opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
            unet.train()
            try:
                for _ in tqdm(range(steps), disable=not progress, desc="lora"):
                    idx = torch.randint(n, (min(config.batch_size, n),), generator=generator)
                    z = mean[idx]
                    if std is not None:
                        z = z + std[idx] * torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
                    noise = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
                    t = torch.randint(T, (len(idx),), generator=generator).to(self.device)
                    cond = emb[idx]
                    if empty is not None:
                        drop = (torch.rand(len(idx), generator=generator) < self.caption_dropout).to(self.device)
                        cond = torch.where(drop[:, None, None], empty, cond)
                    target = {"epsilon": noise, "sample": z}.get(kind)
                    if target is None:
                        target = train_sched.get_velocity(z, noise, t)
                    with torch.enable_grad():
                        pred = unet(train_sched.add_noise(z, noise, t), t, encoder_hidden_states=cond,
                                    return_dict=False)[0]
                        loss = F.mse_loss(pred.float(), target.float())
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        if config.grad_clip > 0:
                            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                        opt.step()
                    losses.append(float(loss.detach()))
            finally:
                unet.eval()
        return {"steps": steps, "pairs": n, "loss_first": losses[0],
                "loss_last": sum(losses[-10:]) / len(losses[-10:]), "losses": losses}

    def load_lora(self, path, weight: float = 1.0) -> None:
        """Load a LoRA file or folder (peft / diffusers / kohya) into the UNet with ``weight``."""
        from dream.adapters import load_lora

        load_lora(self.unet, path, weight=weight)

    # ---- soft tokens ---------------------------------------------------------------------------------
    def load_soft_tokens(self, path, uncon2neg: Optional[bool] = None):
        """Load SoftREPA / AGSM soft tokens trained for this UNet (``dream align softrepa|agsm`` with a diffusers
        model) into its cross-attention (:class:`~dream.align.soft_tokens.DiffusersSoftTokens`): generation uses
        psi+ on the conditional half of the CFG batch and, with ``uncon2neg`` (default: the tokens' own setting),
        psi- on the unconditional half. Replaces tokens loaded before; a file that does not fit this UNet raises
        ``ValueError`` and leaves the tokens loaded before in place. Returns the bank."""
        from .soft_tokens import DiffusersSoftTokens, load_soft_tokens

        bank = load_soft_tokens(path, device=self.device)
        c, want = bank.config, self.unet.config.cross_attention_dim
        if c.backbone != "unet":
            raise ValueError(f"{path}: soft tokens for a {c.backbone!r} model, this generator has a UNet")
        if c.dim != want:
            raise ValueError(f"{path}: soft tokens of width {c.dim}, the UNet's cross-attention takes {want}")
        bank = bank.to(self.dtype).requires_grad_(False)
        old = getattr(self, "_soft", None)
        if old is not None:
            old.remove()
        try:
            self._soft = DiffusersSoftTokens(self.unet, bank, uncon2neg=uncon2neg)
        except Exception:
            self._soft = None if old is None else DiffusersSoftTokens(self.unet, old.bank, old.context.cfg_halves)
            raise
        return bank

    def unload_soft_tokens(self) -> None:
        """Remove loaded soft tokens (the UNet's own attention processors back)."""
        old = getattr(self, "_soft", None)
        if old is not None:
            old.remove()
        self._soft = None
