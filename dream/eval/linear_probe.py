"""Linear probing of frozen features: LARS / SGD probe, L-BFGS logistic regression, k-NN.

What:
- the official DREAM / MAE linear-probe head: ``BatchNorm1d(affine=False, eps=1e-6)`` followed by a
  Linear layer (trunc-normal std 0.01 weights, zero bias), trained with LARS (or SGD + momentum),
  linear warm-up then half-cycle cosine learning rate, ``lr = blr * batch / 256``;
- a fast multinomial logistic regression on standardised features (full-batch L-BFGS with an L2
  penalty; ``l2 = 1 / (C * n)`` reproduces scikit-learn's ``LogisticRegression(C=C)``);
- cosine k-NN (k = 20, similarity-weighted voting ``exp(s / T)`` or simple majority);
- top-1 / top-5 accuracy.

Features come from :func:`dream.eval.features.dream_image_features` (official: buffer-token mean
of the last block WITHOUT ``encoder_norm``, all tokens visible). The encoder is frozen and the
official recipe uses no augmentation by default, so training on cached features is exactly the
same computation as the per-epoch forward passes.

Provenance: LARS from You et al. 2017 (arXiv 1708.03888) in the MoCo v3 / MAE variant (no weight
decay or trust ratio on 1-D parameters); probe protocol from MAE (arXiv 2111.06377) and the DREAM
``main_linprobe.py`` description in the reference spec. Re-implemented from those descriptions.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from dream.utils.config import ConfigBase

__all__ = [
    "LARS",
    "LinearProbeConfig",
    "LinearProbeHead",
    "LogisticRegression",
    "check_features_labels",
    "cosine_lr",
    "train_linear_probe",
    "fit_logistic_regression",
    "topk_accuracy",
    "knn_predict",
    "knn_accuracy",
    "linear_probe",
]


# ----------------------------------------------------------------------------------------------
# Checks and metrics
# ----------------------------------------------------------------------------------------------


def check_features_labels(features: torch.Tensor, labels: torch.Tensor, name: str = "train") -> tuple:
    """Validate (N, D) float features and (N,) integer labels; returns them as (float, long)."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{name} features must be a (N, D) tensor, got {shape}")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"{name} labels must be a (N,) tensor, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"{name} labels must be integers, got {labels.dtype}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(f"{name}: {features.shape[0]} feature rows but {labels.shape[0]} labels")
    if labels.numel() and labels.min() < 0:
        raise ValueError(f"{name} labels must be >= 0, got min {int(labels.min())}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} features contain NaN or inf")
    return features.float(), labels.long().to(features.device)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies (k capped at the number of classes) as ``{"top1": ..., "top5": ...}``."""
    labels = labels.to(logits.device)
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices                       # (N, kmax)
    hit = pred == labels[:, None]
    return {f"top{k}": float(hit[:, :min(k, kmax)].any(1).float().mean()) for k in ks}


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int = 20,
    temperature: Optional[float] = 0.07,
    num_classes: Optional[int] = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Cosine k-NN class scores (N_test, C).

    Args:
        k: neighbours (capped at the number of training samples).
        temperature: weight neighbours by ``exp(cos / T)``; None = simple majority vote.
        num_classes: defaults to ``max(train_labels) + 1``.
    """
    train_features, train_labels = check_features_labels(train_features, train_labels, "k-NN train")
    if test_features.dim() != 2 or test_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"test features {tuple(test_features.shape)} do not match train {tuple(train_features.shape)}")
    c = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    k = min(k, train_features.shape[0])
    tr = F.normalize(train_features.float(), dim=1)
    te = F.normalize(test_features.float().to(tr.device), dim=1)
    out = []
    for i in range(0, te.shape[0], chunk_size):
        sim, idx = (te[i:i + chunk_size] @ tr.t()).topk(k, dim=1)  # (b, k)
        w = torch.ones_like(sim) if temperature is None else (sim / temperature).exp()
        scores = torch.zeros(sim.shape[0], c, device=tr.device)
        scores.scatter_add_(1, train_labels[idx], w)
        out.append(scores)
    return torch.cat(out)


def knn_accuracy(train_features, train_labels, test_features, test_labels, k: int = 20,
                 temperature: Optional[float] = 0.07) -> dict[str, float]:
    """Top-1 / top-5 accuracy of the cosine k-NN classifier."""
    test_features, test_labels = check_features_labels(test_features, test_labels, "k-NN test")
    c = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    scores = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes=c)
    return topk_accuracy(scores, test_labels)


