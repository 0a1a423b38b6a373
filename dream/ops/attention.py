"""Scaled dot-product attention with one backend switch: :func:`resolve_backend` is the only place that picks.

Backends:
    ``math``   the reference: plain PyTorch ``softmax(q k^T * scale + masks) v`` (:func:`attention_ref`); rows
               whose keys are all masked give 0 (every backend follows this convention). No dropout.
    ``sdpa``   ``torch.nn.functional.scaled_dot_product_attention``.
    ``eager``  the CPU training path: the same plain ops with dropout from :func:`dream.ops.dropout.dropout_mask`
               (one integer compare per element), without SDPA's CPU fallback's extra passes (separate q/k
               scaling, ``_safe_softmax``'s isneginf/all/where, ``bernoulli_`` + div + mul).
    ``triton`` the fused flash-attention kernel in ``dream.kernels`` (CUDA, or the CPU
               interpreter when ``TRITON_INTERPRET=1``).
    ``auto``   ``eager`` for CPU tensors with dropout (training); otherwise ``sdpa``, or ``triton`` on CUDA for
               supported dtype/shape/mask only when the environment sets ``DREAM_AUTO_TRITON=1``. Measured on an
               H100 (benchmarks/results/bench_attention_cuda.json) our kernel runs at 0.13-0.46x SDPA's speed
               at DREAM's shapes, so auto does not pick it by default.

Shapes: q (B, H, Nq, Dh), k/v (B, H, Nk, Dh). ``key_padding_mask`` is ``bool`` (B, Nk) with
``True`` = padded key (excluded), following the library-wide "True = masked" convention.
An explicitly requested backend that cannot run raises an error that names the reason;
only ``auto`` falls back, and the choice is logged once per (backend, reason).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "sdpa", "math", "eager")
_FORCED: list[str] = []  # stack of scoped overrides (see ``attention_backend``)
_LOGGED: set = set()


@contextlib.contextmanager
def attention_backend(name: str):
    """Scoped override of every module's backend, for tests and debugging."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.info(msg)


def _kernels():
    """Import ``dream.kernels`` lazily; any failure means "unavailable"."""
    try:
        from dream import kernels  # noqa: WPS433

        return kernels
    except Exception:  # broken binary packages raise more than ImportError
        return None


def triton_unsupported_reason(q: torch.Tensor, k: torch.Tensor, dropout_p: float = 0.0) -> Optional[str]:
    """Why the Triton kernel cannot run these inputs, or ``None`` if it can."""
    kern = _kernels()
    if kern is None or not getattr(kern, "is_available", lambda: False)():
        why = getattr(kern, "unavailable_reason", lambda: "dream.kernels could not be imported")() if kern else \
            "dream.kernels could not be imported"
        return f"Triton kernels unavailable: {why}"
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not q.is_cuda and not interp:
        return "inputs are on CPU and TRITON_INTERPRET=1 is not set (the kernel needs CUDA)"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported (fp16, bf16, fp32)"
    if q.shape[-1] not in (32, 64, 128) and not getattr(kern, "supports_head_dim", lambda d: False)(q.shape[-1]):
        return f"head dim {q.shape[-1]} is not supported (32, 64, 128)"
    if dropout_p > 0:
        return "attention dropout is not implemented in the Triton kernel"
    return None


def resolve_backend(requested: str, q: torch.Tensor, k: torch.Tensor, dropout_p: float = 0.0) -> str:
    """Turn ``requested`` into a concrete backend for these inputs (raises if impossible)."""
    if _FORCED:
        requested = _FORCED[-1]
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {BACKENDS}")
    if requested == "triton":
        why = triton_unsupported_reason(q, k, dropout_p)
        if why is not None:
            raise RuntimeError(f"attention backend 'triton' was requested but cannot run: {why}")
        return "triton"
    if requested == "math" and dropout_p > 0:
        raise RuntimeError("attention backend 'math' (the reference) does not implement dropout; use 'eager' or "
                           "'sdpa' in training")
    if requested == "auto":
        if dropout_p > 0 and q.device.type == "cpu":
            return "eager"
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and os.environ.get("DREAM_AUTO_TRITON") == "1":
            why = triton_unsupported_reason(q, k, dropout_p)
            if why is None:
                _log_once("attention backend: auto -> triton")
                return "triton"
            _log_once(f"attention backend: auto -> sdpa ({why})")
        return "sdpa"
    return requested


def _bool_to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def attention_ref(q, k, v, *, key_padding_mask=None, is_causal=False, scale=None, upcast=True):
    """The reference: ``softmax(q k^T * scale + masks) v`` in plain PyTorch, optionally in float32.

    Rows whose keys are all masked (every key padded, or causal rows with no key) give 0, not NaN."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    allowed = _allowed(s, key_padding_mask, is_causal)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if allowed is not None:
        p = p.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return torch.matmul(p, v).to(dtype)


def _allowed(s: torch.Tensor, key_padding_mask, is_causal: bool) -> Optional[torch.Tensor]:
    """(B|1, 1, Nq|1, Nk) bool: which keys each query may attend to (None = all)."""
    allowed = None
    if key_padding_mask is not None:
        allowed = ~key_padding_mask[:, None, None, :]
    if is_causal:
        nq, nk = s.shape[-2:]
        causal = torch.ones(nq, nk, dtype=torch.bool, device=s.device).tril()
        allowed = causal if allowed is None else allowed & causal
    return allowed


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                    scale: Optional[float] = None) -> torch.Tensor:
    """The ``eager`` backend: ``softmax(q * scale @ k^T + masks)``, dropout, ``@ v`` in plain ops (CPU training).

    Same function as SDPA with dropout; fully masked rows give 0. Dropout masks come from the global RNG."""
    from .dropout import dropout_mask

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q * scale, k.transpose(-2, -1))                            # (B, H, Nq, Nk)
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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over (B, H, N, Dh) tensors through the selected backend."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-D (B, H, N, Dh) q/k/v, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = padded), got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (k.shape[0], k.shape[2]):
            raise ValueError(f"key_padding_mask must have shape {(k.shape[0], k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")
    name = resolve_backend(backend, q, k, dropout_p)
    if name == "triton":
        from dream import kernels

        return kernels.flash_attention(q, k, v, key_padding_mask=key_padding_mask, causal=is_causal, scale=scale)
    if name == "eager":
        return eager_attention(q, k, v, dropout_p, key_padding_mask, is_causal, scale)
    if name == "math":
        return attention_ref(q, k, v, key_padding_mask=key_padding_mask, is_causal=is_causal, scale=scale,
                             upcast=False)
    attn_mask = None
    if key_padding_mask is not None:
        attn_mask = ~key_padding_mask[:, None, None, :]  # SDPA: True = take part in attention
        if is_causal:
            nq, nk = q.shape[2], k.shape[2]
            attn_mask = attn_mask & torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
            is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale)
