"""Recognising peft LoRA layers without importing peft (duck-typed on peft's ``BaseTunerLayer`` attributes).

Code that must see what a wrapped layer computes calls the layer itself: DREAM's fast paths do (the decoder's
``rows`` path and the diffusion MLP's fused parameters read a wrapped projection through its own forward), so an
active, unmerged adapter is never skipped.
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ["is_lora_layer"]


def is_lora_layer(m: nn.Module) -> bool:
    """A peft LoRA layer (``peft.tuners.lora.LoraLayer``: a wrapper holding ``base_layer`` and ``lora_A``)."""
    return hasattr(m, "get_base_layer") and hasattr(m, "lora_A") and hasattr(m, "merged_adapters")
