"""Transformer building blocks with timm/MAR/DREAM state-dict names.

``Block``:               x += Attn(norm1 x); x += Mlp(norm2 x)                       (timm ViT block)
``CrossAttentionBlock``: x += SelfAttn(norm0 x); x += CrossAttn(norm1 x, y); x += Mlp(norm2 x)   (DREAM)

All attention goes through :func:`dream.ops.attention.attention`; the backend is resolved per call
from the module's ``attn_backend`` (``auto`` | ``triton`` | ``sdpa`` | ``math``).

Glossary: B batch, N tokens, D width, H heads, Dh head dim.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Mlp

from dream.ops.attention import attention

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


class Attention(nn.Module):
    """Multi-head self-attention with a packed ``qkv`` projection (timm layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_backend = attn_backend

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, Dh)
        x = attention(q, k, v, key_padding_mask=key_padding_mask, is_causal=is_causal,
                      dropout_p=self.attn_drop if self.training else 0.0, backend=self.attn_backend)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))


class CrossAttention(nn.Module):
    """Queries from ``x``, keys/values from the condition ``y`` (k = kv[:D], v = kv[D:])."""

    def __init__(self, dim: int, cond_dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(cond_dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_backend = attn_backend

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None):
        B, N, D = x.shape
        M = y.shape[1]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)       # (B, H, N, Dh)
        kv = self.kv(y).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)                                                                # (B, H, M, Dh)
        x = attention(q, k, v, key_padding_mask=key_padding_mask,
                      dropout_p=self.attn_drop if self.training else 0.0, backend=self.attn_backend)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))


def _mlp(dim: int, mlp_ratio: float, drop: float) -> Mlp:
    return Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)


class Block(nn.Module):
    """Pre-norm ViT block (timm names: norm1, attn.{qkv,proj}, norm2, mlp.{fc1,fc2})."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_backend: str = "auto"):
        super().__init__()
        self.norm1 = LayerNorm6(dim)
        self.attn = Attention(dim, num_heads, True, attn_drop, proj_drop, attn_backend)
        self.norm2 = LayerNorm6(dim)
        self.mlp = _mlp(dim, mlp_ratio, proj_drop)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_padding_mask=key_padding_mask)
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """DREAM decoder block (norm0, self_attn, norm1, cross_attn.{q,kv,proj}, norm2, mlp)."""

    def __init__(self, dim: int, cond_dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_backend: str = "auto"):
        super().__init__()
        self.norm0 = LayerNorm6(dim)
        self.self_attn = Attention(dim, num_heads, True, attn_drop, proj_drop, attn_backend)
        self.norm1 = LayerNorm6(dim)
        self.cross_attn = CrossAttention(dim, cond_dim, num_heads, True, attn_drop, proj_drop, attn_backend)
        self.norm2 = LayerNorm6(dim)
        self.mlp = _mlp(dim, mlp_ratio, proj_drop)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_padding_mask: Optional[torch.Tensor] = None):
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), y, key_padding_mask=y_padding_mask)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *args, checkpointing: bool = False, **kwargs):
    """Apply ``blocks`` in order, optionally with activation checkpointing (training only)."""
    for blk in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(blk, x, *args, use_reentrant=False, **kwargs)
        else:
            x = blk(x, *args, **kwargs)
    return x
