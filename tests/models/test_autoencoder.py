"""Tests for dream.models.vae / vae_convert: parity with diffusers' AutoencoderKL (built from configs, random
weights), LDM/MAR key conversion, strict loading errors, latent scaling/patchify and the tokenizers.

Tolerances (tests/tolerance.py): our VAE and diffusers' are two float32 implementations of the same network,
compared by flash-attention's 2x rule against diffusers' VAE run in float64 (our error <= 2 x diffusers' own
float32 error + the rounding of the float64 result), so no threshold depends on the CPU or thread count."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL  # independent reference (resolved at collection)
from safetensors.torch import load_file, save_file

from dream.models import vae_convert
from dream.models.patchify import patchify, unpatchify
from dream.models.autoencoder import AutoencoderKL, VAEConfig, load_vae_state_dict
from dream.models.tokenizers import PixelTokenizer, VAETokenizer, create_tokenizer, estimate_latent_scale
from tolerance import U, assert_2x, assert_rel_close, gemm_rel_tol

# reduced SD-like (2 levels), custom 3-level layout with down/up attention and a shift, tiny KL-16-like (5 levels)
SD_SMALL = VAEConfig.sd(block_out_channels=(32, 64), norm_num_groups=8, sample_size=32)
CUSTOM3 = VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=3,
                    encoder_attn_levels=(2,), decoder_attn_levels=(1,), scaling_factor=0.5, shift_factor=0.1,
                    patch_size=1, sample_size=16)
KL16_TINY = VAEConfig.mar_kl16(block_out_channels=(16, 16, 32, 32, 64), norm_num_groups=8, sample_size=32)
CASES = {"sd_small": (SD_SMALL, 32), "custom3": (CUSTOM3, 16), "kl16_tiny": (KL16_TINY, 32)}


def diffusers_kwargs(cfg: VAEConfig) -> dict:
    d = cfg.to_diffusers_config()
    return {k: v for k, v in d.items() if not k.startswith("_") and k != "dream_patch_size"}


def make_diffusers_vae(cfg: VAEConfig, seed: int = 0) -> DiffusersAutoencoderKL:
    """Independent reference: diffusers' AutoencoderKL with random weights (GroupNorm affines perturbed too)."""
    torch.manual_seed(seed)
    ref = DiffusersAutoencoderKL(**diffusers_kwargs(cfg)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return ref


def images(b: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def ref_outputs(ref: DiffusersAutoencoderKL, x: torch.Tensor, z: torch.Tensor):
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        return post.mean, post.logvar, ref.decode(z).sample


def assert_matches_reference(ours: AutoencoderKL, ref: DiffusersAutoencoderKL, size: int) -> None:
    """Posterior mean, log-variance and decoded image of our VAE vs diffusers': 2x rule, diffusers in float64
    (same weights, same inputs) as the truth."""
    x = images(2, size)
    z = torch.randn(2, ours.config.latent_channels, size // ours.config.stride, size // ours.config.stride)
    mean, logvar, dec = ref_outputs(ref, x, z)
    truth = ref_outputs(copy.deepcopy(ref).double(), x.double(), z.double())
    with torch.no_grad():
        post = ours.encode(x)
        out = ours.decode(z)
    for name, o, r, t in zip(("mean", "logvar", "decode"), (post.mean, post.logvar, out), (mean, logvar, dec), truth):
        assert_2x(o, r, t, f"VAE {name} vs diffusers")


# ---------------------------------------------------------------------------------------------------------
# Full-size layouts on the meta device
# ---------------------------------------------------------------------------------------------------------


def test_full_sd_config_keys_and_params_match_diffusers():
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig.sd()).state_dict()
        ref = DiffusersAutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
            norm_num_groups=32, sample_size=256).state_dict()
    assert len(ours) == 248
    n = sum(v.numel() for v in ours.values())
    assert round(n / 1e6, 2) == 83.65
    assert n == sum(v.numel() for v in ref.values())
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    # hand-written names from environment.md Appendix A
    expected = {
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
        "decoder.up_blocks.3.resnets.0.conv_shortcut.weight": (128, 256, 1, 1),
        "decoder.mid_block.attentions.0.to_out.0.weight": (512, 512),
        "encoder.down_blocks.2.downsamplers.0.conv.weight": (512, 512, 3, 3),
        "decoder.up_blocks.2.upsamplers.0.conv.weight": (256, 256, 3, 3),
    }
    for k, shape in expected.items():
        assert tuple(ours[k].shape) == shape, k
    assert "encoder.down_blocks.3.downsamplers.0.conv.weight" not in ours
    assert "decoder.up_blocks.3.upsamplers.0.conv.weight" not in ours


def test_full_mar_kl16_config_ldm_keys_and_params():
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig.mar_kl16())
        ldm = model.ldm_state_dict()
        ref = DiffusersAutoencoderKL(**diffusers_kwargs(VAEConfig.mar_kl16())).state_dict()
    assert len(ldm) == 312
    assert sum(v.numel() for v in ldm.values()) == 66_456_019
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.items()}
    # hand-written names from mar_diffusion_spec.md Appendix A
    expected = {
        "encoder.down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.down.4.attn.0.norm.bias": (512,),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.3.block.0.conv1.weight": (256, 512, 3, 3),
        "decoder.up.4.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
        "quant_conv.weight": (32, 32, 1, 1),
        "post_quant_conv.weight": (16, 16, 1, 1),
    }
    for k, shape in expected.items():
        assert tuple(ldm[k].shape) == shape, k
    assert not any(k.startswith("decoder.up.") and ".attn." in k for k in ldm)
    assert "encoder.down.4.downsample.conv.weight" not in ldm and "decoder.up.0.upsample.conv.weight" not in ldm


