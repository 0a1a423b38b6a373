"""Image-text webdataset pipelines for DREAM training.

Reads webdataset tar shards (members ``<key>.jpg|png|webp`` + ``<key>.txt`` and/or ``<key>.json``),
decodes and transforms each image (ADM centre crop + random flip -> ``[-1, 1]``) and yields batches::

    {"image": (B, 3, H, W) float32, "caption": list[str], "key": list[str], "meta": list[dict | None]}

Properties:

* **Sharding.** Shard URLs are local paths, ``pipe:``/``http(s)://`` URLs (opened with webdataset's
  ``gopen``) or brace patterns (``"shards/{000..009}.tar"``, several joined with ``::``). Shards are split
  first per node (``rank::world_size``) then per DataLoader worker; a warning is issued when there are fewer
  shards than ``world_size * num_workers`` (idle workers; uneven ranks can hang DDP, see webdataset#188).
* **Determinism.** Shard order, the sample shuffle buffer and every augmentation coin come from
  ``torch.Generator`` streams seeded by ``(seed, epoch, rank, worker)``; the same seed and epoch give the
  same batches. ``resampled=True`` draws shards with replacement (infinite stream cut to
  ``batches_per_epoch``, equal on every rank, which is what keeps DDP in step).
* **Robustness.** Samples with a missing/corrupt image or a missing/empty caption are skipped and counted
  by reason; unreadable shards are counted too. Sizes are bounded (``max_member_bytes``, ``max_sample_bytes``,
  ``max_image_pixels``, ``max_resize_pixels``; see :mod:`dream.data.decoding`): an input over a limit is skipped
  as ``too_large`` before it is read, decoded or resized. Workers report their counts with every batch (and in a
  final end-of-stream record), :class:`ImageTextLoader` aggregates them into ``loader.stats`` and logs one
  summary line per epoch.
* **Exact resume.** Every raw sample (after the shuffle buffer) has a position in its worker's stream, and
  every batch records the position after its last sample. ``loader.state_dict()`` (taken between batches,
  stored in the checkpoint) holds, per worker, that position, the batch count and whether the worker is
  finished, plus which worker is next in the DataLoader's round robin. ``loader.load_state_dict(state)``
  makes the next ``iter(loader)`` fast-forward every worker to its position (skipped raw samples are read
  but not decoded; their random numbers are still consumed) and rotate worker ids so that the round robin
  continues with the right worker: the remaining batches are bit-identical to an uninterrupted epoch.
  Iterating draws nothing from the global torch RNG (the DataLoader gets its own generator), so a resumed
  trainer's dropout stream is unchanged.
  Requirements: same shards, seed, batch size, ``num_workers``, ``world_size`` and rank. For a single
  worker (``num_workers <= 1``) the state reduces to one integer, ``start_index`` = raw samples of this
  rank's epoch already consumed (``state_dict()["workers"][0]["next_index"]``).

Trainer usage::

    loader = make_dataloader("cc12m/{00000..02175}.tar", batch_size=64, num_workers=8, seed=seed,
                             rank=rank, world_size=world_size, resampled=True, batches_per_epoch=5000)
    if resuming:
        loader.load_state_dict(ckpt["data"])       # epoch + per-worker positions + epoch stats so far
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)                    # keeps a pending resume of the same epoch
        for batch in loader:                       # batch["image"]: (B, 3, 256, 256) in [-1, 1]
            ...
            ckpt["data"] = loader.state_dict()     # JSON-friendly; save with the model checkpoint
        print(loader.stats)                        # the summary line was logged at the end of the epoch

Written from scratch for ``dream`` (patterns: open_clip's webdataset recipe, MAR/ADM preprocessing).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from dream.data.decoding import SKIP_REASONS, SkipSample, check_shape, check_size, decode_caption, decode_image
from dream.data.decoding import has_scheme as _has_scheme
from dream.data.decoding import iter_shard as _iter_shard
from dream.data.transforms import DEFAULT_MAX_RESIZE_PIXELS, ImageTooLarge, ImageTransform
from dream.utils.config import ConfigBase

__all__ = [
    "WebDatasetConfig",
    "ImageTextDataset",
    "ImageTextLoader",
    "make_dataloader",
    "expand_urls",
    "SKIP_REASONS",
    "SkipSample",
    "decode_caption",
    "check_shape",
    "mix_seed",
]

logger = logging.getLogger("dream.data")

_MASK64 = (1 << 64) - 1
# Stream ids for mix_seed (arbitrary distinct constants).
_SHARD_ORDER, _SHARD_PICK, _SAMPLE_SHUFFLE, _AUGMENT, _LOADER = 0x51A4D, 0x9C1C, 0x5F0F, 0xA06, 0x10AD


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 chain); used to seed per-worker generators."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h & ((1 << 63) - 1)


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


def expand_urls(urls: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> List[str]:
    """Expand shard specs to a flat list of URLs.

    Accepts a string (brace patterns, several specs joined with ``::``), a path, or a sequence of those.
    Local paths must exist.

    Raises:
        ValueError: empty list; FileNotFoundError: local shards that do not exist (up to five named).
    """
    import braceexpand  # dependency of webdataset

    if isinstance(urls, (str, os.PathLike)):
        specs = [s for s in os.fspath(urls).split("::") if s]
    else:
        specs = [os.fspath(u) for u in urls]
    out: List[str] = []
    for spec in specs:
        out.extend(braceexpand.braceexpand(spec))
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}")
    missing = [u for u in out if not _has_scheme(u) and not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} shard(s) not found: {missing[:5]}{more}")
    return out


@dataclass(frozen=True)
class WebDatasetConfig(ConfigBase):
    """Options of the image-text pipeline.

    Attributes:
        batch_size: samples per batch (per rank).
        image_size: output side length of the default transform.
        shuffle_buffer: size of the sample shuffle buffer per worker (0 = no sample shuffling).
        shuffle_shards: shuffle the shard order every epoch (non-resampled mode).
        seed: base seed of all random streams.
        resampled: draw shards with replacement (infinite stream; needs ``batches_per_epoch``).
        batches_per_epoch: batches per epoch *per rank* (split over workers); ``None`` = until data ends.
        drop_last: drop each worker's last incomplete batch.
        caption_keys: members tried in order for the caption (``"json"`` reads ``json_caption_fields``).
        json_caption_fields: caption fields of the json member, tried in order.
        image_keys: image members tried in order.
        max_logged_errors: per worker, how many skipped samples are logged with details.

    Limits (a sample over one is skipped and counted as ``too_large``, the log line names the limit):
        max_member_bytes: size of one tar member; a larger one is never read (the stream skips over it).
        max_sample_bytes: all members of one sample together.
        max_image_pixels: width x height of the image, read from its header before decoding (default: PIL's
            decompression-bomb threshold; PIL's own error at twice its threshold still applies).
        max_resize_pixels: the output of every resize step of the default ADM crop (an image with an extreme
            aspect ratio would otherwise be scaled up to gigabytes: 400000x1 at 32 px is 409.6 M pixels).
    """

    batch_size: int = 64
    image_size: int = 256
    shuffle_buffer: int = 1000
    shuffle_shards: bool = True
    seed: int = 0
    resampled: bool = False
    batches_per_epoch: Optional[int] = None
    drop_last: bool = True
    caption_keys: tuple = ("txt", "json")
    json_caption_fields: tuple = ("caption", "text")
    image_keys: tuple = ("jpg", "jpeg", "png", "webp")
    max_logged_errors: int = 5
    max_member_bytes: int = 64 << 20
    max_sample_bytes: int = 256 << 20
    max_image_pixels: int = 89_478_485
    max_resize_pixels: int = DEFAULT_MAX_RESIZE_PIXELS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.batches_per_epoch is not None and self.batches_per_epoch <= 0:
            raise ValueError(f"batches_per_epoch must be positive, got {self.batches_per_epoch}")
        for name in ("max_member_bytes", "max_sample_bytes", "max_image_pixels", "max_resize_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.resampled and self.batches_per_epoch is None:
            raise ValueError("resampled=True gives an infinite stream: set batches_per_epoch")
        object.__setattr__(self, "caption_keys", tuple(self.caption_keys))
        object.__setattr__(self, "json_caption_fields", tuple(self.json_caption_fields))
        object.__setattr__(self, "image_keys", tuple(self.image_keys))
        if not self.caption_keys or not self.image_keys:
            raise ValueError("caption_keys and image_keys must not be empty")


# --------------------------------------------------------------------------------------------------------
# Raw stream: shards -> grouped samples -> shuffle buffer
# --------------------------------------------------------------------------------------------------------
class _Uniforms:
    """Chunked uniform draws from a generator (avoids one tiny torch call per sample)."""

    def __init__(self, generator: torch.Generator, chunk: int = 1024):
        self.generator, self.chunk, self.buf, self.i = generator, chunk, [], 0

    def next(self) -> float:
        if self.i >= len(self.buf):
            self.buf = torch.rand(self.chunk, generator=self.generator, dtype=torch.float64).tolist()
            self.i = 0
        self.i += 1
        return self.buf[self.i - 1]

    def index(self, n: int) -> int:
        return min(int(self.next() * n), n - 1)


def _shuffled(items: Iterable[Any], bufsize: int, rng: _Uniforms) -> Iterator[Any]:
    """Deterministic streaming shuffle with a buffer of ``bufsize`` items."""
    if bufsize <= 1:
        yield from items
        return
    buf: List[Any] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        j = rng.index(len(buf))
        out, buf[j] = buf[j], item
        yield out
    while buf:
        j = rng.index(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def _stack(tensors: List[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; CPU tensors go through numpy (single-threaded, no intra-op thread contention)."""
    if all(t.device.type == "cpu" and not t.requires_grad for t in tensors):
        return torch.from_numpy(np.stack([t.numpy() for t in tensors]))
    return torch.stack(tensors)


def _collate(samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    return {
        "image": _stack([s["image"] for s in samples]),  # (B, 3, H, W)
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


# --------------------------------------------------------------------------------------------------------
# Dataset (runs inside each DataLoader worker)
# --------------------------------------------------------------------------------------------------------
class ImageTextDataset(torch.utils.data.IterableDataset):
    """Iterable over *batches* of decoded image-text samples from webdataset shards (one rank).

    Batching happens inside the worker so that each batch can carry the worker's skip counters and stream
    position. Besides the four public keys, items carry ``"__position__"`` and ``"__skipped__"``, and every
    worker ends with an ``{"__end__": True, ...}`` record; :class:`ImageTextLoader` consumes these, so use it
    (or :func:`make_dataloader`) rather than iterating this class directly.

    Args:
        urls: shard spec(s), see :func:`expand_urls`.
        config: :class:`WebDatasetConfig`.
        transform: ``transform(pil_image, generator) -> Tensor (3, H, W)``; default ADM crop + flip(0.5).
        rank, world_size: this node's rank; default from ``torch.distributed`` (else 0 / 1).
        epoch: epoch whose order is produced (``set_epoch`` changes it).
    """

    def __init__(
        self,
        urls,
        config: Optional[WebDatasetConfig] = None,
        transform: Optional[Callable[..., torch.Tensor]] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        epoch: int = 0,
    ) -> None:
        super().__init__()
        self.urls = expand_urls(urls)
        self.config = config if config is not None else WebDatasetConfig()
        self.transform = transform if transform is not None else \
            ImageTransform(self.config.image_size, 0.5, self.config.max_resize_pixels)
        if rank is None or world_size is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if ready else 0) if rank is None else rank
            world_size = (dist.get_world_size() if ready else 1) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = int(epoch)
        self.resume: Optional[Dict[str, Any]] = None  # set by ImageTextLoader before iter()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order, shuffle and augmentation streams depend on it)."""
        self.epoch = int(epoch)

    # ----- per-worker plan -------------------------------------------------------------------------------
    def _worker_shards(self, worker: int, num_workers: int) -> Iterator[str]:
        cfg = self.config
        if cfg.resampled:
            g = _generator(cfg.seed, self.epoch, _SHARD_PICK, self.rank, worker)
            rng = _Uniforms(g)
            while True:
                yield self.urls[rng.index(len(self.urls))]
        order = list(range(len(self.urls)))
        if cfg.shuffle_shards:
            g = _generator(cfg.seed, self.epoch, _SHARD_ORDER)  # same on every rank: a partition
            order = torch.randperm(len(self.urls), generator=g).tolist()
        mine = order[self.rank :: self.world_size][worker::num_workers]
        for i in mine:
            yield self.urls[i]

    def worker_quota(self, worker: int, num_workers: int) -> Optional[int]:
        """Batches this worker produces per epoch (``None``: until its shards end)."""
        n = self.config.batches_per_epoch
        if n is None:
            return None
        return n // num_workers + (1 if worker < n % num_workers else 0)

    def _raw_samples(self, worker: int, num_workers: int, counts: collections.Counter):
        """Grouped raw samples of this worker's shards, in shard order."""
        empty_run = 0
        for url in self._worker_shards(worker, num_workers):
            n = 0
            for sample in _iter_shard(url, counts, self.config.max_member_bytes, self.config.max_sample_bytes):
                n += 1
                yield sample
            empty_run = 0 if n else empty_run + 1
            if self.config.resampled and empty_run >= max(100, 2 * len(self.urls)):
                raise RuntimeError(f"{empty_run} resampled shards in a row gave no sample: is any shard readable?")

    # ----- decoding (override in subclasses) ---------------------------------------------------------------
    def decode_sample(self, sample: Dict[str, Any], generator: torch.Generator, shapes: Dict[str, tuple]):
        """Raw tar members -> ``{"image", "caption", "key", "meta"}``; raises ``SkipSample(reason)`` on bad data.

        ``generator`` is this sample's own augmentation generator (seeded from the worker stream).
        """
        caption, meta = decode_caption(sample, self.config)
        image = decode_image(sample, self.config)
        try:
            x = self.transform(image, generator)
        except ImageTooLarge as exn:
            raise SkipSample("too_large", str(exn)) from None
        except Exception as exn:  # noqa: BLE001 - a user transform may raise anything
            raise SkipSample("transform_error", f"{type(exn).__name__}: {exn}") from None
        if isinstance(self.transform, ImageTransform):  # ours: finite by construction, check the shape only
            size = self.transform.image_size
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != (3, size, size):
                raise SkipSample("bad_shape", f"image: got {tuple(x.shape)}, expected {(3, size, size)}")
        else:  # a custom transform: the first good sample fixes the shape
            shapes.setdefault("image", tuple(getattr(x, "shape", ())))
            check_shape("image", x, shapes["image"])
        return {"image": x, "caption": caption, "key": sample["__key__"], "meta": meta}

    def collate(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        """List of decoded samples -> batch dict."""
        return _collate(samples)

    # ----- iteration -------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        num_workers, slot = (info.num_workers, info.id) if info is not None else (1, 0)
        resume = self.resume or {}
        worker = (slot + int(resume.get("worker_offset", 0))) % num_workers  # logical worker id
        wstate = (resume.get("workers") or [{}] * num_workers)[worker]
        yield from self._iter_worker(worker, num_workers, dict(wstate))

    def _emit(self, pending, position, counts, next_index: int, batches: int) -> Dict[str, Any]:
        """Collate ``pending`` and attach the stream position and the skip counts since the last batch."""
        position.update(next_index=next_index, batches=batches)
        batch = self.collate(pending)
        batch["__position__"] = dict(position, done=False)
        batch["__skipped__"] = dict(counts)
        counts.clear()
        return batch

    def _iter_worker(self, worker: int, num_workers: int, wstate: Dict[str, Any]):
        cfg = self.config
        start = int(wstate.get("next_index", 0))
        batches = int(wstate.get("batches", 0))
        quota = self.worker_quota(worker, num_workers)
        counts: collections.Counter = collections.Counter()
        position = {"worker": worker, "next_index": start, "batches": batches}
        if wstate.get("done") or (quota is not None and batches >= quota):
            yield {"__end__": True, "__position__": dict(position, done=True), "__skipped__": {}}
            return
        logged = 0
        shuffle_rng = _Uniforms(_generator(cfg.seed, self.epoch, _SAMPLE_SHUFFLE, self.rank, worker))
        aug_gen = _generator(cfg.seed, self.epoch, _AUGMENT, self.rank, worker)
        raw = self._raw_samples(worker, num_workers, counts)
        pending: List[Dict[str, Any]] = []
        aug_seeds: List[int] = []
        shapes: Dict[str, tuple] = {}  # first shape seen per tensor field (checked on every sample)
        for index, sample in enumerate(_shuffled(raw, cfg.shuffle_buffer, shuffle_rng)):
            if not aug_seeds:  # one seed per raw sample, drawn even for skipped ones (resume-exact)
                aug_seeds = torch.randint(0, 2**62, (1024,), generator=aug_gen).tolist()[::-1]
            seed = aug_seeds.pop()
            if index < start:
                continue
            try:
                check_size(sample)
                item = self.decode_sample(sample, torch.Generator().manual_seed(seed), shapes)
            except SkipSample as skip:
                counts[skip.reason] += 1
                if logged < cfg.max_logged_errors:
                    logged += 1
                    logger.warning("skipping sample %s from %s: %s %s", sample.get("__key__"),
                                   sample.get("__url__"), skip.reason, skip.detail)
                continue
            pending.append(item)
            if len(pending) == cfg.batch_size:
                batches += 1
                yield self._emit(pending, position, counts, next_index=index + 1, batches=batches)
                pending = []
                if quota is not None and batches >= quota:
                    break
        else:
            if pending and not cfg.drop_last:
                batches += 1
                yield self._emit(pending, position, counts, next_index=index + 1, batches=batches)
            elif pending:
                counts["dropped_last"] += len(pending)
        yield {"__end__": True, "__position__": dict(position, done=True), "__skipped__": dict(counts)}


# --------------------------------------------------------------------------------------------------------
# Loader (main process): DataLoader + stats aggregation + resume state
# --------------------------------------------------------------------------------------------------------
def _empty_stats(epoch: int) -> Dict[str, Any]:
    return {"epoch": epoch, "batches": 0, "samples": 0, "skipped": {}, "skipped_total": 0, "shard_errors": 0,
            "dropped_last": 0, "complete": False}


class ImageTextLoader:
    """Iterates :class:`ImageTextDataset` through a ``torch.utils.data.DataLoader``.

    * ``stats``: counters of the current (or last) epoch: ``batches``, ``samples``, ``skipped`` (reason ->
      count), ``skipped_total``, ``shard_errors``, ``dropped_last``, ``complete``. Aggregated over workers.
    * one summary line per finished epoch through ``log_fn`` (default ``logging.getLogger("dream.data").info``).
    * ``state_dict()`` / ``load_state_dict()``: exact mid-epoch resume (see the module docstring).
    * after a complete epoch the epoch advances by one; ``set_epoch`` sets it explicitly.

    Args:
        dataset: the :class:`ImageTextDataset`.
        num_workers: DataLoader workers (0 = in the main process).
        pin_memory, prefetch_factor, multiprocessing_context: passed to the DataLoader.
        log_fn: callable receiving the per-epoch summary line.
    """

    def __init__(
        self,
        dataset: ImageTextDataset,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: Optional[int] = None,
        multiprocessing_context: Optional[str] = None,
        log_fn: Optional[Callable[[str], None]] = None,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.log_fn = log_fn if log_fn is not None else logger.info
        self.stats = _empty_stats(dataset.epoch)
        self._resume: Optional[Dict[str, Any]] = None
        self._state = self._fresh_state()
        n_shards, total = len(dataset.urls), dataset.world_size * max(1, self.num_workers)
        if not dataset.config.resampled and n_shards < total:
            warnings.warn(
                f"{n_shards} shard(s) for world_size * num_workers = {total} readers: some workers get no "
                "data, ranks may get unequal numbers of batches (DDP can hang). Use more shards or "
                "resampled=True with batches_per_epoch.",
                stacklevel=2,
            )

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @property
    def workers(self) -> int:
        """Logical worker streams (1 when ``num_workers == 0``)."""
        return max(1, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next iteration (clears any pending resume state of another epoch)."""
        self.dataset.set_epoch(epoch)
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None

    def __len__(self) -> int:
        n = self.dataset.config.batches_per_epoch
        if n is None:
            raise TypeError("length unknown: set batches_per_epoch (streams end when the shards end)")
        return n

    def _fresh_state(self) -> Dict[str, Any]:
        return {
            "workers": [{"next_index": 0, "batches": 0, "done": False} for _ in range(self.workers)],
            "next_worker": 0,
        }

    def state_dict(self) -> Dict[str, Any]:
        """Data position after the last batch handed out (JSON-friendly): store it in the checkpoint."""
        return {
            "epoch": self.epoch,
            "num_workers": self.workers,
            "world_size": self.dataset.world_size,
            "rank": self.dataset.rank,
            "batch_size": self.dataset.config.batch_size,
            "seed": self.dataset.config.seed,
            "workers": [dict(w) for w in self._state["workers"]],
            "next_worker": self._state["next_worker"],
            "stats": json.loads(json.dumps(self.stats)),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Resume: the next ``iter(self)`` continues epoch ``state["epoch"]`` exactly where it stopped.

        Raises:
            ValueError: the state was saved with another worker count / world size / rank / batch size /
                seed, for which an exact resume is impossible, or is not a shard loader's state.
        """
        expect = {"num_workers": self.workers, "world_size": self.dataset.world_size, "rank": self.dataset.rank,
                  "batch_size": self.dataset.config.batch_size, "seed": self.dataset.config.seed}
        missing = set(expect) | {"epoch", "workers", "next_worker"}
        missing -= set(state)
        if missing:
            raise ValueError(f"not a shard loader's data state (missing keys {sorted(missing)}): was it saved "
                             "for another kind of data?")
        bad = {k: (state[k], v) for k, v in expect.items() if state[k] != v}
        if bad:
            raise ValueError(f"cannot resume data exactly, settings differ (saved, current): {bad}")
        self.dataset.set_epoch(int(state["epoch"]))
        self._resume = {"epoch": int(state["epoch"]), "workers": [dict(w) for w in state["workers"]],
                        "next_worker": int(state["next_worker"]), "stats": state.get("stats")}

    def set_start_index(self, start_index: int) -> None:
        """Single-worker resume: skip the first ``start_index`` raw samples of this rank's current epoch."""
        if self.workers != 1:
            raise ValueError("an integer start_index needs num_workers <= 1; use state_dict()/load_state_dict()")
        if self.dataset.config.batches_per_epoch is not None:
            raise ValueError("with batches_per_epoch use state_dict()/load_state_dict() (it tracks batches)")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self._resume = {"epoch": self.epoch, "next_worker": 0, "stats": None,
                        "workers": [{"next_index": int(start_index), "batches": 0, "done": False}]}

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == self.epoch:
            self._state = {"workers": [dict(w) for w in resume["workers"]], "next_worker": resume["next_worker"]}
            self.stats = dict(resume["stats"]) if resume.get("stats") else _empty_stats(self.epoch)
            self.stats["skipped"] = dict(self.stats.get("skipped", {}))
            self.dataset.resume = {"workers": self._state["workers"], "worker_offset": self._state["next_worker"]}
        else:
            self._state = self._fresh_state()
            self.stats = _empty_stats(self.epoch)
            self.dataset.resume = None
        self.stats["epoch"], self.stats["complete"] = self.epoch, False
        kwargs: Dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs.update(prefetch_factor=self.prefetch_factor, multiprocessing_context=self.multiprocessing_context)
        # The DataLoader draws its workers' base seed when an iterator is created: from ``generator``, or else from
        # the global torch RNG, which would shift the trainer's dropout stream on every resume. Ours is a pure
        # function of (seed, epoch, rank), so the loader consumes no global randomness.
        generator = _generator(self.dataset.config.seed, self.epoch, _LOADER, self.dataset.rank)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            generator=generator, **kwargs
        )
        try:
            for item in loader:
                pos = item.pop("__position__")
                self._count(item.pop("__skipped__"))
                w = pos["worker"]
                self._state["workers"][w] = {"next_index": pos["next_index"], "batches": pos["batches"],
                                             "done": pos["done"]}
                if item.get("__end__"):
                    continue
                self._state["next_worker"] = (w + 1) % self.workers
                self.stats["batches"] += 1
                self.stats["samples"] += len(item["caption"])
                yield item
        finally:
            self.dataset.resume = None
        self.stats["complete"] = True
        self.log_fn(self.summary())
        self.dataset.set_epoch(self.epoch + 1)
        self._state = self._fresh_state()

    def _count(self, skipped: Dict[str, int]) -> None:
        for reason, n in skipped.items():
            if reason == "shard_error":
                self.stats["shard_errors"] += n
            elif reason == "dropped_last":
                self.stats["dropped_last"] += n
            else:
                self.stats["skipped"][reason] = self.stats["skipped"].get(reason, 0) + n
                self.stats["skipped_total"] += n

    def summary(self) -> str:
        """One line describing the current ``stats``."""
        s = self.stats
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["skipped"].items())) or "none"
        return (f"[dream.data] epoch {s['epoch']}: {s['samples']} samples in {s['batches']} batches; "
                f"skipped {s['skipped_total']} ({reasons}); shard errors {s['shard_errors']}; "
                f"dropped (incomplete last batch) {s['dropped_last']}")


def make_dataloader(
    urls,
    batch_size: int,
    image_size: int = 256,
    num_workers: int = 4,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    epoch: int = 0,
    resampled: bool = False,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    transform: Optional[Callable[..., torch.Tensor]] = None,
    caption_keys: Sequence[str] = ("txt", "json"),
    batches_per_epoch: Optional[int] = None,
    start_index: Optional[int] = None,
    log_fn: Optional[Callable[[str], None]] = None,
    pin_memory: bool = False,
    **config_overrides: Any,
) -> ImageTextLoader:
    """Build an :class:`ImageTextLoader` over image-text shards.

    Args:
        urls: shard spec(s): paths, URLs, brace patterns (``"data/{000..099}.tar"``), ``::``-joined.
        batch_size: samples per batch on this rank.
        image_size: side of the ADM centre crop.
        num_workers: DataLoader worker processes.
        shuffle_buffer: sample shuffle buffer per worker (0 disables; shard order is still shuffled unless
            ``shuffle_shards=False`` is passed).
        seed, epoch: determine every random choice.
        resampled: sample shards with replacement (needs ``batches_per_epoch``).
        rank, world_size: node split (default from ``torch.distributed``).
        transform: ``(pil_image, generator) -> Tensor (3, H, W)``; default ADM crop + flip(0.5).
        caption_keys: caption members in priority order (``"json"`` reads its "caption"/"text" field).
        batches_per_epoch: batches per epoch on this rank (``None``: until the shards end).
        start_index: single-worker resume: raw samples of this epoch to skip (see module docstring).
        log_fn: receives the per-epoch summary line.
        pin_memory: DataLoader option.
        **config_overrides: other :class:`WebDatasetConfig` fields (``drop_last``, ``shuffle_shards``, ...).

    Returns:
        :class:`ImageTextLoader`.
    """
    known = {f.name for f in dataclasses.fields(WebDatasetConfig)}
    unknown = set(config_overrides) - known
    if unknown:
        raise TypeError(f"unknown make_dataloader options: {sorted(unknown)}")
    config = WebDatasetConfig(batch_size=batch_size, image_size=image_size, shuffle_buffer=shuffle_buffer,
                              seed=seed, resampled=resampled, batches_per_epoch=batches_per_epoch,
                              caption_keys=tuple(caption_keys), **config_overrides)
    dataset = ImageTextDataset(urls, config, transform=transform, rank=rank, world_size=world_size, epoch=epoch)
    loader = ImageTextLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, log_fn=log_fn)
    if start_index is not None:
        loader.set_start_index(start_index)
    return loader
