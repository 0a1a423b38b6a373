"""Linear probe: L-BFGS vs scikit-learn on digits, LARS/SGD vs L-BFGS, k-NN by hand, DREAM features.

Tolerances (tests/tolerance.py): accuracies of different solvers agree up to a few borderline test samples
(an optimisation check, stated in samples); feature paths running the same ops are compared exactly, paths on
other batch shapes or with another formula by the 2x rule against float64; the head's random init in standard
errors.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dream.eval.features import dream_token_features, iter_labeled_batches
from dream.eval.linear_probe import (
    LARS,
    LinearProbeConfig,
    LinearProbeHead,
    cosine_lr,
    fit_logistic_regression,
    knn_accuracy,
    knn_predict,
    linear_probe,
    topk_accuracy,
)
from tolerance import U, assert_2x, mean_tol


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return (torch.tensor(xtr, dtype=torch.float32), torch.tensor(ytr), torch.tensor(xte, dtype=torch.float32),
            torch.tensor(yte), (xtr, ytr, xte, yte))


def test_lbfgs_matches_sklearn_logistic_regression(digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tr, ytr, te, yte, (xtr, ytr_np, xte, yte_np) = digits
    sc = StandardScaler().fit(xtr)
    sk = LogisticRegression(C=1.0, max_iter=5000).fit(sc.transform(xtr), ytr_np)
    sk_acc = sk.score(sc.transform(xte), yte_np)
    res = linear_probe(tr, ytr, te, yte, mode="lbfgs", C=1.0, knn_k=None, progress=False)
    assert res["top1"] >= 0.9
    # the same convex objective, two solvers and stopping rules: the accuracies may differ by a few borderline
    # test samples (0.02 of 540 = 10 samples), not a rounding bound
    assert abs(res["top1"] - sk_acc) <= 0.02, (res["top1"], sk_acc)
    # Same objective, so the solutions themselves are close too.
    clf = fit_logistic_regression(tr, ytr, C=1.0)
    agree = (clf.predict(te).numpy() == sk.predict(sc.transform(xte))).mean()
    assert agree >= 0.98
    assert res["top5"] >= res["top1"]


@pytest.mark.parametrize("mode,cfg", [
    ("sgd", LinearProbeConfig(blr=0.1, epochs=100, warmup_epochs=10, batch_size=256)),
    ("lars", LinearProbeConfig(blr=5.0, epochs=100, warmup_epochs=5, batch_size=256)),
])
def test_sgd_lars_probe_agrees_with_lbfgs(digits, mode, cfg):
    tr, ytr, te, yte, _ = digits
    ref = linear_probe(tr, ytr, te, yte, mode="lbfgs", knn_k=None, progress=False)["top1"]
    res = linear_probe(tr, ytr, te, yte, mode=mode, config=cfg, knn_k=None, progress=False,
                       generator=torch.Generator().manual_seed(0))
    assert res["top1"] >= 0.9
    # stochastic first-order solvers vs L-BFGS on the same objective: within 10 of 540 test samples (an
    # optimisation check, not a rounding bound)
    assert abs(res["top1"] - ref) <= 0.02, (mode, res["top1"], ref)


def test_lars_step_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))          # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=2.0, weight_decay=0.5, momentum=0.9, trust_coefficient=0.1)
    w.grad = torch.tensor([[1.0, -2.0]])
    b.grad = torch.tensor([0.5])
    opt.step()
    d = torch.tensor([[1.0, -2.0]]) + 0.5 * torch.tensor([[3.0, 4.0]])  # g + wd * w = [2.5, 0]
    d = d * (0.1 * 5.0 / 2.5)                                          # trust ratio 0.2
    # at most 8 float32 roundings (g + wd w, two norms, the trust ratio, momentum, lr, the update) of values
    # of size <= 5, each <= u relative
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0]]) - 2.0 * d, rtol=8 * U[torch.float32], atol=0)
    # 1-D: plain SGD, no decay; dyadic values, so every operation is exact
    assert torch.equal(b.detach(), torch.tensor([1.0 - 2.0 * 0.5]))


def test_head_and_schedule():
    head = LinearProbeHead(32, 7, generator=torch.Generator().manual_seed(0))
    assert not head.norm.affine and head.norm.eps == 1e-6
    w = head.head.weight.detach()
    assert w.abs().max() <= 0.02 * (1 + U[torch.float32])                  # 2 x fl(0.01), rounded once
    # sample std of the 7 x 32 weights vs 0.01 x std of N(0, 1) truncated to [-2, 2], in standard errors: the
    # sample variance has variance (m4 - s^4) / n, so the std's standard error is s sqrt((kurtosis - 1) / 4n)
    import scipy.stats as st

    tn = st.truncnorm(-2, 2)
    s, kurt = 0.01 * float(tn.std()), float(tn.stats(moments="k")) + 3
    assert abs(float(w.std()) - s) <= mean_tol(s * math.sqrt(kurt - 1) / 2, w.numel())
    assert torch.count_nonzero(head.head.bias) == 0
    U64 = U[torch.float64]                                                 # a few float64 roundings of cos
    assert cosine_lr(0, 100, 10, 1.0) == 0.0
    assert cosine_lr(5, 100, 10, 1.0) == pytest.approx(0.5, abs=4 * U64)
    assert cosine_lr(10, 100, 10, 1.0) == pytest.approx(1.0, abs=4 * U64)
    assert cosine_lr(55, 100, 10, 1.0) == pytest.approx(0.5, abs=4 * U64)
    assert cosine_lr(100, 100, 10, 1.0, min_lr=0.1) == pytest.approx(0.1, abs=4 * U64)


def test_knn_by_hand():
    # Query along e0. Train: one class-0 point at cos 1, two class-1 points at cos 0.5.
    train = torch.tensor([[1.0, 0.0], [0.5, 0.8660254], [0.5, -0.8660254], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([[2.0, 0.0]])
    assert int(knn_predict(train, labels, q, k=3, temperature=None).argmax()) == 1   # majority 2 vs 1
    assert int(knn_predict(train, labels, q, k=3, temperature=0.07).argmax()) == 0   # e^(1/.07) > 2 e^(.5/.07)
    scores = knn_predict(train, labels, q, k=3, temperature=None, num_classes=3)
    assert scores.tolist() == [[1.0, 2.0, 0.0]]


def test_knn_on_clustered_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 5
    ytr, yte = torch.arange(5).repeat(30), torch.arange(5).repeat(10)
    tr = centers[ytr] + 0.1 * torch.randn(150, 16, generator=g)
    te = centers[yte] + 0.1 * torch.randn(50, 16, generator=g)
    res = knn_accuracy(tr, ytr, te, yte, k=20)
    assert res["top1"] == 1.0 and res["top5"] == 1.0
    # shuffled training labels destroy it
    bad = knn_accuracy(tr, ytr[torch.randperm(150, generator=g)], te, yte, k=20)
    assert bad["top1"] < 0.6


def test_topk_accuracy_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.2, 0.3]])
    labels = torch.tensor([1, 1, 0, 2])
    acc = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert acc["top1"] == 0.25 and acc["top2"] == 0.75 and acc["top5"] == 1.0


def test_mismatched_labels_error():
    f = torch.randn(10, 4)
    with pytest.raises(ValueError, match="10 feature rows but 9 labels"):
        linear_probe(f, torch.zeros(9, dtype=torch.long), f, torch.zeros(10, dtype=torch.long), mode="lbfgs")
    with pytest.raises(ValueError, match="test"):
        linear_probe(f, torch.zeros(10, dtype=torch.long), f, torch.zeros(3, dtype=torch.long), mode="lbfgs")
    with pytest.raises(TypeError, match="integers"):
        fit_logistic_regression(f, torch.zeros(10))
    with pytest.raises(ValueError, match="mode"):
        linear_probe(f, torch.zeros(10, dtype=torch.long), f, torch.zeros(10, dtype=torch.long), mode="svm")


def test_dream_model_features_end_to_end():
    import dream

    model = dream.create_model("dream_test")
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    n = 480
    tokens = torch.randn(n, cfg.seq_len, cfg.token_dim, generator=g)
    w = torch.randn(cfg.token_dim, 4, generator=g)
    labels = (tokens.mean(1) @ w).argmax(1)                      # a linear function of the tokens
    model.train()  # features must still be dropout-free and leave the mode unchanged
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        feats = dream_token_features(model, tokens, pool="buffer")
        again = dream_token_features(model, tokens[:8], pool="buffer")
        model.eval()
        h = model.forward_encoder(tokens[:8], apply_norm=False)
        normed = dream_token_features(model, tokens[:8], pool="buffer", apply_norm=True)
        full = dream_token_features(model, tokens[:8], pool="mean")
        fake = dream_token_features(model, tokens[:8], buffer="fake_latent")
        h_fake = model.forward_encoder(tokens[:8], apply_norm=False, buffer="fake_latent")
        ln = dream_token_features(model, tokens[:8], fc_norm=True)
    assert model.training is False
    assert feats.shape == (n, cfg.encoder_embed_dim)
    # a batch of 8 vs 480 (another GEMM shape): 2x rule against the float64 model
    with torch.no_grad():
        truth = dream_token_features(model64, tokens[:8].double(), pool="buffer")
    assert_2x(again, feats[:8], truth, "features of a smaller batch")
    # the same ops on the same batch: exactly equal
    exact = dict(rtol=0, atol=0)
    torch.testing.assert_close(again, h[:, :cfg.buffer_size].mean(1), **exact)      # official: no encoder_norm
    assert h.shape[1] == cfg.buffer_size + cfg.seq_len                              # all tokens visible
    torch.testing.assert_close(normed, model.encoder_norm(h)[:, :cfg.buffer_size].mean(1), **exact)
    torch.testing.assert_close(full, h.mean(1), **exact)
    torch.testing.assert_close(fake, h_fake[:, :cfg.buffer_size].mean(1), **exact)
    assert not torch.allclose(fake, again, atol=1e-3)              # another buffer: O(1) changes, not rounding

    def standardise(f):
        return (f - f.mean(1, keepdim=True)) / torch.sqrt(f.var(1, unbiased=False, keepdim=True) + 1e-6)

    # F.layer_norm vs the textbook formula: 2x rule, the formula in float64 on the same features as the truth
    assert_2x(ln, standardise(again), standardise(again.double()), "fc_norm")
    majority = float(labels[320:].bincount().max()) / 160
    res = linear_probe(feats[:320], labels[:320], feats[320:], labels[320:], mode="lbfgs", progress=False)
    assert res["top1"] > majority + 0.15, (res, majority)
    res = linear_probe(feats[:320], labels[:320], feats[320:], labels[320:], mode="lars", progress=False,
                       config=LinearProbeConfig(blr=5.0, epochs=40, warmup_epochs=4, batch_size=64),
                       generator=torch.Generator().manual_seed(0))
    assert res["top1"] > majority + 0.1 and np.isfinite(res["knn_top1"])


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_labeled_sources(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    for i, cls in enumerate(["cat", "dog", "cat", "emu", "dog", "cat"]):
        os.makedirs(tmp_path / "train" / cls, exist_ok=True)
        Image.fromarray(imgs[i]).save(tmp_path / "train" / cls / f"{i}.png")
    (x, y), = list(iter_labeled_batches(str(tmp_path / "train"), batch_size=16))
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.uint8
    assert y.tolist() == [0, 0, 0, 1, 1, 2]                                  # classes sorted: cat, dog, emu
    shard = tmp_path / "s-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            for name, data in ((f"{i:04d}.jpg" if i % 2 else f"{i:04d}.png", _png(imgs[i])),
                               (f"{i:04d}.cls" if i < 2 else f"{i:04d}.json",
                                str(i * 3).encode() if i < 2 else json.dumps({"label": i * 3}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    batches = list(iter_labeled_batches(str(shard), batch_size=3))
    assert [b[1].tolist() for b in batches] == [[0, 3, 6], [9]]
    torch.testing.assert_close(batches[0][0][0], torch.from_numpy(imgs[0]).permute(2, 0, 1))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        list(iter_labeled_batches(torch.zeros(3, 3, 4, 4), labels=[0, 1]))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def write_digit_folders(root, per_split=(300, 150)):
    """ImageFolder train/val splits of sklearn digits as 8x8 RGB PNGs (class folders d0..d9)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    imgs = (x.reshape(-1, 8, 8) * (255 / 16)).round().astype(np.uint8)
    start = 0
    for split, n in zip(("train", "val"), per_split):
        for i in range(start, start + n):
            d = root / split / f"d{y[i]}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.repeat(imgs[i][..., None], 3, axis=2)).save(d / f"{i:04d}.png")
        start += n
    return root / "train", root / "val"


