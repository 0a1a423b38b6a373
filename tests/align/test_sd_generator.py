"""DiffusersGenerator on tiny random Stable Diffusion folders built from configs (a latent one with a VAE and a
pixel-space one without): loading through load_generator (folder and tag), deterministic batched sampling that
equals the stock StableDiffusionPipeline, LoRA fine-tuning that trains only the adapter and lowers the denoising loss,
merge, and adapter files that diffusers' own loader reads back."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from sd_helpers import IMAGE, hf_clip_tokenizer, save_sd_folder, unet_probe, write_clip_tokenizer

from dream.align.generators import LoraTrainConfig, load_generator
from dream.align.sd import DiffusersGenerator, unet_targets

PROMPTS = ["a red square", "two blue circles", "a green triangle left of a yellow star"]
SAMPLER = {"num_inference_steps": 3, "guidance_scale": 2.0}
U32 = 2.0 ** -24                       # float32 unit roundoff


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    tok = hf_clip_tokenizer(write_clip_tokenizer(root / "tok"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"latent": save_sd_folder(root / "latent", tok, latent=True),
                "pixel": save_sd_folder(root / "pixel", tok, latent=False)}


def _gen(folders, kind, **kw) -> DiffusersGenerator:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_generator(folders[kind], **{"batch_size": 4, "sampler": SAMPLER, **kw})


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _tol_2x(ours32, ref32, truth64) -> float:
    """The 2x rule (flash-attention's test acceptance rule): our float32 result may be off the float64 truth by at
    most twice the error of the reference float32 computation, plus the rounding of the truth to float32."""
    scale = truth64.abs().max()
    return float(2 * (ref32.double() - truth64).abs().max() / scale + U32)


def _err(a, truth64) -> float:
    return float((a.double() - truth64).abs().max() / truth64.abs().max())


def _randomize_lora(unet, std=0.05, seed=3):
    """Random adapter weights (B starts at 0 and a few steps leave it small): merge and file tests then compare a
    clearly non-zero adapter."""
    from dream.adapters import lora_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.add_(std * torch.randn(p.shape, generator=g))


def _short(**kw) -> LoraTrainConfig:
    return LoraTrainConfig(**{"rank": 4, "alpha": 8.0, "lr": 1e-3, "min_steps": 2, "max_steps": 2, "batch_size": 2,
                              **kw})


# ---- loading and sampling --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["latent", "pixel"])
def test_generate_is_deterministic_per_seed_and_batched(folders, kind):
    gen = _gen(folders, kind, batch_size=2)
    assert isinstance(gen, DiffusersGenerator) and (gen.vae is None) == (kind == "pixel")
    a = gen.generate(PROMPTS, seed=0)
    assert a.shape == (3, 3, IMAGE, IMAGE) and a.dtype == torch.float32
    assert float(a.min()) >= -1 and float(a.max()) <= 1 and float(a.std()) > 0.05
    assert torch.equal(gen.generate(PROMPTS, seed=0), a)
    assert _rel(gen.generate(PROMPTS, seed=1), a) > 0.1
    # batches of 2 draw from one generator in order: the first batch equals a run over those prompts alone
    assert torch.equal(gen.generate(PROMPTS[:2], seed=0), a[:2])
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="empty prompt list"):
        gen.generate([], seed=0)


def test_latent_sampling_equals_the_stock_pipeline(folders):
    """Our loop against diffusers' StableDiffusionPipeline.__call__ (same folder, seed, steps, CFG): the stock
    pipeline returns (x / 2 + 0.5).clamp(0, 1), whose two roundings (the + 0.5 and, when mapped back, the - 1 after
    an exact * 2) are at most 2^-24 each on [0, 1]: the images agree to 2^-23."""
    gen = _gen(folders, "latent")
    ours = gen.generate(PROMPTS, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = gen.pipe(PROMPTS, generator=torch.Generator().manual_seed(5), output_type="pt", **SAMPLER).images
    assert float((stock * 2 - 1 - ours).abs().max()) <= 2 * U32
    # without CFG (guidance 1) as well
    gen1 = _gen(folders, "latent", sampler={"num_inference_steps": 2, "guidance_scale": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock1 = gen.pipe(PROMPTS[:1], generator=torch.Generator().manual_seed(2), output_type="pt",
                          num_inference_steps=2, guidance_scale=1.0).images
    assert float((stock1 * 2 - 1 - gen1.generate(PROMPTS[:1], seed=2)).abs().max()) <= 2 * U32


def test_loading_errors_and_a_shipped_diffusers_tag(folders, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        DiffusersGenerator.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown sampler settings"):
        _gen(folders, "latent", sampler={"num_iter": 4})
    # a table entry of kind "diffusers" dispatches to DiffusersGenerator with its sampler settings as defaults
    from dream.models import pretrained

    assert "diffusers" in pretrained.KINDS
    cfg = pretrained.PretrainedCfg(tag="sd_test.tiny", kind="diffusers", folder=str(folders["latent"].resolve()),
                                   files={}, sampler={"num_inference_steps": 2, "guidance_scale": 3.0})
    monkeypatch.setitem(pretrained._TABLE, "sd_test.tiny", cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = load_generator("sd_test.tiny", sampler={"guidance_scale": 1.5})
    assert isinstance(gen, DiffusersGenerator)
    assert gen.sampler["num_inference_steps"] == 2 and gen.sampler["guidance_scale"] == 1.5


def test_unet_targets_map_dream_presets_to_the_unet_default(folders):
    assert unet_targets("decoder") is None and unet_targets("decoder_attn+text_aligner") is None
    assert unet_targets(["to_q"]) == ["to_q"] and unet_targets("attn") == "attn"
    gen = _gen(folders, "latent")
    linear = unet_targets("all", gen.unet)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2" in linear and "time_embedding.linear_1" in linear
    assert all(isinstance(gen.unet.get_submodule(n), torch.nn.Linear) for n in linear)
    gen.finetune_lora(PROMPTS[:2], gen.generate(PROMPTS[:2], 0), _short(), torch.Generator().manual_seed(0))
    adapted = {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0"
               for n, m in gen.unet.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"to_q", "to_k", "to_v", "to_out.0"}          # LoraTrainConfig's "decoder" -> diffusers' attn


# ---- LoRA fine-tuning ------------------------------------------------------------------------------------------
def _probe_loss(gen, prompts, images, seed=123) -> float:
    """The epsilon-prediction MSE of the UNet on the pairs at fixed noise and five fixed timesteps per image,
    written out from diffusers' formulation (VAE posterior mean x scaling factor; DDPM add_noise)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(gen.pipe.scheduler.config)
    with torch.no_grad():
        z = images if gen.vae is None else gen.vae.encode(images).latent_dist.mean * gen.vae.config.scaling_factor
        ts = torch.tensor([50, 250, 450, 650, 850])
        z, emb = z.repeat_interleave(5, 0), gen.encode_prompts(prompts).repeat_interleave(5, 0)
        t = ts.repeat(len(prompts))
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
        pred = gen.unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=emb).sample
        return float(F.mse_loss(pred, noise))


