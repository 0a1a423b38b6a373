"""N-way K-shot few-shot classification on frozen features.

What: episodes drawn with a seeded ``torch.Generator`` (N classes among those with at least
K + Q samples, K support and Q query samples per class, no overlap), a classifier fitted on the
support set -- nearest class mean by cosine ("prototype", Snell et al. 2017, arXiv 1703.05175)
or multinomial logistic regression (the L-BFGS solver of :mod:`dream.eval.linear_probe`) -- and
the mean query accuracy with a 95 % confidence interval (``1.96 * std / sqrt(episodes)``) over
episodes. DREAM reports 5-way 5-shot accuracy (its exact protocol is not released; this is the
standard episodic protocol). Re-implemented from the papers.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .linear_probe import check_features_labels

__all__ = ["sample_episode", "few_shot_eval", "prototype_predict"]


def _class_pools(labels: torch.Tensor, min_count: int) -> list[torch.Tensor]:
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
    pools = list(torch.split(order, counts.tolist()))
    return [p for p, c in zip(pools, counts.tolist()) if c >= min_count]


def sample_episode(
    labels: torch.Tensor,
    n_way: int = 5,
    k_shot: int = 5,
    n_query: int = 15,
    generator: Optional[torch.Generator] = None,
    _pools: Optional[list[torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one episode.

    Returns:
        ``(support_idx (N*K,), support_y (N*K,), query_idx (N*Q,), query_y (N*Q,))`` with episode
        labels in ``[0, N)``; indices point into ``labels``.
    """
    pools = _pools if _pools is not None else _class_pools(labels.cpu(), k_shot + n_query)
    if len(pools) < n_way:
        raise ValueError(
            f"{n_way}-way {k_shot}-shot with {n_query} queries needs {n_way} classes with >= "
            f"{k_shot + n_query} samples; only {len(pools)} qualify"
        )
    chosen = torch.randperm(len(pools), generator=generator)[:n_way]
    sup, qry = [], []
    for pool_id in chosen.tolist():
        pool = pools[pool_id]
        pick = pool[torch.randperm(pool.numel(), generator=generator)[:k_shot + n_query]]
        sup.append(pick[:k_shot])
        qry.append(pick[k_shot:])
    ways = torch.arange(n_way)
    return (torch.cat(sup), ways.repeat_interleave(k_shot), torch.cat(qry), ways.repeat_interleave(n_query))


def prototype_predict(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int) -> torch.Tensor:
    """Nearest class mean by cosine: (S, D), (S,), (Q, D) -> predicted episode labels (Q,)."""
    s = F.normalize(support.float(), dim=1)
    protos = torch.zeros(n_way, s.shape[1], device=s.device).index_add_(0, support_y.to(s.device), s)
    protos = F.normalize(protos, dim=1)                                   # (N, D)
    return (F.normalize(query.float(), dim=1) @ protos.t()).argmax(1)


def _logreg_batched(sup: torch.Tensor, sy: torch.Tensor, qry: torch.Tensor, n_way: int, C: float,
                    max_iter: int = 100) -> torch.Tensor:
    """Independent logistic regressions for E episodes at once -> query predictions (E, Q).

    The joint objective is the sum of the per-episode objectives (mean CE + l2/2 ||W||^2 with
    ``l2 = 1 / (C * S)``, standardised support features), so its minimiser is the per-episode one.
    """
    e, s, d = sup.shape
    x = sup.double()
    mean = x.mean(1, keepdim=True)
    std = x.std(1, unbiased=False, keepdim=True)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    xs = (x - mean) / std                                                   # (E, S, D)
    lam = 1.0 / (C * s)
    w = torch.zeros(e, d, n_way, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(e, 1, n_way, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")
    target = sy.reshape(-1).to(x.device)

    def closure():
        opt.zero_grad()
        logits = torch.baddbmm(b, xs, w)                                    # (E, S, N)
        loss = F.cross_entropy(logits.reshape(-1, n_way), target, reduction="sum") / s + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    q = (qry.double() - mean) / std
    return torch.baddbmm(b.detach(), q, w.detach()).argmax(-1)             # (E, Q)


def few_shot_eval(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_way: int = 5,
    k_shot: int = 5,
    n_query: int = 15,
    episodes: int = 600,
    classifier: str = "prototype",
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
    C: float = 1.0,
    chunk_episodes: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean episode accuracy and 95 % confidence interval.

    Args:
        features: (N, D) frozen features; labels: (N,) integer class ids.
        classifier: ``"prototype"`` (cosine nearest class mean) or ``"logreg"`` (logistic
            regression on L2-normalised, then standardised support features, ``C`` as in
            scikit-learn; all episodes of a chunk are solved in one batched L-BFGS).
        seed: seeds a fresh CPU generator when ``generator`` is None (same seed -> same episodes).
        chunk_episodes: episodes evaluated together.

    Returns:
        ``{"accuracy", "ci95", "std", "episodes", "n_way", "k_shot", "n_query", "classifier",
        "episode_accuracies"}``.
    """
    from tqdm.auto import tqdm

    features, labels = check_features_labels(features, labels, "few-shot")
    if classifier not in ("prototype", "logreg"):
        raise ValueError(f"classifier must be 'prototype' or 'logreg', got {classifier!r}")
    if min(n_way, k_shot, n_query, episodes) < 1 or n_way < 2:
        raise ValueError(f"need n_way >= 2 and k_shot, n_query, episodes >= 1; "
                         f"got {n_way}, {k_shot}, {n_query}, {episodes}")
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    pools = _class_pools(labels.cpu(), k_shot + n_query)
    draws = [sample_episode(labels, n_way, k_shot, n_query, gen, _pools=pools) for _ in range(episodes)]
    si = torch.stack([d[0] for d in draws]).to(features.device)             # (E, N*K)
    qi = torch.stack([d[2] for d in draws]).to(features.device)             # (E, N*Q)
    sy, qy = draws[0][1].to(features.device), draws[0][3].to(features.device)
    accs = []
    for c0 in tqdm(range(0, episodes, chunk_episodes), desc=f"{n_way}-way {k_shot}-shot", disable=not progress):
        sup = F.normalize(features[si[c0:c0 + chunk_episodes]], dim=-1)     # (e, N*K, D)
        qry = F.normalize(features[qi[c0:c0 + chunk_episodes]], dim=-1)     # (e, N*Q, D)
        e = sup.shape[0]
        if classifier == "prototype":
            protos = F.normalize(sup.reshape(e, n_way, k_shot, -1).mean(2), dim=-1)   # (e, N, D)
            pred = torch.bmm(qry, protos.transpose(1, 2)).argmax(-1)
        else:
            pred = _logreg_batched(sup, sy.expand(e, -1), qry, n_way, C)
        accs.append((pred == qy).float().mean(1).cpu())
    a = torch.cat(accs).double()
    std = float(a.std(unbiased=False)) if a.numel() > 1 else 0.0
    return {
        "accuracy": float(a.mean()),
        "ci95": 1.96 * std / math.sqrt(a.numel()),
        "std": std,
        "episodes": episodes,
        "n_way": n_way,
        "k_shot": k_shot,
        "n_query": n_query,
        "classifier": classifier,
        "episode_accuracies": a.tolist(),
    }
