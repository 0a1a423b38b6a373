"""The public table of weights shipped inside the package (``arch.tag`` names, in timm's style).

Every entry is a :class:`PretrainedCfg`: where its files live, the sha256 of each (checked on every load, so a
truncated or edited file fails with a message naming it instead of loading garbage), licence, how it was made,
and for pipelines the tokenizer, frozen text encoder and sampler settings it was tuned with. Everything that
needs shipped weights (``create_model``, ``DreamPipeline.from_pretrained``, ``create_tokenizer``, the
evaluation CLI, benchmarks) goes through :func:`get_pretrained_cfg` / :func:`pretrained_path`.

    >>> from dream.models.pretrained import list_pretrained, get_pretrained_cfg
    >>> list_pretrained()
    ['dream_tiny.shapes']
    >>> get_pretrained_cfg("dream_tiny.shapes").sampler["cfg"]
    2.0
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

__all__ = ["PretrainedCfg", "PretrainedFileError", "list_pretrained", "get_pretrained_cfg", "pretrained_path",
           "is_pretrained_tag", "ASSETS"]

ASSETS = Path(__file__).resolve().parents[1] / "assets"
KINDS = ("pipeline", "tokenizer", "features", "diffusers")   # diffusers: a StableDiffusionPipeline folder


class PretrainedFileError(RuntimeError):
    """A shipped file is missing or its sha256 differs from the table (a corrupted or edited install)."""


@dataclass(frozen=True)
class PretrainedCfg:
    """One shipped artefact. ``files`` maps paths relative to :attr:`path` to their sha256."""

    tag: str                                   # the public name ("dream_tiny.shapes", "shapes_vae")
    kind: str                                  # pipeline | tokenizer | features
    folder: str                                # relative to dream/assets ("" = the assets folder itself)
    files: Mapping[str, str]
    license: str = "MIT"
    description: str = ""
    arch: Optional[str] = None                 # registry architecture of a pipeline's model
    tokenizer: Optional[str] = None            # pipeline: the tokenizer it was trained with
    text_encoder: Optional[str] = None         # pipeline: frozen text-conditioner spec (minilm | random | hf:PATH)
    use_padding_mask: bool = False             # pipeline: text padding masks on
    sampler: Mapping[str, Any] = field(default_factory=dict)  # pipeline: num_iter, cfg, cfg_schedule, ...
    training: str = ""                         # how it was made (command / provenance file)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.tag}: unknown kind {self.kind!r} ({' | '.join(KINDS)})")
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))
        object.__setattr__(self, "sampler", MappingProxyType(dict(self.sampler)))

    @property
    def path(self) -> Path:
        """The folder holding the files (inside the installed package)."""
        return ASSETS / self.folder if self.folder else ASSETS

    def verify(self) -> Path:
        """Check every file's sha256; returns :attr:`path`. Raises :class:`PretrainedFileError` naming the file."""
        for rel, expected in self.files.items():
            f = self.path / rel
            if not f.is_file():
                raise PretrainedFileError(f"shipped file for {self.tag!r} is missing: {f} (reinstall dream)")
            got = _sha256(f)
            if got != expected:
                raise PretrainedFileError(
                    f"shipped file for {self.tag!r} is corrupted: {f} has sha256 {got}, expected {expected} "
                    "(reinstall dream, or restore the file from the repository)")
        return self.path


_HASHES: dict = {}