def test_cli_linprobe_pixels_and_dream_model(tmp_path):
    from dream.cli import main
    from dream.eval.features import PixelFeatureExtractor, extract_features

    train, val = write_digit_folders(tmp_path)
    out = tmp_path / "lp.json"
    rc = main(["eval", "linprobe", "--features", "pixels", "--train", str(train), "--val", str(val),
               "--mode", "lbfgs", "--out", str(out), "--no-cache", "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    # same numbers as the library on features extracted independently of the CLI
    f_tr = extract_features(PixelFeatureExtractor(), iter_labeled_batches(str(train)), progress=False)
    f_va = extract_features(PixelFeatureExtractor(), iter_labeled_batches(str(val)), progress=False)
    ref = linear_probe(f_tr["features"], f_tr["labels"], f_va["features"], f_va["labels"], mode="lbfgs",
                       progress=False)
    # the same pixel features (per-image pooling) and the same deterministic solvers: the same accuracies
    assert res["top1"] == ref["top1"] and res["knn_top1"] == ref["knn_top1"]
    assert res["top1"] >= 0.85 and res["num_train"] == 300 and res["num_classes"] == 10

    # the DREAM encoder path (random dream_test + tiny random VAE tokenizer), with the feature cache
    cache = tmp_path / "cache"
    args = ["eval", "linprobe", "--model", "dream_test", "--tokenizer", "vae_test", "--image-size", "16",
            "--train", str(train), "--val", str(val), "--mode", "lbfgs", "--max-images", "60",
            "--cache-dir", str(cache), "--out", str(out), "--quiet"]
    torch.manual_seed(0)
    assert main(args) == 0
    first = json.loads(out.read_text())
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 2 and first["feature_dim"] == 64 and first["num_train"] == 60
    stamps = [f.stat().st_mtime_ns for f in files]
    torch.manual_seed(0)
    assert main(args) == 0
    assert json.loads(out.read_text())["top1"] == first["top1"]
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("*.safetensors"))] == stamps  # read, not rewritten
    torch.manual_seed(0)
    assert main(args[:-5] + ["--no-cache", "--out", str(out), "--quiet"]) == 0  # same without the cache
    assert json.loads(out.read_text())["top1"] == first["top1"]
