"""Training checkpoints that never lose work.

``checkpoint-{step:08d}.pt`` holds only tensors and primitive containers (model, EMA, optimizer, LR and
masking schedules, step, RNG states, data position, configs as dicts), so it loads with
``torch.load(weights_only=True)``. Writes go to a temporary file, are fsynced, then renamed: a write
killed mid-way leaves the previous checkpoint intact. Only the last ``keep`` are kept.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch

_PATTERN = re.compile(r"checkpoint-(\d+)\.pt$")


def atomic_torch_save(obj, path: os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    except OSError:
        pass


def list_checkpoints(folder: os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _PATTERN.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: os.PathLike) -> Optional[Path]:
    cks = list_checkpoints(folder)
    return cks[-1] if cks else None


def save_checkpoint(state: dict, folder: os.PathLike, step: int, keep: int = 3) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"checkpoint-{step:08d}.pt"
    atomic_torch_save(state, path)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    for stale in folder.glob("checkpoint-*.pt.tmp*"):
        stale.unlink(missing_ok=True)
    return path


def load_checkpoint(path: os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint-*.pt in {path}")
        path = found
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(str(path), map_location="cpu", weights_only=True)
