"""The shipped ``sd_tiny.shapes``: a diffusers folder that stock diffusers loads and samples with no ``dream`` code,
listed in the pretrained table with the sha256 of every file, its sampler settings and its provenance."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from dream.models import pretrained as P  # noqa: E402

TAG = "sd_tiny.shapes"

# Runs in a fresh interpreter: `dream` is made unimportable, so only torch / diffusers / transformers are used.
_STOCK = r"""
import json, sys
sys.modules["dream"] = None                      # any `import dream...` now raises ImportError
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True)
pipe.set_progress_bar_config(disable=True)
out = pipe("a red square", num_inference_steps=int(sys.argv[2]), guidance_scale=float(sys.argv[3]),
           generator=torch.Generator().manual_seed(0), output_type="pt")
img = out.images
assert not any(m.startswith("dream") for m in sys.modules if sys.modules[m] is not None)
print(json.dumps({"shape": list(img.shape), "min": float(img.min()), "max": float(img.max()),
                  "finite": bool(torch.isfinite(img).all()), "unet_dtype": str(pipe.unet.dtype),
                  "text_dtype": str(pipe.text_encoder.dtype), "vae_dtype": str(pipe.vae.dtype),
                  "classes": [type(getattr(pipe, k)).__name__ for k in
                              ("unet", "text_encoder", "tokenizer", "vae", "scheduler")]}))
"""


def test_shipped_folder_loads_and_samples_with_stock_diffusers_only(tmp_path):
    folder = P.pretrained_path(TAG)                               # sha256-checked
    cfg = P.get_pretrained_cfg(TAG)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", _STOCK, str(folder), "2", str(cfg.sampler["guidance_scale"])],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["shape"] == [1, 3, 32, 32] and out["finite"]
    assert 0.0 <= out["min"] <= out["max"] <= 1.0
    assert out["unet_dtype"] == out["text_dtype"] == out["vae_dtype"] == "torch.float32"   # fp16 files, fp32 load
    assert out["classes"] == ["UNet2DConditionModel", "CLIPTextModel", "CLIPTokenizer", "AutoencoderKL",
                              "DPMSolverMultistepScheduler"]


def test_table_entry_lists_every_file_and_the_recorded_sampler():
    cfg = P.get_pretrained_cfg(TAG, "diffusers")
    assert cfg.kind == "diffusers" and TAG in P.list_pretrained("diffusers")
    assert TAG not in P.list_pretrained()                       # not a DreamPipeline
    on_disk = sorted(str(p.relative_to(cfg.path)) for p in cfg.path.rglob("*") if p.is_file())
    assert on_disk == sorted(cfg.files)                         # nothing unlisted ships, nothing listed is missing
    assert P.pretrained_path(TAG) == cfg.path
    index = json.loads((cfg.path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    training = json.loads((cfg.path / "training.json").read_text())
    for k in ("num_inference_steps", "guidance_scale"):
        assert training["sampler"][k] == cfg.sampler[k], k
    sched = json.loads((cfg.path / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == training["sampler"]["scheduler"] == "DPMSolverMultistepScheduler"
    from dream.align.sd import SAMPLER_DEFAULTS

    assert set(cfg.sampler) <= set(SAMPLER_DEFAULTS)            # the generator takes the recorded settings as they are
    for k in ("command", "config", "seed", "wall_s", "hardware", "test"):
        assert k in training, k
    size = sum((cfg.path / f).stat().st_size for f in cfg.files)
    assert size < 24 * 2 ** 20, size


def test_shipped_vae_config_has_no_shift_and_the_scale_of_shapes_vae():
    vae = json.loads((P.pretrained_path(TAG) / "vae" / "config.json").read_text())
    tok = json.loads((P.pretrained_path("shapes_vae") / "config.json").read_text())["vae"]
    assert vae["shift_factor"] is None                         # folded into quant_conv / post_quant_conv
    assert vae["scaling_factor"] == tok["scaling_factor"] and vae["latent_channels"] == 16
