"""CLIP score: our torchmetrics wrapper vs torchmetrics used directly and vs a manual computation
with a tiny random transformers CLIP (offline); DREAM's own score vs a manual cosine.

Tolerances (tests/tolerance.py): the wrapper vs torchmetrics in the same batches runs the same ops, so the
numbers are equal exactly; independent float32 computations are compared by the 2x rule against the same
computation in float64, with a floor of one reduction's float32 bound since a score is a handful of numbers.
"""
from __future__ import annotations

import copy
import json
import string

import pytest
import torch
import torch.nn.functional as F

from dream.eval.clipscore import DreamCLIPScore, dream_clip_score, hf_clip_score, load_hf_clip
from tolerance import assert_2x, gemm_rel_tol

CAPTIONS = ["a red cat", "two blue dogs", "a green square", "the small yellow ball", "a dog on grass"]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("openai_free_tiny_clip")  # no "openai" in the path on purpose
    letters = list(string.ascii_lowercase)
    vocab = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters] + ["ca", "cat</w>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    model.save_pretrained(d)
    proc.save_pretrained(d)
    return d, model, proc


def test_hf_clip_score_matches_torchmetrics_and_manual(tiny_clip_dir):
    from torchmetrics.multimodal.clip_score import CLIPScore

    d, model, proc = tiny_clip_dir
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)

    ours = hf_clip_score(imgs, CAPTIONS, str(d), batch_size=2, progress=False)  # local folder route
    assert ours["num_pairs"] == 5

    # torchmetrics directly, on the model as the wrapper loads it (another instance of the same weights may be
    # laid out differently in memory and take another GEMM path), in our batches of 2: the same ops in the
    # same order as the wrapper
    pair = load_hf_clip(d)
    tm = CLIPScore(model_name_or_path=lambda: pair)
    for i in range(0, 5, 2):
        tm.update(imgs[i:i + 2], CAPTIONS[i:i + 2])
    direct = float(tm.compute())
    assert ours["clip_score"] == direct

    # Independent path: our own preprocessing (32x32 input: resize and crop are identities) and the
    # towers + projections called directly, then max(100 * mean cosine, 0).
    ip = proc.image_processor
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    enc = proc.tokenizer(CAPTIONS, padding=True, return_tensors="pt")

    def manual(model, dtype):
        pixels = (imgs.to(dtype) / 255.0 - mean.to(dtype)) / std.to(dtype)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)    # transformers builds CLIP's causal mask in the default dtype
        try:
            with torch.no_grad():
                e_img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
                e_txt = model.text_projection(model.text_model(**enc).pooler_output)
        finally:
            torch.set_default_dtype(default)
        return max(float((100 * F.cosine_similarity(e_img, e_txt, dim=-1)).mean()), 0.0)

    # 2x rule against the manual path in float64; a single number, so with a floor of one reduction's float32
    # bound (n = 3 x 8 x 8 = 192, the patch embedding, the longest reduction of the tiny CLIP)
    truth = manual(copy.deepcopy(model).double(), torch.float64)
    assert truth > 0
    assert_2x(torch.tensor(ours["clip_score"]), torch.tensor(manual(model, torch.float32)),
              torch.tensor(truth, dtype=torch.float64),
              "CLIP score vs manual", floor=gemm_rel_tol(torch.float32, 3 * 8 * 8))

    # float images in [-1, 1] give the same number (converted to uint8 like a PNG save)
    again = hf_clip_score(imgs.float() / 127.5 - 1.0, CAPTIONS, pair, batch_size=2, progress=False)
    assert again["clip_score"] == ours["clip_score"]
    with pytest.raises(ValueError, match="captions"):
        hf_clip_score(imgs, CAPTIONS[:3], (model, proc), progress=False)


def _toy_text_tokenizer(ctx: int, vocab: int):
    def tok(texts):
        rows = []
        for t in texts:
            ids = [1 + (ord(ch) % (vocab - 2)) for ch in t[: ctx - 1]] + [vocab - 1]  # EOT = max id
            rows.append(ids + [0] * (ctx - len(ids)))
        return torch.tensor(rows)
    return tok


