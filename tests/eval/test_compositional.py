"""Compositional verifier (rule-based VQA) and the ShapesWorld FID feature CNN."""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from dream.data.shapes import ShapesConfig, ShapesWorld
from dream.eval.compositional import (QUESTION_TYPES, Verifier, VerifierConfig, answer_questions, colour_accuracy,
                                      dsg_scores, questions_from_spec, shape_accuracy)
from tolerance import assert_2x

N_RENDERS = 1000


@pytest.fixture(scope="module")
def renders():
    world = ShapesWorld(ShapesConfig())
    return world.batch(range(N_RENDERS), "test")


@pytest.fixture(scope="module")
def verifier():
    return Verifier(ShapesConfig())


def _agreement(verifier, images, metas, specs=None, parsed=None):
    """Per question type: fraction of verifier answers equal to the answers computed from the true objects."""
    specs = specs or [m["spec"] for m in metas]
    parsed = parsed if parsed is not None else verifier.parse(images)
    per = {t: [] for t in QUESTION_TYPES}
    for objs, spec, m in zip(parsed, specs, metas):
        qs = questions_from_spec(spec)
        truth = answer_questions(qs, m["objects"])
        got = answer_questions(qs, objs)
        for q, a, b in zip(qs, got, truth):
            per[q["type"]].append(a == b)
    return {t: sum(v) / len(v) for t, v in per.items() if v}, {t: len(v) for t, v in per.items()}


# ------------------------------------------------------------------------------------------------
# Robustness of the parser (>= 1,000 renders)
# ------------------------------------------------------------------------------------------------

def test_clean_renders(renders, verifier):
    images, _, metas = renders
    res = verifier.score(images, [m["spec"] for m in metas])
    acc, counts = _agreement(verifier, images, metas, parsed=[d["objects"] for d in res["details"]])
    assert all(counts[t] >= 100 for t in QUESTION_TYPES), counts
    assert all(a >= 0.99 for a in acc.values()), acc
    assert res["prompt_accuracy"] >= 0.99 and res["num_images"] == N_RENDERS
    assert all(res["accuracy"][t] >= 0.99 for t in QUESTION_TYPES), res["accuracy"]


def _gauss_blur(x, sigma):
    r = torch.arange(-1.0, 2.0)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    k2 = (k[:, None] * k[None]).expand(3, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)


@pytest.mark.parametrize("kind", ["noise", "box_blur", "gauss_blur", "jitter"])
def test_degraded_renders(renders, verifier, kind):
    images, _, metas = renders
    g = torch.Generator().manual_seed(0)
    x = images.float() / 255.0
    if kind == "noise":
        x = x + 0.05 * torch.randn(x.shape, generator=g)
    elif kind == "box_blur":
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    elif kind == "gauss_blur":
        x = _gauss_blur(x, 0.5)
    else:
        x = x * (1 + 0.1 * (2 * torch.rand(x.shape[0], 1, 1, 1, generator=g) - 1))
    x = x.clamp(0, 1) * 2 - 1                                   # float input in [-1, 1]
    acc, _ = _agreement(verifier, x, metas)
    assert all(a >= 0.95 for a in acc.values()), (kind, acc)


def test_wrong_images_fail(renders, verifier):
    images, _, metas = renders
    n = 300
    shifted = [m["spec"] for m in metas[1:n + 1]]
    res = verifier.score(images[:n], shifted, details=False)
    assert res["prompt_accuracy"] < 0.1 and res["dsg_score"] < 0.4, res
    # on mismatched pairs ("no" answers) the verifier still agrees with the true objects
    acc, _ = _agreement(verifier, images[:n], metas[:n], specs=shifted)
    assert all(a >= 0.99 for a in acc.values()), acc
    # images rendered from a spec with one attribute changed fail that attribute's question
    world = ShapesWorld(ShapesConfig())
    spec = {"type": "single", "entities": [{"colour": "red", "shape": "square", "count": 1, "size": None}],
            "relation": None}
    wrong_colour = world.render({**spec, "entities": [{**spec["entities"][0], "colour": "blue"}]})
    wrong_shape = world.render({**spec, "entities": [{**spec["entities"][0], "shape": "circle"}]})
    right = world.render(spec)
    out = verifier.score(torch.stack([right, wrong_colour, wrong_shape]), [spec] * 3)
    assert [d["answers"] for d in out["details"]] == [[True, True], [True, False], [False, False]]


