"""Image <-> text retrieval recall@K from embeddings (zero-shot retrieval, as in CLIP, arXiv 2103.00020).

What: cosine similarities between image embeddings (Ni, D) and caption embeddings (Nt, D), with
optionally several captions per image (``text_to_image[j]`` = the image of caption j).
- image -> text: an image is a hit at K when any of its captions ranks in the top K;
- text -> image: a caption is a hit at K when its image ranks in the top K.
The rank of the correct item is the number of candidates with a strictly higher similarity
(ties count in favour of the correct item), so results are deterministic. Re-implemented from
the standard definition.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["retrieval_ranks", "retrieval_recall"]


def _check(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: Optional[torch.Tensor]) -> torch.Tensor:
    if image_emb.dim() != 2 or text_emb.dim() != 2:
        raise ValueError(f"embeddings must be 2-D, got image {tuple(image_emb.shape)}, text {tuple(text_emb.shape)}")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding sizes differ: image {image_emb.shape[1]}, text {text_emb.shape[1]}")
    ni, nt = image_emb.shape[0], text_emb.shape[0]
    if text_to_image is None:
        if ni != nt:
            raise ValueError(f"{ni} images and {nt} captions: pass text_to_image (caption -> image index)")
        return torch.arange(nt, device=image_emb.device)
    t2i = torch.as_tensor(text_to_image, device=image_emb.device).long().reshape(-1)
    if t2i.shape[0] != nt:
        raise ValueError(f"text_to_image has {t2i.shape[0]} entries for {nt} captions")
    if nt and (int(t2i.min()) < 0 or int(t2i.max()) >= ni):
        raise ValueError(f"text_to_image values must be in [0, {ni})")
    return t2i


def retrieval_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: Optional[torch.Tensor] = None,
    normalize: bool = True,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the correct items.

    Returns:
        ``(i2t_rank (Ni,), t2i_rank (Nt,))``; images without any caption get rank -1.
    """
    t2i = _check(image_emb, text_emb, text_to_image)
    img, txt = image_emb.float(), text_emb.float().to(image_emb.device)
    if normalize:
        img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    ni = img.shape[0]
    i2t_rank = torch.empty(ni, dtype=torch.long, device=img.device)
    for s in range(0, ni, chunk_size):
        sim = img[s:s + chunk_size] @ txt.t()                                   # (b, Nt)
        own = t2i[None, :] == torch.arange(s, s + sim.shape[0], device=img.device)[:, None]
        best = sim.masked_fill(~own, float("-inf")).max(1).values              # (b,)
        rank = (sim > best[:, None]).sum(1)
        i2t_rank[s:s + sim.shape[0]] = torch.where(own.any(1), rank, torch.full_like(rank, -1))
    nt = txt.shape[0]
    t2i_rank = torch.empty(nt, dtype=torch.long, device=img.device)
    for s in range(0, nt, chunk_size):
        sim = txt[s:s + chunk_size] @ img.t()                                   # (b, Ni)
        correct = sim.gather(1, t2i[s:s + sim.shape[0], None])                 # (b, 1)
        t2i_rank[s:s + sim.shape[0]] = (sim > correct).sum(1)
    return i2t_rank, t2i_rank


def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: Optional[torch.Tensor] = None,
    ks: Sequence[int] = (1, 5, 10),
    normalize: bool = True,
) -> dict[str, float]:
    """Recall@K both ways.

    Args:
        image_emb: (Ni, D) image embeddings.
        text_emb: (Nt, D) caption embeddings.
        text_to_image: (Nt,) image index of each caption (default: caption j <-> image j).
        ks: the K values.
        normalize: L2-normalise first (cosine similarity).

    Returns:
        ``{"i2t_R@1", ..., "t2i_R@1", ..., "rsum", "i2t_median_rank", "t2i_median_rank",
        "num_images", "num_texts"}`` (median ranks are 1-based).
    """
    i2t, t2i = retrieval_ranks(image_emb, text_emb, text_to_image, normalize)
    i2t = i2t[i2t >= 0]
    if i2t.numel() == 0:
        raise ValueError("no image has a caption")
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((i2t < k).float().mean())
    for k in ks:
        out[f"t2i_R@{k}"] = float((t2i < k).float().mean())
    out["rsum"] = 100.0 * sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    out["i2t_median_rank"] = float(i2t.float().median() + 1)
    out["t2i_median_rank"] = float(t2i.float().median() + 1)
    out["num_images"], out["num_texts"] = int(image_emb.shape[0]), int(text_emb.shape[0])
    return out
