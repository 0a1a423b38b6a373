"""`dream train-sd`: the diffusers Stable Diffusion trainer on ShapesWorld (exact resume, export loads with stock
diffusers), the CLIP tokenizer export and the VAE with its shift folded in."""
import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from dream.train.sd_shapes import SDShapesTrainer, SDTrainConfig  # noqa: E402

TINY_UNET = {"sample_size": 4, "in_channels": 16, "out_channels": 16, "block_out_channels": [32, 32],
             "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": [1, 1],
             "norm_num_groups": 8}
TINY_TEXT = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 1, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
             "pad_token_id": 49407}


NO_TB = {"tensorboard": False}


def _cfg(**kw):
    base = dict(unet=dict(TINY_UNET), text_encoder=dict(TINY_TEXT), num_images=48, cache_chunk=32, batch_size=8,
                steps=4, warmup_steps=1, log_every=1, ckpt_every=0, val_every=0, model_max_length=16)
    return SDTrainConfig(**{**base, **kw})


def _tensors(obj, prefix=""):
    """Every tensor of a nested state dict, by a dotted path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def test_resume_continues_exactly(tmp_path):
    straight = SDShapesTrainer(_cfg(ckpt_every=2), tmp_path / "a", log_to=NO_TB)
    straight.fit(evaluate=False)
    first = SDShapesTrainer(_cfg(ckpt_every=2, minutes=1e-9), tmp_path / "b", log_to=NO_TB)     # stops after one step
    first.fit(evaluate=False)
    assert first.step == 1 and (tmp_path / "b" / "checkpoint-00000001.pt").exists()
    resumed = SDShapesTrainer(_cfg(ckpt_every=2), tmp_path / "b", resume=True, log_to=NO_TB)
    assert resumed.step == 1
    res = resumed.fit(evaluate=False)
    assert res["steps"] == 4 and res["train_s_total"] > res["wall_s_this_run"] > 0
    a, b = straight.state(), resumed.state()
    for key in ("model", "ema", "optimizer"):
        ta, tb = dict(_tensors(a[key])), dict(_tensors(b[key]))
        assert ta.keys() == tb.keys()
        worst = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if ta[k].numel())
        assert worst == 0.0, (key, worst)
    assert torch.equal(a["rng_gen"], b["rng_gen"])
    hist_a = [h["loss"] for h in straight.history]
    hist_b = [h["loss"] for h in resumed.history]
    assert hist_a == hist_b
    # the latent cache was built once per run folder, in chunks (32 + 16 rows), and is reused on resume
    assert sorted(p.name for p in (tmp_path / "b" / "latents").glob("chunk-*")) == ["chunk-00000.safetensors",
                                                                                    "chunk-00001.safetensors"]


def test_batches_are_a_function_of_the_step_and_cover_each_epoch(tmp_path):
    t = SDShapesTrainer(_cfg(batch_size=20), tmp_path)
    rows = torch.cat([t.batch_indices(k) for k in range(12)])         # 240 rows = 5 epochs of 48
    for e in range(5):
        assert sorted(rows[48 * e:48 * (e + 1)].tolist()) == list(range(48))
    again = SDShapesTrainer(_cfg(batch_size=20), tmp_path / "other")
    assert torch.equal(again.batch_indices(7), t.batch_indices(7))


def test_export_loads_in_float32_with_stock_diffusers(tmp_path):
    from dream.models.diffusers_export import load_sd_pipeline, sd_generate

    t = SDShapesTrainer(_cfg(steps=2), tmp_path, log_to=NO_TB)
    t.fit(evaluate=False)
    folder = t.export()
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                 "scheduler/scheduler_config.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "model_index.json").read_text())["safety_checker"] == [None, None]
    pipe = load_sd_pipeline(folder)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    ema = t.ema.shadow["unet"].state_dict()
    for k, v in pipe.unet.state_dict().items():          # float16 storage: the EMA weights rounded once
        assert torch.equal(v, ema[k].half().float()), k
    assert pipe.tokenizer.model_max_length == 16
    img = sd_generate(pipe, ["a red square", "two blue circles"], num_inference_steps=2, guidance_scale=2.0)
    assert img.shape == (2, 3, 32, 32) and bool(torch.isfinite(img).all())
    # one generator per prompt: the image of a prompt does not depend on the batch it is drawn in
    alone = sd_generate(pipe, ["a red square", "two blue circles"], num_inference_steps=2, guidance_scale=2.0,
                        batch_size=1)
    assert torch.allclose(alone, img, atol=1e-5)


def test_exported_tokenizer_gives_dream_clip_ids(tmp_path):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    from dream.data.shapes import ShapesWorld
    from dream.text import CLIPTokenizer
    from dream.text.hf_export import export_clip_tokenizer

    hf = HFCLIPTokenizer.from_pretrained(str(export_clip_tokenizer(tmp_path / "tok", model_max_length=32)))
    ours = CLIPTokenizer.from_default()
    world = ShapesWorld()
    caps = [world.sample_meta(i, s)["caption"] for s in ("train", "test") for i in range(60)]
    caps += ["A photo of a CAT!", "", "two  blue\tcircles", "naïve café, 3 dogs", "it's a large-ish cross"]
    for c in caps:
        assert hf(c).input_ids == [ours.sot_token_id] + ours.encode(c) + [ours.eot_token_id], c
    assert len(hf) == ours.vocab_size == 49408
    padded = hf(["a red square"], padding="max_length", max_length=32).input_ids[0]
    assert padded[:4] == [49406, 320, 736, 3999] and padded[4:] == [49407] * 28     # SD 1.x: pad with EOT


def test_vae_export_folds_the_shift_exactly():
    from dream.data.shapes import ShapesWorld
    from dream.models.diffusers_export import vae_to_diffusers
    from dream.models.patchify import unpatchify
    from dream.models.tokenizers import create_tokenizer

    tok = create_tokenizer("shapes_vae")
    assert tok.config.shift_factor != 0.0
    vae = vae_to_diffusers(tok)
    assert vae.config.shift_factor is None and vae.config.scaling_factor == tok.config.scaling_factor
    x = ShapesWorld().batch(range(8), "val")[0].float() / 127.5 - 1
    with torch.no_grad():
        ours = unpatchify(tok.encode(x, sample=False), 1, 16)
        theirs = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        assert torch.allclose(theirs, ours, atol=1e-4, rtol=0)        # |latents| <= ~6, float32 1x1-conv bias fold
        img_ours = tok.decode(tok.encode(x, sample=False))
        img_theirs = vae.decode(ours / vae.config.scaling_factor).sample
        assert torch.allclose(img_theirs, img_ours, atol=1e-4, rtol=0)


def test_cli_is_registered_and_config_validates():
    from dream.cli import COMMANDS

    assert COMMANDS["train-sd"][0] == "dream.cli.train_sd"
    with pytest.raises(ValueError, match="caption_dropout"):
        SDTrainConfig(caption_dropout=1.5)
    with pytest.raises(ValueError, match="unknown SDTrainConfig keys"):
        SDTrainConfig.from_dict({"stepz": 3})
