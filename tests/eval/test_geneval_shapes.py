"""GenEval-shapes: the category rules on hand-made objects, ground-truth renders score 1, corrupted images fail
the right categories, prompts are held-out, reproducible and honour exclusions; the CLI writes the schema."""
import json

import pytest
import torch

from dream.data.shapes import ShapesConfig, ShapesWorld
from dream.eval.geneval_shapes import (CATEGORIES, GenEvalShapes, geneval_judgements, geneval_prompts,
                                       relative_position)


def _obj(shape, colour, x0, y0, x1, y1):
    return {"shape": shape, "colour": colour, "bbox": [x0, y0, x1, y1], "x": (x0 + x1) / 2, "y": (y0 + y1) / 2}


def test_relative_position_follows_geneval_rule():
    a, b = _obj("square", "red", 0, 10, 8, 18), _obj("circle", "blue", 20, 10, 28, 18)
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    top, bottom = _obj("square", "red", 10, 0, 18, 8), _obj("circle", "blue", 10, 20, 18, 28)
    assert relative_position(top, bottom) == {"above"}          # y grows downwards
    # centres 4 px apart with 8-px boxes: the 0.1 x (8 + 8) = 1.6 px margin leaves 2.4 px -> still "left of"
    assert relative_position(_obj("s", "r", 0, 0, 8, 8), _obj("s", "r", 4, 0, 12, 8)) == {"left of"}
    # within the margin: no relation at all
    assert relative_position(_obj("s", "r", 0, 0, 8, 8), _obj("s", "r", 1, 0, 9, 8)) == set()
    # diagonal at 45 degrees: both directions count (|dx|, |dy| ~ 0.707 > 0.5)
    assert relative_position(_obj("s", "r", 0, 0, 8, 8), _obj("s", "r", 20, 20, 28, 28)) == {"left of", "above"}


def test_category_rules():
    single = {"type": "single", "entities": [{"colour": "red", "shape": "square", "count": 1, "size": None}],
              "relation": None}
    assert geneval_judgements([_obj("square", "blue", 0, 0, 8, 8)], single) == {"single_object": True,
                                                                                  "colors": False}
    count = {"type": "count", "entities": [{"colour": "red", "shape": "circle", "count": 2, "size": None}],
             "relation": None}
    two = [_obj("circle", "red", 0, 0, 8, 8), _obj("circle", "green", 20, 0, 28, 8)]
    assert geneval_judgements(two, count) == {"counting": True, "over_count": False}   # class-level count
    three = two + [_obj("circle", "red", 0, 20, 8, 28)]
    assert geneval_judgements(three, count) == {"counting": False, "over_count": True}
    rel = {"type": "relation", "entities": [{"colour": "red", "shape": "square", "count": 1, "size": None},
                                            {"colour": "blue", "shape": "circle", "count": 1, "size": None}],
           "relation": {"subject": 0, "predicate": "left of", "object": 1}}
    ok = [_obj("square", "red", 0, 10, 8, 18), _obj("circle", "blue", 20, 10, 28, 18)]
    assert geneval_judgements(ok, rel) == {"position": True}
    # a second red square on the wrong side breaks "for every subject / object pair"
    assert geneval_judgements(ok + [_obj("square", "red", 24, 24, 30, 30)], rel) == {"position": False}
    assert geneval_judgements(ok[:1], rel) == {"position": False}


@pytest.fixture(scope="module")
def bench():
    return GenEvalShapes(num_real=200)


def test_ground_truth_renders_pass_and_corruptions_fail(bench):
    prompts = geneval_prompts(96, prompt_seed=3)
    world = ShapesWorld(ShapesConfig())
    imgs = torch.stack([world.render(p.spec, generator=torch.Generator().manual_seed(i))
                        for i, p in enumerate(prompts)])
    r = bench.evaluate(imgs, prompts)
    assert r["n_prompts"] == 96 and set(r["geneval"]) == set(CATEGORIES) | {"overall"}
    assert r["prompt_accuracy"] == 1.0 and r["geneval"]["overall"] == 1.0 and r["over_count_rate"] == 0.0
    assert all(v == 1.0 for v in r["per_type"].values())
    # blank images: nothing is found, every category fails, FID is far above the renders'
    blank = torch.zeros_like(imgs)
    rb = bench.evaluate(blank, prompts)
    assert rb["prompt_accuracy"] == 0.0 and rb["geneval"]["overall"] == 0.0
    assert rb["fid_cnn"] > 5 * r["fid_cnn"]
    # counting prompts rendered with one more object: counting fails and every one over-counts
    cnt = [p for p in prompts if p.spec["type"] == "count" and p.spec["entities"][0]["count"] < 4]
    more = []
    for i, p in enumerate(cnt):
        spec = json.loads(json.dumps(p.spec))
        spec["entities"][0]["count"] += 1
        more.append(world.render(spec, generator=torch.Generator().manual_seed(i)))
    rc = bench.evaluate(torch.stack(more), cnt)
    assert rc["geneval"]["counting"] == 0.0 and rc["over_count_rate"] == 1.0


def test_prompts_are_held_out_reproducible_and_honour_exclusions():
    a, b, c = geneval_prompts(40, 0), geneval_prompts(40, 0), geneval_prompts(40, 1)
    assert [p.caption for p in a] == [p.caption for p in b]
    assert [p.caption for p in a] != [p.caption for p in c]
    banned = {p.caption for p in a[:20]}
    d = geneval_prompts(40, 0, exclude=banned)
    assert not banned & {p.caption for p in d}
    with pytest.raises(ValueError, match="at least one prompt"):
        geneval_prompts(0)


def test_cli_writes_the_schema(tmp_path):
    from dream.cli import main

    out = tmp_path / "r.json"
    assert main(["eval", "geneval-shapes", "--model", "dream_tiny.shapes", "--prompts", "8", "--num-real", "64",
                 "--quiet", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    for k in ("prompt_accuracy", "per_type", "geneval", "over_count_rate", "fid_cnn", "n_prompts"):
        assert k in r
    assert set(r["geneval"]) == {"overall", *CATEGORIES} and r["n_prompts"] == 8
    assert set(r["per_type"]) <= {"existence", "colour", "count", "size", "relation"}


def test_cli_runs_a_diffusers_model_too(tmp_path):
    from dream.cli import main

    out = tmp_path / "sd.json"
    assert main(["eval", "geneval-shapes", "--model", "sd_tiny.shapes", "--prompts", "4", "--num-real", "32",
                 "--quiet", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["n_prompts"] == 4 and set(r["geneval"]) == {"overall", *CATEGORIES}
    with pytest.raises(SystemExit, match="--sad"):
        main(["eval", "geneval-shapes", "--model", "sd_tiny.shapes", "--prompts", "2", "--sad", "2,1", "--quiet"])
