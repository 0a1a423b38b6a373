"""Exponential moving average of model parameters (official: 0.9999 every step, no warm-up).

Buffers (BatchNorm statistics) are copied from the live model, as the official checkpoints do.
``trainable_only=True`` (LoRA runs) averages only the parameters that require grad; the shadow model shares
the frozen tensors with the live one (no second copy) and ``state_dict`` holds the averaged tensors only.
"""
from __future__ import annotations

import copy

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, trainable_only: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        core = model.module if hasattr(model, "module") else model
        self.names = [n for n, p in core.named_parameters() if p.requires_grad or not trainable_only]
        self.trainable_only = trainable_only
        shared = {id(p): p for p in core.parameters() if not p.requires_grad} if trainable_only else {}
        self.shadow = copy.deepcopy(core, shared).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    def _pairs(self, core: torch.nn.Module) -> tuple[list, list]:
        ema, cur = dict(self.shadow.named_parameters()), dict(core.named_parameters())
        return [ema[n] for n in self.names], [cur[n].detach() for n in self.names]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        core = model.module if hasattr(model, "module") else model
        ema_p, cur_p = self._pairs(core)
        torch._foreach_mul_(ema_p, self.decay)
        torch._foreach_add_(ema_p, cur_p, alpha=1.0 - self.decay)
        for b_ema, b in zip(self.shadow.buffers(), core.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        if self.trainable_only:
            params = dict(self.shadow.named_parameters())
            return {n: params[n].detach() for n in self.names}
        return self.shadow.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        if not self.trainable_only:
            self.shadow.load_state_dict(sd, strict=True)
            return
        if set(sd) != set(self.names):
            raise KeyError(f"EMA state does not match: missing {sorted(set(self.names) - set(sd))[:5]}, "
                           f"unexpected {sorted(set(sd) - set(self.names))[:5]}")
        params = dict(self.shadow.named_parameters())
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(sd[n])
