"""Stable Diffusion folders in diffusers' own classes from the project's parts, and sampling them.

A latent diffusion model (Rombach et al., 2022, arXiv 2112.10752) in diffusers (huggingface/diffusers) is a folder
that ``StableDiffusionPipeline.from_pretrained`` loads: ``model_index.json`` plus one subfolder per component
(``unet``, ``text_encoder``, ``tokenizer``, ``vae``, ``scheduler``). This module builds such folders from the
project's pieces:

* :func:`vae_to_diffusers`: a :class:`~dream.models.tokenizers.VAETokenizer` (e.g. ``shapes_vae``) as a diffusers
  ``AutoencoderKL``. The project's latent convention is ``latents = (z - shift_factor) * scaling_factor``; the
  stock SD pipeline decodes ``vae.decode(latents / scaling_factor)`` and never applies ``shift_factor``, so the
  shift is folded into the weights: ``quant_conv``'s mean bias loses ``shift`` (the posterior mean becomes
  ``z - shift``) and ``post_quant_conv``'s bias gains ``W @ (shift * 1)`` (the decoder sees the original ``z``).
  Both convolutions are 1x1, so the fold is exact up to float rounding; the exported config has no shift.
* :func:`save_sd_pipeline`: write the components with diffusers' / transformers' own ``save_pretrained``
  (safetensors), without safety checker or feature extractor.
* :func:`sd_generate`: images from captions with the stock pipeline, one ``torch.Generator`` per prompt (so an
  image does not depend on the batch it was drawn in).

diffusers and transformers are imported when these functions run (``pip install 'dream[sd]'``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

__all__ = ["vae_to_diffusers", "save_sd_pipeline", "load_sd_pipeline", "sd_generate", "prompt_generators"]


@torch.no_grad()
def vae_to_diffusers(vae_tokenizer, fold_shift: bool = True):
    """A diffusers ``AutoencoderKL`` with the weights of ``vae_tokenizer`` (a
    :class:`~dream.models.tokenizers.VAETokenizer`, or a name / path for :func:`create_tokenizer`).

    With ``fold_shift`` the tokenizer's ``shift_factor`` is folded into ``quant_conv`` / ``post_quant_conv`` (see
    the module docstring), so ``vae.encode(x).latent_dist.mean * scaling_factor`` equals the tokenizer's latents and
    ``vae.decode(latents / scaling_factor)`` its decoded images, with the config's ``shift_factor`` left unset.
    """
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from dream.models.tokenizers import VAETokenizer, create_tokenizer

    tok = vae_tokenizer if isinstance(vae_tokenizer, VAETokenizer) else create_tokenizer(vae_tokenizer)
    if not isinstance(tok, VAETokenizer):
        raise TypeError(f"need a VAE tokenizer, got {type(tok).__name__}")
    cfg = tok.config.to_diffusers_config()
    cfg.pop("dream_patch_size", None)
    cfg.pop("_class_name", None)
    shift = float(tok.config.shift_factor)
    cfg["shift_factor"] = None if fold_shift else shift
    vae = DiffusersAutoencoderKL(**cfg)
    sd = {k: v.detach().float().clone() for k, v in tok.vae.state_dict().items()}
    if fold_shift and shift != 0.0:
        if not (tok.config.use_quant_conv and tok.config.use_post_quant_conv):
            raise ValueError("folding shift_factor needs quant_conv and post_quant_conv (1x1 convolutions)")
        c = tok.config.latent_channels
        sd["quant_conv.bias"][:c] -= shift                                   # posterior mean: z - shift
        w = sd["post_quant_conv.weight"][:, :, 0, 0].double()                 # (C_out, C_in)
        sd["post_quant_conv.bias"] = (sd["post_quant_conv.bias"].double() + shift * w.sum(dim=1)).float()
    vae.load_state_dict(sd, strict=True)
    return vae.eval()


def save_sd_pipeline(folder: Union[str, os.PathLike], *, unet, text_encoder, tokenizer, vae, scheduler,
                     dtype: Optional[torch.dtype] = None, vae_dtype: Optional[torch.dtype] = None) -> Path:
    """Write a ``StableDiffusionPipeline`` folder (safetensors; no safety checker / feature extractor).

    ``dtype`` stores the UNet and text encoder weights in that dtype (e.g. ``torch.float16`` to halve the folder),
    ``vae_dtype`` the VAE's; the modules passed in are not changed. ``from_pretrained`` without ``torch_dtype``
    loads them back in float32.
    """
    import copy

    from diffusers import StableDiffusionPipeline

    def cast(m, dt):
        return copy.deepcopy(m).to(dt) if dt is not None else m

    pipe = StableDiffusionPipeline(vae=cast(vae, vae_dtype), text_encoder=cast(text_encoder, dtype),
                                   tokenizer=tokenizer, unet=cast(unet, dtype), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(os.fspath(folder), safe_serialization=True)
    return Path(folder)


def load_sd_pipeline(folder: Union[str, os.PathLike], device: Union[str, torch.device, None] = None):
    """``StableDiffusionPipeline.from_pretrained(folder)`` in float32, offline, progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(os.fspath(folder), torch_dtype=torch.float32,
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def prompt_generators(n: int, seed: int, start: int = 0) -> list:
    """One ``torch.Generator`` per prompt: prompt ``i`` gets seed ``seed_for(seed, "sd-sample", i)``."""
    from dream.data.shapes import seed_for

    return [torch.Generator().manual_seed(seed_for(seed, "sd-sample", i)) for i in range(start, start + n)]


@torch.no_grad()
def sd_generate(pipe, captions: Sequence[str], *, seed: int = 0, num_inference_steps: int = 25,
                guidance_scale: float = 3.0, batch_size: int = 128, negative_prompt: Optional[str] = None
                ) -> torch.Tensor:
    """Images (N, 3, H, W) float in [-1, 1] for ``captions`` from a diffusers text-to-image pipeline; prompt ``i``
    draws its noise from its own generator (:func:`prompt_generators`), so results do not depend on
    ``batch_size``."""
    captions = list(captions)
    out = []
    for a in range(0, len(captions), batch_size):
        chunk = captions[a:a + batch_size]
        neg = None if negative_prompt is None else [negative_prompt] * len(chunk)
        res = pipe(chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   negative_prompt=neg, generator=prompt_generators(len(chunk), seed, a), output_type="pt")
        out.append(res.images.float().cpu() * 2 - 1)
    if not out:
        raise ValueError("no captions")
    return torch.cat(out).clamp(-1, 1)
