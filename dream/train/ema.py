"""Exponential moving average of model parameters (official: 0.9999 every step, no warm-up).

Buffers (BatchNorm statistics) are copied from the live model, as the official checkpoints do.
"""
from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        core = model.module if hasattr(model, "module") else model
        self.shadow = copy.deepcopy(core).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        core = model.module if hasattr(model, "module") else model
        ema_p = list(self.shadow.parameters())
        cur_p = list(core.parameters())
        torch._foreach_mul_(ema_p, self.decay)
        torch._foreach_add_(ema_p, [p.detach() for p in cur_p], alpha=1.0 - self.decay)
        for b_ema, b in zip(self.shadow.buffers(), core.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.shadow.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.shadow.load_state_dict(sd, strict=True)