def test_config_from_ldm_ddconfig_matches_presets():
    mar = {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
           "resolution": 256, "z_channels": 16, "in_channels": 3, "out_ch": 3, "double_z": True}
    cfg = VAEConfig.from_ldm_config(mar, embed_dim=16, decoder_attn_levels=())
    assert cfg.architecture() == VAEConfig.mar_kl16().architecture()
    sd = {"ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "resolution": 256,
          "z_channels": 4}
    assert VAEConfig.from_ldm_config(sd, embed_dim=4).architecture() == VAEConfig.sd().architecture()
    assert VAEConfig.sd().stride == 8 and VAEConfig.sd().token_dim == 16
    assert VAEConfig.mar_kl16().stride == 16 and VAEConfig.mar_kl16().token_dim == 16
    assert VAEConfig.from_dict(json.loads(json.dumps(CUSTOM3.to_dict()))) == CUSTOM3
    with pytest.raises(ValueError, match="bogus"):
        VAEConfig.from_dict({"bogus": 1})


# ---------------------------------------------------------------------------------------------------------
# Numerical parity with diffusers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_diffusers_state_dict_parity(case):
    cfg, size = CASES[case]
    ref = make_diffusers_vae(cfg)
    ours = AutoencoderKL(cfg).eval()
    assert load_vae_state_dict(ours, ref.state_dict()) == []
    assert_matches_reference(ours, ref, size)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ldm_layout_round_trip_and_parity(case):
    cfg, size = CASES[case]
    ref = make_diffusers_vae(cfg, seed=3)
    ldm = vae_convert.diffusers_to_ldm(ref.state_dict())
    assert vae_convert.detect_layout(ldm) == "ldm"
    back = vae_convert.ldm_to_diffusers(ldm)
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    ours = AutoencoderKL(cfg).eval()
    load_vae_state_dict(ours, ldm)
    assert_matches_reference(ours, ref, size)


