"""Transformer building blocks with timm/MAR/DREAM state-dict names.

``Block``:               x += Attn(norm1 x); x += Mlp(norm2 x)                       (timm ViT block)
``CrossAttentionBlock``: x += SelfAttn(norm0 x); x += CrossAttn(norm1 x, y); x += Mlp(norm2 x)   (DREAM)

All attention goes through :func:`dream.ops.attention.attention`; the backend is resolved per call
from the module's ``attn_backend`` (``auto`` | ``triton`` | ``sdpa`` | ``math``).

Training on CPU (dropout active) takes two cheaper paths that compute the same function:

* :class:`FastDropout` (used for ``proj_drop`` and the MLP's ``drop1``/``drop2``) draws its keep-mask
  from 64-bit random words split into two 32-bit uniforms (``P(drop) = round(p 2^32) / 2^32``, i.e. p
  to within 2^-33) instead of ``bernoulli_`` on a float tensor; on CPU (1 thread, 5.2 M elements) the
  whole dropout costs ~20-25 ms instead of ~57 ms. On CUDA it is plain ``F.dropout``.
* :func:`train_attention` replaces SDPA's CPU "math" fallback (the only CPU SDPA path that supports
  dropout) with softmax(q k^T / sqrt(d)) -> dropout -> @ v without SDPA's extra passes
  (separate q/k scaling, ``_safe_softmax``'s isneginf/all/where, ``bernoulli_`` + div + mul).
Dropout masks come from the global torch RNG, as with ``nn.Dropout``. In eval mode, or with p = 0,
both are the identity / plain :func:`~dream.ops.attention.attention`.

Glossary: B batch, N tokens, D width, H heads, Dh head dim.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from dream.ops.attention import attention, resolve_backend

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


def dropout_mask(shape: Sequence[int], p: float, dtype: torch.dtype = torch.float32,
                 device=None) -> torch.Tensor:
    """Scaled keep-mask for dropout: 0 with probability ``round(p 2^32) / 2^32``, else ``1 / (1 - p)``.

    Each 64-bit word from the global RNG gives two uniform 32-bit integers; one integer compare per
    element replaces ``bernoulli_``'s per-element float draw.

    Args:
        shape: mask shape; p: drop probability in (0, 1); dtype/device of the returned mask.
    Returns:
        (shape) tensor of ``dtype`` holding 0 or 1 / (1 - p).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout_mask needs 0 < p < 1, got {p}")
    n = math.prod(shape)
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-2 ** 63, 2 ** 63 - 1)
    threshold = -2 ** 31 + round(p * 2 ** 32)                       # int32 uniform >= threshold -> keep
    keep = words.view(torch.int32)[:n] >= threshold                 # (n,) bool
    return keep.view(torch.uint8).to(dtype).mul_(1.0 / (1.0 - p)).view(shape)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with a cheaper CPU mask (:func:`dropout_mask`); plain ``F.dropout`` elsewhere.

    A subclass of ``nn.Dropout``, so code that walks modules (``isinstance(m, nn.Dropout)``, setting
    ``m.p``) keeps working; no parameters or buffers, so state dicts are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p >= 1.0 or self.inplace or not x.is_floating_point():
            return F.dropout(x, self.p, True, self.inplace)
        return x * dropout_mask(x.shape, self.p, x.dtype, x.device)


def train_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                    key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) + masks) with dropout, @ v, in plain PyTorch ops (the CPU training path).

    Same function as SDPA's math path with dropout: rows whose keys are all masked give 0.
    q (B, H, Nq, Dh), k/v (B, H, Nk, Dh), key_padding_mask (B, Nk) bool True = padded.
    """
    s = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))             # (B, H, Nq, Nk)
    dead = None
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        dead = key_padding_mask.all(-1)[:, None, None, None]                    # (B, 1, 1, 1)
    if is_causal:
        nq, nk = s.shape[-2:]
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    a = torch.softmax(s, dim=-1)
    if dead is not None:
        a = a.masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        a = a * dropout_mask(a.shape, dropout_p, a.dtype, a.device)
    return torch.matmul(a, v)


def _attend(module: nn.Module, q, k, v, key_padding_mask=None, is_causal: bool = False) -> torch.Tensor:
    """Dispatch: CPU training with attention dropout -> :func:`train_attention`; else ``attention``."""
    p = module.attn_drop if module.training else 0.0
    if p > 0.0 and q.device.type == "cpu" and resolve_backend(module.attn_backend, q, k, p) == "sdpa":
        return train_attention(q, k, v, p, key_padding_mask, is_causal)
    return attention(q, k, v, key_padding_mask=key_padding_mask, is_causal=is_causal, dropout_p=p,
                     backend=module.attn_backend)


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
        self.proj_drop = FastDropout(proj_drop)
        self.attn_backend = attn_backend

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, Dh)
        x = _attend(self, q, k, v, key_padding_mask, is_causal)
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
        self.proj_drop = FastDropout(proj_drop)
        self.attn_backend = attn_backend

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None):
        B, N, D = x.shape
        M = y.shape[1]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)       # (B, H, N, Dh)
        kv = self.kv(y).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)                                                                # (B, H, M, Dh)
        x = _attend(self, q, k, v, key_padding_mask)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x))


def _mlp(dim: int, mlp_ratio: float, drop: float) -> Mlp:
    mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
    mlp.drop1, mlp.drop2 = FastDropout(mlp.drop1.p), FastDropout(mlp.drop2.p)
    return mlp


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
