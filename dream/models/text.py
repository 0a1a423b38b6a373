"""CLIP-style causal text tower (contrastive branch), re-implemented from the CLIP paper
(Radford et al., 2021, arXiv 2103.00020) and the OpenCLIP layout that the official DREAM code uses.

State-dict names (top level of :class:`~dream.models.dream.DREAM`): ``token_embedding``,
``positional_embedding``, ``transformer.resblocks.{i}.{ln_1, attn.in_proj_weight, attn.in_proj_bias,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final``, ``text_projection``.

NOTE (official quirk): the text tower's LayerNorms use eps 1e-5 (PyTorch default), unlike the 1e-6
used everywhere else in DREAM; the MLP uses exact GELU (not QuickGELU).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dream.ops.attention import attention


class PackedMultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter names (packed q, k, v)."""

    def __init__(self, dim: int, num_heads: int, attn_backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"text width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.attn_backend = attn_backend
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, is_causal: bool = True) -> torch.Tensor:
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = attention(q, k, v, is_causal=is_causal, backend=self.attn_backend)
        return self.out_proj(x.transpose(1, 2).reshape(B, N, D))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "auto"):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln_1 = nn.LayerNorm(dim)  # eps 1e-5 (official)
        self.attn = PackedMultiheadAttention(dim, num_heads, attn_backend)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), is_causal=True)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """The stack of causal residual blocks (``transformer.resblocks``)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, attn_backend: str = "auto"):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, attn_backend) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x)
        return x
