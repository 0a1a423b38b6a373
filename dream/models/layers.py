"""Transformer building blocks with timm/MAR/DREAM state-dict names.

``Block``:               x += Attn(norm1 x); x += Mlp(norm2 x)                       (timm ViT block)
``CrossAttentionBlock``: x += SelfAttn(norm0 x); x += CrossAttn(norm1 x, y); x += Mlp(norm2 x)   (DREAM)

All attention goes through :func:`dream.ops.attention.attention`; the backend is resolved per call
from the module's ``attn_backend`` (``auto`` | ``triton`` | ``sdpa`` | ``math``).

Training on CPU (dropout active): :class:`FastDropout` (used for ``proj_drop`` and the MLP's ``drop1``/``drop2``)
draws its keep-mask with :func:`dream.ops.dropout.dropout_mask` (two 32-bit uniforms per 64-bit random word,
~2.5x cheaper than ``bernoulli_``; plain ``F.dropout`` on CUDA), and attention dropout is one of the backends
of :func:`dream.ops.attention.attention` (``auto`` picks ``eager`` for CPU training). Dropout masks come from
the global torch RNG, as with ``nn.Dropout``.

Fast path for sampling: :class:`Attention` and :class:`CrossAttentionBlock` take ``rows`` (the query rows to
compute; keys and values still cover every position), so a decoder that only needs a few positions skips the
queries, cross-attention and MLP of the others.

Glossary: B batch, N tokens, D width, H heads, Dh head dim.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from dream.ops.attention import attention
from dream.ops.dropout import dropout_mask

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


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
                is_causal: bool = False, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D); with ``rows`` (B, r) long, only those query rows: (B, r, D)."""
        B, N, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        if rows is None:
            qkv = self.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)                                               # (B, H, N, Dh)
        else:
            if is_causal:
                raise ValueError("rows= is not supported with causal attention")
            idx = rows[..., None].expand(-1, -1, D)
            if type(self.qkv) is nn.Linear:                                       # queries of the rows only
                w, b = self.qkv.weight, self.qkv.bias
                q = F.linear(torch.gather(x, 1, idx), w[:D], None if b is None else b[:D])       # (B, r, D)
                kv = F.linear(x, w[D:], None if b is None else b[D:])                             # (B, N, 2D)
            else:            # a wrapped projection (e.g. a LoRA adapter): its own forward, so its delta counts
                qkv = self.qkv(x)
                q, kv = torch.gather(qkv[..., :D], 1, idx), qkv[..., D:]
            q = q.reshape(B, -1, H, Dh).transpose(1, 2)
            k, v = kv.reshape(B, N, 2, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
        p = self.attn_drop if self.training else 0.0
        x = attention(q, k, v, key_padding_mask=key_padding_mask, is_causal=is_causal, dropout_p=p,
                      backend=self.attn_backend)
        x = x.transpose(1, 2).reshape(B, q.shape[2], D)
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

    def project_kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the condition, each (B, H, M, Dh): what ``forward`` computes from ``y``."""
        B, M, _ = y.shape
        kv = self.kv(y).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        return k, v

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor] = None,
                kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """``kv``: the condition's keys and values from :meth:`project_kv` (``y`` is then unused): a sampler whose
        condition stays fixed over many calls projects it once."""
        B, N, D = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)       # (B, H, N, Dh)
        k, v = self.project_kv(y) if kv is None else kv                                    # (B, H, M, Dh)
        p = self.attn_drop if self.training else 0.0
        x = attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=p, backend=self.attn_backend)
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

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D); with ``rows`` (B, r) long, the output at those rows only (B, r, D) (keys and
        values still cover all N positions)."""
        if rows is None:
            x = x + self.attn(self.norm1(x), key_padding_mask=key_padding_mask)
        else:
            xs = torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))
            x = xs + self.attn(self.norm1(x), key_padding_mask=key_padding_mask, rows=rows)
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

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor], y_padding_mask: Optional[torch.Tensor] = None,
                rows: Optional[torch.Tensor] = None, kv: Optional[tuple] = None) -> torch.Tensor:
        """x (B, N, D), y (B, M, Dy) -> (B, N, D). With ``rows`` (B, r) long: the block's output at those rows only,
        (B, r, D) (self-attention keys/values still cover all N positions). ``kv``: the cross-attention's
        precomputed ``cross_attn.project_kv(y)`` (``y`` unused)."""
        if rows is None:
            x = x + self.self_attn(self.norm0(x))
        else:
            xs = torch.gather(x, 1, rows[..., None].expand(-1, -1, x.shape[-1]))    # (B, r, D)
            x = xs + self.self_attn(self.norm0(x), rows=rows)
        x = x + self.cross_attn(self.norm1(x), y, key_padding_mask=y_padding_mask, kv=kv)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *args, checkpointing: bool = False, **kwargs):
    """Apply ``blocks`` in order, optionally with activation checkpointing (training only)."""
    for blk in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(blk, x, *args, use_reentrant=False, **kwargs)
        else:
            x = blk(x, *args, **kwargs)
    return x


