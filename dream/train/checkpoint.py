"""Training checkpoints that never lose work.

``checkpoint-{step:08d}.pt`` holds only tensors and primitive containers (model, EMA, optimizer, LR and
masking schedules, step, RNG states, data position, configs as dicts), so it loads with
``torch.load(weights_only=True)``. Writes go to a temporary file, are fsynced, then renamed: a write
killed mid-way leaves the previous checkpoint intact. Only the last ``keep`` are kept.

A failed write removes its temporary file, and a full disk raises :class:`DiskFullError` naming the file
(PyTorch's own error does not say so); :func:`clean_stale_temp_files` removes what a killed process left. On
resume, :func:`load_resumable` takes the newest checkpoint that loads and says which newer ones it skipped and why.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

_PATTERN = re.compile(r"checkpoint-(\d+)\.pt$")
# temporary files of our atomic writes in a run folder (checkpoints, metrics.jsonl rewrite, exported weights)
STALE_PATTERNS = ("checkpoint-*.pt.tmp*", "metrics.jsonl.tmp*", "*.json.tmp*", "*/model.safetensors.tmp",
                  "*/*.json.tmp*")

log = logging.getLogger("dream.train")


class DiskFullError(OSError):
    """A write failed because the disk (or the quota) is full; the message names the file."""


def _disk_full(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:     # PyTorch may wrap the OSError of the write
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def disk_full_hint(path: os.PathLike, cleanup: Optional[os.PathLike] = None):
    """Turn a full-disk error raised inside the block into :class:`DiskFullError` naming ``path``; on any error
    remove ``cleanup`` (the temporary file being written)."""
    try:
        yield
    except BaseException as e:
        if cleanup is not None:
            with contextlib.suppress(OSError):
                Path(cleanup).unlink(missing_ok=True)
        if isinstance(e, Exception) and _disk_full(e):
            try:
                free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:,.1f} MiB free"
            except OSError:
                free = "free space unknown"
            raise DiskFullError(errno.ENOSPC, f"disk full: could not write {path} ({free}); free some space "
                                f"(or move the run folder) and run again") from e
        raise


def clean_stale_temp_files(folder: os.PathLike) -> list[Path]:
    """Remove the temporary files that interrupted atomic writes left in a run folder (:data:`STALE_PATTERNS`);
    returns them. Call it before a run starts writing (one process per folder)."""
    folder = Path(folder)
    removed = []
    for pattern in STALE_PATTERNS:
        for p in folder.glob(pattern):
            if p.is_file() or p.is_symlink():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    if removed:
        log.info("removed %d stale temporary file(s) of an interrupted write: %s", len(removed),
                 ", ".join(p.name for p in removed[:5]))
    return removed


def atomic_torch_save(obj, path: os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with disk_full_hint(path, cleanup=tmp):
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


def load_resumable(folder: os.PathLike, check: Optional[Callable[[dict, Path], None]] = None) -> tuple[Path, dict]:
    """``(path, state)`` of the newest checkpoint in ``folder`` that loads and passes ``check(state, path)``
    (which raises on a bad state). Each newer one that fails is logged with the reason and skipped.

    Raises:
        FileNotFoundError: no checkpoint in ``folder``; RuntimeError: none loads (every reason listed).
    """
    found = list_checkpoints(folder)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint in {folder}")
    reasons = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path)
            if not isinstance(state, dict):
                raise TypeError(f"expected a dict, got {type(state).__name__}")
            if check is not None:
                check(state, path)
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file fails in many ways
            reason = f"{type(e).__name__}: {e}"
            reasons.append(f"{path.name}: {reason}")
            log.warning("--resume: skipping %s, it does not load (%s)", path, reason)
            continue
        if reasons:
            log.warning("--resume: using %s, the newest checkpoint that loads (skipped %d newer)", path.name,
                        len(reasons))
        return path, state
    raise RuntimeError(f"--resume: no checkpoint in {folder} loads: " + "; ".join(reasons))


def require_state(st: dict, keys, model: Optional[torch.nn.Module] = None, model_key: Optional[str] = None,
                  path: Optional[os.PathLike] = None) -> None:
    """Raise ``KeyError`` unless the training state ``st`` has every key in ``keys``; with ``model``, also check
    ``st[model_key]`` against it (names and shapes) before anything is changed."""
    missing = [k for k in keys if k not in st]
    if missing:
        raise KeyError(f"training state without {missing}")
    if model is not None:
        from dream.models.convert import check_state_dict

        check_state_dict(model, st[model_key], path)


def restore_loop_state(trainer, st: dict) -> None:
    """Restore what every single-process trainer keeps besides its modules: ``opt``, ``step``, the data
    generator ``gen``, the global torch RNG, ``history`` and the seconds trained before (``prior_s``)."""
    trainer.opt.load_state_dict(st["optimizer"])
    trainer.step = int(st["step"])
    trainer.gen.set_state(st["rng_gen"])
    torch.set_rng_state(st["rng_torch"])
    trainer.history = list(st.get("history", []))
    trainer.prior_s = float(st.get("train_s", 0.0))
