"""DREAM model: shapes, gradients, determinism, save/load, strict loading, input validation."""
import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dream
from dream.masking import mask_from_orders, sample_orders
from dream.models import DreamConfig
from tolerance import assert_2x, gemm_rel_tol

OFFICIAL_COUNTS = {"dream_b": 329_357_857, "dream_l": 635_989_793, "dream_h": 1_128_416_289,
                   "dream_g": 2_432_714_657}


def _inputs(model, B=3, ratio=0.6, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, cfg.seq_len, cfg.token_dim, generator=g)
    ids = torch.randint(1, cfg.clip_vocab_size - 2, (B, cfg.clip_context_length), generator=g)
    ids[:, 0] = cfg.clip_vocab_size - 2
    ids[:, -1] = cfg.clip_vocab_size - 1
    feats = torch.randn(B, cfg.text_max_len, cfg.text_embed_dim, generator=g)
    orders = sample_orders(B, cfg.seq_len, generator=g)
    mask = mask_from_orders(orders, int(round(ratio * cfg.seq_len)))
    return tokens, ids, feats, mask


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_param_counts_match_official_on_meta(name):
    with torch.device("meta"):
        m = dream.create_model(name)
    assert m.num_params() == OFFICIAL_COUNTS[name]


def test_keys_and_shapes_match_official_key_list(official_tiny):
    text = (official_tiny.parent / "official_dream_keys.txt").read_text().splitlines()
    section, want = None, {}
    for line in text:
        if line.startswith("## dream_base_txt_conditional"):
            section = "b"
        elif line.startswith("## dream_") or line.startswith("## Parameter"):
            section = None
        elif section == "b" and "\t" in line:
            k, shape = line.split("\t")[:2]
            want[k] = tuple(json.loads(shape))
    with torch.device("meta"):
        m = dream.create_model("dream_b")
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == want


def test_list_and_get_config():
    names = dream.list_models()
    for n in ("dream_test", "dream_tiny", "dream_b", "dream_l", "dream_h", "dream_g"):
        assert n in names
    assert dream.list_models("dream_?") == ["dream_b", "dream_g", "dream_h", "dream_l"]
    with pytest.raises(KeyError, match="unknown model"):
        dream.get_config("dream_x")
    with pytest.raises(KeyError, match="no shipped weights"):
        dream.create_model("dream_b", pretrained=True)


def test_config_json_round_trip(tmp_path):
    cfg = dream.get_config("dream_g")
    cfg.save(tmp_path / "config.json", arch="dream_g")
    assert DreamConfig.load(tmp_path / "config.json") == cfg
    d = cfg.to_dict()
    d["not_a_field"] = 1
    with pytest.raises(ValueError, match="not_a_field"):
        DreamConfig.from_dict(d)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.encoder_depth = 3


