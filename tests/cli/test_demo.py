"""`dream demo` end to end at a tiny budget, and the shipped checkpoint loads offline."""
import json

import pytest
import torch

import dream


def test_shipped_checkpoint_loads_offline_and_is_small():
    m = dream.create_model("dream_tiny.shapes", pretrained=True)
    assert m.config.encoder_embed_dim == dream.get_config("dream_tiny").encoder_embed_dim
    from dream.models.pretrained import pretrained_path

    folder = pretrained_path("dream_tiny.shapes")
    assert (folder / "model" / "model.safetensors").stat().st_size <= 20 * 2 ** 20
    info = json.loads((folder / "training.json").read_text())
    assert {"command", "config", "seed", "wall_s", "hardware", "steps"} <= set(info)
    # the weights are trained, not the random init
    fresh = dream.create_model(m.config)
    assert not torch.allclose(m.state_dict()["z_proj.weight"], fresh.state_dict()["z_proj.weight"])


@pytest.mark.parametrize("masking", ["fluid", "dream"])
def test_demo_smoke(tmp_path, masking):
    from dream.cli import main

    rc = main(["demo", "--out", str(tmp_path), "--minutes", "0.2", "--num-prompts", "4", "--num-single", "6",
               "--num-real", "24", "--fresh-masking", masking,
               "--num-iter", "3", "--sad", "2,1"])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "samples.png").exists() and (tmp_path / "loss.png").exists()
    models = report["models"]
    assert len(models) == 3
    assert models["fresh (0.2 min)"]["training"]["masking"] == masking
    for r in models.values():
        g = r["generation"]
        assert set(g) == {"plain", "sad"}
        for k in ("single_object_colour_acc", "single_object_shape_acc", "prompt_accuracy", "fid_shapes_cnn"):
            assert k in g["plain"]
        assert g["plain"]["single_object_n"] == 6       # accuracy over --num-single prompts, not just 4 // 2
        assert "retrieval" in r["understanding"] and "linear_probe_colour_acc" in r["understanding"]


def test_shipped_pipeline_uses_the_shipped_vae_tokenizer():
    from dream.models.tokenizers import VAETokenizer, create_tokenizer
    from dream.pipeline import DreamPipeline

    pipe = DreamPipeline.from_pretrained("dream_tiny.shapes")
    assert isinstance(pipe.tokenizer, VAETokenizer)
    assert pipe.tokenizer.token_dim == pipe.model.config.token_dim
    assert pipe.tokenizer.stride == pipe.model.config.vae_stride
    tok = create_tokenizer("shapes_vae")
    assert tok.config == pipe.tokenizer.config
    from dream.data.shapes import ShapesConfig, ShapesWorld

    # the shipped VAE reconstructs held-out ShapesWorld renders (the verifier's answers survive it)
    world = ShapesWorld(ShapesConfig(image_size=32))
    imgs, _, metas = world.batch(range(64), "test")
    x = imgs.float() / 127.5 - 1
    rec = tok.decode(tok.encode(x, sample=False)).clamp(-1, 1)
    assert float((rec - x).abs().mean()) < 0.03    # reconstruction quality of the trained VAE, not a rounding bound
    from dream.eval.compositional import Verifier

    assert Verifier(world.config).score(rec, metas, details=False)["question_accuracy"] > 0.95


def test_shipped_tag_means_shipped_weights_and_tokenizer_in_the_cli(tmp_path):
    """`--model dream_tiny.shapes` loads the trained weights and the shipped VAE (never a random model), and
    `create_model("dream_tiny.shapes", pretrained=False)` builds the shipped architecture, randomly initialised."""
    from PIL import Image

    from dream.cli import main
    from dream.data.shapes import ShapesConfig, ShapesWorld
    from dream.pipeline import pipeline_tokenizer_spec

    assert pipeline_tokenizer_spec("dream_tiny.shapes") == "shapes_vae"
    shipped = dream.create_model("dream_tiny.shapes", pretrained=True)
    fresh = dream.create_model("dream_tiny.shapes", pretrained=False)
    assert fresh.config == shipped.config
    assert not torch.equal(fresh.z_proj.weight, shipped.z_proj.weight)
    world = ShapesWorld(ShapesConfig(image_size=32))
    imgs, caps, _ = world.batch(range(32), "test")
    d = tmp_path / "imgs"
    d.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps({"file": f"{i}.png", "captions": [c]})
                                                   for i, c in enumerate(caps)))
    out = tmp_path / "r.json"
    assert main(["eval", "retrieval", "--model", "dream_tiny.shapes", "--images", str(d), "--captions",
                 str(tmp_path / "caps.jsonl"), "--out", str(out), "--no-cache", "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["num_images"] == 32
    assert res["t2i_R@5"] > 0.5 and res["i2t_R@5"] > 0.5     # chance: 5/32 = 0.16