def _sha256(path: Path) -> str:
    """sha256 of a file, cached on (path, size, mtime) so repeated loads do not re-read it."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


# ------------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------------
_TABLE: dict[str, PretrainedCfg] = {}


def _register(cfg: PretrainedCfg) -> None:
    if cfg.tag in _TABLE:
        raise ValueError(f"pretrained tag {cfg.tag!r} registered twice")
    _TABLE[cfg.tag] = cfg


_register(PretrainedCfg(
    tag="dream_tiny.shapes", kind="pipeline", folder="dream_tiny_shapes", arch="dream_tiny",
    files={"model/model.safetensors": "0a5286a8a27affa932a570c7ae3db0266d4534b13ea4d8d4420ae7f670649b9c",
           "model/config.json": "37b1bd7d37c37bdbbf67b89651902adb24b2601c14d572abdba320a0b16c51e5",
           "pipeline.json": "fd8967b31957f297977bcecd3b4f8cda9efd5e156bdd8933420c82cbca8ea0f0",
           "train_config.yaml": "efaff5f19600886299e97c14de62e69e0162eaf58393c7372fe5898e4902b7aa",
           "training.json": "298a1f346c46047df45a20c8587803be0e6ab3437007f21c2cfeb64763c7c8d6"},
    description="dream_tiny (9.3 M parameters) trained by the project on ShapesWorld 32x32 with Masking Warmup, "
                "18,000 steps x 64 images; EMA weights in bf16",
    tokenizer="shapes_vae", text_encoder="random", use_padding_mask=True,
    sampler={"num_iter": 16, "cfg": 2.0, "cfg_schedule": "constant", "temperature": 1.0, "clip_denoised": 5.0},
    training="training.json (commands, seed, wall time, hardware); recipe train_config.yaml"))

_register(PretrainedCfg(
    tag="shapes_vae", kind="tokenizer", folder="shapes_vae",
    files={"model.safetensors": "466c00916b12ed48ec33888f7eafb85ca17b06a5f489442f94487b1a6ab14f6b",
           "config.json": "9686bd620eac8856a11a65e9ad63f11b93ecd1ecaa069044872f58e20ffaed09",
           "training.json": "07fdf0807681d1aadc88474241629a9510643d7d956d78e473f02563b76a4947"},
    description="ShapesWorld KL-f8 VAE tokenizer (16 latent channels, 32x32 -> 16 tokens), trained by "
                "`dream train-vae --config configs/vae_shapes.yaml`",
    training="training.json"))

_register(PretrainedCfg(
    tag="shapes_cnn", kind="features", folder="",
    files={"shapes_cnn.safetensors": "2735035c38ad62dfe7a18d3a2468062a19a399505c21955da5a9dfcf84194916",
           "shapes_cnn.json": "b2de43db642684edbfc5dcc40d36fd7d33bd5199e340eca5f397ad73b7e1ff25"},
    description="ShapesWorld feature CNN (FID features and attribute heads), trained by "
                "benchmarks/train_shapes_cnn.py",
    training="shapes_cnn.json"))

_register(PretrainedCfg(
    tag="sd_tiny.shapes", kind="diffusers", folder="sd_tiny_shapes",
    files={"model_index.json": "f769c4167385232bb0114c2de0ec913c5f307235a426cb7fa4faca5b6b64d589",
           "scheduler/scheduler_config.json": "724847dcc65b22a563fc8c72bcfd9fbf3e5d726e24ebfe12081ca4c136894ae3",
           "text_encoder/config.json": "1385682463acd7d136467d1dfeed7da651a037cfae11760167ef2ba44cf35992",
           "text_encoder/model.safetensors": "8f7a3f6fdb13758e75e87c852183bc76b5ac58be80c2f9d56d1d54076b1b879b",
           "tokenizer/merges.txt": "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a",
           "tokenizer/special_tokens_map.json": "a46982c1c09487f4ba4118d4d491a01d7e1b3a9e457662aa93f7c7159f11eaf7",
           "tokenizer/tokenizer_config.json": "bf29ef120f7718e8ee0dd35b26e4c821690adf30725001ac6c2a7d7281754bae",
           "tokenizer/vocab.json": "e089ad92ba36837a0d31433e555c8f45fe601ab5c221d4f607ded32d9f7a4349",
           "train_config.yaml": "33c989a87704cc50e9d1b3796f085c247689687fba648f02cd01245452145bae",
           "training.json": "e825ab74c45a412b7cdcf3f00caef19e8fe471da5d5d718e7b38ba63e5afa073",
           "unet/config.json": "3014d67a0cf3b039c979c53176cf2311b72b0404d3b2107f7e8e9e2cfbd2f78f",
           "unet/diffusion_pytorch_model.safetensors": "9170b34834fbea57f0d276ea1242c0071e6cc41d37f5484a27482fbf0e53fd4b",
           "vae/config.json": "358a7c4df183ea0defe2e6d784a20c84ef1fce78444e9d724baa9674f36cad1c",
           "vae/diffusion_pytorch_model.safetensors": "521dbf0dc925b8c5ff99f0e71ef1c6682bf4ece411f95a97cbed69a8f04e48f4"},
    description="Stable Diffusion in diffusers' classes on ShapesWorld 32x32 (StableDiffusionPipeline folder): "
                "UNet2DConditionModel (4.2 M) on shapes_vae's 4x4x16 latents, CLIPTextModel (3.3 M, CLIP BPE "
                "vocabulary) trained jointly, v-prediction, 3,500 steps x 64 images; EMA weights in float16",
    tokenizer="shapes_vae",                    # its VAE; the text encoder is the folder's own (text_encoder/)
    sampler={"num_inference_steps": 20, "guidance_scale": 1.5},          # with the folder's DPM-Solver++ scheduler
    training="training.json (command, seed, wall time, hardware, measured accuracy); recipe train_config.yaml"))


# ------------------------------------------------------------------------------------------------------
# Lookup
# ------------------------------------------------------------------------------------------------------
def list_pretrained(kind: Optional[str] = "pipeline") -> list[str]:
    """Shipped tags of one ``kind`` (pipeline | tokenizer | features), or of every kind with ``kind=None``."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} ({' | '.join(KINDS)})")
    return sorted(t for t, c in _TABLE.items() if kind is None or c.kind == kind)


def is_pretrained_tag(name: Any, kind: Optional[str] = None) -> bool:
    """Whether ``name`` is a shipped tag (of ``kind``)."""
    c = _TABLE.get(os.fspath(name)) if isinstance(name, (str, os.PathLike)) else None
    return c is not None and (kind is None or c.kind == kind)


def get_pretrained_cfg(tag: str, kind: Optional[str] = None) -> PretrainedCfg:
    """The table entry of ``tag``; an unknown tag raises a ``KeyError`` that lists the known ones."""
    c = _TABLE.get(tag)
    if c is None or (kind is not None and c.kind != kind):
        known = ", ".join(list_pretrained(kind)) or "none"
        raise KeyError(f"unknown pretrained tag {tag!r}; shipped {kind + ' ' if kind else ''}tags: {known}")
    return c


def pretrained_path(tag: str, kind: Optional[str] = None, verify: bool = True) -> Path:
    """The folder of a shipped tag, after checking every file's sha256 (``verify``)."""
    c = get_pretrained_cfg(tag, kind)
    return c.verify() if verify else c.path
