"""CUDA paths of the trainer and the sampler (marker ``gpu``; skipped without a GPU).

Run on a CUDA machine with ``TRITON_INTERPRET=0 pytest -m gpu tests/test_gpu.py tests/test_kernels.py``.
The user's generator stays on the CPU (results do not depend on the accelerator); draws happen there and move.
"""
import pytest
import torch

import dream
from dream.pipeline import DreamPipeline
from dream.train import TrainConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = {"clip_vocab_size": 49408, "img_size": 32, "vae_stride": 1, "patch_size": 8, "vae_embed_dim": 3}


def test_trainer_runs_on_cuda_with_a_cpu_generator(tmp_path):
    from dream.train.loop import Trainer

    cfg = TrainConfig(model="dream_test", model_overrides=TINY, text_encoder="random", batch_size=8, steps=3,
                      log_every=1, ckpt_every=0, precision="bf16", lr=1e-3, warmup_steps=1, ema_decay=0.9,
                      masking={"preset": "dream"}, steps_per_epoch=1, device="cuda", num_workers=2,
                      sample_prompts=[])
    tr = Trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    res = tr.fit()
    assert res["steps"] == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in tr.history)
    after = tr.model.state_dict()
    assert next(tr.model.parameters()).is_cuda
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_generate_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = dream.create_model("dream_test", **TINY).eval()
    from dream.models.tokenizers import PixelTokenizer

    imgs = {}
    for dev in ("cpu", "cuda"):
        pipe = DreamPipeline(model, PixelTokenizer(8, 32), text_encoder="random", device=dev)
        imgs[dev] = pipe.generate(["a red square", "two blue circles"], num_iter=4, cfg=2.0, seed=3,
                                  autocast=None).float().cpu()
    assert imgs["cuda"].shape == (2, 3, 32, 32)
    torch.testing.assert_close(imgs["cuda"], imgs["cpu"], atol=2e-2, rtol=0)
