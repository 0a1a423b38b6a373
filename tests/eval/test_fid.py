"""FID / IS: our statistics and Frechet distance vs torchmetrics, streaming sources, and the
FID-Inception architecture vs torchvision's InceptionV3 layout (random weights, offline)."""
from __future__ import annotations

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


class TinyFeatureNet(nn.Module):
    """Seeded random conv net: uint8 (B, 3, H, W) -> (B, 16)."""

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
    assert abs(res["fid"]) <= 1e-3


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
    tm.update(real, real=True)
    tm.update(fake, real=False)
    ref = float(tm.compute())
    assert ref > 0.01
    assert abs(ours - ref) <= 1e-4 * abs(ref), (ours, ref)


def test_frechet_distance_matches_scipy_sqrtm():
    import scipy.linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 12, generator=g, dtype=torch.float64)
    b = torch.randn(40, 12, generator=g, dtype=torch.float64) * 1.5 + 0.3
    m1, m2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)


def test_inception_score_matches_torchmetrics():
    from torchmetrics.image.inception import InceptionScore

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 30, generator=g, dtype=torch.float64) * 3
    tm = InceptionScore(feature=nn.Identity(), splits=10)
    tm.update(logits)
    torch.manual_seed(123)  # torchmetrics shuffles with the global RNG
    ref_mean, ref_std = tm.compute()
    mean, std = inception_score(logits, splits=10, generator=torch.Generator().manual_seed(123))
    assert mean == pytest.approx(float(ref_mean), rel=1e-9)
    # torchmetrics reports the unbiased std, torch-fidelity (and we) the biased one.
    assert std * np.sqrt(10 / 9) == pytest.approx(float(ref_std), rel=1e-9)


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
    for src in (str(tmp_path / "folder"), str(shard), (imgs[i:i + 4] for i in range(0, 30, 4))):
        s = ev.compute_statistics(src)
        assert s.num_images == 30
        np.testing.assert_allclose(s.mu, base.mu, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(s.sigma, base.sigma, rtol=1e-9, atol=1e-12)
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
        fake_f.avg_pool2d = lambda t, kernel_size, stride, padding: F.avg_pool2d(
            t, kernel_size, stride, padding, count_include_pad=False)
        monkeypatch.setattr(tvi, "F", fake_f)
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                     "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b"]:
            x = getattr(tv, name)(x)
        fake_f.avg_pool2d = lambda t, kernel_size, stride, padding: F.max_pool2d(t, kernel_size, stride, padding)
        x = tv.Mixed_7c(x)
        ref = x.mean((2, 3))
    scale = ref.abs().max()
    assert scale > 0
    assert (feats["2048"] - ref).abs().max() <= 1e-4 * scale
    logits = ref @ sd["fc.weight"].t()
    assert torch.allclose(feats["logits_unbiased"], logits, rtol=1e-4, atol=1e-4 * logits.abs().max())


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
    ev = FIDEvaluator(PixelFeatureExtractor(), progress=False)
    expected = ev.evaluate(b, a)["fid"]
    assert res["metric"] == "fid" and res["num_images"] == 20 and res["num_reference_images"] == 24
    assert res["fid"] == pytest.approx(expected, rel=1e-6) and expected > 0.01
    assert "inception_score_mean" not in res  # pixel features have no classifier logits
    assert len(list(cache.glob("fidstats-*.npz"))) == 1  # reference statistics cached
    # statistics files on both sides give the same number
    rc = main(["eval", "fid", "--images", str(tmp_path / "fake_stats.npz"), "--ref", str(next(cache.glob("*.npz"))),
               "--features", "pixels", "--out", str(out), "--no-cache", "--quiet"])
    assert rc == 0 and json.loads(out.read_text())["fid"] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="no images"):
        (tmp_path / "empty").mkdir()
        main(["eval", "fid", "--images", str(tmp_path / "empty"), "--ref", str(tmp_path / "real"),
              "--features", "pixels", "--no-cache", "--quiet"])