def test_relation_and_count_errors_detected(verifier):
    world = ShapesWorld(ShapesConfig())
    spec = {"type": "relation", "entities": [{"colour": "green", "shape": "square", "count": 1, "size": None},
                                             {"colour": "red", "shape": "circle", "count": 1, "size": None}],
            "relation": {"subject": 0, "predicate": "left of", "object": 1}}
    flipped = {**spec, "relation": {**spec["relation"], "predicate": "right of"}}
    imgs = torch.stack([world.render(spec, torch.Generator().manual_seed(s)) for s in range(10)])
    assert verifier.score(imgs, [spec] * 10)["accuracy"]["relation"] == 1.0
    assert verifier.score(imgs, [flipped] * 10)["accuracy"]["relation"] == 0.0
    three = {"type": "count", "entities": [{"colour": "yellow", "shape": "triangle", "count": 3, "size": None}],
             "relation": None}
    two = {**three, "entities": [{**three["entities"][0], "count": 2}]}
    img = world.render(three)
    assert verifier.score(img, [three])["accuracy"]["count"] == 1.0
    assert verifier.score(img, [two])["accuracy"]["count"] == 0.0


# ------------------------------------------------------------------------------------------------
# Questions and DSG dependencies (hand-made cases)
# ------------------------------------------------------------------------------------------------

def test_questions_and_dsg_dependencies():
    spec = {"type": "relation", "entities": [{"colour": "green", "shape": "square", "count": 1, "size": "small"},
                                             {"colour": "red", "shape": "circle", "count": 1, "size": None}],
            "relation": {"subject": 0, "predicate": "above", "object": 1}}
    qs = questions_from_spec(spec)
    assert [q["type"] for q in qs] == ["existence", "colour", "size", "existence", "colour", "relation"]
    assert qs[1]["text"] == "is the square green?" and qs[1]["parents"] == [0]
    assert qs[5]["parents"] == [1, 4]
    obj = lambda c, s, x, y, size="small": {"colour": c, "shape": s, "x": x, "y": y, "size_class": size}  # noqa
    # green square above red circle, all right
    assert answer_questions(qs, [obj("green", "square", 5, 5), obj("red", "circle", 5, 20)]) == [True] * 6
    # square is blue: colour fails -> size and relation fail under DSG, relation itself is false too
    ans = answer_questions(qs, [obj("blue", "square", 5, 5), obj("red", "circle", 5, 20)])
    assert ans == [True, False, False, True, True, False]
    # no circle at all: existence fails, its colour child fails by dependency even if answered "yes"
    forced = [True, True, True, False, True, True]
    assert dsg_scores(qs, forced) == [True, True, True, False, False, False]
    # count questions: exactly n
    cq = questions_from_spec("three red crosses")
    assert [q["type"] for q in cq] == ["existence", "colour", "count"]
    objs = [obj("red", "cross", i * 8, 3) for i in range(4)]
    assert answer_questions(cq, objs) == [True, True, False]
    assert answer_questions(cq, objs[:3]) == [True, True, True]


# ------------------------------------------------------------------------------------------------
# Parser behaviour
# ------------------------------------------------------------------------------------------------

