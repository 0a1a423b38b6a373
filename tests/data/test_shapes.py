"""ShapesWorld generator: determinism, caption/metadata agreement, geometry, rendering, shards."""
import dataclasses
import io
import json
import math
import re
import tarfile

import pytest
import torch

from dream.data.shapes import (PALETTE, PLURALS, RELATIONS, SAMPLE_TYPES, ShapesConfig, ShapesWorld,
                               parse_caption, write_shards)

NUM = {1: "a", 2: "two", 3: "three", 4: "four"}


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(ShapesConfig())


@pytest.fixture(scope="module")
def batch(world):
    return world.batch(range(400), "train")


# ------------------------------------------------------------------------------------------------
# Determinism and splits
# ------------------------------------------------------------------------------------------------

def test_same_index_is_identical_across_instances(world):
    other = ShapesWorld(ShapesConfig())
    for i in (0, 7, 123456):
        a, b = world.sample(i, "train"), other.sample(i, "train")
        assert torch.equal(a.image, b.image)
        assert a.caption == b.caption
        assert json.dumps(a.meta, sort_keys=True) == json.dumps(b.meta, sort_keys=True)


def test_splits_and_seeds_differ(world):
    imgs = {s: world.batch(range(20), s)[0] for s in ("train", "val", "test")}
    assert not torch.equal(imgs["train"], imgs["val"])
    assert not torch.equal(imgs["train"], imgs["test"])
    # no single image coincides between train and val (disjoint seed namespaces)
    same = (imgs["train"][:, None] == imgs["val"][None]).flatten(2).all(-1)
    assert not same.any()
    other_seed = world.batch(range(20), "train", seed=1)[0]
    assert not torch.equal(imgs["train"], other_seed)


def test_batch_matches_single_samples_and_stream_resumes(world):
    imgs, caps, metas = world.batch([3, 4, 5], "val")
    for j, i in enumerate([3, 4, 5]):
        s = world.sample(i, "val")
        assert torch.equal(imgs[j], s.image) and caps[j] == s.caption and metas[j] == s.meta
    it = world.stream("val", start=4)
    first, second = next(it), next(it)
    assert first.meta["index"] == 4 and torch.equal(first.image, imgs[1])
    assert second.meta["index"] == 5 and second.caption == caps[2]


def test_config_json_round_trip():
    cfg = ShapesConfig(image_size=48, holdout_combos=(("red", "square"),), background=(128, 128, 128))
    back = ShapesConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match="unknown"):
        ShapesConfig.from_dict({"image_size": 32, "colour_count": 3})


def test_bad_inputs_raise(world):
    with pytest.raises(ValueError, match="split"):
        world.sample(0, "training")
    with pytest.raises(ValueError, match="index"):
        world.sample(-1)
    with pytest.raises(ValueError, match="colours"):
        ShapesConfig(colours=("red", "mauve"))
    with pytest.raises(ValueError, match="background"):
        ShapesConfig(background=(255, 0, 0))
    with pytest.raises(ValueError, match="predicate"):
        world.layout({"type": "relation", "entities": [{"colour": "red", "shape": "square", "count": 1},
                                                       {"colour": "blue", "shape": "circle", "count": 1}],
                      "relation": {"subject": 0, "predicate": "inside", "object": 1}})


# ------------------------------------------------------------------------------------------------
# Captions agree with metadata
# ------------------------------------------------------------------------------------------------

def _phrase_pattern(e):
    size = f"{e['size']} " if e.get("size") else ""
    noun = e["shape"] if e["count"] == 1 else PLURALS[e["shape"]]
    return rf"\b{NUM[e['count']]} {size}{e['colour']} {noun}\b"


