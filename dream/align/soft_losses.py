"""SoftREPA and AGSM losses over the B x B (image, caption) pairs of a batch, as the authors' code computes them.

Rows are images i, columns captions j; every pair shares one timestep t and one noise draw per image (the authors
draw one t and one eps per step for the whole pair matrix), so the only difference along a row is the caption.

* SoftREPA (arXiv 2503.08250; softrepa/SoftREPA @ ff92f4b, ``ContrastiveLoss``): e_ij = per-element mean squared
  error of the prediction for image i under caption j; logits ``alpha * exp(-e / tau)`` (a double exponential: the
  logits lie in (0, alpha], so the margin is capped at alpha) with tau 0.07, alpha 4; cross-entropy against the
  diagonal (image -> text only), plus ``dweight`` times the mean diagonal error.
* AGSM (arXiv 2605.30038; jaayeon/AGSM @ 5524482, ``AGSMObjective``): rewards r_ij = -e_ij of the EMA tokens'
  predictions; Plackett-Luce weights w = softmax_j(r / tau), tau 0.1; guidance Delta_ij = ybar_ij - sum_k w_ik ybar_ik;
  positive target y_i + gamma+ Delta_ii (set psi+), negative target y_i - gamma- Delta_ij (set psi-, dropped when
  gamma- = 0); mean squared error to the online predictions, averaged over the B positives and the B^2 - B negatives.

Row chunking: every function takes a block of rows (``rows`` = their indices in the batch, the positive column of
row r being ``rows[r]``) and ``batch`` = B, and normalises by the whole batch, so the chunk losses sum to the
full-batch loss whatever the chunk size. (The official AGSM code normalises each chunk by itself and sums the chunk
gradients, so its loss scale grows with B / nrows: not reproduced.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["pair_errors", "softrepa_loss", "plackett_luce_weights", "agsm_loss", "pair_diagnostics",
           "diagonal_mask"]


def pair_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """e_ij = mean over elements of (target_i - pred_ij)^2: pred (r, B, ...), target (r, ...) -> (r, B)."""
    if pred.shape[0] != target.shape[0] or pred.shape[2:] != target.shape[1:]:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} do not pair up (r, B, ...)")
    return (pred - target[:, None]).pow(2).flatten(2).mean(-1)


def diagonal_mask(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """(r, B) bool, True at each row's positive column."""
    return F.one_hot(rows.to(torch.long), batch).bool()


def _rows(rows: Optional[torch.Tensor], n: int, batch: Optional[int], device) -> tuple[torch.Tensor, int]:
    rows = torch.arange(n, device=device) if rows is None else rows.to(device=device, dtype=torch.long)
    return rows, n if batch is None else int(batch)


def softrepa_loss(err: torch.Tensor, tau: float = 0.07, alpha: float = 4.0, dweight: float = 0.0,
                  rows: Optional[torch.Tensor] = None, batch: Optional[int] = None) -> torch.Tensor:
    """SoftREPA's loss for a block of rows of the error matrix.

    Args:
        err: (r, B) errors e_ij of images ``rows`` against all B captions.
        rows: (r,) the images' indices (their positive columns); default 0..r-1 (the whole batch).
        batch: B, the normaliser (default r): chunk losses add up to the full-batch loss.
    Returns:
        sum over the rows of [-log softmax_j(alpha exp(-e_ij / tau))_i + dweight e_ii] / B.
    """
    rows, B = _rows(rows, err.shape[0], batch, err.device)
    logits = alpha * torch.exp(-err / tau)
    ce = F.cross_entropy(logits, rows, reduction="sum")
    diag = err.gather(1, rows[:, None]).sum()
    return (ce + dweight * diag) / B


def plackett_luce_weights(err: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """w_ij = softmax_j(r_ij / tau) with rewards r = -err: (r, B), each row sums to 1."""
    return torch.softmax(-err / tau, dim=1)


def agsm_loss(pred: torch.Tensor, ema_pred: torch.Tensor, target: torch.Tensor, tau: float = 0.1,
              g_pos: float = 1.0, g_neg: float = 1.0, rows: Optional[torch.Tensor] = None,
              batch: Optional[int] = None) -> tuple[torch.Tensor, dict]:
    """AGSM's loss for a block of rows.

    Args:
        pred: (r, B, ...) online predictions (psi+ on each row's positive column, psi- elsewhere).
        ema_pred: (r, B, ...) the EMA tokens' predictions (no gradient is taken through them).
        target: (r, ...) the plain score-matching target y_i (eps, or eps - x0 for flows).
        rows, batch: as in :func:`softrepa_loss`.
    Returns:
        (loss, {"weights": w (r, B), "ema_err": e of the EMA predictions (r, B), "pos", "neg": the two terms}).
    """
    rows, B = _rows(rows, pred.shape[0], batch, pred.device)
    ema_pred = ema_pred.detach()
    with torch.no_grad():
        ema_err = pair_errors(ema_pred, target)
        w = plackett_luce_weights(ema_err, tau)                                     # (r, B)
        mix = torch.einsum("rb,rb...->r...", w.to(ema_pred.dtype), ema_pred)        # sum_k w_ik ybar_ik
        delta = ema_pred - mix[:, None]                                             # (r, B, ...)
    diag = diagonal_mask(rows, B)                                                   # (r, B)
    r = pred.shape[0]
    idx = torch.arange(r, device=pred.device)
    pos_target = target + g_pos * delta[idx, rows]
    pos = (pred[idx, rows] - pos_target).pow(2).flatten(1).mean(-1).sum() / B
    neg = pred.new_zeros(())
    if g_neg != 0 and B > 1:
        neg_target = target[:, None] - g_neg * delta                                # (r, B, ...)
        e = (pred - neg_target).pow(2).flatten(2).mean(-1)                          # (r, B)
        neg = e.masked_fill(diag, 0.0).sum() / (B * B - B)
    return pos + neg, {"weights": w, "ema_err": ema_err, "pos": pos.detach(), "neg": neg.detach()}


@torch.no_grad()
def pair_diagnostics(err: torch.Tensor, tau: float = 0.1, rows: Optional[torch.Tensor] = None) -> dict:
    """Win rate (w_ii > max_{j != i} w_ij) and mean margin (w_ii - max_{j != i} w_ij) of w = softmax_j(-e / tau),
    the diagnostics the AGSM code logs; plus the mean positive and negative errors."""
    rows, B = _rows(rows, err.shape[0], None, err.device)
    B = err.shape[1]
    if B < 2:
        return {"win_rate": float("nan"), "margin": float("nan"), "err_pos": float(err.mean()), "err_neg": float("nan")}
    w = plackett_luce_weights(err, tau)
    diag = diagonal_mask(rows, B)
    w_pos = w[diag]
    w_neg = w.masked_fill(diag, float("-inf")).max(1).values
    return {"win_rate": float((w_pos > w_neg).float().mean()), "margin": float((w_pos - w_neg).mean()),
            "err_pos": float(err[diag].mean()), "err_neg": float(err[~diag].mean())}
