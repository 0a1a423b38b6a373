"""benchmarks/shapes_objectives.py end to end at toy size: three objectives train and are evaluated."""
import json
from pathlib import Path

import pytest

from helpers import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "shapes_objectives.py"


def _bench():
    return load_script(BENCH)


def test_shapes_objectives_smoke(tmp_path):
    mod = _bench()
    out = tmp_path / "objectives.json"
    assert mod.main(["--steps", "2", "--num-prompts", "4", "--num-single", "4", "--num-real", "32", "--num-iter", "2",
                     "--work", str(tmp_path / "runs"), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data["results"]) == ["DREAM", "CLIP-only", "FLUID-only"]
    for name, r in data["results"].items():
        assert r["training"]["steps"] == 2
        assert 0.0 <= r["understanding"]["linear_probe_colour_acc"] <= 1.0
        assert set(r["generation"]) == {"plain", "sad"}
    # the objectives really differ: CLIP-only never computes a diffusion loss, FLUID-only no contrastive loss
    assert data["results"]["CLIP-only"]["training"]["final"]["diff_loss"] == 0.0
    assert data["results"]["FLUID-only"]["training"]["model_overrides"]["clip_loss_weight"] == 0.0
    assert data["results"]["CLIP-only"]["training"]["final"]["mask_ratio"] == 0.0
    assert "| DREAM |" in data["markdown"]


def test_shapes_objectives_rejects_unknown_variant(tmp_path):
    with pytest.raises(SystemExit):
        _bench().main(["--variants", "DALL-E", "--work", str(tmp_path)])
