"""Write image-text webdataset shards from a folder of images or a CSV/JSONL table.

Sources:

* a **folder**: every image file (``.jpg .jpeg .png .webp .bmp .gif .tif .tiff``, searched recursively, sorted
  by relative path) with a same-name ``.txt`` caption next to it (``cat.jpg`` + ``cat.txt``);
* a **CSV** (header row) or **JSONL** table with an image-path column and a caption column (names set by
  ``path_key`` / ``caption_key``; relative paths are resolved against the table's folder). Other columns are
  kept in the sample's json metadata.

Each written sample has members ``<key>.<jpg|png|webp>`` (original bytes; other formats re-encoded to PNG),
``<key>.txt`` (caption) and ``<key>.json`` (``{"caption", "source", ...extra columns}``). Keys are the
running sample index (``%09d``), unique over all shards. Shards are named ``<prefix>-%06d.tar`` and written
atomically (temporary file + rename). Items with a missing file, an unreadable image, or a missing / empty
caption are skipped and counted by reason.

Written from scratch for ``dream``; the tar layout is the webdataset convention (written with
``webdataset.TarWriter``).
"""
from __future__ import annotations

import collections
import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional

from PIL import Image

__all__ = [
    "ShardItem",
    "MakeShardsResult",
    "IMAGE_EXTENSIONS",
    "iter_folder",
    "iter_table",
    "write_items",
    "RotatingShardWriter",
    "make_shards",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
MAKE_SHARDS_SKIP_REASONS = ("missing_file", "corrupt_image", "missing_caption", "empty_caption")


@dataclass
class ShardItem:
    """One source item: an image file, its caption (``None`` if missing) and extra metadata."""

    path: str
    caption: Optional[str]
    source: str = ""
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MakeShardsResult:
    """What :func:`write_items` / :func:`make_shards` wrote."""

    paths: List[str]
    written: int
    skipped: Dict[str, int]

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    @property
    def pattern(self) -> str:
        """Brace pattern covering all shards (for ``make_dataloader``); empty if nothing was written."""
        if not self.paths:
            return ""
        if len(self.paths) == 1:
            return self.paths[0]
        first, last = self.paths[0], self.paths[-1]
        head, tail = first[:-len("000000.tar")], ".tar"
        return f"{head}{{{first[len(head):-len(tail)]}..{last[len(head):-len(tail)]}}}{tail}"


# --------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------
def iter_folder(folder: str) -> List[ShardItem]:
    """Images under ``folder`` (recursive, sorted) with same-name ``.txt`` captions.

    Raises:
        NotADirectoryError: ``folder`` is not a directory.
    """
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"not a folder: {folder}")
    items = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(root, name)
            txt = os.path.join(root, stem + ".txt")
            caption = None
            if os.path.isfile(txt):
                with open(txt, "r", encoding="utf-8", errors="replace") as f:
                    caption = f.read()
            items.append(ShardItem(path=path, caption=caption, source=os.path.relpath(path, folder)))
    items.sort(key=lambda it: it.source)
    return items


