"""Token layout shared by every tokenizer and the model.

Official MAR/DREAM layout: latent (B, C, H, W) -> (B, (H/p)*(W/p), C*p*p). Tokens are row-major
over the grid; inside a token the features are channel-major, then the p x p sub-pixels:
feature index = c*p*p + py*p + px.
"""
from __future__ import annotations

import torch


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, C*p*p) in the official channel-major order."""
    if x.dim() != 4:
        raise ValueError(f"patchify expects (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"spatial size {h}x{w} is not divisible by patch size {p}")
    x = x.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwcpq", x)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, L, C*p*p) -> (B, C, H, W); exact inverse of :func:`patchify`."""
    if x.dim() != 3:
        raise ValueError(f"unpatchify expects (B, L, D), got shape {tuple(x.shape)}")
    b, n, d = x.shape
    p = patch_size
    if d != channels * p * p:
        raise ValueError(f"token dim {d} != channels*p*p = {channels}*{p}*{p}")
    if grid_hw is None:
        gh = gw = int(round(n ** 0.5))
        if gh * gw != n:
            raise ValueError(f"{n} tokens do not form a square grid; pass grid_hw")
    else:
        gh, gw = grid_hw
    x = x.reshape(b, gh, gw, channels, p, p)
    x = torch.einsum("nhwcpq->nchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)