def _base_state(gen) -> dict:
    """Every non-adapter tensor of the UNet, text encoder and VAE by its plain name (peft's base_layer dropped)."""
    out = {}
    for comp in ("unet", "text_encoder", "vae"):
        m = getattr(gen.pipe, comp)
        if m is None:
            continue
        for n, p in list(m.named_parameters()) + list(m.named_buffers()):
            if "lora_" not in n:
                out[f"{comp}.{n.replace('.base_layer', '')}"] = p.detach().clone()
    return out


def test_finetune_trains_only_the_adapter_and_lowers_the_loss_on_its_pairs(folders):
    """Two pairs repeated for 30 steps at a high learning rate: the denoising loss on those pairs, measured at fixed
    noise and timesteps (not the training draws), must fall by more than 5 % (about 10 % here: a random UNet's
    attention LoRA first removes the untrained output's bias; real denoising takes far more steps). The base
    weights of the UNet, text encoder and VAE stay bit-identical and only LoRA tensors require grad."""
    gen = _gen(folders, "latent")
    prompts = PROMPTS[:2]
    images = gen.generate(prompts, seed=0)
    before, loss0 = _base_state(gen), _probe_loss(gen, prompts, images)
    info = gen.finetune_lora(prompts, images, _short(rank=8, lr=1e-2, min_steps=30, max_steps=30),
                             torch.Generator().manual_seed(0))
    assert info["steps"] == 30 and info["pairs"] == 2 and len(info["losses"]) == 30
    assert all(torch.isfinite(torch.tensor(info["losses"])))
    after = _base_state(gen)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    trainable = [n for n, p in gen.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in gen.pipe.text_encoder.parameters())
    loss1 = _probe_loss(gen, prompts, images)
    assert loss1 < 0.95 * loss0, (loss0, loss1)


def test_finetune_is_deterministic_for_a_generator_seed_in_pixel_space(folders):
    """The same generator seed gives the same losses and adapter (a pixel-space UNet; the base stays bit-identical)."""
    from dream.adapters import adapter_state_dict

    images = _gen(folders, "pixel").generate(PROMPTS[:2], 0)

    def run(seed):
        gen = _gen(folders, "pixel")
        before = _base_state(gen)
        info = gen.finetune_lora(PROMPTS[:2], images, _short(), torch.Generator().manual_seed(seed))
        assert all(torch.equal(_base_state(gen)[k], v) for k, v in before.items())
        return info["losses"], adapter_state_dict(gen.unet)

    (la, sa), (lb, sb), (lc, _) = run(0), run(0), run(1)
    assert la == lb and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert la != lc                        # another seed: other pairs / noise / timesteps / adapter init


