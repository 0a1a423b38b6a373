"""Random draws that honour a ``torch.Generator`` on any device.

PyTorch requires the generator and the output to live on the same device. Our functions take a user's generator
(CPU by default, so results do not depend on the accelerator) and must still produce tensors on the model's
device: draw where the generator lives, then move. With no generator, draw directly on ``device``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def _where(generator: Optional[torch.Generator], device) -> torch.device:
    return generator.device if generator is not None else torch.device(device if device is not None else "cpu")


def randn(shape: Sequence[int], generator: Optional[torch.Generator] = None, device=None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal ``shape`` drawn with ``generator`` (on its device), returned on ``device``."""
    x = torch.randn(tuple(shape), generator=generator, device=_where(generator, device), dtype=dtype)
    return x if device is None else x.to(device, non_blocking=True)


def randint(high: int, shape: Sequence[int], generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Integers in ``[0, high)`` drawn with ``generator`` (on its device), returned on ``device``."""
    x = torch.randint(0, high, tuple(shape), generator=generator, device=_where(generator, device))
    return x if device is None else x.to(device, non_blocking=True)