def iter_table(table: str, path_key: str = "path", caption_key: str = "caption") -> List[ShardItem]:
    """Rows of a CSV (with header) or JSONL file as :class:`ShardItem`.

    Raises:
        FileNotFoundError: missing table; ValueError: unknown format, bad JSON line or missing column.
    """
    if not os.path.isfile(table):
        raise FileNotFoundError(f"table not found: {table}")
    base = os.path.dirname(os.path.abspath(table))
    ext = os.path.splitext(table)[1].lower()
    rows: List[Dict[str, Any]] = []
    if ext == ".csv":
        with open(table, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or path_key not in reader.fieldnames:
                raise ValueError(f"{table}: no {path_key!r} column (columns: {reader.fieldnames})")
            rows = list(reader)
    elif ext in (".jsonl", ".ndjson"):
        with open(table, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exn:
                    raise ValueError(f"{table}:{lineno}: invalid JSON ({exn})") from None
                if not isinstance(row, dict) or path_key not in row:
                    raise ValueError(f"{table}:{lineno}: expected an object with a {path_key!r} field")
                rows.append(row)
    else:
        raise ValueError(f"unknown table format {ext!r} (use .csv or .jsonl): {table}")
    items = []
    for row in rows:
        rel = str(row[path_key])
        path = rel if os.path.isabs(rel) else os.path.join(base, rel)
        caption = row.get(caption_key)
        caption = None if caption is None else str(caption)
        extra = {k: v for k, v in row.items() if k not in (path_key, caption_key)}
        items.append(ShardItem(path=path, caption=caption, source=rel, meta=extra))
    return items


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------
def _load_item(item: ShardItem, verify: bool):
    """Return (ext, bytes, caption) or raise ValueError(reason)."""
    if item.caption is None:
        raise ValueError("missing_caption")
    caption = item.caption.strip()
    if not caption:
        raise ValueError("empty_caption")
    try:
        with open(item.path, "rb") as f:
            data = f.read()
    except OSError:
        raise ValueError("missing_file") from None
    try:
        image = Image.open(io.BytesIO(data))
        fmt = image.format
        if verify:
            image.load()
    except Exception:  # noqa: BLE001 - PIL raises many exception types for bad files
        raise ValueError("corrupt_image") from None
    if fmt in _KEEP_FORMATS:
        return _KEEP_FORMATS[fmt], data, caption
    try:  # other formats: re-encode losslessly as PNG
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
    except Exception:  # noqa: BLE001
        raise ValueError("corrupt_image") from None
    return "png", buf.getvalue(), caption


class RotatingShardWriter:
    """Writes sample dicts (``{"__key__": str, ext: bytes}``) into ``<prefix>-%06d.tar`` shards of
    ``shard_size`` samples; each shard is written to ``.tmp`` and renamed when complete. Call ``close()``."""

    def __init__(self, out_dir: str, shard_size: int, prefix: str):
        self.out_dir, self.shard_size, self.prefix = out_dir, shard_size, prefix
        self.paths: List[str] = []
        self.count = 0  # samples in the open shard
        self.file = self.writer = None

    def _open(self) -> None:
        from webdataset import TarWriter

        path = os.path.join(self.out_dir, f"{self.prefix}-{len(self.paths):06d}.tar")
        self.paths.append(path)
        self.file = open(path + ".tmp", "wb")
        self.writer = TarWriter(self.file, encoder=False, mtime=0.0)
        self.count = 0

    def write(self, sample: Dict[str, Any]) -> None:
        if self.writer is None or self.count >= self.shard_size:
            self.close()
            self._open()
        self.writer.write(sample)
        self.count += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.file.close()
            os.replace(self.paths[-1] + ".tmp", self.paths[-1])
            self.writer = self.file = None


def write_items(
    items: Iterable[ShardItem],
    out_dir: str,
    shard_size: int = 1000,
    prefix: str = "shard",
    verify: bool = True,
    progress: bool = True,
    total: Optional[int] = None,
) -> MakeShardsResult:
    """Write ``items`` to webdataset shards in ``out_dir``.

    Args:
        items: :class:`ShardItem` iterable.
        out_dir: output folder (created).
        shard_size: samples per shard.
        prefix: shard file-name prefix.
        verify: fully decode every image (catches truncated files) instead of reading its header only.
        progress: show a tqdm progress bar.
        total: number of items, for the progress bar.

    Returns:
        :class:`MakeShardsResult` with the shard paths, the written count and skipped counts by reason.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    skipped: collections.Counter = collections.Counter()
    writer = RotatingShardWriter(out_dir, shard_size, prefix)
    written = 0
    iterator: Iterator[ShardItem] = iter(items)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=total, desc="make-shards", unit="img")
    try:
        for item in iterator:
            try:
                ext, data, caption = _load_item(item, verify)
            except ValueError as exn:
                skipped[str(exn)] += 1
                continue
            meta = {"caption": caption, "source": item.source or item.path, **item.meta}
            writer.write({"__key__": f"{written:09d}", ext: data, "txt": caption.encode("utf-8"),
                          "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
            written += 1
            if progress:
                iterator.set_postfix(skipped=sum(skipped.values()), refresh=False)
    finally:
        writer.close()
    return MakeShardsResult(paths=writer.paths, written=written, skipped=dict(skipped))


def make_shards(
    source: str,
    out_dir: str,
    shard_size: int = 1000,
    prefix: str = "shard",
    path_key: str = "path",
    caption_key: str = "caption",
    verify: bool = True,
    progress: bool = True,
) -> MakeShardsResult:
    """Shards from a folder (images + same-name ``.txt``) or a ``.csv`` / ``.jsonl`` table.

    See :func:`write_items` for the arguments and the result.
    """
    if os.path.isdir(source):
        items = iter_folder(source)
    else:
        items = iter_table(source, path_key=path_key, caption_key=caption_key)
    return write_items(items, out_dir, shard_size=shard_size, prefix=prefix, verify=verify,
                       progress=progress, total=len(items))
