"""Soft-token training on a tiny DREAM pipeline: the batched pair predictions against a per-pair loop on the model's
public API, gradients only in the bank, chunk-size invariance of the step, exact resume, tiny end-to-end runs of
both methods (trainer and ``dream align``), loading tokens into a pipeline with a LoRA, and the CLI flags."""
import json

import pytest
import torch

import dream
from dream.align.soft_pairs import DreamPairs
from dream.align.soft_tokens import DiffusersSoftTokens, SoftTokenBank, SoftTokenConfig, load_soft_tokens
from dream.align.soft_train import SoftTokenTrainer, SoftTrainConfig, hard_negative_batch
from dream.data.shapes import ShapesWorld, spec_key
from dream.models.tokenizers import PixelTokenizer
from dream.pipeline import DreamPipeline

PIX = {"clip_vocab_size": 49408, "img_size": 32, "vae_stride": 1, "patch_size": 8, "vae_embed_dim": 3,
       "num_sampling_steps": "5", "attn_dropout": 0.0, "proj_dropout": 0.0}
TINY = dict(steps=4, batch_size=3, val_every=2, val_batches=1, log_every=1, ckpt_every=2, lr_interval=2)


def tiny_pipe(seed=0) -> DreamPipeline:
    torch.manual_seed(seed)
    model = dream.create_model("dream_test", **PIX)
    with torch.no_grad():
        for p in model.diffloss.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return DreamPipeline(model, PixelTokenizer(8, 32), text_encoder="random", use_padding_mask=True)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipe()


def test_hard_negative_batches_hold_distinct_captions_of_one_scene():
    world = ShapesWorld()
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        images, caps, specs = hard_negative_batch(world, 6, g, (0.0, 1.0, 0.0, 0.0))
        assert images.shape == (6, 3, 32, 32) and -1 <= float(images.min()) and float(images.max()) <= 1
        assert len({spec_key(s) for s in specs}) == 6
        assert specs[0]["type"] == "count"
        counts = [s["entities"][0]["count"] for s in specs[1:] if s["entities"][0]["shape"] == specs[0]["entities"][0]
                  ["shape"] and s["entities"][0]["colour"] == specs[0]["entities"][0]["colour"]]
        assert counts and all(c != specs[0]["entities"][0]["count"] for c in counts)   # other counts, same objects


def test_pair_predictions_equal_a_per_pair_loop(pipe):
    """e_ij batched (encoder once per image, decoder once per pair, text columns trimmed) == each pair run alone."""
    m = pipe.model.eval()
    pairs = DreamPairs(pipe)
    images, caps, _ = hard_negative_batch(ShapesWorld(), 3, torch.Generator().manual_seed(1))
    enc = pairs.encode(images, caps)
    pb = pairs.prepare(enc, torch.Generator().manual_seed(2), t=300)
    bank = SoftTokenBank(SoftTokenConfig(dim=64, n_sets=2, time_bins=100, init_std=0.5),
                         torch.Generator().manual_seed(3))
    with torch.no_grad():
        bank.t_tokens.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    sets = torch.tensor([[0, 1, 1], [1, 0, 1], [1, 1, 0]])
    with torch.no_grad():
        got = pairs.predict(pb, bank, sets)
        feats, pad = pipe.text.features(caps)
        tokens = pipe.tokenizer.encode(images)
        mask = pb.cond["mask"]
        net, diff = m.diffloss.net, m.diffloss.train_diffusion
        ab = float(diff.alphas_cumprod[300])
        for i in range(3):
            h = m.forward_encoder(tokens[i:i + 1], mask[i:i + 1])
            x0 = tokens[i][mask[i]]
            eps = pb.cond["noise"][i]
            x_t = ab ** 0.5 * x0 + (1 - ab) ** 0.5 * eps
            for j in range(3):
                y = torch.cat([m.forward_text_aligner(feats[j:j + 1], pad[j:j + 1]), bank.tokens[sets[i, j], 0][None]], 1)
                p = torch.cat([pad[j:j + 1], torch.zeros(1, 4, dtype=torch.bool)], 1)
                z = m.forward_decoder(h, mask[i:i + 1], y, p)[0][mask[i]]
                t = torch.full((z.shape[0],), 300)
                c = z + bank.t_tokens.weight[30]
                want = net(x_t, t, c)[:, : x0.shape[1]]
                torch.testing.assert_close(got[i, j], want, rtol=1e-4, atol=1e-5)
    assert torch.equal(pb.target, pb.cond["noise"])


def _trainer(pipe, tmp_path, name, **kw):
    cfg = SoftTrainConfig(**{**TINY, **kw})
    return SoftTokenTrainer(cfg, tmp_path / name, pipeline=pipe, progress=False)


