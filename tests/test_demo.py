"""`dream demo` end to end at a tiny budget, and the shipped checkpoint loads offline."""
import json

import torch

import dream


def test_shipped_checkpoint_loads_offline_and_is_small():
    m = dream.create_model("dream_tiny.shapes", pretrained=True)
    assert m.config.encoder_embed_dim == dream.get_config("dream_tiny").encoder_embed_dim
    from dream.models.registry import ASSETS

    f = ASSETS / "dream_tiny_shapes" / "model" / "model.safetensors"
    assert f.stat().st_size <= 20 * 2 ** 20
    info = json.loads((ASSETS / "dream_tiny_shapes" / "training.json").read_text())
    assert {"command", "config", "seed", "wall_s", "hardware", "steps"} <= set(info)
    # the weights are trained, not the random init
    fresh = dream.create_model("dream_tiny")
    assert not torch.allclose(m.state_dict()["z_proj.weight"], fresh.state_dict()["z_proj.weight"])


def test_demo_smoke(tmp_path):
    from dream.cli import main

    rc = main(["demo", "--out", str(tmp_path), "--minutes", "0.2", "--num-prompts", "4", "--num-real", "24",
               "--num-iter", "3", "--sad", "2,1"])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "samples.png").exists() and (tmp_path / "loss.png").exists()
    models = report["models"]
    assert len(models) == 3
    for r in models.values():
        g = r["generation"]
        assert set(g) == {"plain", "sad"}
        for k in ("single_object_colour_acc", "single_object_shape_acc", "prompt_accuracy", "fid_shapes_cnn"):
            assert k in g["plain"]
        assert "retrieval" in r["understanding"] and "linear_probe_colour_acc" in r["understanding"]