# ----------------------------------------------------------------------------------------------
# LARS probe
# ----------------------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """LARS with momentum. Parameters with ndim > 1 get weight decay and the layer-wise trust ratio
    ``eta * ||w|| / ||g + wd * w||``; 1-D parameters (biases, norms) get plain momentum SGD."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"bad LARS hyper-parameters lr={lr}, weight_decay={weight_decay}, momentum={momentum}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    pn, dn = p.norm(), d.norm()
                    one = torch.ones_like(pn)
                    q = torch.where(pn > 0, torch.where(dn > 0, group["trust_coefficient"] * pn / dn, one), one)
                    d = d * q
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss


@dataclass(frozen=True)
class LinearProbeConfig(ConfigBase):
    """Hyper-parameters of the LARS / SGD probe.

    Defaults are MAE's linear-probe recipe (LARS, blr 0.1, no weight decay, 90 epochs, 10 warm-up
    epochs, batch 16384), which DREAM's ``main_linprobe.py`` derives from; :meth:`dream_official`
    gives the values read from DREAM's script defaults. The batch is capped at the training-set
    size, and ``lr = blr * batch / 256``.
    """

    optimizer: str = "lars"          # "lars" | "sgd"
    blr: float = 0.1                 # base learning rate (per 256 samples)
    lr: Optional[float] = None       # absolute lr; overrides blr when set
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 16384
    min_lr: float = 0.0
    trust_coefficient: float = 0.001  # LARS eta
    init_std: float = 0.01           # trunc-normal std of the head weights

    @classmethod
    def dream_official(cls) -> "LinearProbeConfig":
        """DREAM ``main_linprobe.py`` defaults: LARS, blr 1e-4, wd 0.02, 90 epochs, 10 warm-up,
        batch 128 per GPU (x 8 GPUs assumed here)."""
        return cls(optimizer="lars", blr=1e-4, weight_decay=0.02, epochs=90, warmup_epochs=10, batch_size=1024)


class LinearProbeHead(nn.Module):
    """``BatchNorm1d(affine=False, eps=1e-6)`` -> ``Linear`` (trunc-normal std 0.01, zero bias)."""

    def __init__(self, dim: int, num_classes: int, init_std: float = 0.01,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        with torch.no_grad():
            w = torch.randn(self.head.weight.shape, generator=generator)
            # Truncated normal on [-2 std, 2 std] by resampling the tails.
            for _ in range(16):
                bad = w.abs() > 2
                if not bad.any():
                    break
                w[bad] = torch.randn(int(bad.sum()), generator=generator)
            self.head.weight.copy_(w.clamp_(-2, 2) * init_std)
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))                            # (B, C)


