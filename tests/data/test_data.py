"""Tests for dream.data: webdataset pipeline, ADM transform, shard writer, CLI, latent cache.

Shards are built here with ``tarfile`` + PIL (independent of our writer), with known bad samples, so the
skip counts are known exactly.
"""
import argparse
import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dream.data.transforms import ImageTransform, adm_center_crop, eval_transform, pil_to_tensor
from dream.data.webdataset import expand_urls, make_dataloader
from tolerance import assert_rel_close, gemm_rel_tol

SIZE = 8
# Bad samples in the synthetic shards and the reason each must be counted under.
EXPECTED_SKIPS = {"corrupt_image": 2, "empty_caption": 1, "missing_caption": 1, "missing_image": 1}


def _image(i, w=20, h=12):
    g = torch.Generator().manual_seed(i)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """3 shards: 21 valid samples (png/jpg/webp, txt or json captions) + 5 bad ones."""
    d = tmp_path_factory.mktemp("shards")
    fmts = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")]
    valid, paths = {}, []
    for s in range(3):
        path = d / f"part-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for j in range(7):
                key = f"s{s}_{j:02d}"
                ext, fmt = fmts[(s + j) % 3]
                img = _image(10 * s + j, w=20 + j, h=12 + s)
                data = _encode(img, fmt)
                _add(tar, f"{key}.{ext}", data)
                caption = f"caption of {key}"
                if j % 2:
                    field = "caption" if j % 4 == 1 else "text"
                    _add(tar, f"{key}.json", json.dumps({field: caption, "idx": j}).encode())
                else:
                    _add(tar, f"{key}.txt", caption.encode())
                valid[key] = (caption, data)
            if s == 0:
                jpg = _encode(_image(99), "JPEG")
                _add(tar, "bad_trunc.jpg", jpg[: len(jpg) // 2])  # truncated JPEG
                _add(tar, "bad_trunc.txt", b"truncated")
                _add(tar, "bad_notimg.png", b"this is not an image at all")
                _add(tar, "bad_notimg.txt", b"not an image")
            if s == 1:
                _add(tar, "bad_empty.png", _encode(_image(98), "PNG"))
                _add(tar, "bad_empty.txt", b"   \n")
                _add(tar, "bad_nocap.png", _encode(_image(97), "PNG"))
            if s == 2:
                _add(tar, "bad_noimg.txt", b"caption without image")
        paths.append(str(path))
    return {"dir": d, "paths": paths, "pattern": str(d / "part-{000..002}.tar"), "valid": valid}


def _loader(shards, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("shuffle_buffer", 5)
    kw.setdefault("drop_last", False)
    kw.setdefault("log_fn", lambda s: None)
    return make_dataloader(shards["pattern"], kw.pop("batch_size", 4), image_size=SIZE, **kw)


def _run(loader):
    return [dict(b) for b in loader]


def _keys(batches):
    return [k for b in batches for k in b["key"]]


# ----------------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------------
def test_adm_crop_box_halving_equals_average_pooling():
    img = _image(0, w=64, h=64)
    out = adm_center_crop(img, 8)  # 64 -> 32 -> 16 -> 8 by BOX halving, then a same-size resize
    ref = torch.nn.functional.avg_pool2d(torch.tensor(np.asarray(img)).permute(2, 0, 1)[None].double(), 8)
    got = torch.tensor(np.asarray(out)).permute(2, 0, 1)[None].double()
    assert out.size == (8, 8)
    # PIL's 8-bit BOX halving rounds with an error in [0, 1) per stage: three stages
    assert (got - ref).abs().max() <= 3.0 and (got - ref).abs().mean() < 2.0


def test_adm_crop_keeps_the_centre_of_a_non_square_image():
    band = np.zeros((20, 60, 3), dtype=np.uint8)
    band[:, :20, 0] = 255  # red left
    band[:, 20:40, 1] = 255  # green centre
    band[:, 40:, 2] = 255  # blue right
    out = np.asarray(adm_center_crop(Image.fromarray(band), 8)).astype(float)
    assert out.shape == (8, 8, 3)
    inner = out[:, 1:7]
    assert inner[..., 1].min() > 240 and inner[..., 0].max() < 15 and inner[..., 2].max() < 15


@pytest.mark.parametrize("w,h", [(7, 5), (8, 8), (33, 17), (100, 40), (9, 300)])
def test_transform_output_size_and_range(w, h):
    x = ImageTransform(SIZE, flip_prob=0.5)(_image(w * h, w=w, h=h), torch.Generator().manual_seed(0))
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    white = pil_to_tensor(Image.new("RGB", (4, 4), (255, 255, 255)))
    black = pil_to_tensor(Image.new("L", (4, 4), 0))
    assert bool((white == 1).all()) and bool((black == -1).all()) and black.shape == (3, 4, 4)


def test_flip_uses_generator():
    img = _image(3, w=30, h=20)
    plain = eval_transform(SIZE)(img)
    assert torch.equal(ImageTransform(SIZE, flip_prob=1.0)(img), plain.flip(-1))
    t = ImageTransform(SIZE, flip_prob=0.5)
    g = torch.Generator().manual_seed(0)
    flips = [bool(torch.equal(t(img, g), plain.flip(-1))) for _ in range(200)]
    assert 70 < sum(flips) < 130  # Binomial(200, 0.5): > 4 sigma margin
    a = [t(img, torch.Generator().manual_seed(s)) for s in range(5)]
    b = [t(img, torch.Generator().manual_seed(s)) for s in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------
# Pipeline: decoding, skipping, stats
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_pipeline_skips_and_counts_bad_samples(shards, num_workers):
    lines = []
    loader = _loader(shards, num_workers=num_workers, log_fn=lines.append)
    batches = _run(loader)
    keys = _keys(batches)
    assert sorted(keys) == sorted(shards["valid"])  # every good sample exactly once, no bad one
    assert loader.stats["skipped"] == EXPECTED_SKIPS
    assert loader.stats["skipped_total"] == sum(EXPECTED_SKIPS.values())
    assert loader.stats["samples"] == len(shards["valid"]) and loader.stats["batches"] == len(batches)
    assert loader.stats["shard_errors"] == 0 and loader.stats["complete"]
    assert len(lines) == 1 and "skipped 5" in lines[0] and "corrupt_image: 2" in lines[0]


def test_batch_format_and_captions(shards):
    batches = _run(_loader(shards, batch_size=5))
    for b in batches:
        assert set(b) == {"image", "caption", "key", "meta"}
        n = len(b["key"])
        assert b["image"].shape == (n, 3, SIZE, SIZE) and b["image"].dtype == torch.float32
        assert float(b["image"].min()) >= -1 and float(b["image"].max()) <= 1
        for key, cap, meta in zip(b["key"], b["caption"], b["meta"]):
            assert cap == shards["valid"][key][0]
            j = int(key.split("_")[1])
            assert (meta is None) == (j % 2 == 0)
            if meta is not None:
                assert meta["idx"] == j


def test_images_equal_direct_transform(shards):
    batches = _run(_loader(shards, shuffle_buffer=0, shuffle_shards=False))
    b = batches[0]
    for key, x in zip(b["key"], b["image"]):
        ref = eval_transform(SIZE)(Image.open(io.BytesIO(shards["valid"][key][1])))
        assert torch.equal(x, ref) or torch.equal(x, ref.flip(-1))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_drop_last_counts_dropped(shards, num_workers):
    # no shuffling: the last raw sample (missing_image) comes after each worker's last full batch, so its
    # count reaches the loader only through the end-of-stream record
    loader = _loader(shards, batch_size=4, drop_last=True, num_workers=num_workers, shuffle_buffer=0,
                     shuffle_shards=False)
    batches = _run(loader)
    assert all(len(b["key"]) == 4 for b in batches)
    assert loader.stats["samples"] + loader.stats["dropped_last"] == len(shards["valid"])
    assert loader.stats["dropped_last"] > 0 and loader.stats["skipped"] == EXPECTED_SKIPS


def test_truncated_tar_is_a_shard_error(shards, tmp_path):
    data = open(shards["paths"][1], "rb").read()
    broken = tmp_path / "broken.tar"
    broken.write_bytes(data[: len(data) // 2 + 100])
    loader = make_dataloader([shards["paths"][0], str(broken)], 4, image_size=SIZE, num_workers=0,
                             shuffle_buffer=0, drop_last=False, log_fn=lambda s: None)
    keys = _keys(_run(loader))
    assert loader.stats["shard_errors"] == 1
    assert {k for k in keys if k.startswith("s0_")} == {k for k in shards["valid"] if k.startswith("s0_")}
    assert 0 < len([k for k in keys if k.startswith("s1_")]) < 7


# ----------------------------------------------------------------------------------------------------------
# URLs, splitting, determinism, resume
# ----------------------------------------------------------------------------------------------------------
def test_brace_patterns_and_missing_shards(shards):
    assert expand_urls(shards["pattern"]) == shards["paths"]
    joined = f"{shards['paths'][0]}::{shards['dir']}/part-{{001..002}}.tar"
    assert expand_urls(joined) == shards["paths"]
    a = sorted(_keys(_run(_loader(shards))))
    b = sorted(_keys(_run(make_dataloader(shards["paths"], 4, image_size=SIZE, num_workers=0, drop_last=False,
                                          log_fn=lambda s: None))))
    assert a == b
    with pytest.raises(FileNotFoundError, match="not found"):
        expand_urls(str(shards["dir"] / "part-{000..004}.tar"))
    with pytest.raises(ValueError):
        expand_urls([])


def test_rank_split_is_a_partition_and_warns(shards):
    with pytest.warns(UserWarning, match="shard"):
        loaders = [_loader(shards, rank=r, world_size=2, num_workers=2) for r in range(2)]
    keys = [_keys(_run(ld)) for ld in loaders]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(shards["valid"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_determinism_by_seed_and_epoch(shards, num_workers):
    a = _run(_loader(shards, seed=1, epoch=3, num_workers=num_workers))
    b = _run(_loader(shards, seed=1, epoch=3, num_workers=num_workers))
    assert _keys(a) == _keys(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert _keys(_run(_loader(shards, seed=1, epoch=4, num_workers=num_workers))) != _keys(a)
    assert _keys(_run(_loader(shards, seed=2, epoch=3, num_workers=num_workers))) != _keys(a)


def test_epoch_advances_after_a_full_pass(shards):
    loader = _loader(shards, seed=0, epoch=0)
    first = _keys(_run(loader))
    assert loader.epoch == 1
    second = _keys(_run(loader))
    assert second == _keys(_run(_loader(shards, seed=0, epoch=1))) and second != first
    loader.set_epoch(0)
    assert _keys(_run(loader)) == first


def test_resume_with_start_index_equals_tail(shards):
    full_loader = _loader(shards, seed=5)
    full, states = [], []
    for b in full_loader:
        full.append(b)
        states.append(full_loader.state_dict())
    k = 2
    start = states[k - 1]["workers"][0]["next_index"]
    resumed_loader = _loader(shards, seed=5, start_index=start)
    tail = _run(resumed_loader)
    assert _keys(tail) == _keys(full[k:])
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(tail, full[k:]))
    with pytest.raises(ValueError, match="num_workers"):
        _loader(shards, num_workers=2, start_index=3)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_resume_state_dict_multiworker_equals_tail(shards, k):
    loader = _loader(shards, seed=7, num_workers=2, batch_size=2)
    full, states = [], []
    for b in loader:
        full.append(b)
        states.append(json.loads(json.dumps(loader.state_dict())))  # as stored in a checkpoint
    full_stats = dict(loader.stats)
    other = _loader(shards, seed=7, num_workers=2, batch_size=2)
    other.load_state_dict(states[k - 1])
    tail = _run(other)
    assert _keys(tail) == _keys(full[k:])
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(tail, full[k:]))
    assert other.stats["samples"] == full_stats["samples"] and other.stats["skipped"] == full_stats["skipped"]
    wrong = _loader(shards, seed=7, num_workers=0, batch_size=2)
    with pytest.raises(ValueError, match="num_workers"):
        wrong.load_state_dict(states[k - 1])


def test_resampled_epoch_length(shards):
    loaders = [_loader(shards, resampled=True, batches_per_epoch=5, rank=r, world_size=2, num_workers=2,
                       drop_last=True) for r in range(2)]
    for ld in loaders:
        batches = _run(ld)
        assert len(batches) == len(ld) == 5
        assert all(len(b["key"]) == 4 for b in batches)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        _loader(shards, resampled=True)


def test_an_invalid_json_member_drops_the_sample_only_when_the_caption_needs_it(tmp_path):
    path = tmp_path / "json.tar"
    with tarfile.open(path, "w") as tar:
        for key, members in [("ok_txt", {"txt": b"a caption", "json": b"{not json"}),
                             ("only_json", {"json": b"{\"caption\": oops"}),
                             ("good", {"txt": b"fine", "json": b"{\"idx\": 1}"})]:
            _add(tar, f"{key}.png", _encode(_image(1), "PNG"))
            for ext, data in members.items():
                _add(tar, f"{key}.{ext}", data)
    loader = make_dataloader(str(path), 1, image_size=SIZE, num_workers=0, shuffle_buffer=0, drop_last=False,
                             log_fn=lambda s: None)
    got = {k: (c, m) for b in loader for k, c, m in zip(b["key"], b["caption"], b["meta"])}
    assert got == {"ok_txt": ("a caption", None), "good": ("fine", {"idx": 1})}
    assert loader.stats["skipped"] == {"bad_json": 1}


# ----------------------------------------------------------------------------------------------------------
# make-shards and the CLI
# ----------------------------------------------------------------------------------------------------------
def _cli(argv):
    from dream.cli import data as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


@pytest.fixture
def image_folder(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    captions = {}
    for i, (name, fmt) in enumerate([("a.jpg", "JPEG"), ("b.png", "PNG"), ("sub/c.webp", "WEBP"),
                                     ("d.bmp", "BMP"), ("e.png", "PNG")]):
        (src / name).write_bytes(_encode(_image(i, w=16 + i, h=10), fmt))
        captions[name] = f"a picture number {i}"
        (src / name).with_suffix(".txt").write_text(captions[name])
    (src / "nocap.png").write_bytes(_encode(_image(50), "PNG"))  # no .txt
    (src / "empty.png").write_bytes(_encode(_image(51), "PNG"))
    (src / "empty.txt").write_text("  ")
    (src / "broken.jpg").write_bytes(_encode(_image(52), "JPEG")[:40])
    (src / "broken.txt").write_text("broken")
    return src, captions


def _read_back(pattern):
    batches = _run(make_dataloader(pattern, 2, image_size=SIZE, num_workers=0, shuffle_buffer=0,
                                   shuffle_shards=False, drop_last=False, log_fn=lambda s: None,
                                   transform=eval_transform(SIZE)))
    return {m["source"]: (c, x, m) for b in batches for c, x, m in zip(b["caption"], b["image"], b["meta"])}


def test_make_shards_from_folder_round_trip(image_folder, tmp_path, capsys):
    from dream.data.shards import make_shards

    src, captions = image_folder
    res = make_shards(str(src), str(tmp_path / "out"), shard_size=2, progress=False)
    assert res.written == 5 and len(res.paths) == 3
    assert res.skipped == {"missing_caption": 1, "empty_caption": 1, "corrupt_image": 1}
    back = _read_back(res.pattern)
    assert {k: v[0] for k, v in back.items()} == captions
    for name, (_, x, _) in back.items():
        ref = eval_transform(SIZE)(Image.open(src / name))
        assert torch.equal(x, ref)  # jpg/png/webp bytes kept as is; bmp re-encoded losslessly


def test_make_shards_cli_folder(image_folder, tmp_path, capsys):
    src, _ = image_folder
    out = tmp_path / "cli_out"
    assert _cli(["make-shards", str(src), "--out", str(out), "--shard-size", "10", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "wrote 5 samples in 1 shard" in text and "skipped 3" in text
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar"]
    assert _cli(["make-shards", str(tmp_path / "nope.csv"), "--out", str(out), "--no-progress"]) == 1


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_make_shards_from_table_round_trip(image_folder, tmp_path, fmt):
    from dream.data.shards import make_shards

    src, captions = image_folder
    rows = [{"file": name, "text": cap, "license": f"cc-{i}"} for i, (name, cap) in enumerate(captions.items())]
    rows.append({"file": "does_not_exist.png", "text": "ghost", "license": "x"})
    table = src / f"table.{fmt}"
    if fmt == "csv":
        with open(table, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file", "text", "license"])
            w.writeheader()
            w.writerows(rows)
    else:
        table.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = make_shards(str(table), str(tmp_path / fmt), shard_size=3, path_key="file", caption_key="text",
                      progress=False)
    assert res.written == 5 and res.skipped == {"missing_file": 1}
    back = _read_back(res.pattern)
    assert {k: v[0] for k, v in back.items()} == captions
    assert {k: v[2]["license"] for k, v in back.items()} == {r["file"]: r["license"] for r in rows[:-1]}


def test_shapes_cli_writes_readable_shards(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert _cli(["shapes", "--out", str(out), "--n", "6", "--shard-size", "4", "--image-size", "16"]) == 0
    paths = sorted(str(p) for p in out.glob("*.tar"))
    assert len(paths) == 2
    loader = make_dataloader(paths, 3, image_size=16, num_workers=0, drop_last=False, log_fn=lambda s: None)
    batches = _run(loader)
    assert sum(len(b["key"]) for b in batches) == 6 and loader.stats["skipped_total"] == 0


# ----------------------------------------------------------------------------------------------------------
# Latent cache
# ----------------------------------------------------------------------------------------------------------
class _ConvMoments(torch.nn.Module):
    """A tiny stand-in VAE encoder: images (B,3,8,8) -> moments (B,4,2,2)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 4, stride=4)

    def encode_moments(self, x):
        return self.conv(x)


class _ConvTokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 2, stride=2)

    def encode(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)  # (B, 16, 2)


def _text_encoder(captions):
    lengths = torch.tensor([len(c) for c in captions], dtype=torch.float32)
    feats = lengths[:, None, None] * torch.linspace(0, 1, 6)[None, :, None] * torch.ones(1, 1, 5)  # (B, 6, 5)
    mask = torch.arange(6)[None, :] >= (lengths[:, None] % 6)
    return feats, mask


@pytest.mark.parametrize("tokenizer_cls,kind", [(_ConvMoments, "moments"), (_ConvTokens, "tokens")])
def test_latent_cache_round_trip(shards, tmp_path, tokenizer_cls, kind):
    from dream.data.latent_cache import build_latent_cache, make_latent_loader

    torch.manual_seed(0)
    tok = tokenizer_cls().eval()
    res = build_latent_cache(shards["pattern"], str(tmp_path / "cache"), tok, _text_encoder, image_size=SIZE,
                             batch_size=4, shard_size=8, progress=False)
    assert res["kind"] == kind and res["written"] == len(shards["valid"])
    assert res["stats"]["skipped"] == EXPECTED_SKIPS
    encode = tok.encode_moments if kind == "moments" else tok.encode

    def reference(key, flipped):
        x = eval_transform(SIZE)(Image.open(io.BytesIO(shards["valid"][key][1])))[None]
        with torch.no_grad():
            return encode(x.flip(-1) if flipped else x)[0]

    for flip_prob in (0.0, 1.0, 0.5):
        loader = make_latent_loader(res["paths"], 4, num_workers=0, flip_prob=flip_prob, drop_last=False,
                                    log_fn=lambda s: None)
        seen, flips = 0, []
        for b in loader:
            assert b[kind].dtype == torch.float32 and b["text"].dtype == torch.float16
            for i, key in enumerate(b["key"]):
                flipped = bool(b["flipped"][i])
                # one convolution of fan-in <= 3 x 4 x 4, batched here, alone in the reference: a reduction of
                # length 48 in another order (and the flip moves the same numbers: exact up to that order)
                assert_rel_close(b[kind][i], reference(key, flipped), gemm_rel_tol(torch.float32, 48), "cached latent")
                feats, mask = _text_encoder([shards["valid"][key][0]])
                assert torch.equal(b["text"][i], feats[0].half()) and torch.equal(b["text_mask"][i], mask[0])
                assert b["caption"][i] == shards["valid"][key][0]
                flips.append(flipped)
            seen += len(b["key"])
        assert seen == len(shards["valid"])
        if flip_prob in (0.0, 1.0):
            assert all(f == bool(flip_prob) for f in flips)
        else:
            assert 0 < sum(flips) < len(flips)
