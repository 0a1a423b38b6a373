"""Bounded inputs: tiny files that would decode or resize into gigabytes are skipped and counted (``too_large``)
with the limit named, and the peak memory they add is measured in a fresh process."""
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

from dream.data.transforms import adm_center_crop
from dream.data.webdataset import WebDatasetConfig, make_dataloader

MiB = 1 << 20


def _png(w, h, color=(200, 30, 30), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (w, h), color if mode == "RGB" else 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, read in chunks (a 1 GiB member without holding it in memory)."""

    def __init__(self, n):
        self.left = n

    def readable(self):
        return True

    def readinto(self, b):
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def _good(tar, key):
    _add(tar, f"{key}.png", _png(40, 30, (10, 200, 10)))
    _add(tar, f"{key}.txt", f"caption {key}".encode())


# Runs in a fresh interpreter: warm up on a normal shard, then report the peak RSS added by the crafted one.
_MEASURE = r"""
import json, resource, sys
from dream.data.webdataset import make_dataloader

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024        # Linux: KiB

def run(url):
    loader = make_dataloader(url, 1, image_size=int(sys.argv[3]), num_workers=0, shuffle_buffer=0,
                             drop_last=False, log_fn=lambda s: None)
    keys = [k for b in loader for k in b["key"]]
    return keys, loader.stats

run(sys.argv[1])
before = peak()
keys, stats = run(sys.argv[2])
print(json.dumps({"added_mb": (peak() - before) / 2**20, "keys": keys, "skipped": stats["skipped"]}))
"""


def _measure(tmp_path, crafted, image_size):
    warm = tmp_path / "warm.tar"
    with tarfile.open(warm, "w") as tar:
        _good(tar, "w0")
        _good(tar, "w1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [os.environ.get("PYTHONPATH"), os.getcwd()] if p)}
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(warm), str(crafted), str(image_size)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{crafted.name}: +{res['added_mb']:.1f} MB peak RSS")
    return res


def test_a_400000x1_png_is_skipped_before_the_resize_allocates(tmp_path):
    bomb = _png(400000, 1, mode="L")
    assert len(bomb) < 500           # 467 bytes on disk
    shard = tmp_path / "aspect.tar"
    with tarfile.open(shard, "w") as tar:
        _good(tar, "a0")
        _add(tar, "bomb.png", bomb)
        _add(tar, "bomb.txt", b"a very long thin line")
        _good(tar, "a1")
    res = _measure(tmp_path, shard, 32)
    assert res["keys"] == ["a0", "a1"] and res["skipped"] == {"too_large": 1}
    assert res["added_mb"] < 200


def test_a_1gib_member_in_a_small_tar_gz_is_not_read(tmp_path):
    shard = tmp_path / "member.tar.gz"
    with tarfile.open(shard, "w:gz", compresslevel=1) as tar:
        _good(tar, "m0")
        _good(tar, "big")
        info = tarfile.TarInfo("big.bin")      # an extension nobody reads
        info.size = 1 << 30
        tar.addfile(info, _Zeros(info.size))
        _good(tar, "m1")
    assert shard.stat().st_size < 8 * MiB
    res = _measure(tmp_path, shard, 32)
    assert res["keys"] == ["m0", "m1"] and res["skipped"] == {"too_large": 1}
    assert res["added_mb"] < 200


def test_every_resize_step_is_bounded_and_the_message_names_the_limit():
    from dream.data.transforms import ImageTooLarge

    with pytest.raises(ImageTooLarge, match="max_resize_pixels"):
        adm_center_crop(Image.new("RGB", (5000, 1)), 256)          # would be 327,680,000 pixels
    # a wide but sane image passes, and the limit can be raised or lowered
    assert adm_center_crop(Image.new("RGB", (2000, 100)), 64).size == (64, 64)
    with pytest.raises(ImageTooLarge):
        adm_center_crop(Image.new("RGB", (2000, 100)), 64, max_pixels=64 * 64 * 10)


def test_limits_are_config_fields_and_skips_name_them(tmp_path):
    cfg = WebDatasetConfig()
    assert cfg.max_image_pixels > 0 and cfg.max_resize_pixels > 0 and cfg.max_member_bytes > 0 \
        and cfg.max_sample_bytes >= cfg.max_member_bytes
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        _good(tar, "k0")
        _add(tar, "wide.png", _png(300, 20))
        _add(tar, "wide.txt", b"wide")
        _add(tar, "many.png", _png(64, 64))
        _add(tar, "many.txt", b"many members")
        for i in range(3):
            _add(tar, f"many.x{i}", bytes(3000))
        _add(tar, "huge.png", _png(128, 128))
        _add(tar, "huge.txt", b"huge")
        _good(tar, "k1")
    lines = []

    def loader(**kw):
        return make_dataloader(str(shard), 1, image_size=8, num_workers=0, shuffle_buffer=0, drop_last=False,
                               log_fn=lines.append, **kw)

    ld = loader(max_resize_pixels=8 * 100, max_member_bytes=5000, max_sample_bytes=8000, max_image_pixels=10000)
    assert [k for b in ld for k in b["key"]] == ["k0", "k1"]
    assert ld.stats["skipped"] == {"too_large": 3}
    ld = loader()
    assert [k for b in ld for k in b["key"]] == ["k0", "wide", "many", "huge", "k1"]


def test_dream_train_passes_the_limits_through_data_options(tmp_path):
    from dream.train import TrainConfig
    from dream.train.loop import ShardBatches

    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        _good(tar, "k0")
    cfg = TrainConfig(data=str(shard), data_options={"max_image_pixels": 100, "max_member_bytes": 1 << 20})
    data = ShardBatches(str(shard), 8, 1, cfg, 0, 1)
    assert data.loader.dataset.config.max_image_pixels == 100
    assert data.loader.dataset.config.max_member_bytes == 1 << 20
    with pytest.raises(TypeError, match="max_image_pixel"):
        ShardBatches(str(shard), 8, 1, cfg.replace(data_options={"max_image_pixel": 1}), 0, 1)