@pytest.mark.parametrize("method", ["softrepa", "agsm"])
def test_gradients_reach_only_the_bank_and_the_ema_moves_only_tokens(pipe, tmp_path, method):
    tr = _trainer(pipe, tmp_path, method, method=method, ema_decay=0.5)
    model_before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    bank_before = tr.bank.tokens.detach().clone()
    ema_before = None if tr.ema is None else tr.ema.tokens.detach().clone()
    tr.train_step()
    assert all(p.grad is None for p in pipe.model.parameters())
    assert tr.bank.tokens.grad is not None and tr.bank.tokens.grad.abs().sum() > 0
    assert [id(p) for g in tr.opt.param_groups for p in g["params"]] == [id(p) for p in tr.bank.parameters()]
    after = pipe.model.state_dict()
    assert set(after) == set(model_before) and all(torch.equal(after[k], model_before[k]) for k in after)
    assert not torch.equal(tr.bank.tokens, bank_before)
    if method == "agsm":
        assert tr.bank.tokens.shape[0] == 2 and tr.bank.tokens.grad[1].abs().sum() > 0   # psi- trained on negatives
        torch.testing.assert_close(tr.ema.tokens, 0.5 * ema_before + 0.5 * tr.bank.tokens.detach(), rtol=0,
                                   atol=1e-7)


def test_null_init_starts_every_token_at_the_aligned_null_prompt(pipe, tmp_path):
    tr = _trainer(pipe, tmp_path, "null", method="agsm", init="null")
    with torch.no_grad():
        want = pipe.model.forward_text_aligner(*pipe.text.null(1))[0, 0]
    torch.testing.assert_close(tr.bank.tokens, want.expand_as(tr.bank.tokens), rtol=0, atol=0)
    torch.testing.assert_close(tr.ema.tokens, tr.bank.tokens, rtol=0, atol=0)        # ema_init "copy"
    with pytest.raises(ValueError, match="unknown init"):
        SoftTrainConfig(init="bos")


@pytest.mark.parametrize("method", ["softrepa", "agsm"])
def test_step_gradient_does_not_depend_on_the_chunk_size(pipe, tmp_path, method):
    grads = []
    for chunk in (0, 1, 2):
        tr = _trainer(pipe, tmp_path, f"{method}{chunk}", method=method, chunk_rows=chunk, g_neg=0.5)
        rec = tr.train_step()
        grads.append((tr.bank.tokens.grad.clone(), rec["loss"]))
    for g, loss in grads[1:]:
        torch.testing.assert_close(g, grads[0][0], rtol=1e-4, atol=1e-7)
        assert abs(loss - grads[0][1]) <= 1e-5 * abs(grads[0][1])


@pytest.mark.parametrize("method", ["softrepa", "agsm"])
def test_tiny_end_to_end_run_and_exact_resume(pipe, tmp_path, method):
    rep = _trainer(pipe, tmp_path, "straight", method=method).run()
    out = tmp_path / "straight"
    for f in ("config.json", "checkpoint.pt", "metrics.jsonl", "val.jsonl", "report.json", "loss.png",
              "diagnostics.png", "val.png", "captions.json", "tokens/soft_tokens.safetensors", "tokens/soft_tokens.json"):
        assert (out / f).exists(), f
    assert rep["steps"] == 4 and len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / "tokens" / "soft_tokens.json").read_text())["config"]["method"] == method
    tr = _trainer(pipe, tmp_path, "resumed", method=method)
    for _ in range(2):
        tr.train_step()
    tr._save()
    with pytest.raises(FileExistsError):
        _trainer(pipe, tmp_path, "resumed", method=method)
    tr2 = SoftTokenTrainer(SoftTrainConfig(**{**TINY, "method": method}), tmp_path / "resumed", resume=True,
                           pipeline=pipe, progress=False)
    assert tr2.step == 2
    tr2.run()
    a, b = load_soft_tokens(out / "tokens"), load_soft_tokens(tmp_path / "resumed" / "tokens")
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)


def test_pipeline_loads_soft_tokens_with_a_lora_and_saves_them(pipe, tmp_path):
    from dream.adapters import add_lora

    prompts = ["two red circles", "a blue square"]
    p = tiny_pipe()
    base = p.generate(prompts, num_iter=2, seed=3)
    bank = SoftTokenBank(SoftTokenConfig(dim=64, n_sets=2, init_std=1.0), torch.Generator().manual_seed(0))
    bank.save(tmp_path / "tok")
    p.load_soft_tokens(tmp_path / "tok")
    soft = p.generate(prompts, num_iter=2, seed=3)
    assert (soft - base).abs().max() > 1e-3
    p.load_soft_tokens(tmp_path / "tok", uncon2neg=True)
    assert (p.generate(prompts, num_iter=2, seed=3) - soft).abs().max() > 1e-4
    p.load_soft_tokens(tmp_path / "tok")
    add_lora(p.model, rank=2, targets="decoder")                      # soft tokens + LoRA together
    with torch.no_grad():
        for n, q in p.model.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    both = p.generate(prompts, num_iter=2, seed=3)
    assert (both - soft).abs().max() > 1e-4
    p.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "soft_tokens" / "soft_tokens.safetensors").exists()
    q = DreamPipeline.from_pretrained(tmp_path / "saved")
    assert "soft_text" in q.model._modules
    torch.testing.assert_close(q.generate(prompts, num_iter=2, seed=3), both, rtol=1e-4, atol=1e-4)
    q.unload_soft_tokens()
    p.unload_soft_tokens()
    torch.testing.assert_close(q.generate(prompts, num_iter=2, seed=3), p.generate(prompts, num_iter=2, seed=3),
                               rtol=1e-4, atol=1e-4)