def cosine_lr(step: float, total: float, warmup: float, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup`` steps, then half-cycle cosine to ``min_lr``."""
    if step < warmup:
        return base_lr * step / warmup
    t = (step - warmup) / max(total - warmup, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def train_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: Optional[int] = None,
    config: LinearProbeConfig = LinearProbeConfig(),
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
) -> LinearProbeHead:
    """Train the BN + Linear probe on cached (N, D) features with LARS or SGD.

    Returns:
        the trained head in eval mode (on the features' device).
    """
    from tqdm.auto import tqdm

    features, labels = check_features_labels(features, labels)
    if config.optimizer not in ("lars", "sgd"):
        raise ValueError(f"optimizer must be 'lars' or 'sgd', got {config.optimizer!r}")
    n, d = features.shape
    c = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    if int(labels.max()) >= c:
        raise ValueError(f"label {int(labels.max())} >= num_classes {c}")
    dev = features.device
    head = LinearProbeHead(d, c, config.init_std, generator=generator).to(dev)
    bs = min(config.batch_size, n)
    lr = config.lr if config.lr is not None else config.blr * bs / 256
    if config.optimizer == "lars":
        opt = LARS(head.parameters(), lr=lr, weight_decay=config.weight_decay, momentum=config.momentum,
                   trust_coefficient=config.trust_coefficient)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    steps_per_epoch = max(n // bs, 1)  # drop_last, like the official loader
    total = config.epochs * steps_per_epoch
    head.train()
    step = 0
    for _ in tqdm(range(config.epochs), desc="linear probe", unit="epoch", disable=not progress):
        perm = torch.randperm(n, generator=generator).to(dev)
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            cur = cosine_lr(step, total, config.warmup_epochs * steps_per_epoch, lr, config.min_lr)
            for g in opt.param_groups:
                g["lr"] = cur
            loss = F.cross_entropy(head(features[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


# ----------------------------------------------------------------------------------------------
# L-BFGS logistic regression
# ----------------------------------------------------------------------------------------------


@dataclass
class LogisticRegression:
    """Multinomial logistic regression on standardised features: ``((x - mean) / std) @ W + b``."""

    mean: torch.Tensor   # (D,)
    std: torch.Tensor    # (D,)
    weight: torch.Tensor  # (D, C)
    bias: torch.Tensor   # (C,)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C)."""
        x = (features.to(self.weight) - self.mean) / self.std
        return x @ self.weight + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).argmax(1)


def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: Optional[int] = None,
    l2: Optional[float] = None,
    C: float = 1.0,
    max_iter: int = 500,
    tol: float = 1e-7,
    standardize: bool = True,
) -> LogisticRegression:
    """Full-batch L-BFGS (strong Wolfe) multinomial logistic regression.

    Objective: ``mean CE + l2/2 * ||W||^2`` (bias not penalised). With ``l2=None`` it is
    ``1 / (C * n)``, which matches scikit-learn's ``LogisticRegression(C=C)`` objective.
    Deterministic: zero initialisation, no sampling.
    """
    features, labels = check_features_labels(features, labels)
    n, d = features.shape
    c = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    if int(labels.max()) >= c:
        raise ValueError(f"label {int(labels.max())} >= num_classes {c}")
    lam = (1.0 / (C * n)) if l2 is None else float(l2)
    x = features.double()
    if standardize:
        mean = x.mean(0)
        std = x.std(0, unbiased=False)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
    else:
        mean, std = torch.zeros(d, dtype=x.dtype, device=x.device), torch.ones(d, dtype=x.dtype, device=x.device)
    xs = (x - mean) / std
    w = torch.zeros(d, c, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(c, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=tol * 1e-3,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, labels) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticRegression(mean.float(), std.float(), w.detach().float(), b.detach().float())


# ----------------------------------------------------------------------------------------------
# One call
# ----------------------------------------------------------------------------------------------


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    mode: str = "lars",
    config: Optional[LinearProbeConfig] = None,
    l2: Optional[float] = None,
    C: float = 1.0,
    knn_k: Optional[int] = 20,
    knn_temperature: Optional[float] = 0.07,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit a probe on the training features and report test top-1/top-5 (+ k-NN).

    Args:
        mode: ``"lars"`` / ``"sgd"`` (BN + Linear head, cosine schedule) or ``"lbfgs"``
            (standardised logistic regression).
        config: probe hyper-parameters (``mode`` overrides ``config.optimizer``).
        l2, C: L-BFGS regularisation (see :func:`fit_logistic_regression`).
        knn_k: also report cosine k-NN accuracy with this k (None: skip).

    Returns:
        ``{"top1", "top5", "mode", "num_train", "num_test", "num_classes"[, "knn_top1", "knn_top5"]}``.
    """
    train_features, train_labels = check_features_labels(train_features, train_labels, "train")
    test_features, test_labels = check_features_labels(test_features, test_labels, "test")
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"train features have dim {train_features.shape[1]}, test {test_features.shape[1]}")
    c = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    if mode == "lbfgs":
        clf = fit_logistic_regression(train_features, train_labels, num_classes=c, l2=l2, C=C)
        logits = clf.logits(test_features)
        extra: dict[str, Any] = {"l2": l2 if l2 is not None else 1.0 / (C * train_features.shape[0])}
    elif mode in ("lars", "sgd"):
        cfg = config or LinearProbeConfig()
        cfg = LinearProbeConfig(**{**asdict(cfg), "optimizer": mode})
        head = train_linear_probe(train_features, train_labels, c, cfg, generator=generator, progress=progress)
        with torch.no_grad():
            logits = head(test_features.to(next(head.parameters()).device))
        extra = {"config": asdict(cfg)}
    else:
        raise ValueError(f"mode must be 'lars', 'sgd' or 'lbfgs', got {mode!r}")
    res: dict[str, Any] = {**topk_accuracy(logits, test_labels), "mode": mode, "num_train": train_features.shape[0],
                           "num_test": test_features.shape[0], "num_classes": c, **extra}
    if knn_k:
        knn = knn_accuracy(train_features, train_labels, test_features, test_labels, knn_k, knn_temperature)
        res["knn_top1"], res["knn_top5"] = knn["top1"], knn["top5"]
        res["knn_k"] = knn_k
    return res
