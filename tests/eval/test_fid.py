"""FID / IS: our statistics and Frechet distance vs torchmetrics, streaming sources, and the
FID-Inception architecture vs torchvision's InceptionV3 layout (random weights, offline).

Tolerances (tests/tolerance.py): statistics and distances are float64 on both sides, bounded by
:func:`fid_float64_tol` (eigenvalue rounding through the matrix square root); where the same features go
through the same ops (same batches) the statistics are compared exactly; the two float32 Inception
implementations by the 2x rule against torchvision's blocks run in float64.
"""
from __future__ import annotations

import copy
import io
import os
import tarfile
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from dream.eval.fid import (
    FIDEvaluator,
    frechet_distance,
    inception_score,
    load_statistics,
    save_statistics,
)
from dream.eval.inception import NUM_STATE_TENSORS, FIDInceptionV3, load_fid_inception, resize_bilinear_tf1
from tolerance import U, assert_2x, gemm_rel_tol, report

U64 = U[torch.float64]


def fid_float64_tol(mu1, sigma1, mu2, sigma2, nonsymmetric: bool = False, c: float = 4.0) -> float:
    """Bound on the float64 rounding error of the Frechet distance of N(mu1, sigma1) and N(mu2, sigma2).

    FID = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 sum_i sqrt(lambda_i), lambda_i the eigenvalues of M = S1^1/2 S2 S1^1/2.
    A backward-stable eigensolver (and the GEMMs forming M) gives each lambda_i with absolute error
    d <= c D u ||S1|| ||S2|| (Weyl's inequality); the square root turns it into at most
    min(sqrt(d), d / (2 sqrt(lambda_i))) -- the first for eigenvalues near 0 (rank-deficient covariances),
    the second for the others. ``nonsymmetric``: the eigenvalues are taken of S1 S2 = S1^1/2 M S1^-1/2
    (torchmetrics, scipy's sqrtm), whose eigenvector basis has condition number <= sqrt(cond(S1)) (Bauer-Fike).
    The D-term sums add c D u times their absolute values.
    """
    mu1, mu2, s1, s2 = (np.asarray(x, dtype=np.float64) for x in (mu1, mu2, sigma1, sigma2))
    D = mu1.shape[0]
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    lam = np.linalg.eigvalsh(r1 @ s2 @ r1).clip(min=0)
    d = c * D * U64 * np.linalg.norm(s1, 2) * np.linalg.norm(s2, 2)
    if nonsymmetric:
        d *= 1 + np.sqrt(np.linalg.cond(s1))
    roots = np.minimum(np.sqrt(d), d / (2 * np.sqrt(lam) + 1e-300)).sum()
    sums = c * D * U64 * (((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) + 2 * np.sqrt(lam).sum())
    return float(2 * roots + sums)


class TinyFeatureNet(nn.Module):
    """Seeded random conv net: uint8 (B, 3, H, W) -> (B, 16). Reductions: 3x3 convs over 3 and 8 channels
    (n = 27, 72), then a mean over 8 x 8 positions: float32 error <= gemm_rel_tol(float32, 72, depth=3)."""

    num_features = 16

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0
        return F.relu(self.c2(torch.tanh(self.c1(x)))).mean((2, 3))


def smooth_images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    """Float images in [-1, 1]: bilinear upsampling of 4x4 noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@pytest.fixture(scope="module")
def net():
    return TinyFeatureNet()


def test_fid_real_vs_real_is_zero(net):
    real = smooth_images(96, seed=1)
    ev = FIDEvaluator(net, batch_size=32, progress=False)
    stats = ev.compute_statistics(real)
    assert stats.num_images == 96
    res = ev.evaluate(real, stats)
    # the same features (same batches), hence the same statistics: only the distance's own float64 rounding
    tol = fid_float64_tol(stats.mu, stats.sigma, stats.mu, stats.sigma)
    report("FID(real, real)", abs(res["fid"]), tol)
    assert abs(res["fid"]) <= tol


def test_fid_grows_with_noise(net):
    real = smooth_images(192, seed=2)
    ev = FIDEvaluator(net, batch_size=64, progress=False)
    ref = ev.compute_statistics(real)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(real.shape, generator=g)
    fids = [ev.evaluate(real + s * noise, ref)["fid"] for s in (0.05, 0.15, 0.3, 0.6)]
    assert all(b > a for a, b in zip(fids, fids[1:])), fids
    assert fids[0] > 0


def test_fid_from_npz_matches_torchmetrics(net, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = as_uint8(smooth_images(128, seed=4)), as_uint8(smooth_images(112, seed=5) * 0.8 + 0.1)
    ev = FIDEvaluator(net, batch_size=40, progress=False)
    path = tmp_path / "ref_stats.npz"
    save_statistics(ev.compute_statistics(real), path)
    with np.load(path) as f:
        assert set(f.files) >= {"mu", "sigma"} and f["sigma"].shape == (16, 16)
    ours = ev.evaluate(fake, str(path))["fid"]

    tm = FrechetInceptionDistance(feature=net)
    for i in range(0, len(real), 40):         # our batches: the same float32 features, float64 sums on both sides
        tm.update(real[i:i + 40], real=True)
    for i in range(0, len(fake), 40):
        tm.update(fake[i:i + 40], real=False)
    ref = float(tm.compute())
    assert ref > 0.01
    # torchmetrics returns its float64 distance cast to float32 (<= u32 relative), and takes the eigenvalues of
    # the non-symmetric S1 S2
    s_real, s_fake = ev.compute_statistics(real), ev.compute_statistics(fake)
    tol = U[torch.float32] * abs(ref) + fid_float64_tol(s_fake.mu, s_fake.sigma, s_real.mu, s_real.sigma, True)
    report("FID vs torchmetrics", abs(ours - ref), tol)
    assert abs(ours - ref) <= tol, (ours, ref)


def test_frechet_distance_matches_scipy_sqrtm():
    import scipy.linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 12, generator=g, dtype=torch.float64)
    b = torch.randn(40, 12, generator=g, dtype=torch.float64) * 1.5 + 0.3
    m1, m2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    # float64 on both sides; scipy's sqrtm works on the non-symmetric s1 s2
    tol = 2 * fid_float64_tol(m1, s1, m2, s2, nonsymmetric=True)
    report("FID vs scipy sqrtm", abs(frechet_distance(m1, s1, m2, s2) - expected), tol)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=0, abs=tol)


def test_inception_score_matches_torchmetrics():
    from torchmetrics.image.inception import InceptionScore

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 30, generator=g, dtype=torch.float64) * 3
    tm = InceptionScore(feature=nn.Identity(), splits=10)
    tm.update(logits)
    torch.manual_seed(123)  # torchmetrics shuffles with the global RNG
    ref_mean, ref_std = tm.compute()
    mean, std = inception_score(logits, splits=10, generator=torch.Generator().manual_seed(123))
    # float64 on both sides. Each split's KL is a sum over C = 30 classes of p (log p - log q), terms bounded
    # by L = 2 max|logit| + log C, so its absolute error is <= c sqrt(C) u64 L per implementation; IS_k =
    # exp(KL_k) turns that into a relative error of each split's score, hence of their mean; the std moves by
    # at most the largest score change, max_k IS_k <= mean + sqrt(splits - 1) std.
    splits = 10
    d_kl = gemm_rel_tol(torch.float64, logits.shape[1]) * (2 * float(logits.abs().max()) + np.log(logits.shape[1]))
    assert mean == pytest.approx(float(ref_mean), rel=2 * d_kl)
    # torchmetrics reports the unbiased std, torch-fidelity (and we) the biased one.
    unbias = np.sqrt(splits / (splits - 1))
    assert std * unbias == pytest.approx(float(ref_std), abs=2 * unbias * (mean + np.sqrt(splits - 1) * std) * d_kl)


def _write_pngs(folder, images_u8):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images_u8):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:04d}.png"))


def test_streaming_sources_agree(net, tmp_path):
    imgs = as_uint8(smooth_images(30, seed=6))
    _write_pngs(tmp_path / "folder" / "sub", imgs)  # recursive listing
    shard = tmp_path / "data-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, im in enumerate(imgs):
            buf = io.BytesIO()
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, format="PNG")
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    ev = FIDEvaluator(net, batch_size=7, progress=False)
    base = ev.compute_statistics(imgs)
    # the same images in the same batches of 7: the same ops in the same order, so the same statistics
    for src in (str(tmp_path / "folder"), str(shard), (imgs[i:i + 7] for i in range(0, 30, 7))):
        s = ev.compute_statistics(src)
        assert s.num_images == 30
        np.testing.assert_array_equal(s.mu, base.mu)
        np.testing.assert_array_equal(s.sigma, base.sigma)
    # batches of 4: the net runs on other batch shapes (a conv may reduce in another order), so each feature
    # may move by its float32 error t max|f|, t = gemm_rel_tol(float32, 72, depth=3) (TinyFeatureNet); the mean
    # moves by as much, the covariance (sum f_i f_j - n mu_i mu_j) / (n - 1) by <= 4 n t max|f|^2 / (n - 1) (the
    # float64 sums' own rounding, ~1e-16 relative, is negligible next to that)
    s = ev.compute_statistics((imgs[i:i + 4] for i in range(0, 30, 4)))
    with torch.no_grad():
        fmax = float(net(imgs).abs().max())
    t, n = gemm_rel_tol(torch.float32, 72, depth=3), 30
    np.testing.assert_allclose(s.mu, base.mu, rtol=0, atol=t * fmax)
    np.testing.assert_allclose(s.sigma, base.sigma, rtol=0, atol=4 * n * t * fmax ** 2 / (n - 1))
    assert ev.compute_statistics(str(tmp_path / "folder"), max_images=11).num_images == 11


def test_empty_folder_and_bad_stats_errors(net, tmp_path):
    ev = FIDEvaluator(net, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ev.compute_statistics(str(tmp_path / "empty"))
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(KeyError, match="mu"):
        load_statistics(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        load_statistics(tmp_path / "missing.npz")


# ---------------------------------------------------------------------------------------------
# FID-Inception architecture
# ---------------------------------------------------------------------------------------------


def test_missing_inception_weights_error(monkeypatch, tmp_path):
    monkeypatch.delenv("DREAM_FID_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="DREAM_FID_WEIGHTS"):
        FIDEvaluator("inception")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_fid_inception(tmp_path / "nope.pth")
    monkeypatch.setenv("DREAM_FID_WEIGHTS", str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="not found"):
        FIDEvaluator()


def test_resize_bilinear_tf1_semantics():
    x = torch.arange(4.0).view(1, 1, 1, 4)
    # TF1 align_corners=False: src = dst * in / out, no half-pixel shift, clamp at the edge.
    out = resize_bilinear_tf1(x, (1, 8))
    assert torch.equal(out, torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]).view(1, 1, 1, 8))
    y = torch.randn(2, 3, 10, 12)
    assert torch.equal(resize_bilinear_tf1(y, (5, 6)), y[:, :, ::2, ::2])
    assert torch.equal(resize_bilinear_tf1(y, (10, 12)), y)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    model = FIDInceptionV3()
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_inception_layout_matches_torchvision(inception_file, monkeypatch):
    """Our random-init file loads strictly into torchvision's InceptionV3 (num_classes=1008, no aux
    head -- the layout of torch-fidelity / pytorch-fid weights), and with the FID pooling quirks
    applied to torchvision's blocks both networks give the same 2048-d features."""
    import torchvision.models.inception as tvi

    path, ours = inception_file
    sd = torch.load(path, weights_only=True)
    assert len(sd) == NUM_STATE_TENSORS == 566
    assert sum(v.numel() for k, v in sd.items() if "num_batches" not in k and "running" not in k) == 23_850_960
    assert sd["fc.weight"].shape == (1008, 2048) and sd["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    tv = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False).eval()
    tv.load_state_dict(sd, strict=True)
    assert [k for k in tv.state_dict()] == list(sd)

    imgs = as_uint8(smooth_images(1, seed=7, size=40))
    loaded = load_fid_inception(path)
    with torch.no_grad():
        feats = loaded.forward_all(imgs)
        x = loaded.preprocess(imgs)
        # torchvision's blocks call F.avg_pool2d; the FID network excludes padding from the average
        # and max-pools in Mixed_7c.
        fake_f = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
        monkeypatch.setattr(tvi, "F", fake_f)

        def torchvision_features(tv, x):
            fake_f.avg_pool2d = lambda t, kernel_size, stride, padding: F.avg_pool2d(
                t, kernel_size, stride, padding, count_include_pad=False)
            for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                         "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                         "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b"]:
                x = getattr(tv, name)(x)
            fake_f.avg_pool2d = lambda t, kernel_size, stride, padding: F.max_pool2d(t, kernel_size, stride, padding)
            return tv.Mixed_7c(x).mean((2, 3))

        ref = torchvision_features(tv, x)
        tv64 = copy.deepcopy(tv).double()
        truth = torchvision_features(tv64, x.double())        # the same preprocessed input, in float64
    assert ref.abs().max() > 0
    # two float32 implementations of ~50 conv layers: 2x rule against torchvision's blocks in float64
    assert_2x(feats["2048"], ref, truth, "FID-Inception 2048-d features")
    logits = ref @ sd["fc.weight"].t()
    assert_2x(feats["logits_unbiased"], logits, truth @ tv64.fc.weight.t(), "FID-Inception logits")


def test_inception_fid_end_to_end_offline(inception_file, tmp_path, monkeypatch):
    path, _ = inception_file
    a, b = as_uint8(smooth_images(2, seed=8, size=32)), as_uint8(smooth_images(2, seed=9, size=32))
    _write_pngs(tmp_path / "a", a)
    monkeypatch.setenv("DREAM_FID_WEIGHTS", str(path))
    ev = FIDEvaluator(batch_size=2, progress=False)  # weights from the environment variable
    assert ev.has_logits
    res = ev.evaluate(b, str(tmp_path / "a"), is_splits=2)
    assert np.isfinite(res["fid"]) and res["fid"] > 0
    assert res["num_images"] == 2 and res["num_reference_images"] == 2
    assert res["inception_score_mean"] >= 1.0


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_fid_on_image_folders(tmp_path):
    import json

    from dream.cli import main
    from dream.eval.features import PixelFeatureExtractor

    a = as_uint8(smooth_images(24, seed=10))
    b = as_uint8(smooth_images(20, seed=11) * 0.7)
    _write_pngs(tmp_path / "real", a)
    _write_pngs(tmp_path / "fake", b)
    out, cache = tmp_path / "fid.json", tmp_path / "cache"
    rc = main(["eval", "fid", "--images", str(tmp_path / "fake"), "--ref", str(tmp_path / "real"),
               "--features", "pixels", "--batch-size", "8", "--out", str(out), "--cache-dir", str(cache), "--quiet",
               "--save-stats", str(tmp_path / "fake_stats.npz")])
    assert rc == 0
    res = json.loads(out.read_text())
    # the CLI's batches (8) on the same decoded pixels: the same ops in the same order, so the same number
    ev = FIDEvaluator(PixelFeatureExtractor(), batch_size=8, progress=False)
    expected = ev.evaluate(b, a)["fid"]
    assert res["metric"] == "fid" and res["num_images"] == 20 and res["num_reference_images"] == 24
    assert res["fid"] == expected and expected > 0.01
    assert "inception_score_mean" not in res  # pixel features have no classifier logits
    assert len(list(cache.glob("fidstats-*.npz"))) == 1  # reference statistics cached
    # statistics files on both sides give the same number
    rc = main(["eval", "fid", "--images", str(tmp_path / "fake_stats.npz"), "--ref", str(next(cache.glob("*.npz"))),
               "--features", "pixels", "--out", str(out), "--no-cache", "--quiet"])
    assert rc == 0 and json.loads(out.read_text())["fid"] == expected
    with pytest.raises(ValueError, match="no images"):
        (tmp_path / "empty").mkdir()
        main(["eval", "fid", "--images", str(tmp_path / "empty"), "--ref", str(tmp_path / "real"),
              "--features", "pixels", "--no-cache", "--quiet"])
