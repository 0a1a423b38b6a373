"""Smoke tests of the scripts in examples/: each runs in-process at a tiny size and its outputs are checked."""
import argparse
import json
import math

import torch
from PIL import Image

from conftest import OFFICIAL_TINY, REPO
from helpers import load_script


def load_example(name: str):
    """The module ``examples/<name>.py`` (examples/ is not a package: users copy the files)."""
    return load_script(REPO / "examples" / f"{name}.py", f"example_{name}")


def write_shapes_folder(root, n: int, split: str) -> list[str]:
    """``n`` single-object ShapesWorld images, red or blue, as ``root/<colour>/<i>.png`` with same-name .txt
    captions: a captioned folder (make-shards layout) and an ImageFolder labelled by colour at once."""
    from dream.data.shapes import ShapesConfig, ShapesWorld

    world = ShapesWorld(ShapesConfig(colours=("red", "blue"), type_weights=(1.0, 0.0, 0.0, 0.0)))
    images, captions, metas = world.batch(range(n), split)
    colours = []
    for i, (image, caption, meta) in enumerate(zip(images, captions, metas)):
        folder = root / meta["objects"][0]["colour"]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption)
        colours.append(meta["objects"][0]["colour"])
    assert set(colours) == {"red", "blue"}, "the probe needs both classes in every split"
    return colours


def test_finetune_on_folder(tmp_path, capsys):
    import dream
    from dream.pipeline import DreamPipeline

    write_shapes_folder(tmp_path / "images", 12, "train")
    out = tmp_path / "run"
    rc = load_example("finetune_on_folder").main(
        ["--images", str(tmp_path / "images"), "--out", str(out), "--model", "dream_tiny.shapes", "--steps", "2",
         "--batch-size", "4", "--log-every", "1"])
    assert rc == 0
    assert "12 captioned images" in capsys.readouterr().out
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in history)
    tuned = dream.create_model(out / "model")
    shipped = dream.create_model("dream_tiny.shapes")
    assert tuned.config == shipped.config
    changed = [k for k, v in shipped.state_dict().items() if not torch.equal(v, tuned.state_dict()[k])]
    assert changed, "two optimizer steps changed no weight"
    pipe = DreamPipeline.from_pretrained(out / "pipeline")
    assert pipe.sampling_defaults["num_iter"] == 16 and pipe.text_encoder_spec == "random"
    assert torch.equal(pipe.model.state_dict()["decoder_norm.weight"], tuned.state_dict()["decoder_norm.weight"])


def test_sample_sad_grid(tmp_path, capsys):
    grid = tmp_path / "grid.png"
    rc = load_example("sample_sad_grid").main(
        ["a red square", "two blue circles", "--sad", "2,0.25", "--num-iter", "4", "--out", str(grid)])
    assert rc == 0
    # save_grid layout: 2 columns of (32 px x 4 = 128 px, or 22 caption chars x 6 px = 132) + 6 px, a 70 px
    # row-label margin; 2 rows of 128 px + 3 caption lines (37 px) + 6 px
    assert Image.open(grid).size == (70 + 2 * 138, 2 * (128 + 37 + 6))
    report = json.loads(grid.with_suffix(".json").read_text())
    assert [r["prompt"] for r in report["prompts"]] == ["a red square", "two blue circles"]
    for r in report["prompts"]:
        for key in ("plain_score", "sad_score", "sad_selection_score"):
            assert math.isfinite(r[key]) and -1.0 <= r[key] <= 1.0
    assert "SAD K=2" in capsys.readouterr().out


def test_evaluate_checkpoint_shapes_cnn_and_probe(tmp_path):
    write_shapes_folder(tmp_path / "train", 16, "train")
    write_shapes_folder(tmp_path / "val", 8, "val")
    summary_path = tmp_path / "eval.json"
    rc = load_example("evaluate_checkpoint").main(
        ["--real", str(tmp_path / "val"), "--num-images", "6", "--num-iter", "4", "--probe-train",
         str(tmp_path / "train"), "--probe-val", str(tmp_path / "val"), "--out", str(summary_path)])
    assert rc == 0
    summary = json.loads(summary_path.read_text())
    assert summary["fid_features"] == "shapes_cnn"
    assert summary["num_images"] == 6 and summary["num_reference_images"] == 8
    assert math.isfinite(summary["fid"]) and summary["fid"] > 0
    probe = summary["linear_probe"]
    assert probe["classes"] == ["blue", "red"] and probe["num_train"] == 16 and probe["num_test"] == 8
    assert probe["top1"] >= 0.75       # colour is linearly readable from the shipped encoder (1.00 in the README)