def test_dream_clip_score_matches_manual_cosine():
    import dream
    from dream.models.patchify import patchify
    from dream.models.tokenizers import create_tokenizer

    model = dream.create_model("dream_test")
    cfg = model.config
    vae = create_tokenizer("vae_test")  # tiny random VAE: 16x16 images -> 16 tokens of 16 dims
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(5, 3, 16, 16, generator=g) * 2 - 1
    text_tok = _toy_text_tokenizer(cfg.clip_context_length, cfg.clip_vocab_size)
    res = dream_clip_score(model, imgs, CAPTIONS, vae, text_tok, batch_size=2, progress=False)
    def manual(model, vae):
        """100 cos(image embedding, text embedding) from the model's parts, all in the modules' dtype."""
        model.eval()
        dtype = next(model.parameters()).dtype
        with torch.no_grad():
            z = vae.vae.encode(imgs.to(dtype)).mean                             # posterior mode, as sample=False
            tokens = patchify((z - vae.config.shift_factor) * vae.config.scaling_factor, vae.patch_size)
            assert tokens.shape == (5, cfg.seq_len, cfg.token_dim)
            ei = model.image_projection(model.forward_encoder(tokens).mean(1))   # mean over buffer + tokens
            et = model.encode_text(text_tok(CAPTIONS), normalize=False)
        return 100 * (ei / ei.norm(dim=1, keepdim=True) * (et / et.norm(dim=1, keepdim=True))).sum(1)

    per = manual(model, vae)
    vae64 = copy.deepcopy(vae)
    vae64.vae = vae64.vae.double()
    truth = manual(copy.deepcopy(model).double(), vae64)
    # scored in batches of 2 vs 5 by another cosine formula: 2x rule against float64, with a floor of one
    # reduction's float32 bound (5 numbers; n = 9 x 64 = 576, the 3x3 convs of vae_test's 64-channel level,
    # the longest reduction on the way)
    scores = torch.tensor(res["scores"])
    assert_2x(scores, per, truth, "DREAM CLIP scores", floor=gemm_rel_tol(torch.float32, 9 * 64))
    # the reported score is the float64 mean of the per-pair scores (5 of them)
    assert res["clip_score"] == pytest.approx(max(float(scores.double().mean()), 0.0),
                                              abs=gemm_rel_tol(torch.float64, 5) * float(scores.abs().max()))
    # pairing matters
    metric = DreamCLIPScore(model, vae, text_tok)
    shuffled = metric.scores(imgs, CAPTIONS[::-1])
    assert not torch.allclose(shuffled, per, atol=1e-3)   # other pairs: O(1) score changes, not rounding
    with pytest.raises(ValueError, match="5 images but 4 captions"):
        metric.scores(imgs, CAPTIONS[:4])


def test_cli_clipscore_with_local_clip_folder(tiny_clip_dir, tmp_path):
    from PIL import Image

    from dream.cli import main

    d, model, proc = tiny_clip_dir
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    (tmp_path / "imgs").mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / "imgs" / f"{i:02d}.png")
    (tmp_path / "caps.txt").write_text("\n".join(CAPTIONS) + "\n")
    out = tmp_path / "cs.json"
    assert main(["eval", "clipscore", "--images", str(tmp_path / "imgs"), "--captions", str(tmp_path / "caps.txt"),
                 "--hf-clip", str(d), "--batch-size", "2", "--out", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    # the CLI's model (loaded from the folder) and batches (2) on the same decoded pixels: the same ops in the
    # same order, so the same number
    expected = hf_clip_score(imgs, CAPTIONS, str(d), batch_size=2, progress=False)["clip_score"]
    assert res["num_pairs"] == 5 and res["clip_score"] == expected
    (tmp_path / "bad.txt").write_text("one caption\n")
    with pytest.raises(ValueError, match="1 captions for 5 images"):
        main(["eval", "clipscore", "--images", str(tmp_path / "imgs"), "--captions", str(tmp_path / "bad.txt"),
              "--hf-clip", str(d), "--quiet"])
