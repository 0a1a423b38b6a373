"""``dream train --lora``: only the adapter trains, checkpoints hold the adapter and trainer state, resume is
exact (with dropout: LoRA dropout 0.1 and the model's own 0.1 attention / projection dropout), the final adapter
is a peft folder that reproduces the trained model on a fresh base."""
from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import dream_inputs, dream_loss

import dream
from dream.adapters import load_lora
from dream.train import TrainConfig
from dream.train.checkpoint import load_checkpoint

TINY = {"clip_vocab_size": 49408, "img_size": 32, "vae_stride": 1, "patch_size": 8, "vae_embed_dim": 3}
LORA = {"rank": 4, "alpha": 8, "targets": "decoder_attn+diffloss", "dropout": 0.1}


def _cfg(**kw):
    base = dict(model="dream_test", model_overrides=TINY, text_encoder="random", batch_size=4, steps=4,
                log_every=1, ckpt_every=2, precision="fp32", lr=1e-2, warmup_steps=1, ema_decay=0.9,
                masking={"preset": "constant", "ratio": 0.75}, steps_per_epoch=1, lora=LORA)
    base.update(kw)
    return TrainConfig(**base)


def _fresh_base(seed: int = 0):
    torch.manual_seed(seed)                       # as the Trainer builds it
    return dream.create_model("dream_test", **TINY)


def test_lora_run_trains_only_the_adapter_and_resumes_exactly(tmp_path):
    from dream.train.loop import Trainer

    full = Trainer(_cfg(ckpt_every=0), tmp_path / "full")
    n_adapter = sum(1 for n, p in full.model.named_parameters() if p.requires_grad)
    held = [p for g in full.opt.param_groups for p in g["params"]]
    assert len(held) == n_adapter and all("lora_" in n for n, p in full.model.named_parameters() if p.requires_grad)
    full.fit()
    a = Trainer(_cfg(steps=2), tmp_path / "part")
    a.fit()
    b = Trainer(_cfg(steps=4), tmp_path / "part", resume=True)
    assert b.step == 2
    b.fit()
    sf, sb = full.model.state_dict(), b.model.state_dict()
    assert list(sf) == list(sb)
    for k in sf:
        assert torch.equal(sf[k], sb[k]), k
    ef, eb = full.ema.state_dict(), b.ema.state_dict()
    assert set(ef) == {n for n, p in full.model.named_parameters() if p.requires_grad}
    for k in ef:
        assert torch.equal(ef[k], eb[k]), k
    # the base did not move; the adapter did (B started at 0)
    base = _fresh_base().state_dict()
    for k, v in sf.items():
        plain = k.replace(".base_layer.", ".")
        if "lora_" not in k:
            assert torch.equal(v, base[plain]), k
    assert any(v.abs().sum() > 0 for k, v in sf.items() if "lora_B" in k)
    # a checkpoint holds the adapter (not the base), the trainer state and the base's fingerprint
    ck = load_checkpoint(tmp_path / "part")
    assert set(ck["model"]) == {"adapter", "base_sha256"}
    assert set(ck["model"]["adapter"]) == set(ef)
    assert len(ck["optimizer"]["state"]) == n_adapter
    # export: a peft folder (no full model) that reproduces the trained model on a fresh base
    assert (tmp_path / "full" / "lora" / "adapter_config.json").exists()
    assert (tmp_path / "full" / "lora_ema" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "full" / "model").exists()
    fresh = _fresh_base().eval()
    load_lora(fresh, tmp_path / "full" / "lora")
    inp = dream_inputs(fresh)
    with torch.no_grad():
        assert float(dream_loss(fresh, inp)) == pytest.approx(float(dream_loss(full.model.eval(), inp)), rel=1e-6)


def test_resume_refuses_a_different_base(tmp_path):
    from dream.train.loop import Trainer

    Trainer(_cfg(steps=2), tmp_path / "run").fit()
    with pytest.raises((ValueError, RuntimeError), match="different base model"):   # every checkpoint refused
        Trainer(_cfg(steps=4, seed=1), tmp_path / "run", resume=True)


def test_dream_train_cli_lora_flag(tmp_path, capsys):
    from dream.cli import main

    cfg = _cfg(steps=2, ckpt_every=2, lora=None)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    rc = main(["train", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "run"),
               "--lora", "rank=2,alpha=4,targets=text_aligner,use_rslora=true"])
    assert rc == 0 and "run/lora" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["lora"] == {"rank": 2, "alpha": 4.0, "targets": "text_aligner", "use_rslora": True}
    from peft import LoraConfig

    lc = LoraConfig.from_pretrained(str(tmp_path / "run" / "lora"))
    assert lc.r == 2 and lc.lora_alpha == 4.0 and lc.use_rslora and all("text_aligner" in t for t in lc.target_modules)
    with pytest.raises(SystemExit, match="rank"):
        main(["train", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "bad"), "--lora", "alpha=4"])
