"""LoRA files against independent references: diffusers' own loaders (``lora_state_dict`` +
``load_lora_adapter``) on fresh tiny diffusers models built from configs, diffusers' own writer, and peft's
``PeftConfig`` / ``PeftModel``. Every adapter has alpha != rank (rank 4, alpha 8) and random A and B."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from lora_helpers import (dream_inputs, dream_loss, make_dream, make_unet, randomize_adapters, rel_err, unet_inputs,
                          unet_out)

from dream.adapters import add_lora, detect_format, load_lora, save_lora


RANK, ALPHA = 4, 8.0
TOL = 1e-5


def _adapted_unet(**kw):
    u = make_unet()
    add_lora(u, RANK, ALPHA, **kw)
    randomize_adapters(u)
    return u


def _diffusers_load(path, model, prefix="unet", pipeline=None):
    """Load a LoRA file into ``model`` the way diffusers does without a pipeline object (offline, diffusers
    wants the folder and the file name)."""
    from diffusers import StableDiffusionPipeline

    pipe_cls = pipeline or StableDiffusionPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe_cls.lora_state_dict(str(path.parent), weight_name=path.name, return_lora_metadata=True)
        sd, meta = out[0], out[-1]
        alphas = out[1] if len(out) == 3 else None
        model.load_lora_adapter(sd, prefix=prefix, network_alphas=alphas, metadata=meta)
    return model


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_our_diffusers_file_in_diffusers_loader_gives_our_output(tmp_path, variant):
    u = _adapted_unet(**variant)
    inp = unet_inputs()
    ours = unet_out(u, inp)
    assert rel_err(ours, unet_out(make_unet(), inp)) > 1e-3           # the adapter does change the output
    f = save_lora(u, tmp_path / "d", format="diffusers")
    assert f.name == "pytorch_lora_weights.safetensors" and detect_format(tmp_path / "d")[0] == "diffusers"
    from safetensors import safe_open

    with safe_open(str(f), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert all(k.startswith("unet.") for k in keys)
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["unet.r"] == RANK and cfg["unet.lora_alpha"] == ALPHA
    theirs = unet_out(_diffusers_load(f, make_unet()), inp)
    assert rel_err(theirs, ours) <= TOL


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}])
def test_our_kohya_file_in_diffusers_loader_gives_our_output(tmp_path, variant):
    u = _adapted_unet(**variant)
    inp = unet_inputs()
    ours = unet_out(u, inp)
    f = save_lora(u, tmp_path / "k.safetensors", format="kohya")
    from safetensors.torch import load_file

    sd = load_file(str(f))
    assert all(k.startswith("lora_unet_") for k in sd)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{name}.lora_down.weight"].shape == (RANK, 64)
    alpha = ALPHA * (math.sqrt(RANK) if variant else 1.0)             # rsLoRA: same alpha / r scale
    assert float(sd[f"{name}.alpha"]) == pytest.approx(alpha)
    theirs = unet_out(_diffusers_load(f, make_unet()), inp)
    assert rel_err(theirs, ours) <= TOL


def test_kohya_alpha_equal_rank_would_be_wrong(tmp_path):
    """What diffusers' convert_state_dict_to_kohya writes (alpha = rank) loads to a different output: the
    kohya test above can fail."""
    from safetensors.torch import load_file, save_file

    u = _adapted_unet()
    inp = unet_inputs()
    f = save_lora(u, tmp_path / "k.safetensors", format="kohya")
    sd = load_file(str(f))
    save_file({k: (torch.tensor(float(RANK)) if k.endswith(".alpha") else v) for k, v in sd.items()},
              str(tmp_path / "wrong.safetensors"))
    theirs = unet_out(_diffusers_load(tmp_path / "wrong.safetensors", make_unet()), inp)
    assert rel_err(theirs, unet_out(u, inp)) > 1e-2


def test_file_written_by_diffusers_loads_with_ours(tmp_path):
    """The other direction: diffusers' own add_adapter + save_lora_weights, read by our load_lora."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    u = make_unet()
    u.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    randomize_adapters(u)
    inp = unet_inputs()
    StableDiffusionPipeline.save_lora_weights(tmp_path / "theirs", unet_lora_layers=get_peft_model_state_dict(u),
                                              unet_lora_adapter_metadata=u.peft_config["default"].to_dict())
    v = make_unet()
    name = load_lora(v, tmp_path / "theirs")
    assert name == "theirs"
    assert rel_err(unet_out(v, inp), unet_out(u, inp)) <= TOL


