"""DreamPipeline and `dream sample`: encode / score / generate, chunking, save/load, bad input."""
import json

import pytest
import torch

import dream
from dream.models.tokenizers import PixelTokenizer
from dream.pipeline import DreamPipeline
from tolerance import U

PIX = {"clip_vocab_size": 49408, "img_size": 32, "vae_stride": 1, "patch_size": 8, "vae_embed_dim": 3,
       "num_sampling_steps": "5"}


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    model = dream.create_model("dream_test", **PIX)
    with torch.no_grad():
        for p in model.diffloss.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return DreamPipeline(model, PixelTokenizer(8, 32), text_encoder="random")


def test_encode_and_score_agree_with_the_model(pipe):
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    texts = ["a red square", "two blue circles", ""]
    e = pipe.encode_images(images)
    t = pipe.encode_text(texts)
    tokens = pipe.tokenizer.encode(images)
    # the pipeline calls the same modules on the same batches (under no_grad, as here): exactly equal
    exact = dict(rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(e, pipe.model.encode_image(tokens), **exact)
        torch.testing.assert_close(t, pipe.model.encode_text(pipe.text.clip_ids(texts)), **exact)
    torch.testing.assert_close(pipe.score(images, texts), (e * t).sum(-1), **exact)
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        pipe.score(images, texts[:2])


def test_generate_deterministic_chunked_and_bad_input(pipe):
    prompts = ["a red square", "a blue circle", "a green cross"]
    a = pipe.generate(prompts, num_iter=3, seed=1, batch_size=2)
    b = pipe.generate(prompts, num_iter=3, seed=1, batch_size=2)
    c = pipe.generate(prompts, num_iter=3, seed=2, batch_size=2)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1
    # chunking: the first chunk of a 2-per-batch run equals a run over just those prompts
    assert torch.equal(pipe.generate(prompts[:2], num_iter=3, seed=1, batch_size=2), a[:2])
    imgs, sc = pipe.generate(prompts[:2], num_iter=3, seed=1, sad=(2, 1), return_scores=True)
    assert imgs.shape == (2, 3, 32, 32) and sc.shape == (2,)
    imgs, sc = pipe.generate(prompts[:2], num_iter=3, seed=1, rerank=2, return_scores=True)
    assert sc.shape == (2,)
    with pytest.raises(ValueError, match="empty prompt list"):
        pipe.generate([])
    with pytest.raises(ValueError, match="num_candidates"):
        pipe.generate(prompts, num_iter=3, sad=(0, 1))
    with pytest.raises(ValueError, match="threshold"):
        pipe.generate(prompts, num_iter=3, sad=(2, 5))
    with pytest.raises(TypeError):
        pipe.generate([1, 2])


def test_save_load_and_sample_cli(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    meta = json.loads((tmp_path / "pipe" / "pipeline.json").read_text())
    assert meta["text_encoder"] == "random"
    p2 = DreamPipeline.from_pretrained(tmp_path / "pipe")
    # the same weights (saved bit for bit) through the same ops: exactly equal
    torch.testing.assert_close(p2.encode_text(["a red square"]), pipe.encode_text(["a red square"]), rtol=0, atol=0)
    a = pipe.generate(["a red square"], num_iter=3, seed=4)
    torch.testing.assert_close(p2.generate(["a red square"], num_iter=3, seed=4), a, rtol=0, atol=0)
    (tmp_path / "prompts.txt").write_text("a red square\n\na blue circle\n")
    from dream.cli import main

    rc = main(["sample", "--model", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "prompts.txt"),
               "--num-iter", "3", "--out", str(tmp_path / "out"), "--sad", "2,1"])
    assert rc == 0
    assert (tmp_path / "out" / "grid.png").exists() and len(list((tmp_path / "out").glob("sample_*.png"))) == 2
    with pytest.raises(SystemExit):
        main(["sample", "--model", str(tmp_path / "pipe"), "--out", str(tmp_path / "o2")])


def test_clip_denoised_is_saved_loaded_and_bounds_vae_token_samples(tmp_path):
    from dream.models.tokenizers import create_tokenizer

    torch.manual_seed(0)
    model = dream.create_model("dream_test", clip_vocab_size=49408, img_size=16, vae_stride=2, patch_size=2,
                               vae_embed_dim=4, num_sampling_steps="5")
    tok = create_tokenizer("vae_test")
    assert DreamPipeline(model, tok, text_encoder="random").clip_denoised is None        # VAE: official, no clip
    assert DreamPipeline(model, PixelTokenizer(2, 16), text_encoder="random").clip_denoised == 1.0
    with pytest.raises(ValueError, match="clip_denoised"):
        DreamPipeline(model, tok, text_encoder="random", clip_denoised=0.0)
    with torch.no_grad():                      # an untrained head whose eps is far off: x0 blows up unclipped
        for p in model.diffloss.parameters():
            p.add_(0.1 * torch.randn_like(p))
    p = DreamPipeline(model, tok, text_encoder="random", clip_denoised=0.5)
    p.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "pipeline.json").read_text())["clip_denoised"] == 0.5
    p2 = DreamPipeline.from_pretrained(tmp_path / "pipe")
    assert p2.clip_denoised == 0.5
    from dream.sampling import MARSampler, SamplerConfig

    feats, pad = p2.text.features(["a red square", "a blue circle"])
    null, null_pad = p2.text.null(2)
    for clip in (None, 0.5):
        s = MARSampler(p2.model, SamplerConfig(num_iter=2, cfg=1.0, clip_denoised=clip))
        toks = s.sample(feats, null, text_padding_mask=pad, null_padding_mask=null_pad,
                        generator=torch.Generator().manual_seed(0))
        if clip is None:
            unclipped = toks.abs().max()
        else:
            # the last DDPM step returns its (clipped) x0 mean, c1 x0 + c2 x with c1 = fl32(1 - O(u64 / beta_0)) and
            # c2 = 0 exactly at t = 0 (1 - abar_prev = 0): within [-0.5, 0.5] up to c1's and the product's roundings
            assert toks.abs().max() <= 0.5 * (1 + 2 * U[torch.float32])
            assert not bool(unclipped <= 0.5)    # unclipped, x0 leaves that range