class TokenCache:
    """LazyMAR's token cache (arXiv 2503.12450) for one stack of blocks over a fixed set of N positions.

    Between two decoding steps most positions' features hardly change. A refresh (``run(..., refresh=True)``)
    computes every row and keeps each block's input. A cached call computes the first ``full_blocks`` blocks for
    every row, then only ``rows``: the ``must`` positions (e.g. tokens revealed at the last step, tokens to reveal
    now) plus the ``ratio`` share of the other ``valid`` positions whose shallow features (the output of the first
    ``full_blocks`` blocks) moved most since they were last computed (lowest cosine similarity, LazyMAR's choice).
    Deeper blocks then run for those rows only (their keys / values still cover every position, the other rows'
    inputs taken from the cache) and the cache keeps the newest value of every row. Approximate: a refresh every
    few steps bounds the drift. Holds tensors only (``map_rows`` selects / repeats trajectories).
    """

    def __init__(self, full_blocks: int = 1, ratio: float = 0.25, states: Optional[list] = None):
        if full_blocks < 0 or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"need full_blocks >= 0 and 0 <= ratio <= 1, got {full_blocks}, {ratio}")
        self.full_blocks, self.ratio = int(full_blocks), float(ratio)
        self.states = states        # inputs of blocks[full_blocks:], then the stack's output: each (B, N, D)

    def map_rows(self, fn) -> "TokenCache":
        return TokenCache(self.full_blocks, self.ratio, None if self.states is None else [fn(t) for t in self.states])

    def select(self, x: torch.Tensor, must: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        """Positions (B, r) ascending to recompute: ``must`` (B, N) bool, plus the ``ratio`` share of the other
        valid positions with the least similar shallow features ``x`` (B, N, D). r is the same for every row."""
        sim = F.cosine_similarity(x.float(), self.states[0].float(), dim=-1)          # (B, N)
        sim = sim.masked_fill(must, -3.0)
        others = ~must if valid is None else valid & ~must
        if valid is not None:
            sim = sim.masked_fill(~valid & ~must, 3.0)
        extra = math.ceil(self.ratio * int(others.sum(1).min()))
        r = int(must.sum(1).max()) + extra
        return torch.topk(sim, r, dim=1, largest=False).indices.sort(dim=1).values

    def run(self, blocks, x: torch.Tensor, *args, must: Optional[torch.Tensor] = None,
            valid: Optional[torch.Tensor] = None, refresh: bool = False, block_kwargs: Optional[list] = None,
            **kwargs) -> torch.Tensor:
        """The stack's output (B, N, D) for input ``x`` (B, N, D); ``args`` / ``kwargs`` go to every block,
        ``block_kwargs[j]`` to block j only. Refreshes when asked, when empty or when the batch changed; else
        recomputes ``select``'s rows only."""
        kw = [dict(kwargs, **(block_kwargs[j] if block_kwargs else {})) for j in range(len(blocks))]
        n = self.full_blocks
        for blk, k in zip(blocks[:n], kw):
            x = blk(x, *args, **k)
        if refresh or self.states is None or self.states[0].shape != x.shape or must is None:
            self.states = []
            for blk, k in zip(blocks[n:], kw[n:]):
                self.states.append(x)
                x = blk(x, *args, **k)
            self.states.append(x)
            return x
        rows = self.select(x, must, valid)
        idx = rows[..., None].expand(-1, -1, x.shape[-1])
        xa = torch.gather(x, 1, idx)
        for j, (blk, k) in enumerate(zip(blocks[n:], kw[n:])):
            self.states[j] = self.states[j].scatter(1, idx, xa)
            xa = blk(self.states[j], *args, rows=rows, **k)
        self.states[-1] = self.states[-1].scatter(1, idx, xa)
        return self.states[-1]