def test_cli_align_sample_and_geneval_with_soft_tokens(tmp_path, capsys):
    from dream.cli import main

    folder = tiny_pipe().save_pretrained(tmp_path / "pipe")
    sets = ["steps=2", "batch_size=3", "val_every=2", "val_batches=1", f"model={folder}"]
    assert main(["align", "agsm", "--out", str(tmp_path / "run"), "--quiet", "--no-tensorboard", "--set", *sets]) == 0
    assert "held-out positive-pair error" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["align", "agsm", "--out", str(tmp_path / "run"), "--quiet", "--no-tensorboard", "--set", *sets])
    assert main(["align", "agsm", "--out", str(tmp_path / "run"), "--resume", "--quiet", "--no-tensorboard"]) == 0
    tokens = tmp_path / "run" / "tokens"
    assert load_soft_tokens(tokens).config.n_sets == 2
    assert main(["sample", "--model", str(folder), "--soft-tokens", str(tokens), "--uncon2neg", "--num-iter", "2",
                 "--out", str(tmp_path / "s"), "two red circles"]) == 0
    assert json.loads((tmp_path / "s" / "samples.json").read_text())["soft_tokens"] == str(tokens)
    with pytest.raises(SystemExit, match="soft-tokens"):
        main(["sample", "--model", str(folder), "--soft-tokens", str(tmp_path / "none"), "--out", str(tmp_path / "s"),
              "a red square"])
    assert main(["eval", "geneval-shapes", "--model", str(folder), "--soft-tokens", str(tokens), "--prompts", "4",
                 "--num-real", "16", "--quiet", "--out", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["settings"]["soft_tokens"] == str(tokens) and "over_count_rate" in rep


class TinySD:
    """A Stable-Diffusion-1.x-shaped pipeline in pixel space: a tiny UNet built from a config, a DDPM scheduler,
    no VAE, and ``encode_prompt`` from a fixed random word table (BOS at position 0)."""

    def __init__(self):
        from diffusers import DDPMScheduler, UNet2DConditionModel

        torch.manual_seed(0)
        self.unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, in_channels=3,
                                         out_channels=3, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                         norm_num_groups=8, attention_head_dim=4, sample_size=32).eval()
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.vae = None
        self.table = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))

    def encode_prompt(self, prompts, device, num_images_per_prompt, do_classifier_free_guidance):
        ids = [[0] + [1 + sum(map(ord, w)) % 63 for w in p.split()][:7] for p in prompts]
        ids = torch.tensor([i + [63] * (8 - len(i)) for i in ids])
        return self.table[ids].to(device), None


def test_tiny_end_to_end_run_on_a_diffusers_unet(tmp_path):
    pipe = TinySD()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = SoftTrainConfig(**{**TINY, "method": "agsm", "init": "null", "time_bins": 100, "groups": ["down"]})
    tr = SoftTokenTrainer(cfg, tmp_path / "sd", pipeline=pipe, progress=False)
    torch.testing.assert_close(tr.bank.tokens[1, 0, 2], pipe.table[0], rtol=0, atol=0)    # BOS of ""
    tr.run()
    bank = load_soft_tokens(tmp_path / "sd" / "tokens")
    assert bank.config.backbone == "unet" and bank.config.groups == ("down",) and bank.config.n_sets == 2
    assert not torch.equal(bank.tokens, tr.ema.tokens)
    after = pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in after)
    assert all(p.grad is None for p in pipe.unet.parameters())


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_unet_pair_target_follows_the_prediction_type(kind):
    """The pair target is what the UNet was trained to predict (a v-prediction model scored against eps would rank
    captions by the wrong error): eps, v = sqrt(a) eps - sqrt(1 - a) x0 (plain math), or x0 -- also when the
    pipeline carries a sampling scheduler (DPM-Solver++, as sd_tiny.shapes) rather than DDPM."""
    from diffusers import DPMSolverMultistepScheduler

    from dream.align.soft_pairs import DiffusersPairs

    pipe = TinySD()
    pipe.scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type=kind)
    pairs = DiffusersPairs(pipe, DiffusersSoftTokens(pipe.unet, SoftTokenBank(SoftTokenConfig(
        dim=32, backbone="unet", groups=("down",)))))
    x0 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    b = pairs.prepare({"x0": x0, "text": torch.zeros(2, 8, 32)}, torch.Generator().manual_seed(1), t=600)
    a = pipe.scheduler.alphas_cumprod[600].double()
    noise = (b.cond["x_t"].double() - a.sqrt() * x0.double()) / (1 - a).sqrt()       # the draw, from x_t
    assert noise.std() > 0.5                                                            # x_t = sqrt(a) x0 + ...
    want = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0.double(),
            "sample": x0.double()}[kind]
    torch.testing.assert_close(b.target.double(), want, rtol=0, atol=1e-4)
