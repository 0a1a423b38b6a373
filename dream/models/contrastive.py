"""Contrastive head: StableRep-style image projection MLP and the filtered symmetric InfoNCE loss.

The image embedding is ``image_projection(mean(encoder tokens))`` with
Linear -> BatchNorm -> ReLU -> Linear -> BatchNorm -> ReLU -> Linear (official ``post_mlp_stablerep``;
the official code uses SyncBatchNorm, which the trainer selects under DDP).

Filtered loss (official ``filter_clip_loss``): samples whose visible fraction is below the threshold are
neither anchors nor image negatives: their rows of the image->text logits and their columns of the
text->image logits are set to -1e9. Their *texts* stay negatives for eligible images. The loss is
sum_i m_i (CE_i2t + CE_t2i) / 2 / (sum_i m_i + 1e-6).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class ImageProjection(nn.Module):
    """Pooled encoder feature (B, D) -> contrastive embedding (B, E)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.layer1 = nn.Linear(in_dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim)
        self.relu1 = nn.ReLU(inplace=True)
        self.layer2 = nn.Linear(hidden_dim, hidden_dim)
        self.bn2 = nn.BatchNorm1d(hidden_dim)
        self.relu2 = nn.ReLU(inplace=True)
        self.layer3 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.layer1(x)))
        x = self.relu2(self.bn2(self.layer2(x)))
        return self.layer3(x)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping the autograd graph (no-op on 1 process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def filtered_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                       eligible: Optional[torch.Tensor] = None, gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE over the (global) batch with ineligible samples filtered out.

    Args:
        image_features, text_features: (B, E) local features (normalised here).
        logit_scale: the *exponentiated* scale (scalar tensor).
        eligible: (B,) bool; None = every sample eligible (plain CLIP loss, exact mean).
        gather: all-gather features (with gradient) and masks across ranks when distributed.
    """
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    if eligible is None:
        eligible = torch.ones(img.shape[0], dtype=torch.bool, device=img.device)
    if eligible.dtype != torch.bool:
        raise TypeError(f"eligible must be bool, got {eligible.dtype}")
    if gather:
        img, txt = gather_with_grad(img), gather_with_grad(txt)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            masks = [torch.empty_like(eligible) for _ in range(dist.get_world_size())]
            dist.all_gather(masks, eligible.contiguous())
            eligible = torch.cat(masks)
    logits_i2t = logit_scale * img @ txt.t()
    logits_t2i = logit_scale * txt @ img.t()
    logits_i2t = logits_i2t.masked_fill(~eligible[:, None], -1e9)
    logits_t2i = logits_t2i.masked_fill(~eligible[None, :], -1e9)
    labels = torch.arange(img.shape[0], device=img.device)
    ce = (F.cross_entropy(logits_i2t, labels, reduction="none")
          + F.cross_entropy(logits_t2i, labels, reduction="none")) / 2
    m = eligible.to(ce.dtype)
    return (ce * m).sum() / (m.sum() + 1e-6)


def clip_loss_unfiltered(image_features, text_features, logit_scale, scale_by: Optional[float] = None):
    """Plain symmetric InfoNCE (mean over samples), optionally divided by ``scale_by``."""
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    labels = torch.arange(img.shape[0], device=img.device)
    logits = logit_scale * img @ txt.t()
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    return loss / scale_by if scale_by else loss