def test_ldm_names_agree_with_diffusers_converter_and_hand_written():
    """Our LDM naming is re-converted by diffusers' own single-file converter (an independent implementation)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ref = make_diffusers_vae(SD_SMALL)
    ldm = vae_convert.diffusers_to_ldm(ref.state_dict())
    conv = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()},
                                      diffusers_kwargs(SD_SMALL))
    ref_sd = ref.state_dict()
    assert set(conv) == set(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(conv[k].reshape(v.shape), v), k
    # two levels: decoder.up.0 is the highest resolution (64 -> 32 channels), up.1 the lowest
    assert tuple(ldm["decoder.up.0.block.0.nin_shortcut.weight"].shape) == (32, 64, 1, 1)
    assert tuple(ldm["decoder.up.1.upsample.conv.weight"].shape) == (64, 64, 3, 3)
    assert tuple(ldm["encoder.mid.attn_1.q.weight"].shape) == (64, 64, 1, 1)
    assert torch.equal(ldm["decoder.up.1.block.2.conv1.weight"], ref_sd["decoder.up_blocks.0.resnets.2.conv1.weight"])
    assert torch.equal(ldm["encoder.norm_out.bias"], ref_sd["encoder.conv_norm_out.bias"])
    assert torch.equal(ldm["decoder.mid.attn_1.proj_out.weight"][:, :, 0, 0],
                       ref_sd["decoder.mid_block.attentions.0.to_out.0.weight"])


def test_wrapped_and_prefixed_checkpoints(tmp_path):
    ref = make_diffusers_vae(SD_SMALL)
    ldm = vae_convert.diffusers_to_ldm(ref.state_dict())
    full = {"first_stage_model." + k: v for k, v in ldm.items()}
    full["model.diffusion_model.conv_in.weight"] = torch.zeros(2, 2)  # rest of a full SD checkpoint: ignored
    full["first_stage_model.loss.logvar"] = torch.zeros(())          # LDM training loss: ignored
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": full, "global_step": 10}, path)
    ours = AutoencoderKL.from_pretrained(path, config=SD_SMALL)
    assert_matches_reference(ours, ref, 32)
    assert load_vae_state_dict(AutoencoderKL(SD_SMALL), full) == ["loss.logvar", "model.diffusion_model.conv_in.weight"]

    ref16 = make_diffusers_vae(KL16_TINY)
    mar_path = tmp_path / "kl16.pth"
    torch.save({"model": {"module." + k: v for k, v in vae_convert.diffusers_to_ldm(ref16.state_dict()).items()}},
               mar_path)
    ours16 = AutoencoderKL.from_pretrained(mar_path, config=KL16_TINY)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in ours16.parameters())
    assert_matches_reference(ours16, ref16, 32)
    ours64 = AutoencoderKL.from_pretrained(mar_path, config=KL16_TINY, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in ours64.parameters())
    x = images(1, 32)
    with torch.no_grad():
        # float64 on both sides: the float64 load equals diffusers' float64 VAE up to float64 rounding
        # (c sqrt(n) u64 per conv, n = 9 x 64 channels = 576, ~20 convs / norms / attention in sequence)
        ref64 = copy.deepcopy(ref16).double()
        truth = ref64.quant_conv(ref64.encoder(x.double()))
        assert_rel_close(ours64.encode_moments(x.double()), truth, gemm_rel_tol(torch.float64, 9 * 64, depth=20),
                         "float64 VAE moments")
        # and the float32 load stays within 2 x diffusers' own float32 error of it
        assert_2x(ours16.encode_moments(x), ref16.quant_conv(ref16.encoder(x)), truth, "float32 VAE moments")
    with pytest.raises(ValueError, match="match no preset"):
        AutoencoderKL.from_pretrained(mar_path)  # tiny channels: no preset applies without a config


def test_deprecated_attention_names_load():
    ref = make_diffusers_vae(SD_SMALL)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in ref.state_dict().items():
        for new, dep in old.items():
            k = k.replace(f".{new}.", f".{dep}.")
        sd[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in sd
    ours = AutoencoderKL(SD_SMALL).eval()
    load_vae_state_dict(ours, sd)
    assert_matches_reference(ours, ref, 32)


def test_diffusers_folders_both_ways(tmp_path):
    ref = make_diffusers_vae(CUSTOM3)
    ref.save_pretrained(tmp_path / "ref")  # diffusers' own writer
    ours = AutoencoderKL.from_pretrained(tmp_path / "ref")
    assert ours.config.architecture() == CUSTOM3.architecture()
    assert (ours.config.scaling_factor, ours.config.shift_factor) == (0.5, 0.1)
    assert_matches_reference(ours, ref, 16)
    # a bare weights file needs an explicit config when no config.json is next to it
    bare = tmp_path / "bare.safetensors"
    save_file(ref.state_dict(), bare)
    assert_matches_reference(AutoencoderKL.from_pretrained(bare, config=CUSTOM3), ref, 16)
    # our writer is readable by diffusers
    ours.save_pretrained(tmp_path / "ours")
    reread = DiffusersAutoencoderKL.from_pretrained(tmp_path / "ours").eval()
    assert_matches_reference(ours, reread, 16)


# ---------------------------------------------------------------------------------------------------------
# Strict loading errors
# ---------------------------------------------------------------------------------------------------------


def test_missing_unexpected_misshaped_keys_are_named():
    good = AutoencoderKL(SD_SMALL).state_dict()
    sd = dict(good)
    del sd["decoder.conv_out.bias"]
    with pytest.raises(ValueError, match=r"missing: \['decoder.conv_out.bias'\]"):
        load_vae_state_dict(AutoencoderKL(SD_SMALL), sd)
    sd = dict(good, **{"encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected: \['encoder.extra.weight'\]"):
        load_vae_state_dict(AutoencoderKL(SD_SMALL), sd)
    sd = dict(good, **{"encoder.conv_in.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"encoder.conv_in.bias: checkpoint \(7,\) vs model \(32,\)"):
        load_vae_state_dict(AutoencoderKL(SD_SMALL), sd)
    mixed = dict(good, **{"encoder.mid.block_1.norm1.weight": torch.zeros(64)})
    with pytest.raises(ValueError, match="mixes LDM keys"):
        load_vae_state_dict(AutoencoderKL(SD_SMALL), mixed)


def test_wrong_layout_is_named():
    with torch.device("meta"):
        kl16 = AutoencoderKL(VAEConfig.mar_kl16()).ldm_state_dict()
        sd_model = AutoencoderKL(VAEConfig.sd())
    with pytest.raises(ValueError) as info:
        load_vae_state_dict(sd_model, kl16)
    msg = str(info.value)
    assert "wrong layout" in msg and "MAR KL-16 layout" in msg and "SD KL-f8 layout" in msg
    assert "'latent_channels': 16" in msg
    # the presets are recognised from the weights alone (LDM or diffusers layout, with SD's prefix)
    assert VAEConfig.from_state_dict(kl16) == VAEConfig.mar_kl16()
    sd_prefixed = {"first_stage_model." + k: v for k, v in sd_model.ldm_state_dict().items()}
    assert VAEConfig.from_state_dict(sd_prefixed) == VAEConfig.sd()
    assert VAEConfig.from_state_dict(sd_model.state_dict()) == VAEConfig.sd()
    with pytest.raises(ValueError, match="wrong layout"):
        load_vae_state_dict(AutoencoderKL(SD_SMALL), make_diffusers_vae(KL16_TINY).state_dict())
    with pytest.raises(FileNotFoundError):
        AutoencoderKL.from_pretrained("/nonexistent/kl16.ckpt")


# ---------------------------------------------------------------------------------------------------------
# Token layout and tokenizers
# ---------------------------------------------------------------------------------------------------------


def test_patchify_matches_official_fixture(official_tiny):
    io = load_file(str(official_tiny / "io.safetensors"))
    tokens = patchify(io["latents"], 2)
    assert torch.equal(tokens, io["x_tokens"])
    assert torch.equal(unpatchify(tokens, 2, 4), io["latents"])
    x = torch.randn(3, 5, 6, 4)
    assert torch.equal(unpatchify(patchify(x, 2), 2, 5, grid_hw=(3, 2)), x)


def test_vae_tokenizer_matches_diffusers_with_scale_and_shift():
    for cfg, size in (CASES["sd_small"], CASES["custom3"]):
        ref = make_diffusers_vae(cfg)
        ref64 = copy.deepcopy(ref).double()
        vae = AutoencoderKL(cfg)
        load_vae_state_dict(vae, ref.state_dict())
        tok = VAETokenizer(vae)
        x = images(2, size)
        p, s = cfg.patch_size, cfg.stride
        tokens = tok.encode(x, sample=False)
        assert tokens.shape == (2, tok.seq_len(size), cfg.latent_channels * p * p)
        assert tokens.shape == (2, (size // s // p) ** 2, tok.token_dim)
        eps = torch.randn((2, cfg.latent_channels, size // s, size // s), generator=torch.Generator().manual_seed(7))

        def expected(ref, x):
            """diffusers' posterior mode and sample (the same N(0, 1) draw), scaled, shifted and patchified."""
            mean, logvar, _ = ref_outputs(ref, x, torch.zeros(1, cfg.latent_channels, 1, 1, dtype=x.dtype))
            mode = patchify((mean - cfg.shift_factor) * cfg.scaling_factor, p)
            sample = patchify((mean + torch.exp(0.5 * logvar) * eps.to(x.dtype) - cfg.shift_factor)
                              * cfg.scaling_factor, p)
            return mode, sample

        (expect, expect_s), (truth, truth_s) = expected(ref, x), expected(ref64, x.double())
        assert_2x(tokens, expect, truth, "tokenizer mode vs diffusers")
        # posterior sample with an explicit generator == mean + std * N(0, 1) from the same seed
        sampled = tok.encode(x, generator=torch.Generator().manual_seed(7))
        assert_2x(sampled, expect_s, truth_s, "tokenizer sample vs diffusers")
        # decode inverts the scale/shift before the decoder
        with torch.no_grad():
            z = unpatchify(tokens, p, cfg.latent_channels) / cfg.scaling_factor + cfg.shift_factor
            dec_ref, dec_truth = ref.decode(z).sample, ref64.decode(z.double()).sample
        out = tok.decode(tokens)
        assert out.shape == (2, 3, size, size)
        assert_2x(out, dec_ref, dec_truth, "tokenizer decode vs diffusers")


