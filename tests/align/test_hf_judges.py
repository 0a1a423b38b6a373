"""The Hugging Face judges' plumbing on tiny random models saved to local folders (no hub): HFVQA with a
BlipForQuestionAnswering and a BlipProcessor (BlipImageProcessor + a BertTokenizer over a small vocabulary), and the
LAION aesthetic predictor with a CLIPModel and an MLP state dict in LAION's key layout. Random models answer
nonsense; what is tested is that answers reach the scores in the right shape and type, and that the aesthetic rating
is exactly the documented computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dream.align.judges import HFVQA, LaionAestheticJudge, VQAJudge
from dream.align.questions import shapes_question_sets
from dream.data.shapes import ShapesConfig, ShapesWorld

WORDS = ("yes no is there a an the how many what colour color of are in image left right above below to one two "
         "three four five six none small large red green blue yellow purple orange white square squares circle "
         "circles triangle triangles star stars cross crosses choices : , ?").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def _renders(n):
    world = ShapesWorld(ShapesConfig())
    ps = world.random_prompt_specs(n, "test", generator=torch.Generator().manual_seed(0))
    imgs = torch.stack([world.render(p.spec, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(ps)])
    return ps, imgs.float() / 127.5 - 1


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    from transformers import (BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor,
                              BlipTextConfig, BlipVisionConfig)

    d = tmp_path_factory.mktemp("blip")
    vocab = SPECIAL + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(d / "vocab.txt"), bos_token="[DEC]")          # as BLIP's: the answer starts with [DEC]
    text = BlipTextConfig(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, intermediate_size=37,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                          bos_token_id=vocab.index("[DEC]"), sep_token_id=vocab.index("[SEP]"),
                          eos_token_id=vocab.index("[SEP]"), pad_token_id=0)
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, initializer_range=0.02)
    torch.manual_seed(0)
    BlipForQuestionAnswering(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                        projection_dim=32, image_text_hidden_size=32)).save_pretrained(d)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok).save_pretrained(d)
    return d


def test_hf_vqa_answers_strings_and_choices_and_scores_in_unit_interval(blip_folder):
    vqa = HFVQA(blip_folder, max_new_tokens=4, batch_size=8)
    ps, x = _renders(4)
    raw = vqa.ask(x[:3], ["is there a red square?", "how many circles?", "what colour is the star?"])
    assert len(raw) == 3 and all(isinstance(a, str) and a == a.strip().lower() for a in raw)
    qa = [shapes_question_sets(p.spec, p.caption) for p in ps]
    answers = vqa.answer(x, qa)
    assert len(answers) == 4
    for q, a in zip(qa, answers):
        assert set(a) == {"tifa", "dsg"} and len(a["tifa"]) == len(q["tifa"]) and len(a["dsg"]) == len(q["dsg"])
        assert all(ans in qq["choices"] for ans, qq in zip(a["tifa"], q["tifa"]))
        assert all(ans in ("yes", "no") for ans in a["dsg"])
    assert vqa.answer(x, qa) == answers                                   # greedy decoding: deterministic
    for mode in ("tifa", "dsg", "mean"):
        s = VQAJudge(vqa, mode).score(x, [p.caption for p in ps], qa)
        assert s.shape == (4,) and s.dtype == torch.float32 and bool(((s >= 0) & (s <= 1)).all()), mode
    assert vqa.answer(x[:1], [{}]) == [{}]                                 # no questions: no model call
    with pytest.raises(ValueError, match="4 images but 3 question sets"):
        VQAJudge(vqa).score(x, [p.caption for p in ps], qa[:3])


# ---- LAION aesthetic predictor ---------------------------------------------------------------------------------
PROJ = 8
MLP_SHAPES = {"layers.0": (1024, PROJ), "layers.2": (128, 1024), "layers.4": (64, 128), "layers.6": (16, 64),
              "layers.7": (1, 16)}


@pytest.fixture(scope="module")
def laion_files(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    d = tmp_path_factory.mktemp("laion")
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=100, max_position_embeddings=16),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8),
                     projection_dim=PROJ)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d / "clip")
    g = torch.Generator().manual_seed(1)
    state = {}
    for name, (o, i) in MLP_SHAPES.items():
        state[f"{name}.weight"] = torch.randn(o, i, generator=g) / i ** 0.5
        state[f"{name}.bias"] = 0.1 * torch.randn(o, generator=g)
    state["layers.7.bias"] = torch.tensor([5.0])                       # ratings around 5 of 10: scores inside (0, 1)
    save_file(state, str(d / "mlp.safetensors"))
    torch.save(state, d / "mlp.pth")
    return d, state


def test_laion_aesthetic_rating_is_the_mlp_over_normalised_clip_embeddings(laion_files):
    d, state = laion_files
    judge = LaionAestheticJudge(d / "clip", d / "mlp.safetensors")
    _, x = _renders(5)
    rating = judge.rating(x)
    # the documented computation, written out: CLIP image embedding, L2-normalised, five Linear layers in a row
    # (dropout is off in eval), no activations, LAION's layers.{0,2,4,6,7} keys
    with torch.no_grad():
        pix = judge.processor(images=[im.permute(1, 2, 0).numpy() for im in ((x + 1) * 127.5).round().to(torch.uint8)],
                              return_tensors="pt")["pixel_values"]
        mean = torch.tensor(judge.processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(judge.processor.image_std).view(1, 3, 1, 1)
        assert float((pix - ((x + 1) / 2 - mean) / std).abs().max()) < 1e-5    # 32x32 in: only rescale + normalise
        h = judge.clip.visual_projection(judge.clip.vision_model(pixel_values=pix).pooler_output)
        h = F.normalize(h, dim=-1)
        for name in MLP_SHAPES:
            h = F.linear(h, state[f"{name}.weight"], state[f"{name}.bias"])
    torch.testing.assert_close(rating, h.squeeze(-1), rtol=0, atol=1e-5)
    s = judge.score(x)
    assert s.shape == (5,) and bool(((s > 0) & (s < 1)).all())
    torch.testing.assert_close(s, (rating / 10).clamp(0, 1), rtol=0, atol=0)
    assert torch.equal(judge.score(x), s)                                     # deterministic
    assert torch.equal(judge.score(((x + 1) * 127.5).round().to(torch.uint8)), s)   # uint8 input: the same image
    # the .pth copy of the weights gives the same judge
    assert torch.equal(LaionAestheticJudge(d / "clip", d / "mlp.pth").score(x), s)


def test_laion_aesthetic_rejects_a_state_dict_in_another_layout(laion_files, tmp_path):
    from safetensors.torch import save_file

    d, state = laion_files
    save_file({k.replace("layers.7", "layers.8"): v for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(RuntimeError, match="8.weight|7.weight"):
        LaionAestheticJudge(d / "clip", tmp_path / "bad.safetensors")