def test_parse_details_and_input_checks(verifier):
    world = ShapesWorld(ShapesConfig())
    s = world.sample(3, "val")
    a = verifier.parse(s.image)
    b = verifier.parse(s.image.float() / 127.5 - 1)
    assert a == b and len(a[0]) == len(s.meta["objects"])
    for o in a[0]:
        x0, y0, x1, y1 = o["bbox"]
        assert x0 < o["x"] < x1 and y0 < o["y"] < y1 and o["area"] > 0
    empty = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    empty[1, 0, 5, 5] = 255                                            # one-pixel speck: below min area
    assert verifier.parse(empty) == [[], []]
    with pytest.raises(ValueError, match="shape"):
        verifier.parse(torch.zeros(3, 32))
    with pytest.raises(TypeError):
        verifier.parse(torch.zeros(1, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="specs"):
        verifier.score(s.image, [s.meta["spec"], s.meta["spec"]])


def test_lenient_merging_of_fragments(verifier):
    world = ShapesWorld(ShapesConfig())
    spec = {"type": "single", "entities": [{"colour": "cyan", "shape": "square", "count": 1, "size": "large"}],
            "relation": None}
    meta = world.layout(spec, torch.Generator().manual_seed(1))
    img = world.render(meta)
    x0, y0, x1, y1 = meta["objects"][0]["bbox"]
    img[:, y0:y1, (x0 + x1) // 2] = 0                                  # a 1-px crack through the object
    assert len(verifier.parse(img)[0]) == 1
    strict = Verifier(ShapesConfig(), VerifierConfig(merge_radius=0, connectivity=4))
    assert len(strict.parse(img)[0]) == 2


def test_single_object_attribute_accuracy(verifier):
    world = ShapesWorld(ShapesConfig())
    prompts = world.random_prompt_specs(60, "test", types=("single",))
    imgs = torch.stack([world.render(p.spec, torch.Generator().manual_seed(i)) for i, p in enumerate(prompts)])
    assert colour_accuracy(imgs, prompts, verifier) == 1.0
    assert shape_accuracy(imgs, [p.spec["entities"][0]["shape"] for p in prompts], verifier) == 1.0
    rolled = [p.spec for p in prompts[1:] + prompts[:1]]
    assert colour_accuracy(imgs, rolled, verifier) < 0.5
    assert shape_accuracy(imgs, rolled, verifier) < 0.6


# ------------------------------------------------------------------------------------------------
# FID feature CNN
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cnn():
    from dream.eval.shapes_features import load_shapes_feature_extractor

    return load_shapes_feature_extractor()


def test_cnn_loads_and_features(cnn):
    from dream.eval.shapes_features import DEFAULT_WEIGHTS

    assert os.path.getsize(DEFAULT_WEIGHTS) <= 5 * 1024 * 1024
    record = json.load(open(os.path.splitext(DEFAULT_WEIGHTS)[0] + ".json"))
    assert {"command", "seed", "wall_time_s", "test_accuracy"} <= set(record)
    world = ShapesWorld(ShapesConfig())
    imgs = world.batch(range(8), "val")[0]
    f = cnn(imgs)
    assert f.shape == (8, cnn.num_features) and f.dtype == torch.float32 and torch.isfinite(f).all()
    # float input in [-1, 1]: preprocessed by another formula (a few roundings of the input), then the same
    # net: 2x rule against the net in float64 on the exact input
    cnn64 = copy.deepcopy(cnn).double()
    with torch.no_grad():
        truth = cnn64.forward_features(imgs.double() / 127.5 - 1)
    assert_2x(cnn(imgs.float() / 127.5 - 1), f, truth, "shapes CNN on float images")
    big = ShapesWorld(ShapesConfig(image_size=64)).batch(range(4), "val")[0]
    assert cnn(big).shape == (4, cnn.num_features)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        cnn(imgs[0])
    assert not any(p.requires_grad for p in cnn.parameters()) and not cnn.training


def test_cnn_attribute_accuracy_beats_chance(cnn):
    from dream.eval.shapes_features import attribute_accuracy

    world = ShapesWorld(ShapesConfig(base_seed=12345))       # unseen seed namespace, held-out split
    imgs, _, metas = world.batch(range(300), "test")
    acc = attribute_accuracy(cnn, imgs, metas)
    assert acc["count"] >= 0.7, acc                           # chance 0.25
    assert acc["single_colour"] >= 0.8 and acc["single_shape"] >= 0.7, acc   # chance 1/7, 1/4
    assert acc["colour_set"] >= 0.5, acc


def test_cnn_as_torchmetrics_fid_feature(cnn):
    from torchmetrics.image.fid import FrechetInceptionDistance

    world = ShapesWorld(ShapesConfig())
    real = world.batch(range(300), "train")[0]
    same = world.batch(range(300), "val")[0]
    g = torch.Generator().manual_seed(0)
    noisy = ((same.float() + 60 * torch.randn(same.shape, generator=g)).clamp(0, 255)).to(torch.uint8)
    blurred = F.avg_pool2d(F.pad(same.float(), (1, 1, 1, 1), mode="replicate"), 3, 1).round().to(torch.uint8)

    def fid(a, b):
        m = FrechetInceptionDistance(feature=cnn)
        m.update(a, real=True)
        m.update(b, real=False)
        return m.compute().item()

    d_same, d_noisy, d_blur = fid(real, same), fid(real, noisy), fid(real, blurred)
    assert d_same < d_noisy / 3 and d_same < d_blur / 3, (d_same, d_noisy, d_blur)