def test_vae_tokenizer_sampling_determinism_and_moments():
    tok = create_tokenizer("vae_test")
    x = images(2, 16)
    a = tok.encode(x, generator=torch.Generator().manual_seed(0))
    b = tok.encode(x, generator=torch.Generator().manual_seed(0))
    c = tok.encode(x, generator=torch.Generator().manual_seed(1))
    mode = tok.encode(x, sample=False)
    assert torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, mode)
    assert a.shape == (2, 16, 16) and a.dtype == torch.float32
    tok64 = VAETokenizer(copy.deepcopy(tok.vae).double())  # the VAE may run in another dtype; tokens are fp32
    t64 = tok64.encode(x, sample=False)
    assert t64.dtype == torch.float32
    # t64 is the float64 encoder's mode rounded to float32, then scaled by the float32 scaling factor: three
    # roundings, (1 + u)^3 - 1 < 3u relative ...
    with torch.no_grad():
        truth = patchify((tok64.vae.encode(x.double()).mean - tok.config.shift_factor) * tok.config.scaling_factor,
                         tok.patch_size)
    assert_rel_close(t64, truth, 3 * U[torch.float32], "float64 VAE tokens vs their float32 rounding")
    # ... and the float32 tokens are within 2 x the float32 error of diffusers' VAE with the same weights
    ref = DiffusersAutoencoderKL(**diffusers_kwargs(tok.config)).eval()
    ref.load_state_dict(tok.vae.state_dict())
    with torch.no_grad():
        expect = patchify((ref.encode(x).latent_dist.mean - tok.config.shift_factor) * tok.config.scaling_factor,
                          tok.patch_size)
    assert_2x(mode, expect, truth, "float32 VAE tokens")
    assert tok64.decode(t64).dtype == torch.float32
    moments = tok.encode_moments(x)
    assert moments.shape == (2, 8, 8, 8)
    assert torch.equal(tok.tokens_from_moments(moments, generator=torch.Generator().manual_seed(0)), a)
    assert torch.equal(tok.tokens_from_moments(moments, sample=False), mode)
    # (t / s + shift - shift) * s: with shift 0 two roundings, |error| <= ((1 + u)^2 - 1)|t| < 3u|t|
    assert tok.config.shift_factor == 0.0
    torch.testing.assert_close(tok.latents_to_tokens(tok.tokens_to_latents(mode)), mode,
                               rtol=3 * U[torch.float32], atol=0)
    # logvar is clamped to [-30, 20]
    big = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], dim=1)
    g = torch.Generator().manual_seed(0)
    expect = torch.exp(torch.tensor(10.0)) * torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    # 0 + exp(0.5 * 20) * eps, then the same scaling: the same float32 ops on the same values, so exactly equal
    assert torch.equal(tok.tokens_from_moments(big, generator=g), tok.latents_to_tokens(expect))