def test_module_shapes():
    m = dream.create_model("dream_test").eval()
    cfg = m.config
    tokens, ids, feats, mask = _inputs(m, B=2, ratio=0.5)
    n_vis = cfg.seq_len - int(mask[0].sum())
    h = m.forward_encoder(tokens, mask)
    assert h.shape == (2, cfg.buffer_size + n_vis, cfg.encoder_embed_dim)
    assert m.forward_encoder(tokens).shape == (2, cfg.buffer_size + cfg.seq_len, cfg.encoder_embed_dim)
    y = m.forward_text_aligner(feats)
    assert y.shape == (2, cfg.text_max_len, cfg.decoder_embed_dim)
    z = m.forward_decoder(h, mask, y)
    assert z.shape == (2, cfg.seq_len, cfg.decoder_embed_dim)
    e = m.encode_image(tokens, mask)
    t = m.encode_text(ids)
    assert e.shape == t.shape == (2, cfg.embed_dim)
    # unit vectors up to two float32 norms of length E (the normalisation's and this check's)
    unit = dict(rtol=gemm_rel_tol(torch.float32, cfg.embed_dim, depth=2), atol=0)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2), **unit)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2), **unit)
    out = m.diffloss.net(torch.randn(5, cfg.token_dim), torch.randint(0, 1000, (5,)), torch.randn(5, cfg.decoder_embed_dim))
    assert out.shape == (5, 2 * cfg.token_dim)
    assert m.unpatchify(tokens).shape == (2, cfg.vae_embed_dim, cfg.img_size // cfg.vae_stride,
                                           cfg.img_size // cfg.vae_stride)


def test_forward_dict_and_gates():
    m = dream.create_model("dream_test")
    tokens, ids, feats, mask = _inputs(m, ratio=0.6)
    out = m(tokens, ids, feats, mask, generator=torch.Generator().manual_seed(1))
    for k in ("loss", "diff_loss", "clip_loss", "diff_gate", "clip_gate", "mask_ratio"):
        assert k in out and out[k].dim() == 0
    assert out["diff_gate"] == 1 and out["clip_gate"] == 1
    # the model computes 1.0 * diff + 0.005 * clip: the same float32 ops, so exactly equal
    torch.testing.assert_close(out["loss"], out["diff_loss"] + 0.005 * out["clip_loss"], rtol=0, atol=0)
    # < 50 % masked: diffusion loss gated off (exactly 0); > 75 % masked: contrastive loss 0
    low = m(tokens, ids, feats, mask_from_orders(sample_orders(3, 16), 4))
    assert low["diff_loss"].item() == 0.0 and low["diff_gate"] == 0
    high = m(tokens, ids, feats, mask_from_orders(sample_orders(3, 16), 15))
    assert high["clip_loss"].item() == 0.0 and high["clip_gate"] == 0 and high["diff_loss"] > 0


def test_gradients_reach_every_trainable_parameter():
    m = dream.create_model("dream_test")
    with torch.no_grad():  # zero-initialised adaLN / final layers would block gradients to the trunk
        for p in m.diffloss.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens, ids, feats, mask = _inputs(m, ratio=0.6)
    m(tokens, ids, feats, mask, generator=torch.Generator().manual_seed(0))["loss"].backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # fake_latent is the official unused null-class buffer vector (zero gradient, as official)
    assert no_grad == ["fake_latent"], no_grad


def test_same_generator_same_loss_and_different_seed_differs():
    m = dream.create_model("dream_test").eval()
    tokens, ids, feats, mask = _inputs(m)
    a = m(tokens, ids, feats, mask, generator=torch.Generator().manual_seed(7))["loss"]
    b = m(tokens, ids, feats, mask, generator=torch.Generator().manual_seed(7))["loss"]
    c = m(tokens, ids, feats, mask, generator=torch.Generator().manual_seed(8))["loss"]
    assert a.item() == b.item() and a.item() != c.item()


def test_per_sample_masks_pad_the_encoder():
    """Rows with different visible counts (per-sample ratios) equal running each row alone."""
    m = dream.create_model("dream_test").eval()
    tokens, ids, feats, _ = _inputs(m, B=2)
    orders = sample_orders(2, 16, generator=torch.Generator().manual_seed(3))
    mask = mask_from_orders(orders, torch.tensor([6, 11]))
    m64 = copy.deepcopy(m).double()
    with torch.no_grad():
        e = m.encode_image(tokens, mask)
        y = m.forward_text_aligner(feats)
        h = m.forward_encoder(tokens, mask)
        z = m.forward_decoder(h, mask, y)
        for i in range(2):
            # a padded batch vs one row alone (other shapes, padded keys): 2x rule against the row in float64;
            # an embedding is E = 24 numbers, so with a floor of one reduction's bound (n = 256, the MLP width)
            row, rmask, ry = tokens[i:i + 1], mask[i:i + 1], feats[i:i + 1]
            assert_2x(e[i], m.encode_image(row, rmask)[0], m64.encode_image(row.double(), rmask)[0],
                      f"encode_image, row {i}", floor=gemm_rel_tol(torch.float32, 256))
            hi, hi64 = m.forward_encoder(row, rmask), m64.forward_encoder(row.double(), rmask)
            assert_2x(z[i], m.forward_decoder(hi, rmask, y[i:i + 1])[0],
                      m64.forward_decoder(hi64, rmask, m64.forward_text_aligner(ry.double()))[0], f"decoder, row {i}")


def test_save_load_round_trip_is_exact(tmp_path):
    m = dream.create_model("dream_test").eval()
    dream.save_pretrained(m, tmp_path / "ckpt")
    m2 = dream.create_model(tmp_path / "ckpt").eval()
    m3 = dream.create_model("dream_test", pretrained=tmp_path / "ckpt").eval()
    for other in (m2, m3):
        for (k, v), (k2, v2) in zip(m.state_dict().items(), other.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    tokens, ids, feats, mask = _inputs(m)
    assert torch.equal(m.encode_image(tokens, mask), m2.encode_image(tokens, mask))


@pytest.mark.parametrize("problem", ["missing", "extra", "shape"])
def test_strict_loading_names_the_key(tmp_path, problem):
    m = dream.create_model("dream_test")
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    if problem == "missing":
        del sd["decoder_norm.weight"]
        key = "decoder_norm.weight"
    elif problem == "extra":
        sd["surprise.weight"] = torch.zeros(1)
        key = "surprise.weight"
    else:
        sd["z_proj.weight"] = torch.zeros(3, 3)
        key = "z_proj.weight"
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        dream.create_model("dream_test", pretrained=tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError):
        dream.create_model("dream_test", pretrained=tmp_path / "nope.safetensors")


def test_official_pth_with_ema_entry_loads(tmp_path, official_tiny):
    sd = load_file(str(official_tiny / "model.safetensors"))
    torch.save({"model": {k: torch.zeros_like(v) for k, v in sd.items()},
                "model_ema": {"module." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ck.pth")
    from dream.models.convert import load_checkpoint_into
    from dream.parity import config_from_official

    cfg = config_from_official(json.loads((official_tiny / "config.json").read_text()))
    m = load_checkpoint_into(dream.DREAM(cfg), tmp_path / "ck.pth", prefer_ema=True)
    assert torch.equal(m.state_dict()["z_proj.weight"], sd["z_proj.weight"])


def test_bad_inputs_raise_clear_errors():
    m = dream.create_model("dream_test")
    tokens, ids, feats, mask = _inputs(m)
    with pytest.raises(ValueError, match="tokens must have shape"):
        m.encode_image(tokens[:, :5])
    with pytest.raises(TypeError, match="floating point"):
        m.encode_image(tokens.long())
    with pytest.raises(TypeError, match="mask must be bool"):
        m(tokens, ids, feats, mask.float())
    with pytest.raises(ValueError, match="text features"):
        m.forward_text_aligner(feats[..., :3])
    with pytest.raises(ValueError, match="text ids"):
        m.encode_text(ids.float())
    with pytest.raises(ValueError, match="batch sizes differ"):
        m(tokens, ids[:2], feats, mask)
