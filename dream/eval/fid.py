"""Frechet Inception Distance and Inception Score with an injectable feature extractor.

What: streaming feature statistics (float64 running sums), reference statistics in the ADM /
MAR ``fid_stats`` ``.npz`` format (keys ``mu``, ``sigma``), a numerically stable Frechet
distance, and the Inception Score (10 splits on the unbiased logits) when the FID-Inception
network is used.

Provenance: FID from Heusel et al. 2017 (arXiv 1706.08500), IS from Salimans et al. 2016
(arXiv 1606.03498); re-implemented from the papers. The feature-module contract is the one of
``torchmetrics.image.fid.FrechetInceptionDistance(feature=<nn.Module>)``: the module gets uint8
(B, 3, H, W) images and returns (B, D) features, so any module used here also works there (and
vice versa). torch-fidelity is not needed: the Inception network is ours
(:mod:`dream.eval.inception`) and loads a local weights file.

Frechet distance: ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` with
``tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))`` -- a symmetric PSD eigenproblem solved
in float64 (no complex square roots, no eps offsets needed).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from .features import count_images, iter_image_batches, to_uint8
from .inception import FIDInceptionV3, load_fid_inception

__all__ = [
    "FIDStatistics",
    "FIDEvaluator",
    "StatsAccumulator",
    "frechet_distance",
    "inception_score",
    "save_statistics",
    "load_statistics",
]


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FIDStatistics:
    """Gaussian statistics of a feature set: ``mu`` (D,), ``sigma`` (D, D) float64 numpy arrays."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int = 0

    def __post_init__(self):
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.shape[0], self.mu.shape[0]):
            raise ValueError(f"bad FID statistics shapes: mu {self.mu.shape}, sigma {self.sigma.shape}")


class StatsAccumulator:
    """Running float64 sums for the mean and (unbiased) covariance of (N, D) features."""

    def __init__(self):
        self.n = 0
        self.sum: Optional[torch.Tensor] = None
        self.outer: Optional[torch.Tensor] = None

    def update(self, feats: torch.Tensor) -> None:
        """Add (B, D) features."""
        if feats.dim() != 2:
            raise ValueError(f"features must be (B, D), got {tuple(feats.shape)}")
        f = feats.detach().to(torch.float64)
        if self.sum is None:
            self.sum = f.sum(0)
            self.outer = f.t() @ f
        else:
            if f.shape[1] != self.sum.shape[0]:
                raise ValueError(f"feature size changed from {self.sum.shape[0]} to {f.shape[1]}")
            self.sum += f.sum(0)
            self.outer += f.t() @ f
        self.n += f.shape[0]

    def compute(self) -> FIDStatistics:
        """Mean and unbiased covariance (like ``np.cov(rowvar=False)``)."""
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return FIDStatistics(mu.cpu().numpy(), sigma.cpu().numpy(), self.n)


def save_statistics(stats: FIDStatistics, path: Union[str, os.PathLike]) -> None:
    """Write ``mu``/``sigma`` (+ ``num_images``) to an ``.npz`` (ADM / MAR ``fid_stats`` format)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, mu=stats.mu, sigma=stats.sigma, num_images=np.int64(stats.num_images))


def load_statistics(path: Union[str, os.PathLike]) -> FIDStatistics:
    """Read an ``.npz`` with keys ``mu`` and ``sigma``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics file not found: {path!r}")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            raise KeyError(f"{path!r} lacks {missing} (has {f.files}); expected the ADM fid_stats format")
        n = int(f["num_images"]) if "num_images" in f.files else 0
        return FIDStatistics(f["mu"].astype(np.float64), f["sigma"].astype(np.float64), n)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.t()


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    Args:
        mu1, mu2: (D,) means (numpy or torch).
        sigma1, sigma2: (D, D) covariances.
    """
    m1, m2, s1, s2 = (torch.as_tensor(np.asarray(x), dtype=torch.float64) for x in (mu1, mu2, sigma1, sigma2))
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.shape[0],) * 2:
        raise ValueError(
            f"incompatible FID statistics: mu {tuple(m1.shape)} vs {tuple(m2.shape)}, "
            f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}"
        )
    s1 = (s1 + s1.t()) / 2
    s2 = (s2 + s2.t()) / 2
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.t()) / 2).clamp_min(0).sqrt().sum()
    diff = m1 - m2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)


def inception_score(logits: torch.Tensor, splits: int = 10, generator: Optional[torch.Generator] = None):
    """Inception Score from (N, C) logits: mean and std of ``exp(E[KL(p(y|x) || p(y))])`` over splits.

    Args:
        logits: (N, C) classifier logits (the FID-Inception ``logits_unbiased``).
        splits: number of equal chunks (10 is the standard).
        generator: if given, the samples are shuffled first (torch-fidelity shuffles).

    Returns:
        (mean, std) floats.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, C), got {tuple(logits.shape)}")
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"Inception Score with {splits} splits needs >= {splits} images, got {n}")
    x = logits.double()
    if generator is not None:
        x = x[torch.randperm(n, generator=generator, device=generator.device).to(x.device)]
    logp = x.log_softmax(1)
    scores = []
    for i in range(splits):
        chunk = logp[i * n // splits:(i + 1) * n // splits]                    # (n/s, C)
        logq = chunk.exp().mean(0, keepdim=True).log()
        kl = (chunk.exp() * (chunk - logq)).sum(1).mean()
        scores.append(kl.exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))


