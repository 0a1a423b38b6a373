"""Mirror a run's metrics to TensorBoard event files and, on request, to Weights & Biases.

A run folder keeps its own record (``metrics.jsonl``, PNGs); :class:`RunLogger` copies the same numbers and
images to the tools people already read:

* TensorBoard: ``<run>/tensorboard/events.out.tfevents.*`` through ``torch.utils.tensorboard.SummaryWriter``
  (needs the ``tensorboard`` package, ``pip install 'dream[log]'``); view with
  ``tensorboard --logdir <run>/tensorboard``. A resumed run passes the step it continues after, and the
  writer's ``purge_step`` hides events that the stopped run logged past its checkpoint, so no step appears twice.
* Weights & Biases (https://docs.wandb.ai/ref/python/init): ``wandb.init(id=..., resume="allow")`` with an id
  kept in ``<run>/wandb_run_id``, so resuming the run folder continues the same W&B run.

Neither package is imported before a logger asks for it. Nothing here knows about any particular trainer.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

log = logging.getLogger(__name__)

TENSORBOARD_NOTICE = ("tensorboard not installed: pip install 'dream[log]' to get TensorBoard event files; "
                      "metrics.jsonl is still written")
WANDB_ID_FILE = "wandb_run_id"

ImageLike = Union[str, os.PathLike, np.ndarray, Any]   # a path, an array/tensor (C, H, W) or a PIL image


def _summary_writer_class():
    """``SummaryWriter``, or None when ``tensorboard`` (which ``torch.utils.tensorboard`` needs) is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ImportError("Weights & Biases logging was requested (--wandb) but the `wandb` package is not "
                          "installed: pip install wandb (or pip install 'dream[wandb]')") from e
    return wandb


def _to_hwc_uint8(image: ImageLike) -> np.ndarray:
    """A path, a PIL image, or a (C, H, W) / (H, W) array or tensor (uint8, or float in [0, 1]) -> (H, W, 3) uint8."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    if hasattr(image, "convert") and hasattr(image, "size"):          # a PIL image
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):                                      # a torch tensor
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (C, H, W) with C in 1, 3, 4; got {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    arr = np.repeat(arr, 3, axis=0) if arr.shape[0] == 1 else arr[:3]
    return np.ascontiguousarray(arr.transpose(1, 2, 0))


class RunLogger:
    """Scalars and images of one run to TensorBoard (``<out_dir>/tensorboard``) and optionally W&B.

    Args:
        out_dir: the run folder.
        tensorboard: ``True`` (error if ``tensorboard`` is missing), ``False``, or ``"auto"`` (use it when
            installed, else log one notice line and carry on without it).
        wandb: log to Weights & Biases; the ``wandb`` package must be installed.
        wandb_project: W&B project (None: W&B's default, e.g. ``$WANDB_PROJECT``).
        run_name: display name of the W&B run (default: the run folder's name).
        config: the run's configuration, stored with the W&B run.
        resume_step: None for a new run; for a resumed run, the step it continues after. TensorBoard then
            drops events logged past that step by the stopped run, and W&B continues the run whose id is saved
            in the folder.

    Use as a context manager (or call :meth:`close`); after closing, logging calls do nothing.
    """

    def __init__(self, out_dir: Union[str, os.PathLike], tensorboard: Union[bool, str] = "auto",
                 wandb: bool = False, wandb_project: Optional[str] = None, run_name: Optional[str] = None,
                 config: Optional[Mapping[str, Any]] = None, resume_step: Optional[int] = None):
        if tensorboard not in (True, False, "auto"):
            raise ValueError(f"tensorboard must be True, False or 'auto', not {tensorboard!r}")
        self.out_dir = Path(out_dir)
        self._tb = None
        self._wandb = None          # the module (for wandb.Image)
        self._wb_run = None
        if wandb:                   # first: a missing package fails before any file is written
            self._wandb = _import_wandb()
        if tensorboard:
            writer_cls = _summary_writer_class()
            if writer_cls is None and tensorboard is True:
                raise ImportError("TensorBoard logging was requested (--tensorboard) but the `tensorboard` "
                                  "package is not installed: pip install 'dream[log]'")
            if writer_cls is None:
                log.warning(TENSORBOARD_NOTICE)
            else:
                purge = None if resume_step is None else int(resume_step) + 1
                self._tb = writer_cls(log_dir=str(self.out_dir / "tensorboard"), purge_step=purge)
        if wandb:
            self._wb_run = self._wandb.init(project=wandb_project, name=run_name or self.out_dir.resolve().name,
                                            dir=str(self.out_dir), config=dict(config or {}), resume="allow",
                                            id=self._wandb_run_id(new=resume_step is None))

    # ------------------------------------------------------------------------------------------
    @property
    def tensorboard_dir(self) -> Optional[Path]:
        """The event-file folder, or None when TensorBoard is off."""
        return self.out_dir / "tensorboard" if self._tb is not None else None

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wb_run is not None

    def _wandb_run_id(self, new: bool) -> str:
        """The id saved in the run folder; a new run (``new``) or a folder without one gets a fresh id."""
        path = self.out_dir / WANDB_ID_FILE
        if not new and path.exists():
            saved = path.read_text().strip()
            if saved:
                return saved
        run_id = uuid.uuid4().hex[:12]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
        return run_id

    def log_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Every finite int/float in ``values`` (booleans and other types are skipped), each under its key."""
        if not self.active:
            return
        nums = {k: float(v) for k, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        if self._tb is not None:
            for k, v in nums.items():
                self._tb.add_scalar(k, v, global_step=step)
        if self._wb_run is not None and nums:
            self._wb_run.log(nums, step=step)

    def log_image(self, step: int, tag: str, image: ImageLike) -> None:
        """One image: a file path (e.g. a saved PNG grid), a PIL image, or a (C, H, W) array / tensor."""
        if not self.active:
            return
        arr = _to_hwc_uint8(image)
        if self._tb is not None:
            self._tb.add_image(tag, arr, global_step=step, dataformats="HWC")
        if self._wb_run is not None:
            self._wb_run.log({tag: self._wandb.Image(arr)}, step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self, failed: bool = False) -> None:
        """Flush and close the event file; finish the W&B run (exit code 1 if ``failed``). Idempotent."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wb_run is not None:
            run, self._wb_run = self._wb_run, None
            if failed:
                run.finish(exit_code=1)
            else:
                run.finish()

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(failed=exc_type is not None)
        return False


# ---- command-line flags, shared by every command that logs a run -------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tensorboard/--no-tensorboard``, ``--wandb`` and ``--wandb-project``."""
    parser.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                        help="write TensorBoard event files to RUN/tensorboard (default: when tensorboard is installed)")
    parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (needs `wandb`)")
    parser.add_argument("--wandb-project", metavar="NAME", default=None, help="W&B project (with --wandb)")


def options_from_args(args: argparse.Namespace) -> dict:
    """Keyword arguments of :class:`RunLogger` from the flags of :func:`add_arguments`. A backend asked for
    explicitly that is not installed ends the command here, before any work, with a message naming it."""
    tb = "auto" if args.tensorboard is None else bool(args.tensorboard)
    opts = {"tensorboard": tb, "wandb": bool(args.wandb), "wandb_project": args.wandb_project}
    if args.wandb_project and not args.wandb:
        raise SystemExit("--wandb-project needs --wandb")
    try:
        if args.wandb:
            _import_wandb()
    except ImportError as e:
        raise SystemExit(str(e)) from e
    if tb is True and _summary_writer_class() is None:
        raise SystemExit("--tensorboard: the `tensorboard` package is not installed: pip install 'dream[log]'")
    return opts
