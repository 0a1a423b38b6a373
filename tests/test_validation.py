"""Input validation at the API boundary: NaN / inf images, guidance and weights are refused, and every bad
config value, file, prompt, seed or step count gets an error naming the file, field or position."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dream
from dream.models.tokenizers import PixelTokenizer
from dream.pipeline import DreamPipeline

PIX = {"img_size": 32, "vae_stride": 1, "patch_size": 8, "vae_embed_dim": 3, "num_sampling_steps": "5"}


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return DreamPipeline(dream.create_model("dream_test", clip_vocab_size=49408, **PIX), PixelTokenizer(8, 32),
                         text_encoder="random")


# ---- item 4: non-finite values ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_score_and_encode_refuse_non_finite_images(pipe, bad):
    images = torch.zeros(2, 3, 32, 32)
    images[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        pipe.score(images, ["a", "b"])
    with pytest.raises(ValueError, match="NaN or infinite"):
        pipe.encode_images(images)


@pytest.mark.parametrize("kw", [{"cfg": float("nan")}, {"cfg": float("inf")}, {"temperature": float("nan")}])
def test_generate_refuses_non_finite_guidance_and_temperature(pipe, kw):
    with pytest.raises(ValueError, match=f"{next(iter(kw))}: must be finite"):
        pipe.generate(["a red square"], num_iter=2, **kw)


def test_weights_with_nan_are_refused_naming_the_tensors_and_dream_sample_fails(pipe, tmp_path):
    from dream.cli import main
    from dream.models.convert import load_checkpoint_into

    folder = pipe.save_pretrained(tmp_path / "pipe")
    sd = load_file(str(folder / "model" / "model.safetensors"))
    sd["z_proj.weight"][0, 0] = float("nan")
    sd["diffloss.net.final_layer.linear.bias"] = torch.full_like(sd["diffloss.net.final_layer.linear.bias"],
                                                                 float("inf"))
    save_file(sd, str(folder / "model" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"NaN or infinite values in 2 tensor.*diffloss.net.final_layer.linear.bias"
                                         r".*z_proj.weight"):
        dream.create_model(folder / "model")
    model = dream.create_model("dream_test", clip_vocab_size=49408, **PIX)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="model.safetensors"):
        load_checkpoint_into(model, folder / "model")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())      # left as it was
    with pytest.raises(ValueError, match="z_proj.weight"):
        main(["sample", "--model", str(folder), "a red square", "--num-iter", "2", "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()


def test_shipped_and_official_weights_are_finite(official_tiny):
    from dream.models.convert import _read, extract_state_dict, non_finite_tensors

    assert non_finite_tensors(dream.create_model("dream_tiny.shapes").state_dict()) == []
    assert non_finite_tensors(extract_state_dict(_read(official_tiny))) == []


# ---- item 5: clear errors ---------------------------------------------------------------------------------
def test_invalid_json_in_config_and_pipeline_files_names_the_file(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "pipe")
    (folder / "pipeline.json").write_text('{"text_encoder": "random",,}')
    with pytest.raises(ValueError, match=r"pipeline.json is not valid JSON \(line 1"):
        DreamPipeline.from_pretrained(folder)
    (folder / "pipeline.json").write_text('{"text_encoder": "random"}')
    cfg = folder / "model" / "config.json"
    cfg.write_text(cfg.read_text()[:-5])
    with pytest.raises(ValueError, match=r"model/config.json is not valid JSON"):
        dream.create_model(folder / "model")
    cfg.write_text(json.dumps({**dream.create_model("dream_test").config.to_dict(), "encoder_depth": "four"}))
    with pytest.raises(ValueError, match=r"config.json.*DreamConfig.encoder_depth: expected int, got str 'four'"):
        dream.create_model(folder / "model")


def test_wrong_field_types_name_the_field(pipe):
    from dream.models.config import DreamConfig

    with pytest.raises(ValueError, match="DreamConfig.encoder_depth: expected int, got str 'four'"):
        DreamConfig(encoder_depth="four")
    with pytest.raises(ValueError, match="SamplerConfig.cfg: expected float, got str 'high'"):
        pipe.generate(["a red square"], num_iter=2, cfg="high")


def test_a_lone_surrogate_prompt_is_a_clear_error_naming_its_position(pipe):
    for call in (lambda p: pipe.generate(p, num_iter=2), pipe.encode_text, lambda p: pipe.text.features(p)):
        with pytest.raises(ValueError, match=r"text at position 1 of 2 is not valid Unicode.*U\+D800"):
            call(["a red square", "a blue \ud800 circle"])


@pytest.mark.parametrize("seed", [2**70, -1, 1.5, True])
def test_seed_out_of_range_is_a_clear_error(pipe, seed):
    from dream.train import TrainConfig

    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        pipe.generate(["a red square"], num_iter=2, seed=seed)
    with pytest.raises(ValueError, match="TrainConfig.seed"):
        TrainConfig(seed=seed)


@pytest.mark.parametrize("steps", ["0", "ddim0", "-3", "10,0", "abc", ""])
def test_num_sampling_steps_must_keep_a_step(pipe, steps):
    from dream.models.config import DreamConfig

    if steps == "":        # "" means the model's own (generate) / all steps (DreamConfig): both valid
        assert pipe.generate(["a"], num_iter=2, num_sampling_steps=steps).shape == (1, 3, 32, 32)
        return
    with pytest.raises(ValueError, match="num_sampling_steps .*must be a positive step count"):
        pipe.generate(["a red square"], num_iter=2, num_sampling_steps=steps)
    with pytest.raises(ValueError, match="DreamConfig.num_sampling_steps"):
        DreamConfig(num_sampling_steps=steps)
    assert pipe.generate(["a"], num_iter=2, num_sampling_steps="ddim3").shape == (1, 3, 32, 32)


def test_a_misspelled_pretrained_tag_lists_the_known_tags():
    with pytest.raises(KeyError, match="unknown pretrained tag 'dream_tiny.bogus_tag'.*dream_tiny.shapes"):
        dream.create_model("dream_tiny.bogus_tag")