@pytest.mark.parametrize("fmt", ["peft", "diffusers", "kohya"])
def test_every_format_round_trips_through_load_lora_on_unet_and_dream(tmp_path, fmt):
    u = _adapted_unet()
    inp = unet_inputs()
    v = make_unet()
    load_lora(v, save_lora(u, tmp_path / "u", format=fmt))
    assert rel_err(unet_out(v, inp), unet_out(u, inp)) <= TOL

    m = make_dream()
    add_lora(m, RANK, ALPHA, targets="decoder+diffloss")
    randomize_adapters(m)
    d_in = dream_inputs(m)
    with torch.no_grad():
        ref = dream_loss(m, d_in)
        n = make_dream()
        load_lora(n, save_lora(m, tmp_path / "m", format=fmt))
        assert abs(float(dream_loss(n, d_in)) - float(ref)) <= TOL * abs(float(ref))


def test_peft_folder_parses_with_peft_and_loads_on_dream_to_the_same_loss(tmp_path):
    from peft import LoraConfig, PeftConfig, PeftModel

    m = make_dream()
    add_lora(m, RANK, ALPHA, targets="decoder_attn+text_aligner", dropout=0.0)
    randomize_adapters(m)
    d_in = dream_inputs(m)
    folder = save_lora(m, tmp_path / "peft")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = PeftConfig.from_pretrained(str(folder))
    assert isinstance(cfg, LoraConfig) or cfg.peft_type == "LORA"
    cfg = LoraConfig.from_pretrained(str(folder))
    assert cfg.r == RANK and cfg.lora_alpha == ALPHA and len(cfg.target_modules) == 2 * 5 + 2 * 4
    with torch.no_grad():
        ref = float(dream_loss(m, d_in))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = PeftModel.from_pretrained(make_dream(), str(folder)).eval()     # peft's own loader
        theirs = float(dream_loss(pm.get_base_model(), d_in))
        n = make_dream()
        load_lora(n, folder)
        mine = float(dream_loss(n, d_in))
        base = float(dream_loss(make_dream(), d_in))
    assert abs(base - ref) > 1e-3                                  # the adapter changes the loss
    assert abs(theirs - ref) <= TOL * abs(ref) and abs(mine - ref) <= TOL * abs(ref)


def test_sd3_transformer_default_targets_and_diffusers_loader(tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    cfg = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
               joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
               pos_embed_max_size=16)

    def fresh():
        torch.manual_seed(0)
        return SD3Transformer2DModel(**cfg).eval()

    g = torch.Generator().manual_seed(0)
    inp = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
               pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([3, 700]))
    s = fresh()
    add_lora(s, RANK, ALPHA)
    adapted = {n.rsplit(".", 1)[-1] for n, mod in s.named_modules() if hasattr(mod, "lora_A")}
    assert adapted == {"to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    randomize_adapters(s)
    with torch.no_grad():
        ours = s(**inp).sample
        f = save_lora(s, tmp_path / "sd3", format="diffusers")
        theirs = _diffusers_load(f, fresh(), prefix="transformer", pipeline=StableDiffusion3Pipeline)(**inp).sample
    assert rel_err(theirs, ours) <= TOL


def test_stable_diffusion_pipeline_load_lora_weights_reads_our_files(tmp_path):
    """``pipe.load_lora_weights`` of a tiny StableDiffusionPipeline built from configs (no tokenizer needed)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    u = _adapted_unet()
    inp = unet_inputs()
    ours = unet_out(u, inp)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                      num_hidden_layers=2, vocab_size=1000, projection_dim=32))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=make_unet(),
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    for fmt in ("diffusers", "kohya"):
        f = save_lora(u, tmp_path / fmt, format=fmt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=fmt)   # offline: name the file
        pipe.set_adapters([fmt])
        assert rel_err(unet_out(pipe.unet, inp), ours) <= TOL, fmt
    pipe.set_adapters(["diffusers"])
    pipe.fuse_lora(adapter_names=["diffusers"])
    pipe.unload_lora_weights()
    assert rel_err(unet_out(pipe.unet, inp), ours) <= TOL                    # diffusers' own fuse
