"""Shared builders for the LoRA tests: a DREAM test model with a non-trivial diffusion head, fixed inputs for a
deterministic training loss, tiny diffusers models built from configs (no hub), and adapter randomisation
(at init B = 0, which would make every adapter test trivially pass)."""
from __future__ import annotations

import torch

import dream


def make_dream(seed: int = 0, **overrides) -> torch.nn.Module:
    """dream_test without dropout, the zero-initialised adaLN / final layers perturbed (eval mode)."""
    torch.manual_seed(seed)
    m = dream.create_model("dream_test", attn_dropout=0.0, proj_dropout=0.0, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.diffloss.net.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m.eval()


def dream_inputs(model, batch: int = 3, seed: int = 5) -> dict:
    """Tokens, ids, text features, a mask with 70 % masked, and fixed diffusion t / noise: a deterministic loss."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    B, L, C = batch, c.seq_len, c.token_dim
    ids = torch.randint(1, c.clip_vocab_size - 1, (B, c.clip_context_length), generator=g)
    ids[:, 6] = c.clip_vocab_size - 1
    order = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])
    mask = torch.zeros(B, L, dtype=torch.bool).scatter(1, order[:, : int(0.7 * L)], True)
    mul = c.diffusion_batch_mul
    return {"tokens": torch.randn(B, L, C, generator=g), "clip_ids": ids,
            "text_feats": torch.randn(B, c.text_max_len, c.text_embed_dim, generator=g), "mask": mask,
            "diff_t": torch.randint(0, c.diffusion_steps, (mul * B * L,), generator=g),
            "diff_noise": torch.randn(mul * B * L, C, generator=g)}


def dream_loss(model, inp: dict) -> torch.Tensor:
    return model(inp["tokens"], inp["clip_ids"], inp["text_feats"], inp["mask"], diff_t=inp["diff_t"],
                 diff_noise=inp["diff_noise"])["loss"]


def randomize_adapters(module, std: float = 0.1, seed: int = 3) -> None:
    from dream.adapters import lora_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(module):
            p.add_(std * torch.randn(p.shape, generator=g))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


UNET_CONFIG = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D",
                   "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                   cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4, sample_size=8)


def make_unet(seed: int = 0):
    """The tiny SD UNet built from a config (random init, seeded)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def unet_inputs(seed: int = 7) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)


@torch.no_grad()
def unet_out(unet, inp) -> torch.Tensor:
    return unet(*inp).sample
