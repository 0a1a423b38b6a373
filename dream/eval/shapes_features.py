"""A small CNN feature extractor for FID on ShapesWorld images.

Inception-v3 features (the usual FID backbone) are meaningless on 32x32 synthetic shapes and its weights
cannot be downloaded here, so FID on ShapesWorld uses a small CNN trained on ShapesWorld itself to predict
object attributes (number of objects, which colour-shape pairs are present, where objects are, their
sizes). Its penultimate layer (``num_features`` = 128 dims) is the FID feature, in the spirit of FID's
"features of a network trained to recognise image content" (Heusel et al., arXiv 1706.08500), and of
domain-specific FID backbones. Trained by ``benchmarks/train_shapes_cnn.py``; weights ship in
``dream/assets/shapes_cnn.safetensors`` (config in the safetensors metadata, training record in the json
next to it).

Use with torchmetrics::

    fid = torchmetrics.image.fid.FrechetInceptionDistance(feature=load_shapes_feature_extractor())
    fid.update(real_uint8, real=True); fid.update(fake_uint8, real=False); fid.compute()
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dream.data.shapes import PALETTE, SHAPES, ShapesConfig
from dream.utils.config import ConfigBase

__all__ = ["ShapesCNNConfig", "ShapesFeatureCNN", "load_shapes_feature_extractor", "attribute_targets",
           "attribute_accuracy", "DEFAULT_WEIGHTS"]

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                               "shapes_cnn.safetensors")


@dataclass(frozen=True)
class ShapesCNNConfig(ConfigBase):
    """Architecture and label space of the ShapesWorld feature CNN."""

    image_size: int = 32                        # inputs are resized to this
    widths: tuple[int, ...] = (16, 32, 32, 64, 64)   # conv widths; stride 2 at the 2nd and 4th conv
    num_features: int = 128                     # FID feature dimension
    colours: tuple[str, ...] = tuple(PALETTE)
    shapes: tuple[str, ...] = SHAPES
    max_objects: int = 4                        # count head classes: 1 .. max_objects
    grid: int = 4                               # position head: grid x grid cells (object centres)

    def __post_init__(self):
        super().__post_init__()
        if len(self.widths) != 5 or self.image_size % 4:
            raise ValueError("widths must have 5 entries and image_size must be divisible by 4")

    @property
    def head_sizes(self) -> dict[str, int]:
        """Output slices of the attribute head, in order."""
        return {"count": self.max_objects, "colour": len(self.colours), "shape": len(self.shapes),
                "combo": len(self.colours) * len(self.shapes), "position": self.grid * self.grid, "size": 2}


class ShapesFeatureCNN(nn.Module):
    """Conv net: images -> ``num_features`` features (for FID) -> attribute logits (for training).

    ``forward`` returns the features; ``forward_heads`` the attribute logits split by head.

    Args:
        config: architecture.
        value_range: range of float inputs (uint8 inputs are always [0, 255]).
    """

    def __init__(self, config: ShapesCNNConfig | None = None, value_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__()
        self.config = config if config is not None else ShapesCNNConfig()
        self.value_range = (float(value_range[0]), float(value_range[1]))
        c = self.config
        w = c.widths
        layers, cin = [], 3
        for i, cout in enumerate(w):
            stride = 2 if i in (1, 3) else 1
            layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.trunk = nn.Sequential(*layers)
        side = c.image_size // 4
        # Features see the whole map (layout, positions) plus its global max and mean (what is present,
        # wherever it is).
        self.fc = nn.Linear(w[-1] * (side * side + 2), c.num_features)
        self.head = nn.Linear(c.num_features, sum(c.head_sizes.values()))
        self.num_features = c.num_features

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float images (B, 3, H, W) -> float in [-1, 1] at ``config.image_size``."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape (B, 3, H, W), got {shape}")
        if images.dtype == torch.uint8:
            x = images.float() / 127.5 - 1.0
        elif images.is_floating_point():
            lo, hi = self.value_range
            x = (images.float() - lo) / (hi - lo) * 2.0 - 1.0
        else:
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        s = self.config.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return x.to(self.fc.weight.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, S, S) in [-1, 1] -> features (B, num_features)."""
        h = self.trunk(x)                                            # (B, C, S/4, S/4)
        return self.fc(torch.cat([h.flatten(1), h.amax((2, 3)), h.mean((2, 3))], 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W), uint8 or float in ``value_range`` -> features (B, num_features) float32."""
        return self.forward_features(self.preprocess(images)).float()

    def forward_heads(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features -> attribute logits: ``count`` (B, max_objects); multi-label ``colour`` (B, K),
        ``shape`` (B, S), ``combo`` (B, K*S) colour-shape pairs, ``position`` (B, grid*grid) occupied cells
        and ``size`` (B, 2) (small, large present)."""
        logits = self.head(F.gelu(features))
        return dict(zip(self.config.head_sizes, logits.split(list(self.config.head_sizes.values()), 1)))


def attribute_targets(metas: list[dict], config: ShapesCNNConfig | None = None) -> dict[str, torch.Tensor]:
    """Training / evaluation targets from ShapesWorld metadata (matching :meth:`ShapesFeatureCNN.forward_heads`).

    Returns:
        ``count`` (B,) long in [0, max_objects), and float multi-hot ``colour`` (B, K), ``shape`` (B, S),
        ``combo`` (B, K*S), ``position`` (B, grid*grid) and ``size`` (B, 2).
    """
    c = config if config is not None else ShapesCNNConfig()
    B, K, S, G = len(metas), len(c.colours), len(c.shapes), c.grid
    count = torch.zeros(B, dtype=torch.long)
    combo, position, size = torch.zeros(B, K * S), torch.zeros(B, G * G), torch.zeros(B, 2)
    for b, m in enumerate(metas):
        objs = m["objects"]
        if not 1 <= len(objs) <= c.max_objects:
            raise ValueError(f"sample has {len(objs)} objects; the CNN counts 1..{c.max_objects}")
        count[b] = len(objs) - 1
        H = float(m["image_size"])
        for o in objs:
            combo[b, c.colours.index(o["colour"]) * S + c.shapes.index(o["shape"])] = 1
            gx, gy = min(G - 1, int(o["x"] / H * G)), min(G - 1, int(o["y"] / H * G))
            position[b, gy * G + gx] = 1
            size[b, 0 if o["size_class"] == "small" else 1] = 1
    colour = combo.view(B, K, S).amax(2)
    shape = combo.view(B, K, S).amax(1)
    return {"count": count, "colour": colour, "shape": shape, "combo": combo, "position": position, "size": size}


@torch.no_grad()
def attribute_accuracy(model: ShapesFeatureCNN, images: torch.Tensor, metas: list[dict],
                       batch_size: int = 256) -> dict[str, float]:
    """Attribute accuracies of the CNN's heads on labelled ShapesWorld images.

    Returns:
        ``count`` (number of objects), ``combo_exact`` / ``combo_label`` (set of colour-shape pairs: exact
        set / per label), ``colour_set`` / ``shape_set`` (exact sets of colours / shapes, from the colour
        and shape heads), ``position_exact``
        / ``position_label`` (occupied grid cells), ``size_label``, and on single-object images
        ``single_colour`` / ``single_shape`` (argmax of the colour / shape head; NaN if there are none).
    """
    c = model.config
    was_training = model.training
    model.eval()
    logits = {k: [] for k in c.head_sizes}
    for i in range(0, len(images), batch_size):
        out = model.forward_heads(model(images[i:i + batch_size]))
        for k, v in out.items():
            logits[k].append(v.float().cpu())
    model.train(was_training)
    logits = {k: torch.cat(v) for k, v in logits.items()}
    tgt = attribute_targets(metas, c)
    combo_pred = logits["combo"] > 0
    combo_true = tgt["combo"] > 0.5
    pos_pred, pos_true = logits["position"] > 0, tgt["position"] > 0.5
    res = {
        "count": (logits["count"].argmax(1) == tgt["count"]).float().mean().item(),
        "combo_exact": (combo_pred == combo_true).all(1).float().mean().item(),
        "combo_label": (combo_pred == combo_true).float().mean().item(),
        "colour_set": ((logits["colour"] > 0) == (tgt["colour"] > 0.5)).all(1).float().mean().item(),
        "shape_set": ((logits["shape"] > 0) == (tgt["shape"] > 0.5)).all(1).float().mean().item(),
        "position_exact": (pos_pred == pos_true).all(1).float().mean().item(),
        "position_label": (pos_pred == pos_true).float().mean().item(),
        "size_label": ((logits["size"] > 0) == (tgt["size"] > 0.5)).float().mean().item(),
    }
    single = tgt["count"] == 0
    if single.any():
        for key in ("colour", "shape"):
            res[f"single_{key}"] = (logits[key][single].argmax(1) == tgt[key][single].argmax(1)).float().mean().item()
    else:
        res["single_colour"] = res["single_shape"] = float("nan")
    return res


def load_shapes_feature_extractor(path: str | None = None, device: str | torch.device | None = None,
                                  value_range: tuple[float, float] = (-1.0, 1.0)) -> ShapesFeatureCNN:
    """Load the shipped (or a given) ShapesWorld feature CNN in eval mode with frozen weights.

    Args:
        path: a ``.safetensors`` file written by ``benchmarks/train_shapes_cnn.py`` (default: shipped one).
        device: where to put the module.
        value_range: range of float inputs; uint8 inputs are always [0, 255]. For torchmetrics' FID with
            ``normalize=True`` (floats in [0, 1]) pass ``(0.0, 1.0)``.

    Returns:
        A :class:`ShapesFeatureCNN`; ``module(images)`` -> (B, ``module.num_features``) features.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path is None:
        from dream.models.pretrained import pretrained_path

        path = str(pretrained_path("shapes_cnn") / "shapes_cnn.safetensors")   # sha256-checked
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ShapesWorld CNN weights not found at {path}; "
                                "train them with benchmarks/train_shapes_cnn.py")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} has no 'config' metadata; was it written by benchmarks/train_shapes_cnn.py?")
    model = ShapesFeatureCNN(ShapesCNNConfig.from_dict(json.loads(meta["config"])), value_range=value_range)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model


def shapes_config_for(config: ShapesCNNConfig) -> ShapesConfig:
    """The ShapesWorld config matching a CNN's label space (for building evaluation data)."""
    return ShapesConfig(image_size=config.image_size, colours=config.colours, shapes=config.shapes,
                        max_objects=config.max_objects)