def test_captions_agree_with_objects(batch):
    _, caps, metas = batch
    seen_types, seen_rel = set(), set()
    for cap, m in zip(caps, metas):
        spec, objs = m["spec"], m["objects"]
        seen_types.add(spec["type"])
        # every entity phrase is literally in the caption, and no other colour or shape word is
        for e in spec["entities"]:
            assert re.search(_phrase_pattern(e), cap), (cap, e)
        named_colours = {e["colour"] for e in spec["entities"]}
        for c in PALETTE:
            if c not in named_colours and m["background"] != list(PALETTE[c]):
                assert not re.search(rf"\b{c}\b", cap.replace("black background", "")), cap
        # objects: exactly the named counts, the named sizes
        assert len(objs) == sum(e["count"] for e in spec["entities"])
        for k, e in enumerate(spec["entities"]):
            mine = [o for o in objs if o["colour"] == e["colour"] and o["shape"] == e["shape"]]
            assert len(mine) == e["count"], (cap, objs)
            if e.get("size"):
                assert all(o["size_class"] == e["size"] for o in mine), (cap, mine)
        # relation true of the centres (x right, y down)
        rel = spec["relation"]
        if rel is not None:
            seen_rel.add(rel["predicate"])
            a = [o for o in objs if o["entity"] == rel["subject"]][0]
            b = [o for o in objs if o["entity"] == rel["object"]][0]
            dx, dy = a["x"] - b["x"], a["y"] - b["y"]
            assert {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[rel["predicate"]]
            assert abs(dx if "of" in rel["predicate"] else dy) >= abs(dy if "of" in rel["predicate"] else dx)
    assert seen_types == set(SAMPLE_TYPES) and seen_rel == set(RELATIONS)


def test_parse_caption_round_trip(batch):
    _, caps, metas = batch
    for cap, m in zip(caps, metas):
        spec = parse_caption(cap)
        ref = m["spec"]
        if ref["relation"] is not None and ref["relation"]["subject"] != 0:
            continue
        assert spec == ref, (cap, spec, ref)


def test_captions_are_varied(batch):
    _, caps, _ = batch
    templates = {re.sub(r"\b(a|two|three|four|small|large|" + "|".join(PALETTE) + "|"
                        + "|".join(list(PLURALS) + list(PLURALS.values())) + r")\b", "_", c) for c in caps}
    assert len(templates) >= 15


# ------------------------------------------------------------------------------------------------
# Geometry and rendering
# ------------------------------------------------------------------------------------------------

def test_no_overlaps_and_inside_image(batch, world):
    imgs, _, metas = batch
    cfg = world.config
    H = cfg.image_size
    for m in metas:
        boxes = [o["bbox"] for o in m["objects"]]
        for x0, y0, x1, y1 in boxes:
            assert cfg.margin <= x0 < x1 <= H - cfg.margin and cfg.margin <= y0 < y1 <= H - cfg.margin
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                gap = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
                assert gap >= cfg.min_gap, (a, b)
    # pixels: colour only inside the objects' boxes, and each box holds only its own colour
    for img, m in zip(imgs[:100], metas[:100]):
        inside = torch.zeros(H, H, dtype=torch.bool)
        for o in m["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            inside[y0:y1, x0:x1] = True
            patch = img[:, y0:y1, x0:x1].float()
            rgb = torch.tensor(PALETTE[o["colour"]], dtype=torch.float32).view(3, 1, 1)
            alpha = patch.amax(0, keepdim=True) / 255.0
            assert torch.allclose(patch, alpha * rgb, atol=1.0)
        assert img[:, ~inside].eq(0).all()


def test_render_matches_hand_rasterisation():
    # Hard-edged (antialias=1) renders at integer boxes, checked with plain indexing / coordinate math.
    w = ShapesWorld(ShapesConfig(antialias=1))
    meta = {"image_size": 32, "objects": [
        {"shape": "square", "colour": "green", "bbox": [2, 3, 12, 13]},
        {"shape": "cross", "colour": "blue", "bbox": [18, 2, 27, 11]},
        {"shape": "circle", "colour": "white", "bbox": [16, 16, 30, 30]}]}
    img = w.render(meta)
    ref = torch.zeros(3, 32, 32, dtype=torch.uint8)
    ref[1, 3:13, 2:12] = 255
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    u, v = (xs - 18) / 9, (ys - 2) / 9
    cross = (u >= 0) & (u < 1) & (v >= 0) & (v < 1) & (((u - 0.5).abs() < 1 / 6) | ((v - 0.5).abs() < 1 / 6))
    ref[2][cross] = 255
    circ = ((xs - 23) ** 2 + (ys - 23) ** 2) < 49
    ref[:, circ] = 255
    assert torch.equal(img, ref)
    # anti-aliased coverage integrates to the analytic areas
    aa = ShapesWorld(ShapesConfig(antialias=8))
    for shape, area in (("circle", math.pi / 4), ("triangle", 0.5), ("cross", 5 / 9), ("square", 1.0)):
        obj = {"shape": shape, "colour": "red", "bbox": [4.3, 5.6, 18.3, 19.6]}
        im = aa.render({"image_size": 32, "objects": [obj]})
        assert abs(im[0].float().sum().item() / 255 / 14 ** 2 - area) < 0.01, shape


def test_render_meta_reproduces_sample_and_spec_layouts(world):
    s = world.sample(11, "test")
    assert torch.equal(world.render(s.meta), s.image)
    spec = {"type": "relation", "entities": [{"colour": "red", "shape": "triangle", "count": 1, "size": "large"},
                                             {"colour": "cyan", "shape": "circle", "count": 1, "size": None}],
            "relation": {"subject": 0, "predicate": "below", "object": 1}}
    for seed in range(5):
        meta = world.layout(spec, torch.Generator().manual_seed(seed))
        a, b = meta["objects"]
        assert a["colour"] == "red" and a["size_class"] == "large" and b["shape"] == "circle"
        assert a["y"] > b["y"]
    img = world.render(spec, torch.Generator().manual_seed(0))
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and img.float().sum() > 0


def test_float_dtype_and_larger_images():
    w32 = ShapesWorld(ShapesConfig())
    wf = ShapesWorld(ShapesConfig(dtype="float"))
    a, b = w32.sample(5), wf.sample(5)
    assert b.image.dtype == torch.float32 and b.image.min() >= -1 and b.image.max() <= 1
    assert torch.allclose((a.image.float() / 127.5 - 1), b.image)
    w64 = ShapesWorld(ShapesConfig(image_size=64))
    imgs, caps, metas = w64.batch(range(30), "train")
    assert imgs.shape == (30, 3, 64, 64)
    assert max(max(o["bbox"][2:]) for m in metas for o in m["objects"]) > 32


def test_prompts_and_holdout():
    cfg = ShapesConfig(holdout_combos=(("red", "square"), ("blue", "circle")))
    w = ShapesWorld(cfg)
    held = {("red", "square"), ("blue", "circle")}
    _, _, metas = w.batch(range(300), "train")
    assert not any((o["colour"], o["shape"]) in held for m in metas for o in m["objects"])
    _, _, test_metas = w.batch(range(300), "test")
    assert any((o["colour"], o["shape"]) in held for m in test_metas for o in m["objects"])
    p1, p2 = w.random_prompt_specs(50, "test"), w.random_prompt_specs(50, "test")
    assert [p.caption for p in p1] == [p.caption for p in p2] and [p.spec for p in p1] == [p.spec for p in p2]
    singles = w.random_prompt_specs(40, "val", generator=torch.Generator().manual_seed(3), types=("single",))
    assert all(p.spec["type"] == "single" and parse_caption(p.caption) == p.spec for p in singles)
    # prompts use their own seed namespace: not the captions of the same-index samples
    caps = w.batch(range(50), "test")[1]
    assert sum(a == p.caption for a, p in zip(caps, p1)) < 10


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------

def test_write_shards_round_trip(tmp_path):
    import webdataset as wds
    from PIL import Image

    paths = write_shards(str(tmp_path), n=25, seed=3, split="val", shard_size=10, progress=False)
    assert [p.rsplit("/", 1)[1] for p in paths] == [f"shapes-val-{k:06d}.tar" for k in range(3)]
    world = ShapesWorld(dataclasses.replace(ShapesConfig(), base_seed=3))
    ds = wds.WebDataset(paths, shardshuffle=False).decode("rgb8").to_tuple("__key__", "png", "txt", "json")
    n = 0
    for key, png, txt, meta in ds:
        idx = int(key.split("_")[1])
        ref = world.sample(idx, "val")
        assert torch.equal(torch.from_numpy(png.copy()).permute(2, 0, 1), ref.image)
        assert txt == ref.caption and meta == json.loads(json.dumps(ref.meta))
        n += 1
    assert n == 25
    # plain tarfile view of the first shard: png/txt/json per key, deterministic bytes
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        assert names[:3] == ["val_00000000.png", "val_00000000.txt", "val_00000000.json"]
        im = Image.open(io.BytesIO(tar.extractfile(names[0]).read()))
        assert im.mode == "RGB" and im.size == (32, 32)
    again = write_shards(str(tmp_path / "again"), n=25, seed=3, split="val", shard_size=10, progress=False)
    assert open(again[0], "rb").read() == open(paths[0], "rb").read()
