"""Helpers shared by several test folders (a plain module on the tests' sys.path, see conftest.py)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A DREAM small enough to train a few steps per test: 32 px, no VAE downsampling, 4 x 4 patches of 8 px.
TINY = {"clip_vocab_size": 49408, "img_size": 32, "vae_stride": 1, "patch_size": 8, "vae_embed_dim": 3}


def tiny_train_config(**kw):
    """A :class:`dream.train.TrainConfig` for ``dream_test`` at :data:`TINY` size (4 steps, checkpoints every 2)."""
    from dream.train import TrainConfig

    base = dict(model="dream_test", model_overrides=TINY, text_encoder="random", batch_size=4, steps=4,
                log_every=1, ckpt_every=2, precision="fp32", lr=1e-3, warmup_steps=1, ema_decay=0.9,
                masking={"preset": "dream"}, steps_per_epoch=1)
    base.update(kw)
    return TrainConfig(**base)


def load_script(path: Path, name: str | None = None):
    """The module of a script outside the package (benchmarks/, examples/: not importable packages), with the
    script's folder on ``sys.path`` for its own sibling imports, as when it is run directly."""
    path = Path(path)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name or f"{path.parent.name}_{path.stem}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
