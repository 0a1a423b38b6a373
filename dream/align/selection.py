"""DreamSync's selection (arXiv 2311.17946): keep, per prompt, the best candidate that passes both thresholds.

A candidate passes when its faithfulness ``S_F >= theta_f`` (0.9: about one wrong answer in ten) and its
aesthetic score ``S_A >= theta_a`` (0.6). Among the passing candidates of a prompt the policy picks one:

* ``faithful_then_aesthetic`` (default): highest S_F, ties broken by S_A;
* ``aesthetic_among_faithful``: highest S_A;
* ``sum``: highest S_F + S_A.

``keep_all_passing`` keeps every passing candidate instead (ablation). Prompts without a passing candidate
contribute nothing. :func:`random_like` is the control of the same size: for the same prompts, a uniformly random
candidate whatever its scores. A candidate whose judge failed (score NaN) never passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dream.utils.config import ConfigBase

__all__ = ["SelectionConfig", "POLICIES", "select", "random_like"]

POLICIES = ("faithful_then_aesthetic", "aesthetic_among_faithful", "sum")


@dataclass(frozen=True)
class SelectionConfig(ConfigBase):
    theta_f: float = 0.9
    theta_a: float = 0.6
    policy: str = "faithful_then_aesthetic"
    keep_all_passing: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.policy not in POLICIES:
            raise ValueError(f"unknown selection policy {self.policy!r} ({' | '.join(POLICIES)})")
        for name in ("theta_f", "theta_a"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def select(s_f: torch.Tensor, s_a: Optional[torch.Tensor] = None,
           config: SelectionConfig = SelectionConfig()) -> list[tuple[int, int]]:
    """(prompt, candidate) pairs kept from scores ``s_f`` (P, K) and ``s_a`` (P, K) (None: no aesthetic filter).

    Returns the pairs in prompt order (one per prompt, or every passing one with ``keep_all_passing``)."""
    if s_f.dim() != 2:
        raise ValueError(f"s_f must be (prompts, candidates), got {tuple(s_f.shape)}")
    s_a = torch.ones_like(s_f) if s_a is None else s_a
    if s_a.shape != s_f.shape:
        raise ValueError(f"s_a {tuple(s_a.shape)} and s_f {tuple(s_f.shape)} differ")
    # thresholds compared in the scores' own precision (a float32 0.9 passes theta 0.9); NaN never passes
    ok = (s_f >= torch.tensor(config.theta_f, dtype=s_f.dtype)) & (s_a >= torch.tensor(config.theta_a, dtype=s_a.dtype))
    out = []
    for p in range(s_f.shape[0]):
        idx = ok[p].nonzero().flatten().tolist()
        if not idx:
            continue
        if config.keep_all_passing:
            out += [(p, k) for k in idx]
            continue
        if config.policy == "faithful_then_aesthetic":
            key = [(float(s_f[p, k]), float(s_a[p, k])) for k in idx]   # lexicographic: S_F, then S_A
        elif config.policy == "aesthetic_among_faithful":
            key = [(float(s_a[p, k]),) for k in idx]
        else:
            key = [(float(s_f[p, k] + s_a[p, k]),) for k in idx]
        best = max(range(len(idx)), key=lambda i: (key[i], -i))         # first index on ties
        out.append((p, idx[best]))
    return out


def random_like(selected: list[tuple[int, int]], num_candidates: int,
                generator: Optional[torch.Generator] = None) -> list[tuple[int, int]]:
    """The control: the same prompts (and count) as ``selected``, each with a uniformly random candidate."""
    picks = torch.randint(num_candidates, (len(selected),), generator=generator).tolist()
    return [(p, int(k)) for (p, _), k in zip(selected, picks)]