def test_tokenizer_input_validation():
    tok = create_tokenizer("vae_test")
    for value, bad in ((1.0005, False), (-1.0005, False), (1.01, True), (-1.01, True)):
        x = torch.zeros(1, 3, 16, 16)
        x[0, 1, 3, 5] = value
        if bad:
            with pytest.raises(ValueError, match=r"\[-1, 1\]"):
                tok.encode(x)
        else:
            tok.encode(x)  # inside the 1e-3 tolerance
    with pytest.raises(ValueError, match="channels"):
        tok.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="not divisible by 4"):
        tok.encode(torch.zeros(1, 3, 18, 18))
    with pytest.raises(ValueError, match="floating point"):
        tok.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="tokens must be"):
        tok.decode(torch.zeros(1, 16, 12))
    with pytest.raises(ValueError, match="not divisible"):
        tok.seq_len(18)


def test_pixel_tokenizer_round_trip_exact(tmp_path):
    tok = PixelTokenizer(4, image_size=16)
    x = images(2, 16)
    t = tok.encode(x)
    assert t.shape == (2, 16, 48) and tok.token_dim == 48 and tok.seq_len() == 16
    assert torch.equal(t, patchify(x, 4)) and torch.equal(tok.decode(t), x)
    assert torch.equal(tok.tokens_from_moments(tok.encode_moments(x)), t)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tok.encode(x * 2)
    tok.save_pretrained(tmp_path / "pix")
    again = create_tokenizer(str(tmp_path / "pix"))
    assert isinstance(again, PixelTokenizer) and again.to_config_dict() == tok.to_config_dict()
    assert create_tokenizer("pixel_p8").token_dim == 192
    assert create_tokenizer({"tokenizer_type": "pixel", "patch_size": 2}).token_dim == 12


