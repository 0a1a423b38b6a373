"""LoRA on DREAM: identity at init, the plain-math delta (alpha / r) B A, merge == unmerged, gradients only on
the adapter, targets and their guard, stacking, all-or-nothing loading, and sampling through the fast paths
(diffusion head and row decoding) with unmerged adapters."""
from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lora_helpers import dream_inputs, dream_loss, make_dream, make_unet, randomize_adapters, rel_err

from dream.adapters import (DREAM_PRESETS, LoraFileError, TargetError, active_adapters, add_lora, list_adapters,
                            load_lora, lora_parameters, merge_lora, resolve_targets, save_lora, set_adapters,
                            unmerge_lora)
from dream.sampling import MARSampler, SamplerConfig

RANK, ALPHA = 4, 8.0


def _state(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same_model(m: nn.Module, state: dict, text: str, attrs: set, grads: list) -> None:
    now = m.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert str(m) == text
    assert set(m.__dict__) == attrs
    assert [p.requires_grad for p in m.parameters()] == grads


# -----------------------------------------------------------------------------------------------
# targets
# -----------------------------------------------------------------------------------------------
def test_presets_select_the_documented_layers():
    m = make_dream()
    c = m.config
    assert len(resolve_targets(m)) == 5 * c.decoder_depth                            # default: decoder_attn
    assert resolve_targets(m, "decoder_attn")[:5] == ["decoder_blocks.0.self_attn.qkv",
                                                      "decoder_blocks.0.self_attn.proj",
                                                      "decoder_blocks.0.cross_attn.q",
                                                      "decoder_blocks.0.cross_attn.kv",
                                                      "decoder_blocks.0.cross_attn.proj"]
    assert len(resolve_targets(m, "decoder")) == 7 * c.decoder_depth
    assert len(resolve_targets(m, "text_aligner")) == 4 * c.text_aligner_depth
    assert len(resolve_targets(m, "encoder")) == 4 * c.encoder_depth
    assert len(resolve_targets(m, "diffloss")) == 3 * c.diffloss_depth + 4
    linears = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    assert resolve_targets(m, "all") == linears
    assert set(resolve_targets(m, "decoder_attn+diffloss")) == set(resolve_targets(m, "decoder_attn")) | set(
        resolve_targets(m, "diffloss"))
    # explicit names, suffixes and regexes
    assert resolve_targets(m, ["decoder_blocks.1.mlp.fc2"]) == ["decoder_blocks.1.mlp.fc2"]
    assert resolve_targets(m, ["cond_embed"]) == ["diffloss.net.cond_embed"]
    assert resolve_targets(m, [r"encoder_blocks\.0\.attn\..*"]) == ["encoder_blocks.0.attn.qkv",
                                                                   "encoder_blocks.0.attn.proj"]
    assert set(DREAM_PRESETS) == {"decoder_attn", "decoder", "text_aligner", "diffloss", "encoder", "all"}


def test_target_entries_that_match_nothing_raise_and_are_named():
    m = make_dream()
    with pytest.raises(TargetError) as e:
        add_lora(m, RANK, targets=["decoder_attn", "to_q", r"nothing\.here"])
    assert "'to_q'" in str(e.value) and "nothing" in str(e.value) and "decoder_attn'" not in str(e.value)
    with pytest.raises(TargetError, match="CrossAttentionBlock"):
        resolve_targets(m, ["decoder_blocks.0"])                       # a block, not a Linear
    assert not list_adapters(m) and not any(hasattr(x, "lora_A") for x in m.modules())
    with pytest.raises(TargetError, match="no default LoRA targets"):
        resolve_targets(nn.Sequential(nn.Linear(2, 2)))
    assert resolve_targets(nn.Sequential(nn.Linear(2, 2)), ["0"]) == ["0"]
    with pytest.raises(TargetError):                                    # peft would accept this list silently
        add_lora(make_unet(), RANK, targets=["to_q", "to_qq"])


# -----------------------------------------------------------------------------------------------
# the adapter's function
# -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_adapted_model_equals_base_at_init(variant):
    base, m = make_dream(), make_dream()
    add_lora(m, RANK, ALPHA, targets="all", **variant)
    inp = dream_inputs(m)
    with torch.no_grad():
        a, b = dream_loss(m, inp), dream_loss(base, inp)
    if variant:
        assert abs(float(a) - float(b)) <= 1e-6 * abs(float(b))    # DoRA: W m / ||W|| = W up to rounding
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("rslora", [False, True])
def test_adapted_linear_is_base_plus_scaled_BA(rslora):
    """Plain math: y = x (W + s B A)^T + b with s = alpha / r (rsLoRA: alpha / sqrt(r)), at weight w: w s."""
    m = make_dream()
    add_lora(m, RANK, ALPHA, targets=["decoder_blocks.0.cross_attn.kv"], use_rslora=rslora)
    randomize_adapters(m)
    layer = m.decoder_blocks[0].cross_attn.kv
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = ALPHA / (math.sqrt(RANK) if rslora else RANK)
    x = torch.randn(5, W.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (W + s * B @ A).T + b, rtol=1e-5, atol=1e-6)
        set_adapters(m, "default", 0.3)
        torch.testing.assert_close(layer(x), x @ (W + 0.3 * s * B @ A).T + b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}])
