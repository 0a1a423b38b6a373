"""Exact resume with a rebuilt data loader: N straight steps == N/2 + resume + N/2, bit for bit, with dropout on,
for ShapesWorld and for shards, in the main process and with 2 DataLoader workers."""
import pytest
import torch

from dream.train import TrainConfig

TINY = {"clip_vocab_size": 49408, "img_size": 32, "vae_stride": 1, "patch_size": 8, "vae_embed_dim": 3,
        "attn_dropout": 0.1, "proj_dropout": 0.1}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from dream.data.shapes import write_shards

    out = tmp_path_factory.mktemp("shards")
    paths = write_shards(str(out), 24, seed=0, split="train", image_size=32, shard_size=8, progress=False)
    return _pattern(paths)


def _pattern(paths):
    """``.../shapes-train-{000000,000001,000002}.tar``"""
    head = paths[0].rsplit("-", 1)[0]
    return head + "-{" + ",".join(p.rsplit("-", 1)[1][:-4] for p in sorted(paths)) + "}.tar"


def _cfg(data, workers, steps, ckpt_every):
    # 24 samples in 3 shards, batch 4: 6 batches an epoch, so 8 steps cross an epoch boundary after the resume
    return TrainConfig(model="dream_test", model_overrides=TINY, text_encoder="random", batch_size=4, steps=steps,
                       log_every=1, ckpt_every=ckpt_every, precision="fp32", lr=1e-3, warmup_steps=1, ema_decay=0.9,
                       masking={"preset": "dream"}, steps_per_epoch=1, data=data, num_workers=workers,
                       shuffle_buffer=8, seed=3)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["shapes", "shards"])
def test_resume_with_rebuilt_loader_is_bit_exact_with_dropout(tmp_path, shards, kind, workers):
    from dream.train.loop import Trainer

    data = "shapes" if kind == "shapes" else shards
    n = 8
    full = Trainer(_cfg(data, workers, n, 0), tmp_path / "full")
    full.fit()
    Trainer(_cfg(data, workers, n // 2, n // 2), tmp_path / "part").fit()
    torch.manual_seed(12345)            # whatever the global RNG holds before the resume must not matter
    resumed = Trainer(_cfg(data, workers, n, 0), tmp_path / "part", resume=True)
    assert resumed.step == n // 2
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())
    ea, eb = full.ema.state_dict(), resumed.ema.state_dict()
    worst_ema = max(float((ea[k].float() - eb[k].float()).abs().max()) for k in ea if ea[k].numel())
    print(f"resume {kind} workers={workers}: max abs diff {worst} (EMA {worst_ema})")
    assert worst == 0.0 and worst_ema == 0.0
    assert full.history[-1]["loss"] == resumed.history[-1]["loss"]
