"""Pure schedule functions of the MAR sampler (MaskGIT cosine reveal, Muse-style linear CFG)."""
from __future__ import annotations

import math

import torch


def mask_len_after(step: int, num_iter: int, seq_len: int, remaining: int) -> int:
    """Tokens still masked after ``step`` (0-based): floor(L cos(pi/2 (step+1)/num_iter)), clamped to
    [1, remaining - 1] (at least one token revealed and one kept; the last step fills everything).

    The official code evaluates the cosine in float64 (numpy) and floors it."""
    ratio = math.cos(math.pi / 2.0 * (step + 1) / num_iter)
    n = math.floor(seq_len * ratio)
    return max(1, min(remaining - 1, n))


def reveal_counts(num_iter: int, seq_len: int) -> list[int]:
    """Tokens revealed at each step."""
    remaining, out = seq_len, []
    for step in range(num_iter):
        if step == num_iter - 1:
            out.append(remaining)
            remaining = 0
        else:
            n = mask_len_after(step, num_iter, seq_len, remaining)
            out.append(remaining - n)
            remaining = n
    return out


def decoded_after(steps: int, num_iter: int, seq_len: int) -> int:
    """Tokens decoded after the first ``steps`` steps."""
    return sum(reveal_counts(num_iter, seq_len)[:steps])


def cfg_at(cfg: float, schedule: str, mask_len: int, seq_len: int) -> float:
    """Guidance scale for a step that leaves ``mask_len`` tokens masked.

    ``linear`` (official, Muse): 1 + (cfg - 1) (L - mask_len) / L computed in float32; ``constant``: cfg."""
    if schedule == "linear":
        val = torch.tensor(1.0, dtype=torch.float32) + (cfg - 1) * (seq_len - torch.tensor(float(mask_len))) / seq_len
        return float(val)
    if schedule == "constant":
        return float(cfg)
    raise ValueError(f"unknown cfg schedule {schedule!r} (linear | constant)")