def test_merged_equals_unmerged_and_unmerge_restores(variant):
    m = make_dream()
    base_state = _state(m)
    add_lora(m, RANK, ALPHA, targets="all", **variant)
    randomize_adapters(m)
    inp = dream_inputs(m)
    with torch.no_grad():
        unmerged = dream_loss(m, inp)
        h = m.forward_encoder(inp["tokens"], inp["mask"])
        z = m.forward_decoder(h, inp["mask"], m.forward_text_aligner(inp["text_feats"]))
        merge_lora(m)
        assert rel_err(dream_loss(m, inp), unmerged) <= 1e-5
        z2 = m.forward_decoder(m.forward_encoder(inp["tokens"], inp["mask"]), inp["mask"],
                               m.forward_text_aligner(inp["text_feats"]))
        assert rel_err(z2, z) <= 1e-5
        unmerge_lora(m)
        assert rel_err(dream_loss(m, inp), unmerged) <= 1e-5
        for k, v in base_state.items():                               # base weights back (to rounding)
            mk = k if k in m.state_dict() else k.replace(k.rsplit(".", 1)[0], k.rsplit(".", 1)[0] + ".base_layer")
            torch.testing.assert_close(m.state_dict()[mk], v, rtol=0, atol=1e-6)
        fused = copy.deepcopy(m)
        merge_lora(fused, unload=True)
        assert not any(hasattr(x, "lora_A") for x in fused.modules()) and "peft_config" not in fused.__dict__
        assert list(fused.state_dict()) == list(base_state)
        assert rel_err(dream_loss(fused, inp), unmerged) <= 1e-5


def test_gradients_reach_only_adapter_tensors_and_the_optimizer_holds_only_them():
    from dream.train.optim import build_optimizer

    m = make_dream().train()
    add_lora(m, RANK, ALPHA, targets="decoder+diffloss+encoder", dropout=0.1)
    randomize_adapters(m)
    adapter = {id(p) for p in lora_parameters(m)}
    dream_loss(m, dream_inputs(m)).backward()
    for n, p in m.named_parameters():
        if id(p) in adapter:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n
    opt = build_optimizer(m, 1e-3)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == adapter


