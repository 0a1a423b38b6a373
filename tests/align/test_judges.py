"""Judges: the verifier VQA answers exactly on ground-truth renders, its selection variant is stricter than the
evaluation one, DREAM judging itself prefers the true prompt, the aesthetic proxy separates clean from degraded
renders, and a judge that raises on one image fails only that candidate."""
import torch
import torch.nn.functional as F

from dream.align.dreamsync import safe_scores
from dream.align.judges import (DreamSelfJudge, ShapesAestheticJudge, ShapesVQA, VERIFIER_VARIANTS, VQAJudge,
                                nearest_choice)
from dream.align.questions import shapes_question_sets
from dream.data.shapes import ShapesConfig, ShapesWorld

WORLD = ShapesWorld(ShapesConfig())


def _renders(n, split="test", types=None):
    ps = WORLD.random_prompt_specs(n, split, types=types)
    imgs = torch.stack([WORLD.render(p.spec, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(ps)])
    return ps, imgs.float() / 127.5 - 1


def test_verifier_vqa_scores_ground_truth_renders_as_faithful():
    ps, x = _renders(48)
    qa = [shapes_question_sets(p.spec, p.caption) for p in ps]
    for mode in ("tifa", "dsg", "mean"):
        s = VQAJudge(ShapesVQA("evaluation"), mode).score(x, [p.caption for p in ps], qa)
        assert s.shape == (48,) and bool((s == 1.0).all()), mode
    # shuffled prompts: most images now fail their questions
    wrong = qa[1:] + qa[:1]
    s = VQAJudge(ShapesVQA("evaluation"), "dsg").score(x, [p.caption for p in ps][1:] + [ps[0].caption], wrong)
    assert float(s.mean()) < 0.6


def test_selection_variant_differs_from_evaluation_variant():
    assert VERIFIER_VARIANTS["selection"] != VERIFIER_VARIANTS["evaluation"]
    ps, x = _renders(32, types=("single",))
    qa = [shapes_question_sets(p.spec, p.caption) for p in ps]
    faint = -1 + 0.45 * (x + 1)          # colours at 45 % intensity: the evaluation threshold (0.4) still sees them
    ev = VQAJudge(ShapesVQA("evaluation")).score(faint, [p.caption for p in ps], qa)
    sel = VQAJudge(ShapesVQA("selection")).score(faint, [p.caption for p in ps], qa)
    assert float(ev.mean()) > 0.4 and float(sel.mean()) == 0.0      # the same images, judged differently


def test_nearest_choice():
    assert nearest_choice("Red", ["blue", "red"]) == "red"
    assert nearest_choice("there are two", ["one", "two", "three"]) == "two"
    assert nearest_choice("xyz", ["yes", "no"]) == "yes"


def test_dream_self_judge_prefers_the_true_prompt():
    from dream.pipeline import DreamPipeline

    pipe = DreamPipeline.from_pretrained("dream_tiny.shapes")
    judge = DreamSelfJudge(pipe, num_negatives=6)
    ps, x = _renders(32, types=("single", "count"))
    caps = [p.caption for p in ps]
    right = judge.score(x, caps)
    wrong = judge.score(x, caps[1:] + caps[:1])
    assert right.shape == (32,) and bool(((right >= 0) & (right <= 1)).all())
    assert float(right.mean()) > float(wrong.mean()) + 0.2
    negs = judge._negatives(caps[0])
    assert len(negs) == 6 and caps[0] not in negs and negs == judge._negatives(caps[0])   # stable across calls


def test_shapes_aesthetic_separates_clean_from_degraded():
    _, x = _renders(48)
    j = ShapesAestheticJudge()
    clean = j.score(x)
    g = torch.Generator().manual_seed(0)
    noisy = j.score((x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1))
    k = torch.ones(3, 1, 3, 3) / 9
    blur = x
    for _ in range(2):
        blur = F.conv2d(F.pad(blur, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    b = j.score(blur)
    assert float((clean >= 0.6).float().mean()) == 1.0                    # clean renders pass theta_a = 0.6
    assert float((noisy >= 0.6).float().mean()) == 0.0
    assert float(b.mean()) < float(clean.mean()) - 0.2
    assert float(j.score(torch.full_like(x, -1.0)).max()) == 0.0           # nothing drawn: 0


def test_safe_scores_fails_only_the_image_that_raises():
    def judge(images, prompts):
        if any(p == "boom" for p in prompts):
            raise RuntimeError("bad image")
        return torch.ones(images.shape[0])

    s, failed = safe_scores(judge, torch.zeros(4, 3, 8, 8), ["a", "boom", "c", "d"])
    assert failed == 1 and torch.isnan(s[1]) and bool((s[[0, 2, 3]] == 1).all())