def test_tokenizer_save_load_and_factory(tmp_path):
    tok = create_tokenizer({"tokenizer_type": "vae", "preset": "test", "vae": {"scaling_factor": 0.3}})
    assert tok.config.scaling_factor == 0.3 and tok.stride == 2 and tok.patch_size == 2
    tok.save_pretrained(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["tokenizer_type"] == "vae"
    x = images(2, 16)
    for again in (VAETokenizer.from_pretrained(tmp_path / "tok"), create_tokenizer(str(tmp_path / "tok"))):
        assert again.config == tok.config
        assert torch.equal(again.encode(x, sample=False), tok.encode(x, sample=False))
    # a diffusers-format folder through the factory: patch size defaults to 16 // stride
    tok.vae.save_pretrained(tmp_path / "diff")
    d = json.loads((tmp_path / "diff" / "config.json").read_text())
    del d["dream_patch_size"]
    (tmp_path / "diff" / "config.json").write_text(json.dumps(d))
    assert create_tokenizer(str(tmp_path / "diff")).patch_size == 8
    # path + latent-convention override; architecture overrides are refused
    tok2 = create_tokenizer({"tokenizer_type": "vae", "path": str(tmp_path / "tok"), "vae": {"patch_size": 1}})
    assert tok2.token_dim == 4 and torch.equal(tok2.vae.state_dict()["quant_conv.weight"],
                                                tok.vae.state_dict()["quant_conv.weight"])
    with pytest.raises(ValueError, match="differs"):
        create_tokenizer({"path": str(tmp_path / "tok"), "vae": {"latent_channels": 8}})
    with pytest.raises(ValueError, match="unknown tokenizer"):
        create_tokenizer("no_such_tokenizer")
    with pytest.raises(ValueError, match=r"unknown keys \['pth'\]"):
        create_tokenizer({"tokenizer_type": "vae", "pth": "/x"})
    with pytest.warns(UserWarning, match="randomly initialised"):
        create_tokenizer({"tokenizer_type": "vae", "preset": "sd", "vae": {"block_out_channels": [32, 32],
                                                                            "norm_num_groups": 8}})


def test_estimate_latent_scale_is_inverse_std():
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    batches = [images(2, 16, seed=s) for s in range(2)]
    got = estimate_latent_scale(vae, batches, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = torch.cat([vae.encode(b).sample(g).flatten() for b in batches])
    # the same float32 samples, summed in float64 on both sides: the one-pass variance (sum z^2 - (sum z)^2 / n)
    # has relative error ~ n u kappa^2 with kappa^2 = 1 + mean^2 / var (Chan, Golub & LeVeque, "Algorithms for
    # computing the sample variance", The American Statistician 37(3), 1983), sqrt(n) u probabilistically;
    # 1 / std halves it
    z = z.double()
    kappa2 = 1.0 + float(z.mean() ** 2 / z.var())
    assert got == pytest.approx(1.0 / z.std().item(), rel=gemm_rel_tol(torch.float64, z.numel()) * kappa2)


def test_tokenizer_config_must_match_vae():
    vae = AutoencoderKL(VAEConfig.tiny())
    with pytest.raises(ValueError, match="differs"):
        VAETokenizer(vae, dataclasses.replace(VAEConfig.tiny(), latent_channels=8))
    assert VAETokenizer(vae, dataclasses.replace(VAEConfig.tiny(), patch_size=1)).token_dim == 4
