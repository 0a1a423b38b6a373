"""The soft-token bank and its injection: DREAM (decoder text stream + the head's time shift, sampler CFG branches)
and diffusers (attention-processor wrapper on a tiny UNet and a tiny SD3 transformer built from configs)."""
import json

import pytest
import torch

import dream
from dream.align.soft_tokens import (DiffusersSoftTokens, SoftTokenBank, SoftTokenConfig, attach_dream, detach_dream,
                                     ema_update_, load_soft_tokens)

UNET_CONFIG = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownBlock2D",
                   "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                   cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4, sample_size=8)


def bank_for(dim=64, n_sets=2, time_bins=100, seed=0, std=0.5, **kw) -> SoftTokenBank:
    b = SoftTokenBank(SoftTokenConfig(dim=dim, n_sets=n_sets, time_bins=time_bins, init_std=std, **kw),
                      torch.Generator().manual_seed(seed))
    if time_bins:
        with torch.no_grad():
            b.t_tokens.weight.normal_(0, std, generator=torch.Generator().manual_seed(seed + 1))
    return b


# -----------------------------------------------------------------------------------------------
# the bank
# -----------------------------------------------------------------------------------------------
def test_bank_shapes_time_bins_and_parameter_count():
    b = bank_for(dim=8, n_sets=2, time_bins=100, n_layers=3)
    assert b.tokens.shape == (2, 3, 4, 8) and b.t_tokens.weight.shape == (100, 24)
    assert b.num_parameters() == 2 * 3 * 4 * 8 + 100 * 24
    assert "2 set(s) x 3 layer(s) x 4 tokens x 8" in b.describe() and f"{b.num_parameters():,}" in b.describe()
    assert b.time_bin(torch.tensor([0, 9, 10, 999, 1500, -3])).tolist() == [0, 0, 1, 99, 99, 0]
    sets, t = torch.tensor([1, 0, 1]), torch.tensor([5, 250, 999])
    out = b(sets, t, layer=2)
    assert out.shape == (3, 4, 8)
    ref = b.tokens[1, 2] + b.t_tokens.weight[99, 16:24]
    torch.testing.assert_close(out[2], ref)
    assert b(0).shape == (1, 4, 8)
    assert bank_for(time_bins=0)(torch.tensor([0, 1]), torch.tensor([3, 4])).shape == (2, 4, 64)