def test_evaluate_checkpoint_inception_weights(tmp_path, monkeypatch):
    """The Inception path with a weights file: random weights (the real ones cannot be downloaded here), with
    variance-preserving conv init so that the features do not vanish through the 94 layers."""
    from dream.eval.inception import WEIGHTS_ENV_VAR, FIDInceptionV3

    monkeypatch.delenv(WEIGHTS_ENV_VAR, raising=False)
    net = FIDInceptionV3()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, generator=torch.Generator().manual_seed(0))
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    write_shapes_folder(tmp_path / "real", 4, "val")
    summary_path = tmp_path / "eval.json"
    rc = load_example("evaluate_checkpoint").main(
        ["--real", str(tmp_path / "real"), "--num-images", "2", "--num-iter", "2", "--inception-weights",
         str(weights), "--out", str(summary_path)])
    assert rc == 0
    summary = json.loads(summary_path.read_text())
    assert summary["fid_features"].startswith("inception")
    assert summary["num_images"] == 2 and summary["num_reference_images"] == 4
    assert math.isfinite(summary["fid"]) and summary["fid"] > 0
    assert "linear_probe" not in summary


def official_pth(path, model, model_ema):
    """An official-style training checkpoint (MAR / DREAM ``misc.save_model``)."""
    torch.save({"model": model, "model_ema": model_ema, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 47, "args": argparse.Namespace(model="dream_tiny", epochs=48)}, path)
    return path


def test_check_official_checkpoint(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    import dream

    example = load_example("check_official_checkpoint")
    config = str(OFFICIAL_TINY / "config.json")
    fixture_weights = load_file(str(OFFICIAL_TINY / "model.safetensors"))
    expected_params = json.loads((OFFICIAL_TINY / "config.json").read_text())["derived"]["num_params"]

    # the fixture's official-key safetensors: a clean report
    report_path = tmp_path / "safetensors.json"
    assert example.main([str(OFFICIAL_TINY / "model.safetensors"), "--official-config", config,
                         "--out", str(report_path)]) == 0
    assert "0 missing / 0 unexpected keys" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["parameters"] == expected_params and report["strict_match"]

    # an official .pth whose EMA holds the fixture's weights and whose raw weights are perturbed: the EMA is
    # loaded, so every official output is reproduced from the checkpoint
    g = torch.Generator().manual_seed(1)
    raw = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
           for k, v in fixture_weights.items()}
    pth = official_pth(tmp_path / "checkpoint-last.pth", {f"module.{k}": v for k, v in raw.items()},
                       fixture_weights)
    report_path = tmp_path / "pth.json"
    assert example.main([str(pth), "--official-config", config, "--parity-fixture", str(OFFICIAL_TINY),
                         "--out", str(report_path)]) == 0
    out = capsys.readouterr().out
    assert "0 missing / 0 unexpected keys" in out and "parity: 63 of 63 outputs match" in out
    report = json.loads(report_path.read_text())
    assert report["missing"] == report["unexpected"] == report["shape_mismatch"] == []
    assert report["parity_weights"] == "checkpoint" and report["parity_ok"]
    assert len(report["parity"]) == 63 and all(row["ok"] for row in report["parity"])

    # another architecture (the situation of a dream_b checkpoint): parity runs with the fixture's own weights
    other = tmp_path / "dream_tiny.safetensors"
    save_file(dream.create_model("dream_tiny").state_dict(), str(other))
    report_path = tmp_path / "other.json"
    assert example.main([str(other), "--arch", "dream_tiny", "--parity-fixture", str(OFFICIAL_TINY),
                         "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["strict_match"] and report["parameters"] == sum(p.numel() for p in
                                                                  dream.create_model("dream_tiny").parameters())
    assert report["parity_weights"] == "fixture" and report["parity_ok"]
    assert "fixture's own weights" in capsys.readouterr().out

    # a checkpoint without one key: reported by name, non-zero exit
    del fixture_weights["encoder_norm.weight"]
    broken = official_pth(tmp_path / "broken.pth", raw, fixture_weights)
    assert example.main([str(broken), "--official-config", config]) == 1
    out = capsys.readouterr().out
    assert "1 missing / 0 unexpected keys" in out and "missing: encoder_norm.weight" in out
