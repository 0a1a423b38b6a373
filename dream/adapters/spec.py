"""Command-line and config forms of LoRA settings (no peft needed to parse them).

``--lora rank=16,alpha=16,targets=decoder_attn+diffloss,dropout=0.05`` -> ``add_lora`` keyword arguments;
``--lora PATH[:WEIGHT]`` -> ``(path, weight)``.
"""
from __future__ import annotations

from typing import Any, Mapping, Union

__all__ = ["lora_spec", "parse_lora_path"]

_TYPES = {"rank": int, "alpha": float, "targets": str, "dropout": float, "use_dora": bool, "use_rslora": bool,
          "name": str}


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


def lora_spec(spec: Union[str, Mapping[str, Any]]) -> dict:
    """``"rank=16,alpha=16,targets=decoder_attn"`` or a mapping -> checked :func:`~dream.adapters.add_lora`
    keyword arguments. ``targets`` may be a preset, ``"a+b"`` presets, or (in a mapping) a list; ``r`` and
    ``lora_alpha`` are accepted as peft's spellings of ``rank`` and ``alpha``."""
    if isinstance(spec, str):
        items: dict[str, Any] = {}
        for part in [p for p in spec.split(",") if p.strip()]:
            key, eq, value = part.partition("=")
            if not eq:
                raise ValueError(f"LoRA spec entries are key=value, got {part!r} in {spec!r}")
            key = key.strip()
            typ = _TYPES.get({"r": "rank", "lora_alpha": "alpha"}.get(key, key))
            try:
                items[key] = _bool(value) if typ is bool else (typ(value.strip()) if typ else value)
            except ValueError as e:
                raise ValueError(f"LoRA spec {spec!r}: {key}={value!r}: {e}") from None
    else:
        items = dict(spec)
    items = {{"r": "rank", "lora_alpha": "alpha"}.get(k, k): v for k, v in items.items()}
    unknown = sorted(set(items) - set(_TYPES))
    if unknown:
        raise ValueError(f"unknown LoRA setting(s) {unknown} (known: {sorted(_TYPES)})")
    if "rank" not in items:
        raise ValueError(f"a LoRA spec needs rank=R, got {spec!r}")
    rank = items["rank"]
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    targets = items.get("targets")
    if targets is not None and not (isinstance(targets, str) or
                                    (isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets))):
        raise ValueError(f"LoRA targets must be a string or a list of strings, got {targets!r}")
    return items


def parse_lora_path(text: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` -> (path, weight); a suffix that is not a number is part of the path."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0
