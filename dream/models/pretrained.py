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
