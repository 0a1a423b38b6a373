"""Low-level ops. ``dream.ops.attention`` is the one place that picks an attention backend."""
from .attention import attention, attention_ref, attention_backend, resolve_backend

__all__ = ["attention", "attention_ref", "attention_backend", "resolve_backend"]