# ----------------------------------------------------------------------------------------------
# Evaluator
# ----------------------------------------------------------------------------------------------


class FIDEvaluator:
    """FID (and IS with Inception) between image sets or against saved reference statistics.

    Args:
        feature_extractor: ``"inception"`` / None (FID-Inception with local weights) or any
            ``nn.Module`` mapping uint8 (B, 3, H, W) -> (B, D).
        weights_path: local FID-Inception weights (else ``$DREAM_FID_WEIGHTS``); Inception only.
        device: where features are computed.
        batch_size: images per forward pass.
        image_size: ADM centre-crop size applied to decoded image files (None: keep size).
        value_range: range of float image tensors given directly (uint8 passes through).
        progress: show tqdm bars.

    Sources (``compute_statistics`` / ``evaluate``): an image folder (recursive), webdataset shard
    spec(s), an image tensor, an iterable / generator of image batches, or an ``.npz`` with
    precomputed ``mu``/``sigma`` (reference side).
    """

    def __init__(
        self,
        feature_extractor: Union[None, str, nn.Module] = None,
        weights_path: Optional[str] = None,
        device: Union[str, torch.device] = "cpu",
        batch_size: int = 50,
        image_size: Optional[int] = None,
        value_range: tuple[float, float] = (-1.0, 1.0),
        progress: bool = True,
    ):
        self.device = torch.device(device)
        if feature_extractor is None or feature_extractor == "inception":
            self.model = load_fid_inception(weights_path, device=self.device)
        elif isinstance(feature_extractor, nn.Module):
            self.model = feature_extractor.to(self.device).eval()
        else:
            raise TypeError(
                f"feature_extractor must be None, 'inception' or an nn.Module, got {feature_extractor!r}"
            )
        self.batch_size = int(batch_size)
        self.image_size = image_size
        self.value_range = value_range
        self.progress = progress

    @property
    def has_logits(self) -> bool:
        """True when the extractor also gives classifier logits (Inception Score available)."""
        return hasattr(self.model, "forward_all") and isinstance(self.model, FIDInceptionV3)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 / float (B, 3, H, W) -> ``{"features": (B, D)[, "logits": (B, C)]}``."""
        x = to_uint8(images, self.value_range).to(self.device)
        if self.has_logits:
            out = self.model.forward_all(x)
            return {"features": out["2048"], "logits": out["logits_unbiased"]}
        f = self.model(x)
        if f.dim() != 2:
            f = f.flatten(1)
        return {"features": f}

    def compute_statistics(
        self, source: Any, max_images: Optional[int] = None, return_logits: bool = False, desc: str = "FID features"
    ):
        """Stream a source through the extractor.

        Returns:
            :class:`FIDStatistics`, or ``(stats, logits (N, C) or None)`` with ``return_logits``.
        """
        from tqdm.auto import tqdm

        acc = StatsAccumulator()
        logits = []
        total = count_images(source)
        if max_images is not None and total is not None:
            total = min(total, max_images)
        batches = iter_image_batches(
            source, batch_size=self.batch_size, image_size=self.image_size,
            max_images=max_images, value_range=self.value_range,
        )
        with tqdm(total=total, desc=desc, unit="img", disable=not self.progress) as bar:
            for imgs in batches:
                out = self.features(imgs)
                acc.update(out["features"])
                if return_logits and "logits" in out:
                    logits.append(out["logits"].double().cpu())
                bar.update(imgs.shape[0])
        if acc.n == 0:
            raise ValueError(f"no images were read from {source!r}")
        stats = acc.compute()
        if return_logits:
            return stats, (torch.cat(logits) if logits else None)
        return stats

    def reference_statistics(self, source: Any, max_images: Optional[int] = None) -> FIDStatistics:
        """``source`` as statistics: an ``.npz`` path is loaded, anything else is computed."""
        if isinstance(source, FIDStatistics):
            return source
        if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".npz"):
            return load_statistics(source)
        return self.compute_statistics(source, max_images=max_images, desc="reference features")

    def evaluate(
        self,
        fake: Any,
        reference: Any,
        max_images: Optional[int] = None,
        max_reference_images: Optional[int] = None,
        is_splits: int = 10,
    ) -> dict[str, float]:
        """FID between ``fake`` and ``reference`` (+ IS of ``fake`` when Inception is used).

        Returns:
            ``{"fid", "num_images", "num_reference_images"[, "inception_score_mean",
            "inception_score_std"]}``.
        """
        ref = self.reference_statistics(reference, max_reference_images)
        stats, logits = self.compute_statistics(fake, max_images=max_images, return_logits=True,
                                                desc="generated features")
        if stats.mu.shape != ref.mu.shape:
            raise ValueError(
                f"feature size {stats.mu.shape[0]} of the images differs from the reference's {ref.mu.shape[0]} "
                "(statistics computed with another feature extractor?)"
            )
        res = {
            "fid": frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma),
            "num_images": stats.num_images,
            "num_reference_images": ref.num_images,
        }
        if logits is not None and logits.shape[0] >= is_splits:
            m, s = inception_score(logits, splits=is_splits)
            res["inception_score_mean"], res["inception_score_std"] = m, s
        return res
