"""InceptionV3 for FID / Inception Score ("FID-Inception"), built from scratch.

What: the InceptionV3 network that the TensorFlow FID / IS reference code uses
(``inception-2015-12-05``, Szegedy et al. 2015, arXiv 1512.00567; FID: Heusel et al. 2017,
arXiv 1706.08500). It differs from torchvision's ImageNet InceptionV3 in three places that
matter for matching published FIDs: average pools exclude padding, the last block
(``Mixed_7c``) max-pools its pool branch, and the classifier has 1008 outputs.

Provenance: re-implemented from the published architecture. Module and parameter names follow
the layout of torch-fidelity's ``FeatureExtractorInceptionV3`` (which is also the torchvision /
pytorch-fid naming): ``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch_pool.bn.running_var``,
``fc.weight`` (1008, 2048) ... -- 94 conv+BN units and one Linear, i.e. 566 state-dict tensors
including BatchNorm's ``num_batches_tracked`` (about 95.7 MB in fp32). The weights are never
downloaded: pass a local file (``weights_path=`` or the ``DREAM_FID_WEIGHTS`` environment
variable), e.g. torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` or pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``. Files are read with ``torch.load(weights_only=True)``
or safetensors.

Input convention (like torchmetrics' ``feature=`` modules): uint8 images (B, 3, H, W) in
[0, 255]. They are resized to 299 x 299 with TensorFlow-1.x bilinear resizing (the
torch-fidelity default, ``resize="tf1"``) or PyTorch's ``F.interpolate`` (``resize="torch"``,
the pytorch-fid choice), then mapped to [-1, 1] with ``(x - 128) / 128``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "FIDInceptionV3",
    "load_fid_inception",
    "resolve_fid_weights",
    "resize_bilinear_tf1",
    "WEIGHTS_ENV_VAR",
    "NUM_STATE_TENSORS",
]

WEIGHTS_ENV_VAR = "DREAM_FID_WEIGHTS"
NUM_STATE_TENSORS = 566  # 94 x (conv.weight + 5 BN tensors) + fc.{weight,bias}
INPUT_SIZE = 299


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool ignores the zero padding: count_include_pad=False.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 convolutions (1x7 / 7x1)."""

    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17 -> 8)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """Mixed_7b / Mixed_7c: expanded filter bank. ``pool="avg"`` (7b) or ``"max"`` (7c, the TF quirk)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = _avg3(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


# ----------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------


def _tf1_axis(n_in: int, n_out: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # TF1 resize_bilinear(align_corners=False): src = dst * n_in / n_out (no half-pixel shift).
    src = torch.arange(n_out, device=device, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w = (src - i0.double()).float()
    return i0, i1, w


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with TensorFlow 1.x semantics (``align_corners=False``, no half-pixel centres).

    Args:
        x: (B, C, H, W) float tensor.
        size: output (H', W').

    Returns:
        (B, C, H', W') tensor.
    """
    if x.dim() != 4:
        raise ValueError(f"resize_bilinear_tf1 expects (B, C, H, W), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    oh, ow = size
    y0, y1, wy = _tf1_axis(h, oh, x.device)
    x0, x1, wx = _tf1_axis(w, ow, x.device)
    wy = wy.to(x.dtype).view(1, 1, oh, 1)
    wx = wx.to(x.dtype).view(1, 1, 1, ow)
    top = x.index_select(2, y0)                                    # (B, C, H', W)
    bot = x.index_select(2, y1)
    rows = top + (bot - top) * wy
    left = rows.index_select(3, x0)                                # (B, C, H', W')
    right = rows.index_select(3, x1)
    return left + (right - left) * wx


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------


class FIDInceptionV3(nn.Module):
    """InceptionV3 feature extractor for FID (2048-d pool features) and IS (1008 logits).

    Args:
        resize: "tf1" (torch-fidelity) or "torch" (pytorch-fid) bilinear resize to 299 x 299.

    ``forward(images)`` returns (B, 2048) pool features, so the module plugs into
    ``torchmetrics.image.fid.FrechetInceptionDistance(feature=module)`` (it has ``num_features``).
    ``forward_all(images)`` returns ``{"2048": (B, 2048), "logits_unbiased": (B, 1008),
    "logits": (B, 1008)}``; the Inception Score uses ``logits_unbiased`` (no fc bias), as
    torch-fidelity does.
    """

    num_features = 2048
    num_logits = 1008

    def __init__(self, resize: str = "tf1"):
        super().__init__()
        if resize not in ("tf1", "torch"):
            raise ValueError(f"resize must be 'tf1' or 'torch', got {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        self.eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) in [0, 255] -> float (B, 3, 299, 299) in [-1, 1)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3 expects (B, 3, H, W) images, got {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise TypeError(
                f"FIDInceptionV3 expects uint8 images in [0, 255] (the torchmetrics / torch-fidelity "
                f"convention), got dtype {images.dtype}; convert with dream.eval.features.to_uint8"
            )
        x = images.to(self.fc.weight.dtype)
        if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            if self.resize == "tf1":
                x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
            else:
                x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return (x - 128.0) / 128.0

    def forward_all(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pool features and logits for uint8 (B, 3, H, W) images."""
        x = self.preprocess(images)                               # (B, 3, 299, 299)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)                          # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)                          # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))        # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                                      # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7a(x)                                      # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))                       # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))                                 # (B, 2048)
        logits_unbiased = pool @ self.fc.weight.t()               # (B, 1008)
        return {"2048": pool, "logits_unbiased": logits_unbiased, "logits": logits_unbiased + self.fc.bias}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 2048) pool features."""
        return self.forward_all(images)["2048"]

    def train(self, mode: bool = True):  # always an inference-mode feature extractor
        return super().train(False)


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def resolve_fid_weights(weights_path: Optional[str | os.PathLike] = None) -> str:
    """Return the local Inception weights file: ``weights_path`` or ``$DREAM_FID_WEIGHTS``.

    Raises:
        FileNotFoundError: neither is given, or the file does not exist. Nothing is downloaded.
    """
    path = weights_path if weights_path is not None else os.environ.get(WEIGHTS_ENV_VAR)
    if not path:
        raise FileNotFoundError(
            "FID-Inception weights are not available: pass weights_path=... (CLI: --inception-weights) "
            f"or set the environment variable {WEIGHTS_ENV_VAR} to a local copy of "
            "'weights-inception-2015-12-05-6726825d.pth' (torch-fidelity) or "
            "'pt_inception-2015-12-05-6726825d.pth' (pytorch-fid). dream never downloads weights."
        )
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID-Inception weights file not found: {path!r}")
    return path


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(sd).__name__})")
    return sd


def load_fid_inception(
    weights_path: Optional[str | os.PathLike] = None,
    device: torch.device | str = "cpu",
    resize: str = "tf1",
) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` and load a local weights file (torch-fidelity / pytorch-fid layout).

    Args:
        weights_path: a ``.pth`` / ``.pt`` (read with ``weights_only=True``) or ``.safetensors`` file;
            falls back to ``$DREAM_FID_WEIGHTS``.
        device: where to put the model.
        resize: see :class:`FIDInceptionV3`.

    Raises:
        FileNotFoundError: no weights file.
        KeyError / ValueError: missing, unexpected or mis-shaped keys (``num_batches_tracked``
            may be absent in older files).
    """
    path = resolve_fid_weights(weights_path)
    sd = _read_state_dict(path)
    # Strip wrappers some exports add.
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    model = FIDInceptionV3(resize=resize)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own and not k.startswith("AuxLogits.")]
    if missing or unexpected:
        raise KeyError(
            f"{path!r} is not an FID-Inception state dict: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"shape mismatch in {path!r}: (key, file, expected) {bad[:3]}")
    model.load_state_dict({k: sd[k] for k in own if k in sd}, strict=False)
    return model.to(device)