# -----------------------------------------------------------------------------------------------
# several adapters
# -----------------------------------------------------------------------------------------------
def test_loads_stack_with_weights_and_set_adapters_switches(tmp_path):
    a, b = make_dream(), make_dream()
    add_lora(a, RANK, ALPHA, targets="decoder_attn")
    add_lora(b, 2, 3.0, targets=["decoder_blocks.0.self_attn.qkv", "diffloss"])
    randomize_adapters(a, seed=1)
    randomize_adapters(b, seed=2)
    pa, pb = save_lora(a, tmp_path / "a"), save_lora(b, tmp_path / "b", format="kohya")
    m = make_dream()
    assert load_lora(m, pa, weight=0.5) == "a"
    assert load_lora(m, pb, name="style", weight=2.0) == "style"
    assert active_adapters(m) == {"a": 0.5, "style": 2.0}
    assert not any(x.training for x in m.modules())                   # an eval model stays in eval (dropouts)
    qkv = m.decoder_blocks[0].self_attn.qkv
    W = qkv.base_layer.weight
    da = a.decoder_blocks[0].self_attn.qkv.get_delta_weight("default")      # (alpha / r) B A of each source
    db = b.decoder_blocks[0].self_attn.qkv.get_delta_weight("default")
    x = torch.randn(3, W.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(qkv(x), F.linear(x, W + 0.5 * da + 2.0 * db, qkv.base_layer.bias),
                                   rtol=1e-5, atol=1e-6)
        set_adapters(m, ["style"], [1.0])
        torch.testing.assert_close(qkv(x), F.linear(x, W + db, qkv.base_layer.bias), rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="nope"):
        set_adapters(m, ["nope"])
    with pytest.raises(ValueError, match="already exists"):
        load_lora(m, pa, name="a")
    merge_lora(m)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        add_lora(m, RANK, name="third")


# -----------------------------------------------------------------------------------------------
# bad input: clear errors, model untouched
# -----------------------------------------------------------------------------------------------
def _corrupt(tmp_path, kind: str):
    src = make_dream()
    add_lora(src, RANK, ALPHA, targets="decoder_attn")
    randomize_adapters(src)
    from safetensors.torch import load_file, save_file

    if kind == "other_arch":
        u = make_unet()
        add_lora(u, RANK, ALPHA)
        return save_lora(u, tmp_path / "unet", format="diffusers"), "UNet2DConditionModel"
    if kind == "other_size":
        big = make_dream(decoder_embed_dim=96, encoder_embed_dim=96)
        add_lora(big, RANK, ALPHA)
        return save_lora(big, tmp_path / "big"), "shape"
    if kind == "kohya_foreign_keys":
        u = make_unet()
        add_lora(u, RANK, ALPHA)
        f = save_lora(u, tmp_path / "k.safetensors", format="kohya")
        sd = load_file(str(f))
        save_file({k.replace("lora_unet_", "lora_dream_"): v for k, v in sd.items()}, str(f))
        return f, "lora_dream_down_blocks"
    folder = save_lora(src, tmp_path / kind)
    w = folder / "adapter_model.safetensors"
    if kind == "truncated":
        data = w.read_bytes()
        w.write_bytes(data[: len(data) // 2])
        return folder, "truncated"
    if kind == "rank_mismatch":
        import json

        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["r"] = 8
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
        return folder, "r=8"
    sd = load_file(str(w))
    key = next(k for k in sd if k.endswith("cross_attn.q.lora_B.weight"))
    if kind == "missing_key":
        sd.pop(key)
        save_file(sd, str(w))
        return folder, "cross_attn.q.lora_B.weight missing"
    if kind == "shape":
        sd[key] = torch.zeros(7, RANK)
        save_file(sd, str(w))
        return folder, "cross_attn.q.lora_B: shape (7, 4)"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["other_arch", "other_size", "kohya_foreign_keys", "truncated", "rank_mismatch",
                                  "missing_key", "shape"])
@pytest.mark.parametrize("preloaded", [False, True])
def test_failed_load_names_the_problem_and_leaves_the_model_untouched(tmp_path, kind, preloaded):
    path, expect = _corrupt(tmp_path, kind)
    m = make_dream()
    if preloaded:                                        # an adapter already there must survive unchanged too
        add_lora(m, 2, targets="decoder_attn+diffloss", name="old")
        randomize_adapters(m)
        set_adapters(m, "old", 0.7)
    before = (_state(m), str(m), set(m.__dict__), [p.requires_grad for p in m.parameters()])
    adapters = dict(active_adapters(m))
    with pytest.raises(LoraFileError) as e:
        load_lora(m, path)
    assert expect in str(e.value), str(e.value)
    _same_model(m, *before)
    assert active_adapters(m) == adapters


def test_a_failure_inside_injection_is_rolled_back(tmp_path, monkeypatch):
    """Past validation, a failing step (here: copying the tensors) still leaves the model exactly as it was."""
    src = make_dream()
    add_lora(src, RANK, ALPHA, targets="decoder+diffloss")
    folder = save_lora(src, tmp_path / "ok")
    m = make_dream()
    add_lora(m, 2, targets="decoder_attn", name="old")
    before = (_state(m), str(m), set(m.__dict__), [p.requires_grad for p in m.parameters()])

    from dream.adapters import lora as lora_mod

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(lora_mod, "_activate", boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        load_lora(m, folder)
    _same_model(m, *before)
    monkeypatch.undo()
    assert load_lora(m, folder) == "ok" and set(active_adapters(m)) == {"old", "ok"}


def test_import_dream_without_peft_and_lora_calls_name_the_extra():
    code = ("import sys; sys.modules['peft'] = None\n"
            "import dream, dream.adapters\n"
            "m = dream.create_model('dream_test')\n"
            "try:\n    dream.adapters.add_lora(m, 4)\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "pip install 'dream[align]'" in out.stdout


# -----------------------------------------------------------------------------------------------
# sampling through the fast paths
# -----------------------------------------------------------------------------------------------
def _sample(model, seed: int = 0) -> torch.Tensor:
    c = model.config
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(2, c.text_max_len, c.text_embed_dim, generator=g)
    null = torch.randn(1, c.text_max_len, c.text_embed_dim, generator=g)
    s = MARSampler(model, SamplerConfig(num_iter=4, cfg=2.0, num_sampling_steps="10", clip_denoised=1.0))
    return s.sample(feats, null, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("targets", ["diffloss", "decoder_attn", "all"])
def test_sampling_with_an_unmerged_adapter_uses_it_and_equals_the_merged_model(targets):
    base = make_dream()
    m = make_dream()
    add_lora(m, RANK, ALPHA, targets=targets)
    randomize_adapters(m, std=0.2)
    m.eval()
    ref_base = _sample(base)
    unfused = _sample(m)
    assert rel_err(unfused, ref_base) > 1e-3                          # the adapter is not bypassed
    merged = copy.deepcopy(m)
    merge_lora(merged, unload=True)
    # x W^T + s (x A^T) B^T vs x (W + s B A)^T: float32 rounding, amplified along 4 AR x 10 diffusion steps
    assert rel_err(_sample(merged), unfused) <= 1e-3
    assert rel_err(_sample(m), unfused) == 0.0                        # cached view reused: same numbers
    set_adapters(m, "default", 0.0)                                   # a state change is seen by the cache
    assert rel_err(_sample(m), ref_base) <= 1e-5
    set_adapters(m, "default", 1.0)
    merge_lora(m)                                                     # merged in place (wrappers kept)
    assert rel_err(_sample(m), unfused) <= 1e-3


def test_token_sampler_follows_adapter_training_steps():
    """The diffusion sampler's weight cache sees an optimizer step on the adapter (version counters)."""
    from dream.sampling import TokenDiffusionSampler

    m = make_dream()
    add_lora(m, RANK, ALPHA, targets="diffloss")
    randomize_adapters(m)
    ts = TokenDiffusionSampler(m.diffloss.net, "10")
    z = torch.randn(3, m.config.decoder_embed_dim, generator=torch.Generator().manual_seed(0))
    first = ts.sample(z, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in lora_parameters(m):
            p.add_(0.05)
    second = ts.sample(z, generator=torch.Generator().manual_seed(1))
    fresh = TokenDiffusionSampler(m.diffloss.net, "10").sample(z, generator=torch.Generator().manual_seed(1))
    assert rel_err(second, first) > 1e-4 and torch.equal(second, fresh)
