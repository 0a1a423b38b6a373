"""Triton kernels for dream, installed as ``dream.kernels`` (the top-level ``kernels/`` folder).

Importing this package never fails: Triton (Linux-only, optional) and the kernel module are imported
inside ``try/except Exception`` (broken binary packages raise more than ImportError). Callers ask
``is_available()`` and, if it is False, ``unavailable_reason()``; ``dream.ops.attention`` does this
and falls back to SDPA when its backend is ``"auto"``.

Public API:
    flash_attention(q, k, v, key_padding_mask=None, causal=False, scale=None, return_lse=False)
    is_available() -> bool
    unavailable_reason() -> str  ("" when available)
    supports_head_dim(head_dim) -> bool
"""
from __future__ import annotations

import os

import torch

_IMPORT_ERROR: str = ""
try:
    import triton  # noqa: F401
except Exception as exc:  # noqa: BLE001 - any failure means "no Triton"
    _IMPORT_ERROR = f"triton could not be imported ({type(exc).__name__}: {exc})"

_attention = None
if not _IMPORT_ERROR:
    try:
        from . import attention as _attention
    except Exception as exc:  # noqa: BLE001
        _IMPORT_ERROR = f"the Triton attention kernels failed to load ({type(exc).__name__}: {exc})"
        _attention = None

__all__ = ["flash_attention", "is_available", "unavailable_reason", "supports_head_dim"]


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason() -> str:
    """Why the Triton kernels cannot run in this process, or ``""`` if they can."""
    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    interp_at_import = _attention.INTERPRET
    if torch.cuda.is_available() or interp_at_import:
        return ""
    if _interpreter_requested():
        return ("TRITON_INTERPRET=1 was set after dream.kernels was imported; set it before the first "
                "import (the kernels are compiled for the interpreter at definition time)")
    return "no CUDA device is available and TRITON_INTERPRET=1 (the CPU interpreter) is not set"


def is_available() -> bool:
    """True if Triton imports and CUDA is available or the CPU interpreter (TRITON_INTERPRET=1) is on."""
    return unavailable_reason() == ""


def supports_head_dim(head_dim: int) -> bool:
    """Whether ``flash_attention`` handles this head dimension (1..128)."""
    if _attention is None:
        return False
    return _attention.supports_head_dim(head_dim)


def flash_attention(q, k, v, key_padding_mask=None, causal=False, scale=None, return_lse=False):
    """Fused flash attention; see ``dream.kernels.attention.flash_attention`` for the full contract.

    Args:
        q: (B, H, Nq, Dh); k, v: (B, H, Nk, Dh); fp16 / bf16 / fp32.
        key_padding_mask: optional (B, Nk) bool, True = padded key.
        causal: top-left aligned causal mask (as SDPA ``is_causal``).
        scale: softmax scale, default Dh ** -0.5.
        return_lse: also return the natural-log log-sum-exp (B, H, Nq).

    Raises:
        RuntimeError: if the kernels are unavailable (the message says why).
    """
    why = unavailable_reason()
    if why:
        raise RuntimeError(f"dream.kernels.flash_attention is unavailable: {why}")
    return _attention.flash_attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, scale=scale,
                                      return_lse=return_lse)
