"""Few-shot episodes (separable / random features, seeding) and retrieval recall vs hand counts."""
from __future__ import annotations

import pytest
import torch

from dream.eval.fewshot import few_shot_eval, sample_episode
from dream.eval.retrieval import retrieval_ranks, retrieval_recall
from tolerance import U


def clustered(num_classes=10, per_class=30, dim=16, spread=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * 5
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centers[labels] + spread * torch.randn(labels.numel(), dim, generator=g), labels


# ---------------------------------------------------------------------------------------------
# Few-shot
# ---------------------------------------------------------------------------------------------


def test_episode_structure():
    _, labels = clustered()
    si, sy, qi, qy = sample_episode(labels, n_way=5, k_shot=3, n_query=4, generator=torch.Generator().manual_seed(1))
    assert si.shape == (15,) and qi.shape == (20,)
    assert set(si.tolist()).isdisjoint(qi.tolist())
    for w in range(5):  # every episode class is one real class, same for support and query
        real = set(labels[si[sy == w]].tolist()) | set(labels[qi[qy == w]].tolist())
        assert len(real) == 1
    assert len(set(labels[si].tolist())) == 5
    with pytest.raises(ValueError, match="only 10 qualify"):
        sample_episode(labels, n_way=11, k_shot=1, n_query=1)


@pytest.mark.parametrize("classifier", ["prototype", "logreg"])
def test_separable_features_give_perfect_accuracy(classifier):
    feats, labels = clustered()
    res = few_shot_eval(feats, labels, n_way=5, k_shot=5, n_query=10, episodes=20, classifier=classifier,
                        progress=False)
    assert res["accuracy"] == 1.0 and res["ci95"] == 0.0


def test_batched_logreg_matches_per_episode_solver():
    import torch.nn.functional as F

    from dream.eval.linear_probe import fit_logistic_regression

    feats, labels = clustered(spread=5.0, seed=2)  # overlapping classes: accuracy well below 1
    res = few_shot_eval(feats, labels, episodes=12, n_query=6, classifier="logreg", seed=5, chunk_episodes=5,
                        progress=False)
    g = torch.Generator().manual_seed(5)
    manual = []
    for _ in range(12):
        si, sy, qi, qy = sample_episode(labels, 5, 5, 6, g)
        clf = fit_logistic_regression(F.normalize(feats[si], dim=1), sy, num_classes=5)
        manual.append(float((clf.predict(F.normalize(feats[qi], dim=1)) == qy).float().mean()))
    diffs = [abs(a - b) for a, b in zip(res["episode_accuracies"], manual)]
    # at most one borderline query of 30 flips; both accuracies are k / 30 rounded to float32 (<= u32 each)
    assert max(diffs) <= 1 / 30 + 2 * U[torch.float32], diffs
    # and in at most 3 of the 12 episodes (0.01 >= 3 / 360): a solver-agreement count, not a rounding bound
    assert sum(manual) / 12 == pytest.approx(res["accuracy"], abs=0.01)
    assert 0.3 < res["accuracy"] < 1.0


def test_random_features_give_chance():
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(400, 32, generator=g), torch.arange(10).repeat(40)
    res = few_shot_eval(feats, labels, n_way=5, k_shot=5, n_query=15, episodes=300, progress=False)
    # chance level 1/5: each episode's accuracy has std <= sqrt(0.2 x 0.8 / 75) = 0.046, so 300 episodes give a
    # standard error of 0.003, but they all reuse one fixed draw of 400 points, whose own accuracy varies at the
    # level of sqrt(0.2 x 0.8 / 400) = 0.02; 0.04 is two of those (a no-signal sanity check, not rounding)
    assert abs(res["accuracy"] - 0.2) < 0.04, res["accuracy"]
    assert 0 < res["ci95"] < 0.02


def test_seed_determinism():
    feats, labels = clustered(spread=4.0)  # overlapping classes, so episodes differ in accuracy
    a = few_shot_eval(feats, labels, episodes=30, seed=3, progress=False)
    b = few_shot_eval(feats, labels, episodes=30, seed=3, progress=False)
    c = few_shot_eval(feats, labels, episodes=30, seed=4, progress=False)
    assert a["episode_accuracies"] == b["episode_accuracies"]
    assert a["episode_accuracies"] != c["episode_accuracies"]
    assert 0.2 < a["accuracy"] < 1.0


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------


def test_identical_embeddings_recall_one():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(50, 8, generator=g)
    res = retrieval_recall(img, img.clone())
    assert res["i2t_R@1"] == 1.0 and res["t2i_R@1"] == 1.0 and res["i2t_median_rank"] == 1.0
    # two captions per image, each a slightly perturbed copy
    txt = torch.cat([img, img]) + 1e-3 * torch.randn(100, 8, generator=g)
    res = retrieval_recall(img, txt, text_to_image=torch.arange(50).repeat(2))
    assert res["i2t_R@1"] == 1.0 and res["t2i_R@1"] == 1.0 and res["num_texts"] == 100


def test_known_permutation_hand_count():
    # Orthonormal embeddings: caption j equals image perm[j]. For caption j the correct image j
    # has cosine 0 and only image perm[j] (cosine 1) beats it, so its rank is 0 if perm[j] == j else 1.
    perm = torch.tensor([0, 2, 1, 3, 5, 4, 6, 7])            # fixed points: 0, 3, 6, 7
    img = torch.eye(8)
    txt = img[perm]
    res = retrieval_recall(img, txt, ks=(1, 2, 5))
    assert res["t2i_R@1"] == 4 / 8 and res["t2i_R@2"] == 1.0
    assert res["i2t_R@1"] == 4 / 8 and res["i2t_R@5"] == 1.0


def test_ranks_match_naive_loops():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(20, 6, generator=g)
    t2i = torch.randint(0, 20, (45,), generator=g)
    txt = img[t2i] + 0.9 * torch.randn(45, 6, generator=g)
    i2t_rank, t2i_rank = retrieval_ranks(img, txt, t2i, chunk_size=7)
    imn = img / img.norm(dim=1, keepdim=True)
    txn = txt / txt.norm(dim=1, keepdim=True)
    sims = (imn @ txn.t()).tolist()
    for j in range(45):
        col = [sims[i][j] for i in range(20)]
        order = sorted(range(20), key=lambda i: -col[i])
        assert order.index(int(t2i[j])) == int(t2i_rank[j])
    for i in range(20):
        order = sorted(range(45), key=lambda j: -sims[i][j])
        owned = [pos for pos, j in enumerate(order) if int(t2i[j]) == i]
        assert int(i2t_rank[i]) == (owned[0] if owned else -1)
    res = retrieval_recall(img, txt, t2i, ks=(1, 5))
    has = i2t_rank >= 0
    # recalls are counts over the same ranks divided in float32 the same way: exactly equal
    assert res["i2t_R@5"] == float((i2t_rank[has] < 5).float().mean())
    assert res["t2i_R@1"] == float((t2i_rank == 0).float().mean())


def test_retrieval_errors():
    with pytest.raises(ValueError, match="pass text_to_image"):
        retrieval_recall(torch.randn(3, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="embedding sizes differ"):
        retrieval_recall(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        retrieval_recall(torch.randn(3, 4), torch.randn(2, 4), text_to_image=[0, 3])


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_fewshot_and_retrieval(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from dream.cli import main

    rng = np.random.default_rng(0)
    # 6 classes of flat-coloured 8x8 images with a little noise: trivially separable in pixel space
    colours = rng.integers(0, 256, size=(6, 3))
    for c in range(6):
        d = tmp_path / "data" / f"c{c}"
        d.mkdir(parents=True)
        for i in range(12):
            arr = np.clip(colours[c] + rng.normal(0, 3, size=(8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    out = tmp_path / "fs.json"
    assert main(["eval", "fewshot", "--features", "pixels", "--data", str(tmp_path / "data"), "--episodes", "20",
                 "--n-query", "5", "--out", str(out), "--no-cache", "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["accuracy"] == 1.0 and res["n_way"] == 5 and res["episodes"] == 20

    # retrieval with a random dream_tiny (pixel tokens, real CLIP BPE ids): runs and reports sane numbers
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
    caps = tmp_path / "caps.jsonl"
    caps.write_text("\n".join(json.dumps({"file": f"{i}.png", "captions": [f"image {i}", f"photo {i}"]})
                              for i in range(6)))
    torch.manual_seed(0)
    assert main(["eval", "retrieval", "--model", "dream_tiny", "--images", str(img_dir), "--captions", str(caps),
                 "--out", str(out), "--no-cache", "--quiet"]) == 0
    res = json.loads(out.read_text())
    assert res["num_images"] == 6 and res["num_texts"] == 12 and res["t2i_R@10"] == 1.0

    import dream
    from dream.text import CLIPTokenizer

    torch.manual_seed(0)
    model = dream.create_model("dream_tiny").eval()
    cfg = model.config
    imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(img_dir / f"{i}.png"))).permute(2, 0, 1)
                        for i in range(6)]).float() / 127.5 - 1
    texts = [t for i in range(6) for t in (f"image {i}", f"photo {i}")]
    with torch.no_grad():
        tokens = imgs.reshape(6, 3, 8, 4, 8, 4).permute(0, 2, 4, 1, 3, 5).reshape(6, 64, 48)  # 4x4 patches
        e_img = model.encode_image(tokens)
        e_txt = model.encode_text(CLIPTokenizer(context_length=cfg.clip_context_length)(texts))
    ref = retrieval_recall(e_img, e_txt, torch.arange(6).repeat_interleave(2))
    for k in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"):
        assert res[k] == ref[k], k          # counts of the same ranks (a near-tie flip would change a count)
