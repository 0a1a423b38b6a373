"""Optimizer parameter groups and learning-rate schedules (official DREAM/MAR recipe).

AdamW(0.9, 0.95), weight decay 0.04 on everything except 1-D tensors, biases and the diffusion head
(official rule: the 0-dim ``logit_scale`` IS decayed). Base LR scaling lr = blr x batch / 256, linear
warmup, then constant (official) or cosine; updated every iteration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def param_groups(model, weight_decay: float, official: bool = True, frozen: tuple[str, ...] = ()) -> list[dict]:
    """[no_decay, decay] groups (official order). Parameters whose name starts with a ``frozen`` prefix
    get ``requires_grad=False`` and are left out."""
    core = model.module if hasattr(model, "module") else model
    no_decay_names = core.no_weight_decay(official=official)
    no_decay, decay = [], []
    for n, p in core.named_parameters():
        if frozen and n.startswith(frozen):
            p.requires_grad_(False)
            continue
        if not p.requires_grad:
            continue
        (no_decay if n in no_decay_names else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model, lr: float, weight_decay: float = 0.04, betas=(0.9, 0.95), official: bool = True,
                    frozen: tuple[str, ...] = (), fused: bool | None = None) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, official, frozen)
    kwargs = {}
    if fused is None:
        fused = True  # fused AdamW runs on CPU and CUDA in recent PyTorch; much faster than the loop
    if fused:
        kwargs["fused"] = True
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


@dataclass(frozen=True)
class LRSchedule:
    """lr(step): linear warmup from 0 over ``warmup_steps``, then ``constant`` or ``cosine`` to ``min_lr``."""

    lr: float
    warmup_steps: int = 0
    total_steps: int = 0
    kind: str = "constant"
    min_lr: float = 0.0

    def __post_init__(self):
        if self.kind not in ("constant", "cosine"):
            raise ValueError(f"unknown LR schedule {self.kind!r} (constant | cosine)")

    def __call__(self, step: float) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        if self.kind == "constant" or self.total_steps <= self.warmup_steps:
            return self.lr
        t = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine_lr(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The small trainers' schedule (VAE, Stable Diffusion): linear warm-up reaching ``lr`` at step
    ``warmup_steps - 1``, then a half cosine to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


def scaled_lr(blr: float, batch_size: int) -> float:
    """Official base-LR scaling: lr = blr * effective batch / 256."""
    return blr * batch_size / 256


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