def test_bank_save_load_round_trip_and_shape_check(tmp_path):
    b = bank_for(dim=8, time_bins=10)
    b.save(tmp_path / "tok", {"step": 3})
    c = load_soft_tokens(tmp_path / "tok")
    assert c.config == b.config
    torch.testing.assert_close(c.tokens, b.tokens, rtol=0, atol=0)
    torch.testing.assert_close(c.t_tokens.weight, b.t_tokens.weight, rtol=0, atol=0)
    c2 = load_soft_tokens(tmp_path / "tok" / "soft_tokens.safetensors")
    torch.testing.assert_close(c2.tokens, b.tokens, rtol=0, atol=0)
    from safetensors.torch import save_file

    save_file({"tokens": torch.zeros(1, 1, 4, 8)}, str(tmp_path / "bad.safetensors"),
              metadata={"dream_soft_tokens": json.dumps(b.config.to_dict())})
    with pytest.raises(ValueError, match="do not match"):
        load_soft_tokens(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        load_soft_tokens(tmp_path / "nothing")


def test_ema_update_touches_only_the_bank_tensors():
    model = dream.create_model("dream_test").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    online, ema = bank_for(seed=1), bank_for(seed=2)
    e0 = [p.clone() for p in ema.parameters()]
    attach_dream(model, online)
    ema_update_(ema, online, 0.9)
    for p, q, o in zip(ema.parameters(), e0, online.parameters()):
        torch.testing.assert_close(p, 0.9 * q + 0.1 * o, rtol=0, atol=1e-6)
    detach_dream(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


# -----------------------------------------------------------------------------------------------
# DREAM
# -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = dream.create_model("dream_test").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.diffloss.net.named_parameters():
            if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def test_dream_tokens_join_the_text_stream_per_cfg_branch(model):
    y, pad = torch.randn(3, 8, 64), torch.zeros(3, 8, dtype=torch.bool)
    pad[:, 6:] = True
    assert model.extend_text_condition(y, pad)[0] is y                        # nothing attached: the inputs
    b = bank_for()
    for uncon2neg, uncond_set in ((False, 0), (True, 1)):
        attach_dream(model, b, uncon2neg=uncon2neg)
        yc, pc = model.extend_text_condition(y, pad, "cond")
        yu, pu = model.extend_text_condition(y, pad, "uncond")
        assert yc.shape == (3, 12, 64) and pc.shape == (3, 12)
        assert torch.equal(yc[:, :8], y) and torch.equal(pc[:, :8], pad) and not pc[:, 8:].any()
        torch.testing.assert_close(yc[:, 8:], b.tokens[0, 0].expand(3, -1, -1))
        torch.testing.assert_close(yu[:, 8:], b.tokens[uncond_set, 0].expand(3, -1, -1))
        assert model.extend_text_condition(y, None)[1] is None
    assert detach_dream(model) is b
    assert "soft_text" not in model._modules and "time_condition" not in model.diffloss.net._modules
    with pytest.raises(ValueError, match="decoder width"):
        attach_dream(model, bank_for(dim=32))


def test_dream_time_table_shifts_the_head_condition_in_forward_and_fused_paths(model):
    net = model.diffloss.net
    b = bank_for()
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(5, net.in_channels, generator=g), torch.randn(5, 64, generator=g)
    t = torch.tensor([0, 17, 250, 640, 999])
    with torch.no_grad():
        plain = net(x, t, z)
        attach_dream(model, b)
        shifted = net(x, t, z)
        ref = net.forward_cond(x, net.time_embed(t) + net.cond_embed(z + b.t_tokens.weight[t // 10]))
        torch.testing.assert_close(shifted, ref, rtol=0, atol=0)
        assert (shifted - plain).abs().max() > 1e-3
        steps = torch.tensor([3, 500, 998])
        fp = net.fused_params(steps, torch.device("cpu"), torch.float32)
        cemb = torch.nn.functional.linear(z[:1], *fp["cond"])
        mods = net.fused_modulations(fp, cemb, 0, 2)
        for s, tt in enumerate(steps.tolist()):
            y_ref = net.time_embed(torch.tensor([tt])) + net.cond_embed(z[:1] + b.t_tokens.weight[tt // 10])
            want = torch.nn.functional.linear(torch.nn.functional.silu(y_ref), *fp["ada"])
            torch.testing.assert_close(mods[s], want, rtol=1e-5, atol=1e-5)
    detach_dream(model)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, z), plain, rtol=0, atol=0)


@pytest.mark.parametrize("uncon2neg", [False, True])
def test_sampler_uses_psi_plus_for_cond_and_the_rule_for_uncond(model, uncon2neg):
    from dream.sampling import MARSampler, SamplerConfig

    c = model.config
    g = torch.Generator().manual_seed(4)
    feats, null = torch.randn(2, c.text_max_len, c.text_embed_dim, generator=g), torch.randn(1, c.text_max_len,
                                                                                            c.text_embed_dim,
                                                                                            generator=g)
    b = bank_for()
    attach_dream(model, b, uncon2neg=uncon2neg)
    try:
        s = MARSampler(model, SamplerConfig(num_iter=2, cfg=2.0, num_sampling_steps="4"))
        st = s.init_state(feats, null, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            y = model.forward_text_aligner(feats)
            y0 = model.forward_text_aligner(null.expand(2, -1, -1))
        torch.testing.assert_close(st.y, torch.cat([y, b.tokens[0, 0].expand(2, -1, -1)], 1))
        torch.testing.assert_close(st.y_null, torch.cat([y0, b.tokens[int(uncon2neg), 0].expand(2, -1, -1)], 1))
        out = s.sample(feats, null, generator=torch.Generator().manual_seed(0))
    finally:
        detach_dream(model)
    base = MARSampler(model, SamplerConfig(num_iter=2, cfg=2.0, num_sampling_steps="4")).sample(
        feats, null, generator=torch.Generator().manual_seed(0))
    assert out.shape == base.shape and (out - base).abs().max() > 1e-4


# -----------------------------------------------------------------------------------------------
# diffusers
# -----------------------------------------------------------------------------------------------
def make_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def unet_inputs(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)


def _block_outputs(unet, inp):
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, k=k: outs.__setitem__(k, o[0] if isinstance(o, tuple) else o))
             for k, m in [("down", unet.down_blocks[-1]), ("mid", unet.mid_block)]]
    with torch.no_grad():
        final = unet(*inp).sample
    for h in hooks:
        h.remove()
    return final, outs


def test_unet_processor_wrapper_shapes_groups_and_removal():
    unet = make_unet()
    inp = unet_inputs()
    ref, _ = _block_outputs(unet, inp)
    bank = SoftTokenBank(SoftTokenConfig(dim=32, n_sets=2, time_bins=100, backbone="unet", groups=("down", "mid")))
    st = DiffusersSoftTokens(unet, bank)
    assert st.names == ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
                        "mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    seen = []
    inner = st.model.attn_processors[st.names[0]].inner

    def spy(attn, hs, ehs=None, mask=None, *a, **k):
        seen.append(ehs.shape)
        return inner(attn, hs, ehs, mask, *a, **k)
    st.model.attn_processors[st.names[0]].inner = spy
    with torch.no_grad():
        out = unet(*inp).sample
    assert out.shape == ref.shape and seen == [(2, 9, 32)]                       # [BOS, 4 soft, 4 text]
    assert torch.equal(st.context.t, inp[1])                                    # t read by the pre-hook
    with st.use(enabled=False), torch.no_grad():                                # disabled: the wrapped processor
        torch.testing.assert_close(unet(*inp).sample, ref, rtol=0, atol=0)
    st.remove()
    with torch.no_grad():
        torch.testing.assert_close(unet(*inp).sample, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no cross-attention"):
        DiffusersSoftTokens(make_unet(), SoftTokenBank(SoftTokenConfig(dim=32, backbone="unet", groups=())))


def test_zero_tokens_change_the_unet_only_where_construction_says_so():
    """Zero tokens with a zero time table are NOT a no-op in a cross-attention: their keys are 0 (no key bias in
    SD's attn2), so each adds exp(0) to the softmax denominator and 0 to the numerator: the attention output is
    scaled by Z / (Z + n). What is unchanged by construction: every module before the first wrapped one. Here the
    tokens sit in the up blocks only, so the down and mid blocks' outputs are bit-identical, the output is not."""
    unet = make_unet()
    inp = unet_inputs()
    ref, ref_blocks = _block_outputs(unet, inp)
    bank = SoftTokenBank(SoftTokenConfig(dim=32, time_bins=100, init="zeros", backbone="unet", groups=("up",)))
    DiffusersSoftTokens(unet, bank)
    out, blocks = _block_outputs(unet, inp)
    for k in ("down", "mid"):
        torch.testing.assert_close(blocks[k], ref_blocks[k], rtol=0, atol=0)
    assert (out - ref).abs().max() > 1e-6


def test_zero_token_dilution_matches_plain_math_on_one_cross_attention():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    bank = SoftTokenBank(SoftTokenConfig(dim=6, n_tokens=3, init="zeros", backbone="unet"))
    from dream.align.soft_tokens import SoftTokenContext, SoftTokenProcessor

    proc = SoftTokenProcessor(attn.processor, bank, SoftTokenContext())
    g = torch.Generator().manual_seed(1)
    hs, ehs = torch.randn(1, 5, 8, generator=g), torch.randn(1, 7, 6, generator=g)
    with torch.no_grad():
        got = proc(attn, hs, ehs)
        q = attn.to_q(hs).view(1, 5, 2, 4).transpose(1, 2)
        k = attn.to_k(ehs).view(1, 7, 2, 4).transpose(1, 2)
        v = attn.to_v(ehs).view(1, 7, 2, 4).transpose(1, 2)
        e = torch.exp(q @ k.transpose(-1, -2) / 2.0)                             # scale 1 / sqrt(4)
        o = (e @ v) / (e.sum(-1, keepdim=True) + 3.0)                            # 3 zero keys: exp(0) each
        want = attn.to_out[0](o.transpose(1, 2).reshape(1, 5, 8))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_unet_gradients_reach_only_the_bank():
    from diffusers import DDIMScheduler

    from dream.align.soft_losses import pair_errors, softrepa_loss
    from dream.align.soft_pairs import UNetPairs

    unet = make_unet()
    for p in unet.parameters():
        p.requires_grad_(False)
    bank = SoftTokenBank(SoftTokenConfig(dim=32, time_bins=100, backbone="unet", per_layer=True, n_layers=2))
    st = DiffusersSoftTokens(unet, bank)
    pairs = UNetPairs(st, DDIMScheduler(num_train_timesteps=1000))
    g = torch.Generator().manual_seed(2)
    pb = pairs.prepare(torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 32, generator=g), g)
    pred = pairs.predict(pb, bank, torch.zeros(3, 3, dtype=torch.long))
    assert pred.shape == (3, 3, 4, 8, 8)
    softrepa_loss(pair_errors(pred, pb.target), dweight=10.0).backward()
    assert bank.tokens.grad.abs().sum() > 0
    assert bank.t_tokens.weight.grad[pb.t // 10].abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())


def test_sd3_joint_attention_tokens_per_layer_are_stripped_from_the_context():
    from diffusers import SD3Transformer2DModel

    cfg = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
               joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
               pos_embed_max_size=16)
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(**cfg).eval()
    for p in tr.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    inp = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
               pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([3, 700]))
    with torch.no_grad():
        ref = tr(**inp).sample
    bank = SoftTokenBank(SoftTokenConfig(dim=16, n_sets=2, n_layers=2, time_bins=100, init_std=0.5, backbone="sd3"))
    st = DiffusersSoftTokens(tr, bank)
    assert st.names == ["transformer_blocks.0.attn.processor", "transformer_blocks.1.attn.processor"]
    ctx_len = []
    hook = tr.transformer_blocks[0].register_forward_hook(lambda m, a, o: ctx_len.append(o[0].shape[1]))
    out = tr(**inp).sample
    hook.remove()
    assert out.shape == ref.shape and ctx_len == [5]                           # the context keeps its 5 tokens
    assert (out - ref).abs().max() > 1e-5
    out.pow(2).mean().backward()
    assert bank.tokens.grad[0].abs().sum() > 0 and bank.tokens.grad[1].abs().sum() == 0   # set 0 by default
    with pytest.raises(ValueError, match="no joint attention"):
        DiffusersSoftTokens(tr, SoftTokenBank(SoftTokenConfig(dim=16, n_layers=5, backbone="sd3")))
