"""`dream train-vae`: the ShapesWorld KL-VAE tokenizer trainer (loss goes down, exact resume, export loads)."""
import json

import pytest
import torch

from dream.train.vae import VAETrainConfig, VAETrainer, vae_loss
from tolerance import assert_rel_close, gemm_rel_tol

TINY = {"latent_channels": 4, "block_out_channels": [8, 8], "layers_per_block": 1, "norm_num_groups": 4,
        "patch_size": 2, "sample_size": 16, "mid_block_attention": False}


def _cfg(**kw):
    base = dict(vae=dict(TINY), image_size=16, batch_size=8, steps=40, lr=3e-3, warmup_steps=2, log_every=5,
                ckpt_every=0, num_stat_images=32)
    return VAETrainConfig(**{**base, **kw})


def test_loss_decreases_and_export_is_a_working_tokenizer(tmp_path):
    from dream.models.tokenizers import create_tokenizer

    t = VAETrainer(_cfg(), tmp_path)
    res = t.fit()
    first, last = t.history[0]["l1"], t.history[-1]["l1"]
    assert last < 0.7 * first, (first, last)
    for name in ("tokenizer/config.json", "tokenizer/model.safetensors", "recon.png", "loss.png", "metrics.jsonl",
                 "vae_training.json"):
        assert (tmp_path / name).exists(), name
    assert {"recon_l1", "psnr_db", "scaling_factor", "verifier_question_accuracy_on_recon"} <= set(res)
    tok = create_tokenizer(str(tmp_path / "tokenizer"))
    x = t.images(0, "val")
    z = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    assert z.shape == (8, 16, 16)                # 16x16 images / (stride 2 x p 2) = 4x4 tokens of 4*2*2 dims
    # the exported scale/shift normalise the latents (computed on held-out images)
    assert abs(float(z.mean())) < 0.5 and 0.5 < float(z.std()) < 2.0
    # decoding the exported tokenizer's tokens equals the trained VAE's own reconstruction
    ref = t.vae.eval().decode(t.vae.encode(x).mode())
    # the tokenizer scales and shifts the latents and undoes it (two roundings of the decoder's input, ~2u of it),
    # then runs the same decoder: ~10 convolutions of fan-in <= 32 x 9 carry that relative perturbation
    assert_rel_close(tok.decode(tok.encode(x, sample=False)), ref, gemm_rel_tol(torch.float32, 32 * 9, depth=10),
                     "tokenizer round trip vs the VAE's reconstruction")


def test_resume_continues_exactly(tmp_path):
    straight = VAETrainer(_cfg(steps=6, ckpt_every=3), tmp_path / "a")
    straight.fit()
    first = VAETrainer(_cfg(steps=6, ckpt_every=3, minutes=1e-9), tmp_path / "b")   # stops after one step
    first.fit()
    assert first.step == 1
    resumed = VAETrainer(_cfg(steps=6, ckpt_every=3), tmp_path / "b", resume=True)
    assert resumed.step == 1
    res = resumed.fit()
    assert res["train_s_total"] > res["wall_s"] > 0          # includes the first invocation's seconds
    for k, v in straight.vae.state_dict().items():
        assert torch.equal(v, resumed.vae.state_dict()[k]), k


def test_config_rejects_unknown_keys_and_bad_geometry(tmp_path):
    with pytest.raises(ValueError, match="unknown VAETrainConfig keys"):
        VAETrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="not a multiple"):
        VAETrainer(_cfg(image_size=18), tmp_path)


def test_kl_term_is_per_element_and_weighted():
    from dream.models.autoencoder import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(**TINY))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    a = vae_loss(vae, x, _cfg(kl_weight=0.0), torch.Generator().manual_seed(1))
    b = vae_loss(vae, x, _cfg(kl_weight=1.0), torch.Generator().manual_seed(1))
    # (rec + 1 * kl) - rec == kl up to the two roundings of the sum and the difference: 2u of |rec + kl|
    assert float((b["loss"] - a["loss"] - b["kl"]).abs()) <= 2 * 2 ** -24 * float(b["loss"].abs())
    post = vae.encode(x)
    # the same per-element KL terms, averaged in another order: a mean over n terms
    n = post.mean.numel()
    assert_rel_close(a["kl"], post.kl().mean() / post.mean[0].numel(), gemm_rel_tol(torch.float32, n), "kl")


def test_cli_writes_config_and_tokenizer(tmp_path):
    import yaml

    from dream.cli import main

    cfg = tmp_path / "vae.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(steps=3).to_dict()))
    assert main(["train-vae", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "vae_train_config.json").read_text())
    assert saved["steps"] == 3 and (tmp_path / "run" / "tokenizer" / "model.safetensors").exists()
    with pytest.raises(SystemExit, match="config file not found"):
        main(["train-vae", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "x")])


def test_train_vae_logs_scalars_lr_and_recon_grid_to_tensorboard(tmp_path):
    import yaml

    from conftest import read_tensorboard
    from dream.cli import main

    cfg = tmp_path / "vae.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(steps=4, log_every=2).to_dict()))
    assert main(["train-vae", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ev = read_tensorboard(tmp_path / "run" / "tensorboard")
    assert set(ev["scalars"]) == set(rows[0]) - {"step"} and {"loss", "l1", "kl", "lr"} <= set(ev["scalars"])
    for tag, points in ev["scalars"].items():
        assert points == [(r["step"], pytest.approx(r[tag], rel=2 ** -24)) for r in rows], tag  # float32 events
    assert [s for s, _, _ in ev["images"]["recon"]] == [4]