def test_caption_dropout_and_v_prediction_train(folders, tmp_path):
    """The optional branches: captions replaced by the empty prompt, and a v-prediction scheduler (target = the
    velocity): training runs and only the adapter changes."""
    from diffusers import DDIMScheduler

    gen = _gen(folders, "latent", caption_dropout=0.5)
    gen.pipe.scheduler = DDIMScheduler.from_config(gen.pipe.scheduler.config, prediction_type="v_prediction")
    before = _base_state(gen)
    info = gen.finetune_lora(PROMPTS, gen.generate(PROMPTS, 0), _short(), torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(info["losses"])))
    assert all(torch.equal(_base_state(gen)[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="caption_dropout"):
        _gen(folders, "latent", caption_dropout=1.0)


@pytest.mark.parametrize("kind", ["latent", "pixel"])
def test_merge_gives_the_unmerged_output(folders, kind):
    """merge_lora fuses W + s B A into plain layers; the merged UNet's output equals the unmerged adapter's within
    the 2x rule against the unmerged UNet evaluated in float64."""
    from dream.adapters import list_adapters

    gen = _gen(folders, kind)
    gen.finetune_lora(PROMPTS, gen.generate(PROMPTS, 0), _short(), torch.Generator().manual_seed(0))
    _randomize_lora(gen.unet)
    base = unet_probe(_gen(folders, kind).unet)
    unmerged = unet_probe(gen.unet)
    truth = unet_probe(copy.deepcopy(gen.unet).double())
    gen.merge_lora()
    merged = unet_probe(gen.unet)
    assert list_adapters(gen.unet) == [] and not any(hasattr(m, "lora_A") for m in gen.unet.modules())
    tol = _tol_2x(merged, unmerged, truth)
    assert _err(merged, truth) <= tol
    assert _rel(unmerged, base) > 100 * tol                # the adapter matters: a skipped merge would fail
    gen.generate(PROMPTS[:1], 0)                           # still samples after the wrappers are gone


@pytest.mark.parametrize("kind", ["latent", "pixel"])
def test_saved_adapters_load_with_diffusers_and_with_load_lora(folders, kind, tmp_path):
    """The diffusers-format file loads with the stock StableDiffusionPipeline.load_lora_weights (diffusers' own
    loader, into a freshly loaded pipeline) and gives our UNet's output; the peft folder reloads through
    load_lora; both within the 2x rule against our adapted UNet in float64."""
    from diffusers import StableDiffusionPipeline

    gen = _gen(folders, kind)
    gen.finetune_lora(PROMPTS, gen.generate(PROMPTS, 0), _short(), torch.Generator().manual_seed(0))
    _randomize_lora(gen.unet)
    ours = unet_probe(gen.unet)
    truth = unet_probe(copy.deepcopy(gen.unet).double())
    f = gen.save_lora(tmp_path / "lora_diffusers", format="diffusers")
    peft_dir = gen.save_lora(tmp_path / "lora", format="peft")
    assert f.name == "pytorch_lora_weights.safetensors" and (peft_dir / "adapter_config.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(str(folders[kind]), safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True,
                                                       **({} if kind == "latent" else {"vae": None}))
        pipe.load_lora_weights(str(f.parent), weight_name=f.name)
    theirs = unet_probe(pipe.unet)
    tol = _tol_2x(theirs, ours, truth)
    assert _err(theirs, truth) <= tol
    other = _gen(folders, kind)
    other.load_lora(peft_dir)
    assert _err(unet_probe(other.unet), truth) <= tol
    assert _rel(ours, unet_probe(_gen(folders, kind).unet)) > 100 * tol


def test_soft_tokens_load_into_the_generator(folders, tmp_path):
    """Soft tokens trained for a diffusers UNet load into the generator: sampling changes with them (they enter the
    cross-attention), unloading gives the plain samples back bit for bit, a file that does not fit (another width)
    raises and leaves the tokens loaded before in place, and tokens replace tokens instead of stacking."""
    from dream.align.soft_tokens import SoftTokenBank, SoftTokenConfig

    gen = _gen(folders, "pixel")
    dim = gen.unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    good = SoftTokenBank(SoftTokenConfig(dim=dim, n_sets=2, backbone="unet", init_std=1.0), generator=g)
    other = SoftTokenBank(SoftTokenConfig(dim=dim, n_sets=2, backbone="unet", init_std=1.0), generator=g)
    wide = SoftTokenBank(SoftTokenConfig(dim=dim + 8, backbone="unet"))
    paths = {n: b.save(tmp_path / n) for n, b in (("good", good), ("other", other), ("wide", wide))}
    plain = gen.generate(PROMPTS, 0)
    gen.load_soft_tokens(paths["good"])
    with_tokens = gen.generate(PROMPTS, 0)
    assert (with_tokens - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="width"):
        gen.load_soft_tokens(paths["wide"])
    assert torch.equal(gen.generate(PROMPTS, 0), with_tokens)
    gen.load_soft_tokens(paths["other"])
    gen.load_soft_tokens(paths["good"])                   # replaces "other": the same samples as "good" alone
    assert torch.equal(gen.generate(PROMPTS, 0), with_tokens)
    gen.load_soft_tokens(paths["good"], uncon2neg=True)   # CFG's unconditional half uses psi-
    assert not torch.equal(gen.generate(PROMPTS, 0), with_tokens)
    gen.unload_soft_tokens()
    assert torch.equal(gen.generate(PROMPTS, 0), plain)
