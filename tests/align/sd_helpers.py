"""Tiny random Stable Diffusion pipelines built from configs (no hub): a CLIP tokenizer from the vendored BPE merges
(Hugging Face vocab.json + merges.txt), a 2-layer CLIPTextModel, a two-level UNet2DConditionModel and, for the latent
variant, a two-level AutoencoderKL (factor 2). Both variants make 32x32 images, ShapesWorld's size: the latent UNet
works on 4 x 16 x 16 latents, the pixel-space one on 3 x 32 x 32 images (a folder without a VAE)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE = 32
CLIP_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
                 projection_dim=32)
UNET = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
            attention_head_dim=4)
VAE = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8, sample_size=IMAGE)
# Stable Diffusion's DDIM settings (steps_offset 1 as the stock pipeline wants it)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)


def write_clip_tokenizer(folder) -> Path:
    """vocab.json (49,408 entries, OpenAI's spelling of the special tokens) and merges.txt from the vendored
    ``bpe_simple_vocab_16e6.txt.gz``; returns the folder."""
    from dream.text.clip_tokenizer import CLIPTokenizer, _read_merges

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ours = CLIPTokenizer.from_default()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(t, t): i for t, i in ours.get_vocab().items()}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = _read_merges(ours.bpe_path)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def hf_clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), model_max_length=77)


def make_sd_pipeline(tokenizer, latent: bool, seed: int = 0):
    """A random StableDiffusionPipeline (latent with a VAE, or pixel space with ``vae=None``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    ch, size = (4, IMAGE // 2) if latent else (3, IMAGE)
    unet = UNet2DConditionModel(**UNET, in_channels=ch, out_channels=ch, sample_size=size)
    te = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT))
    vae = AutoencoderKL(**VAE) if latent else None
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_sd_folder(folder, tokenizer, latent: bool, seed: int = 0) -> Path:
    make_sd_pipeline(tokenizer, latent, seed).save_pretrained(str(folder))
    return Path(folder)


def unet_probe(unet, seed: int = 11) -> torch.Tensor:
    """The UNet's output on fixed random inputs (2 samples, timesteps 10 and 600, random text states)."""
    c, s = unet.config.in_channels, unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, s, s, generator=g).to(unet.dtype)                 # float32 draws, also for a float64 UNet
    enc = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g).to(unet.dtype)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 600]), encoder_hidden_states=enc).sample
