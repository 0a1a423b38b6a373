"""Checkpoint loading: our ``model.safetensors``, official DREAM ``.pth`` (``model`` / ``model_ema``),
plain state dicts. Strict: a missing, unexpected or mis-shaped key, or a tensor holding NaN / inf, raises an error
naming the keys.

Official key names equal ours, so conversion is: unwrap the container, prefer EMA weights when
asked, strip ``module.`` / ``_orig_mod.`` prefixes, drop non-persistent buffers (``attn_mask``).

NOTE: official training checkpoints also pickle an ``argparse.Namespace`` under ``args``, which
``torch.load(weights_only=True)`` refuses. We never unpickle: save the weights of such a file as
safetensors with the official code, or pass ``allow_args_namespace=True`` to allow-list only
``argparse.Namespace`` for ``weights_only`` loading.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load_file, save_file

_DROP = ("attn_mask",)


def _resolve(path: Path) -> Path:
    """The weights file of ``path`` (a folder's model.safetensors, model_ema.safetensors or checkpoint-last.pth)."""
    if path.is_dir():
        for name in ("model.safetensors", "model_ema.safetensors", "checkpoint-last.pth"):
            if (path / name).exists():
                return path / name
        raise FileNotFoundError(f"no model.safetensors (or checkpoint) in {path}")
    return path


def _read(path: Path, allow_args_namespace: bool = False) -> dict:
    path = _resolve(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if allow_args_namespace:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"cannot load {path} safely with weights_only=True ({type(e).__name__}: {e}). "
                           "Official checkpoints pickle argparse.Namespace; pass allow_args_namespace=True "
                           "to allow-list it, or convert the weights to safetensors.") from e


def extract_state_dict(obj: dict, prefer_ema: bool = False) -> dict:
    """Unwrap ``model`` / ``model_ema`` / ``state_dict`` / ``ema`` containers and clean key prefixes."""
    if not isinstance(obj, dict):
        raise TypeError(f"checkpoint must be a dict, got {type(obj).__name__}")
    order = ("model_ema", "ema", "model", "state_dict") if prefer_ema else ("model", "state_dict", "model_ema", "ema")
    for key in order:
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"checkpoint entry {k!r} is not a tensor ({type(v).__name__})")
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        if k.split(".")[-1] in _DROP:
            continue
        out[k] = v
    return out


def non_finite_tensors(sd: dict) -> list[str]:
    """Names of the floating-point tensors of ``sd`` holding NaN or infinite values."""
    return [k for k, v in sd.items() if torch.is_tensor(v) and (v.is_floating_point() or v.is_complex())
            and not bool(torch.isfinite(v).all())]


def compare_state_dict(model: torch.nn.Module, sd: dict) -> dict[str, list[str]]:
    """How ``sd`` differs from ``model.state_dict()``: sorted ``missing`` and ``unexpected`` key names,
    ``shape_mismatch`` descriptions and ``non_finite`` tensors (NaN / inf); all four are empty exactly when ``sd``
    loads strictly."""
    own = model.state_dict()
    return {"missing": sorted(set(own) - set(sd)), "unexpected": sorted(set(sd) - set(own)),
            "shape_mismatch": sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                                     for k in set(own) & set(sd) if own[k].shape != sd[k].shape),
            "non_finite": sorted(non_finite_tensors(sd))}


def check_state_dict(model: torch.nn.Module, sd: dict, source: Union[str, os.PathLike, None] = None) -> None:
    """Raise if ``sd`` does not match ``model`` exactly (missing, unexpected, shapes) or holds NaN / inf values
    (the message names the tensors and ``source``)."""
    diff = compare_state_dict(model, sd)
    missing, unexpected, shapes = diff["missing"], diff["unexpected"], diff["shape_mismatch"]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:20]}"
                        f"{' ...' if len(unexpected) > 20 else ''}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {shapes[:20]}")
    where = f" {source}" if source is not None else ""
    if problems:
        raise RuntimeError(f"checkpoint{where} does not match the model: " + "; ".join(problems))
    bad = diff["non_finite"]
    if bad:
        raise ValueError(f"checkpoint{where} holds NaN or infinite values in {len(bad)} tensor(s): {bad[:20]}"
                         f"{' ...' if len(bad) > 20 else ''}")


def load_state_dict_strict(model: torch.nn.Module, sd: dict, source: Union[str, os.PathLike, None] = None) -> None:
    """Check ``sd`` (:func:`check_state_dict`), then load it; on any error the model is left unchanged."""
    check_state_dict(model, sd, source)
    model.load_state_dict(sd, strict=True)


def read_state_dict(path: Union[str, os.PathLike], prefer_ema: bool = False,
                    allow_args_namespace: bool = False) -> dict:
    """The cleaned state dict of an official or dream checkpoint (file or folder; see module docstring)."""
    return extract_state_dict(_read(Path(path), allow_args_namespace), prefer_ema=prefer_ema)


def load_checkpoint_into(model: torch.nn.Module, path: Union[str, os.PathLike], prefer_ema: bool = False,
                         allow_args_namespace: bool = False) -> torch.nn.Module:
    """Load an official or dream checkpoint into ``model`` strictly (see module docstring); weights with NaN or
    infinite values are refused, naming the tensors."""
    path = _resolve(Path(path))
    load_state_dict_strict(model, read_state_dict(path, prefer_ema, allow_args_namespace), path)
    return model


def save_pretrained(model, folder: Union[str, os.PathLike], dtype: torch.dtype | None = None,
                    arch: str | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` atomically into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        sd[k] = v.contiguous()
    tmp = folder / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt", "model_type": "dream"})
    os.replace(tmp, folder / "model.safetensors")
    model.config.save(folder / "config.json", arch=arch)
    return folder
