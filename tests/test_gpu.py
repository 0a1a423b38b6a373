"""CUDA paths of the trainer and the sampler (marker ``gpu``; skipped without a GPU).

Run on a CUDA machine with ``TRITON_INTERPRET=0 pytest -m gpu tests/test_gpu.py tests/test_kernels.py``.
The user's generator stays on the CPU (results do not depend on the accelerator); draws happen there and move.
"""
import copy

import pytest
import torch

import dream
from dream.pipeline import DreamPipeline
from dream.train import TrainConfig
from tolerance import assert_2x

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


def test_generate_on_cuda_matches_cpu(monkeypatch):
    """CUDA and CPU float32 runs are two reduction orders of the same sampling: flash-attention's 2x rule (the
    CUDA run's error at most twice the CPU run's plus rounding) against the CPU run of a float64 copy."""
    from dream.models.dream import DREAM
    from dream.models.tokenizers import PixelTokenizer
    from dream.utils import rng

    torch.manual_seed(0)
    model = dream.create_model("dream_test", **TINY).eval()
    model64 = copy.deepcopy(model).double()
    # the pipeline's random text encoder gives float32 features: cast them for the float64 copy
    monkeypatch.setattr(model64, "forward_text_aligner",
                        lambda f, mask=None: DREAM.forward_text_aligner(model64, f.double(), mask))
    # the same noise in every dtype: float32 draws (what the float32 runs see), cast
    draw = rng.randn
    monkeypatch.setattr(rng, "randn", lambda shape, generator=None, device=None, dtype=torch.float32:
                        draw(shape, generator, device, torch.float32).to(dtype))
    imgs = {}
    for name, m, dev in (("cpu", model, "cpu"), ("cuda", model, "cuda"), ("truth", model64, "cpu")):
        pipe = DreamPipeline(m, PixelTokenizer(8, 32), text_encoder="random", device=dev)
        imgs[name] = pipe.generate(["a red square", "two blue circles"], num_iter=4, cfg=2.0, seed=3,
                                   autocast=None).float().cpu()
    assert imgs["cuda"].shape == (2, 3, 32, 32)
    assert_2x(imgs["cuda"], imgs["cpu"], imgs["truth"], "CUDA vs CPU generation")
