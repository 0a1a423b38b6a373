"""ShapesWorld: a deterministic synthetic text-to-image dataset with exact compositional ground truth.

Images show 1-4 flat-coloured objects (square, circle, triangle, cross) in well separated colours on a
plain background. Every image comes with a templated caption and structured metadata (the objects and
the caption's *prompt spec*), so generated images can be checked exactly by
:mod:`dream.eval.compositional`.

Design follows the CPU-scale reproduction plan of the project (ShapesWorld, alignment spec E.1), in the
spirit of the TIFA / DSG / GenEval compositional benchmarks (arXiv 2303.11897, 2310.18235, 2310.11513):
single objects, counts, pairs of objects and spatial relations. Re-implemented from that description.

Reproducibility: sample ``index`` of split ``split`` is drawn from a ``torch.Generator`` seeded with a
stable hash of ``(base_seed, split, index)``; any sample can be regenerated from its index alone and the
splits are disjoint seed namespaces. No ``random`` / ``numpy`` RNG is used.

Prompt spec (JSON-serialisable dict)::

    {"type": "single" | "count" | "pair" | "relation",
     "entities": [{"colour": "red", "shape": "square", "count": 1, "size": None | "small" | "large"}, ...],
     "relation": None | {"subject": 0, "predicate": "left of" | "right of" | "above" | "below", "object": 1}}

The image shows exactly the objects named by the spec (no distractors). Coordinates are in pixels,
x to the right, y downwards ("above" = smaller y); bounding boxes are ``[x0, y0, x1, y1]`` with
exclusive ends.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "SHAPES", "PALETTE", "RELATIONS", "SAMPLE_TYPES", "SPLITS", "ShapesConfig", "ShapesSample", "ShapesPrompt",
    "ShapesWorld", "write_shards", "parse_caption", "validate_spec", "size_class", "relation_holds",
    "shape_mask", "seed_for", "to_float_image",
]

# ----------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
PLURALS: dict[str, str] = {"square": "squares", "circle": "circles", "triangle": "triangles", "cross": "crosses"}
# Corners of the RGB cube: pairwise angles (seen from a black background) are >= 35 degrees.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "magenta": (255, 0, 255), "cyan": (0, 255, 255), "white": (255, 255, 255),
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SAMPLE_TYPES: tuple[str, ...] = ("single", "count", "pair", "relation")
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
SIZE_WORDS: tuple[str, ...] = ("small", "large")
BACKGROUND_NAMES: dict[tuple[int, int, int], str] = {(0, 0, 0): "black", (128, 128, 128): "grey",
                                                      (255, 255, 255): "white"}

# Caption templates; {e}, {e1}, {e2} are entity phrases ("a red square", "three blue circles"),
# {rel} a relation phrase, {bg} the background name.
_SINGLE_TEMPLATES = ("{e}", "a picture of {e}", "an image of {e}", "there is {e}", "{e} on a {bg} background",
                     "a photo of {e}", "a drawing of {e}")
_COUNT_TEMPLATES = ("{e}", "a picture of {e}", "an image of {e}", "there are {e}", "{e} on a {bg} background",
                    "a photo of {e}")
_PAIR_TEMPLATES = ("{e1} and {e2}", "a picture of {e1} and {e2}", "{e1} with {e2}", "an image of {e1} and {e2}",
                   "{e1} and {e2} on a {bg} background", "a photo of {e1} and {e2}")
_RELATION_TEMPLATES = ("{e1} {rel} {e2}", "{e1} is {rel} {e2}", "a picture of {e1} {rel} {e2}",
                       "{e1} placed {rel} {e2}", "an image of {e1} {rel} {e2}")
_RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}


# ----------------------------------------------------------------------------------------------------
# Config and records
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapesConfig:
    """ShapesWorld generator settings. Sizes are fractions of ``image_size``."""

    image_size: int = 32
    max_objects: int = 4                       # objects per image: 1 .. max_objects
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(PALETTE)
    background: tuple[int, int, int] = (0, 0, 0)
    type_weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)   # over SAMPLE_TYPES
    min_size: float = 0.25                     # object side (bbox) range; 8..14 px at 32x32
    max_size: float = 0.4375
    small_max: float = 0.3125                  # objects called "small" are <= 10 px at 32x32
    large_min: float = 0.375                   # objects called "large" are >= 12 px at 32x32
    size_word_prob: float = 0.2                # probability that an entity's caption names its size
    min_gap: int = 4                           # empty pixels between any two objects' bounding boxes
    margin: int = 1                            # empty pixels between objects and the image border
    antialias: int = 4                         # supersampling factor per axis; 1 = hard edges
    holdout_combos: tuple[tuple[str, str], ...] = ()   # (colour, shape) pairs that appear only in "test"
    base_seed: int = 0
    dtype: str = "uint8"                       # sample images: "uint8" (3,H,W) or "float" in [-1, 1]

    def __post_init__(self):
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.max_objects <= 6:
            raise ValueError(f"max_objects must be in [1, 6], got {self.max_objects}")
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad or len(set(self.shapes)) != len(self.shapes) or not self.shapes:
            raise ValueError(f"shapes must be distinct names from {SHAPES}, got {self.shapes}")
        bad = [c for c in self.colours if c not in PALETTE]
        if bad or len(set(self.colours)) != len(self.colours) or len(self.colours) < 2:
            raise ValueError(f"colours must be >= 2 distinct names from {tuple(PALETTE)}, got {self.colours}")
        if tuple(self.background) in [PALETTE[c] for c in self.colours]:
            raise ValueError(f"background {self.background} equals a palette colour")
        if len(self.type_weights) != len(SAMPLE_TYPES) or min(self.type_weights) < 0 or sum(self.type_weights) <= 0:
            raise ValueError(f"type_weights must be {len(SAMPLE_TYPES)} non-negative weights over {SAMPLE_TYPES}")
        if not 0 < self.min_size <= self.small_max < self.large_min <= self.max_size <= 0.6:
            raise ValueError("need 0 < min_size <= small_max < large_min <= max_size <= 0.6")
        if self.dtype not in ("uint8", "float"):
            raise ValueError(f"dtype must be 'uint8' or 'float', got {self.dtype!r}")
        for combo in self.holdout_combos:
            if len(combo) != 2 or combo[0] not in self.colours or combo[1] not in self.shapes:
                raise ValueError(f"holdout combo {combo} must be (colour, shape) from the config's vocabulary")
        if len(self.holdout_combos) >= len(self.colours) * len(self.shapes) - 1:
            raise ValueError("holdout_combos leaves fewer than 2 colour-shape combinations for training")

    # Pixel sizes ---------------------------------------------------------------------------------------
    @property
    def size_range_px(self) -> tuple[int, int]:
        return round(self.min_size * self.image_size), round(self.max_size * self.image_size)

    @property
    def small_range_px(self) -> tuple[int, int]:
        return self.size_range_px[0], round(self.small_max * self.image_size)

    @property
    def large_range_px(self) -> tuple[int, int]:
        return round(self.large_min * self.image_size), self.size_range_px[1]

    @property
    def size_boundary_px(self) -> float:
        """Objects with side <= this are "small", larger ones "large"."""
        return (self.small_range_px[1] + self.large_range_px[0]) / 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShapesConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ShapesConfig fields: {sorted(unknown)}")
        kw = dict(d)
        for k in ("shapes", "colours", "type_weights"):
            if k in kw:
                kw[k] = tuple(kw[k])
        if "background" in kw:
            kw["background"] = tuple(int(v) for v in kw["background"])
        if "holdout_combos" in kw:
            kw["holdout_combos"] = tuple(tuple(c) for c in kw["holdout_combos"])
        return cls(**kw)


@dataclass
class ShapesSample:
    """One ShapesWorld sample: ``image`` (3, H, W) uint8 or float in [-1, 1], ``caption``, ``meta``."""

    image: torch.Tensor
    caption: str
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ShapesPrompt:
    """A prompt for generation evaluation: caption plus its prompt spec (no image)."""

    caption: str
    spec: dict


# ----------------------------------------------------------------------------------------------------
# Helpers shared with the verifier
# ----------------------------------------------------------------------------------------------------

def seed_for(base_seed: int, namespace: str, index: int) -> int:
    """Stable 63-bit seed for ``(base_seed, namespace, index)`` (blake2b; independent of PYTHONHASHSEED)."""
    h = hashlib.blake2b(f"shapesworld:{int(base_seed)}:{namespace}:{int(index)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def size_class(size_px: float, config: ShapesConfig) -> str:
    """``"small"`` if an object's bbox side is <= ``config.size_boundary_px`` else ``"large"``."""
    return "small" if size_px <= config.size_boundary_px else "large"


def relation_holds(predicate: str, subject_xy: Sequence[float], object_xy: Sequence[float]) -> bool:
    """Whether ``subject <predicate> object`` holds for two object centres (x right, y down)."""
    (sx, sy), (ox, oy) = subject_xy, object_xy
    if predicate == "left of":
        return sx < ox
    if predicate == "right of":
        return sx > ox
    if predicate == "above":
        return sy < oy
    if predicate == "below":
        return sy > oy
    raise ValueError(f"unknown relation {predicate!r}; expected one of {RELATIONS}")


def to_float_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 image(s) in [0, 255] -> float32 in [-1, 1]."""
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    return image.float() / 127.5 - 1.0


class _Draws:
    """Uniform draws from a ``torch.Generator``, fetched in blocks (one torch call per 256 numbers).

    Python-level sampling (rejection placement, template choice) then costs no per-draw torch overhead
    while all randomness still comes from the seeded torch generator.
    """

    def __init__(self, generator: torch.Generator, block: int = 256):
        self.generator, self.block = generator, block
        self._buf: list[float] = []
        self._pos = 0

    def uniform(self) -> float:
        if self._pos >= len(self._buf):
            self._buf = torch.rand(self.block, generator=self.generator, dtype=torch.float64).tolist()
            self._pos = 0
        self._pos += 1
        return self._buf[self._pos - 1]

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high] (inclusive)."""
        return low + min(high - low, int(self.uniform() * (high - low + 1)))

    def bernoulli(self, p: float) -> bool:
        return self.uniform() < p

    def weighted(self, weights: Sequence[float]) -> int:
        """Index drawn with probability proportional to ``weights``."""
        u, acc = self.uniform() * sum(weights), 0.0
        last = max(i for i, w in enumerate(weights) if w > 0)
        for i, w in enumerate(weights):
            acc += w
            if u < acc and w > 0:
                return i
        return last

    def sample(self, n: int, k: int) -> list[int]:
        """``k`` distinct indices from ``range(n)`` (partial Fisher-Yates)."""
        pool = list(range(n))
        for i in range(k):
            j = self.randint(i, n - 1)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


def _as_draws(generator) -> "_Draws":
    return generator if isinstance(generator, _Draws) else _Draws(generator)


def shape_mask(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-test of one shape at normalised bbox coordinates ``u, v`` in [0, 1) (x right, y down)."""
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "square":
        return inside
    du, dv = (u - 0.5).abs(), (v - 0.5).abs()
    if shape == "circle":
        return inside & (du * du + dv * dv < 0.25)
    if shape == "triangle":                       # apex at the top centre, base along the bottom edge
        return inside & (du <= v * 0.5)
    if shape == "cross":                          # arms one third of the side wide
        return inside & ((du < 1.0 / 6.0) | (dv < 1.0 / 6.0))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _shape_masks(shape_ids: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`shape_mask` for per-element shape ids (indices into :data:`SHAPES`, broadcast with u, v)."""
    out = None
    for i, name in enumerate(SHAPES):
        m = shape_mask(name, u, v) & (shape_ids == i)
        out = m if out is None else out | m
    return out


def shape_template_area(shape: str) -> float:
    """Area of a shape relative to its bounding box."""
    return {"square": 1.0, "circle": torch.pi / 4, "triangle": 0.5, "cross": 5.0 / 9.0}[shape]


# ----------------------------------------------------------------------------------------------------
# Caption parsing (inverse of the templates)
# ----------------------------------------------------------------------------------------------------

_WORD_TO_NUM = {"a": 1, "an": 1, **{w: n for n, w in NUMBER_WORDS.items()}}
_ENTITY_RE = re.compile(
    r"\b(an|a|one|two|three|four|five|six)\s+(?:(small|large)\s+)?(" + "|".join(PALETTE) + r")\s+("
    + "|".join(list(PLURALS.values()) + list(SHAPES)) + r")\b")
_REL_RE = re.compile("|".join(re.escape(p) for ps in _RELATION_PHRASES.values()
                              for p in sorted(ps, key=len, reverse=True)))


def parse_caption(caption: str) -> dict:
    """Parse a ShapesWorld caption back into its prompt spec.

    Args:
        caption: a caption made by the ShapesWorld templates (case and final punctuation are ignored).

    Returns:
        The prompt spec dict (see the module docstring).

    Raises:
        ValueError: if the caption names no object, or more than two.
    """
    text = caption.lower().strip().rstrip(".")
    found = list(_ENTITY_RE.finditer(text))
    if not found or len(found) > 2:
        raise ValueError(f"cannot parse ShapesWorld caption {caption!r}: found {len(found)} object phrases")
    inv_plural = {p: s for s, p in PLURALS.items()}
    entities = []
    for m in found:
        count_word, size, colour, noun = m.groups()
        entities.append({"colour": colour, "shape": inv_plural.get(noun, noun),
                         "count": _WORD_TO_NUM[count_word], "size": size})
    relation = None
    if len(found) == 2:
        between = text[found[0].end():found[1].start()]
        rel = _REL_RE.search(between)
        if rel is not None:
            predicate = next(k for k, ps in _RELATION_PHRASES.items() if rel.group(0) in ps)
            relation = {"subject": 0, "predicate": predicate, "object": 1}
    if len(entities) == 1:
        kind = "single" if entities[0]["count"] == 1 else "count"
    else:
        kind = "relation" if relation is not None else "pair"
    return {"type": kind, "entities": entities, "relation": relation}


def _entity_phrase(e: dict) -> str:
    n = int(e["count"])
    size = f"{e['size']} " if e.get("size") else ""
    if n == 1:
        return f"a {size}{e['colour']} {e['shape']}"
    return f"{NUMBER_WORDS[n]} {size}{e['colour']} {PLURALS[e['shape']]}"


def validate_spec(spec: dict, config: ShapesConfig | None = None) -> None:
    """Raise ``ValueError`` naming the problem if ``spec`` is not a valid prompt spec."""
    if not isinstance(spec, dict) or "entities" not in spec or "type" not in spec:
        raise ValueError(f"prompt spec must be a dict with 'type' and 'entities', got {spec!r}")
    if spec["type"] not in SAMPLE_TYPES:
        raise ValueError(f"spec type {spec['type']!r} not in {SAMPLE_TYPES}")
    colours = config.colours if config else tuple(PALETTE)
    shapes = config.shapes if config else SHAPES
    for e in spec["entities"]:
        if e.get("colour") not in colours or e.get("shape") not in shapes:
            raise ValueError(f"entity {e} has an unknown colour or shape")
        if int(e.get("count", 1)) < 1:
            raise ValueError(f"entity {e} has count < 1")
        if e.get("size") not in (None, *SIZE_WORDS):
            raise ValueError(f"entity {e} has size {e.get('size')!r}; expected None, 'small' or 'large'")
    rel = spec.get("relation")
    if rel is not None:
        if rel.get("predicate") not in RELATIONS:
            raise ValueError(f"relation {rel} has an unknown predicate; expected one of {RELATIONS}")
        n = len(spec["entities"])
        if not (0 <= rel.get("subject", -1) < n and 0 <= rel.get("object", -1) < n):
            raise ValueError(f"relation {rel} refers to missing entities")
    total = sum(int(e.get("count", 1)) for e in spec["entities"])
    if config is not None and total > config.max_objects:
        raise ValueError(f"spec asks for {total} objects, more than max_objects={config.max_objects}")


# ----------------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------------

SPLITS: tuple[str, ...] = ("train", "val", "test")
_MAX_SPECS = 5         # scene specs drawn for one index before the layout error is raised
_MAX_ATTEMPTS = 60      # full placement attempts before giving up (sizes shrink every 15 attempts)


class ShapesWorld:
    """Deterministic, seeded ShapesWorld generator.

    Example::

        world = ShapesWorld(ShapesConfig(image_size=32))
        s = world.sample(0, split="train")      # s.image (3, 32, 32) uint8, s.caption, s.meta
        images, captions, metas = world.batch(range(64), split="val")

    Args:
        config: generator settings.
    """

    def __init__(self, config: ShapesConfig | None = None):
        self.config = config if config is not None else ShapesConfig()
        cfg = self.config
        self._shape_index = {s: SHAPES.index(s) for s in SHAPES}
        held = set(tuple(c) for c in cfg.holdout_combos)
        every = [(c, s) for c in cfg.colours for s in cfg.shapes]
        self._combos = {"test": every, "train": [x for x in every if x not in held]}
        self._combos["val"] = self._combos["train"]
        self._bg = torch.tensor(cfg.background, dtype=torch.float32)

    # -- public API ----------------------------------------------------------------------------------
    def sample(self, index: int, split: str = "train", seed: int | None = None) -> ShapesSample:
        """Sample ``index`` of ``split`` (identical for identical ``(seed, split, index)``).

        Args:
            index: non-negative sample index.
            split: ``"train"``, ``"val"`` or ``"test"``.
            seed: overrides ``config.base_seed``.
        """
        meta = self.sample_meta(index, split, seed)
        image = self.render_batch([meta])[0]
        return ShapesSample(self._format(image), meta["caption"], meta)

    def sample_meta(self, index: int, split: str = "train", seed: int | None = None) -> dict:
        """Metadata (objects, spec, caption) of sample ``index`` without rendering it."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if int(index) < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        base = self.config.base_seed if seed is None else int(seed)
        s = seed_for(base, split, int(index))
        rng = _Draws(torch.Generator().manual_seed(s))
        for tries in range(_MAX_SPECS):
            spec = self._sample_spec(rng, split)
            try:
                objects = self._layout(spec, rng)
                break
            except RuntimeError:  # a rare unlucky layout (e.g. a relation between two large objects): draw again,
                if tries == _MAX_SPECS - 1:  # from the same stream, so the sample stays a function of its index
                    raise
        caption = self.prompt_from_spec(spec, generator=rng)
        return {"index": int(index), "split": split, "seed": s, "image_size": self.config.image_size,
                "background": list(self.config.background), "caption": caption, "spec": spec,
                "objects": objects}

    def batch(self, indices: Sequence[int], split: str = "train", seed: int | None = None
              ) -> tuple[torch.Tensor, list[str], list[dict]]:
        """Samples ``indices`` of ``split`` rendered together.

        Returns:
            ``(images, captions, metas)``; images (B, 3, H, W) uint8 or float in [-1, 1] per ``config.dtype``.
        """
        metas = [self.sample_meta(i, split, seed) for i in indices]
        images = self.render_batch(metas) if metas else torch.zeros(
            0, 3, self.config.image_size, self.config.image_size, dtype=torch.uint8)
        return self._format(images), [m["caption"] for m in metas], metas

    def stream(self, split: str = "train", seed: int | None = None, start: int = 0) -> Iterator[ShapesSample]:
        """Infinite iterator over samples ``start, start + 1, ...``; resume from ``meta["index"] + 1``."""
        index = int(start)
        while True:
            yield self.sample(index, split, seed)
            index += 1

    def render(self, meta_or_spec: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Render an image from sample metadata (exact) or from a prompt spec (random layout).

        Args:
            meta_or_spec: a dict with ``"objects"`` (rendered as given) or a prompt spec.
            generator: RNG for the layout of a spec (default: a generator seeded with 0).

        Returns:
            (3, H, W) image, uint8 or float in [-1, 1] per ``config.dtype``.
        """
        if "objects" not in meta_or_spec:
            meta_or_spec = self.layout(meta_or_spec, generator)
        return self._format(self.render_batch([meta_or_spec])[0])

    def layout(self, spec: dict, generator: torch.Generator | None = None) -> dict:
        """Random object layout satisfying ``spec``; returns metadata accepted by :meth:`render`."""
        validate_spec(spec, self.config)
        rng = _as_draws(generator if generator is not None else torch.Generator().manual_seed(0))
        return {"image_size": self.config.image_size, "background": list(self.config.background),
                "spec": spec, "caption": self.prompt_from_spec(spec), "objects": self._layout(spec, rng)}

    def prompt_from_spec(self, spec: dict, generator: torch.Generator | None = None,
                         template: int | None = None) -> str:
        """Caption for a prompt spec: a random paraphrase with ``generator``, else template ``template`` (0)."""
        validate_spec(spec)
        ents = spec["entities"]
        kind = spec["type"]
        templates = {"single": _SINGLE_TEMPLATES, "count": _COUNT_TEMPLATES, "pair": _PAIR_TEMPLATES,
                     "relation": _RELATION_TEMPLATES}[kind]
        rng = _as_draws(generator) if generator is not None else None
        if template is None:
            template = rng.randint(0, len(templates) - 1) if rng is not None else 0
        fmt = templates[template % len(templates)]
        bg = BACKGROUND_NAMES.get(tuple(self.config.background), "plain")
        if kind in ("single", "count"):
            return fmt.format(e=_entity_phrase(ents[0]), bg=bg)
        if kind == "pair":
            return fmt.format(e1=_entity_phrase(ents[0]), e2=_entity_phrase(ents[1]), bg=bg)
        rel = spec["relation"]
        phrases = _RELATION_PHRASES[rel["predicate"]]
        phrase = phrases[rng.randint(0, len(phrases) - 1)] if rng is not None else phrases[0]
        return fmt.format(e1=_entity_phrase(ents[rel["subject"]]), e2=_entity_phrase(ents[rel["object"]]),
                          rel=phrase, bg=bg)

    def random_prompt_specs(self, n: int, split: str = "test", generator: torch.Generator | None = None,
                            types: Sequence[str] | None = None) -> list[ShapesPrompt]:
        """``n`` prompts (caption + spec, no image) for generation evaluation.

        Without ``generator`` prompt ``i`` is seeded from ``(base_seed, "prompt:" + split, i)``, a namespace
        disjoint from the image samples. ``types`` restricts the prompt types (e.g. ``("single",)``).
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        out = []
        shared = _Draws(generator) if generator is not None else None
        for i in range(int(n)):
            rng = shared or _Draws(torch.Generator().manual_seed(seed_for(self.config.base_seed, "prompt:" + split, i)))
            spec = self._sample_spec(rng, split, types)
            out.append(ShapesPrompt(self.prompt_from_spec(spec, generator=rng), spec))
        return out

    # -- rendering -------------------------------------------------------------------------------------
    def render_batch(self, metas: Sequence[dict]) -> torch.Tensor:
        """Render many metadata dicts at once -> (B, 3, H, W) uint8.

        Each object is rasterised in its own crop with ``antialias`` x ``antialias`` supersampling
        (coverage = fraction of subsamples inside the shape) and blended onto the background; objects
        never overlap, so blending is additive.
        """
        cfg = self.config
        H = cfg.image_size
        ss = max(1, int(cfg.antialias))
        rows = []                                        # (image, shape id, x0, y0, x1, y1, r, g, b)
        for b, m in enumerate(metas):
            if int(m.get("image_size", H)) != H:
                raise ValueError(f"meta image_size {m.get('image_size')} != config image_size {H}")
            for o in m["objects"]:
                if o["shape"] not in self._shape_index or o["colour"] not in PALETTE:
                    raise ValueError(f"object {o} has an unknown shape or colour")
                rows.append([b, self._shape_index[o["shape"]], *[float(v) for v in o["bbox"]],
                             *PALETTE[o["colour"]]])
        img = self._bg.view(1, 1, 1, 3).repeat(len(metas), H, H, 1)          # (B, H, W, 3) in [0, 255]
        if rows:
            t = torch.tensor(rows, dtype=torch.float32)
            bi, sid, box, rgb = t[:, 0].long(), t[:, 1].long(), t[:, 2:6], t[:, 6:9]
            ox, oy = box[:, 0].floor(), box[:, 1].floor()                     # crop origins
            C = int(max((box[:, 2].ceil() - ox).max(), (box[:, 3].ceil() - oy).max()))
            g = torch.arange(C, dtype=torch.float32)
            w = (box[:, 2] - box[:, 0]).clamp_min(1e-6)[:, None, None]
            h = (box[:, 3] - box[:, 1]).clamp_min(1e-6)[:, None, None]
            alpha = torch.zeros(len(rows), C, C)
            for k, name in enumerate(SHAPES):
                sel = (sid == k).nonzero().flatten()
                if len(sel) == 0:
                    continue
                acc = torch.zeros(len(sel), C, C)
                for oyy in ((torch.arange(ss) + 0.5) / ss).tolist():
                    v = ((oy[sel, None] + g[None] + oyy - box[sel, 1:2]) / h[sel, :, 0])[:, :, None]
                    for oxx in ((torch.arange(ss) + 0.5) / ss).tolist():
                        u = ((ox[sel, None] + g[None] + oxx - box[sel, 0:1]) / w[sel, :, 0])[:, None, :]
                        acc += shape_mask(name, u, v)
                alpha[sel] = acc / (ss * ss)
            py = (oy[:, None] + g[None]).long()                               # (M, C)
            px = (ox[:, None] + g[None]).long()
            ok = ((py >= 0) & (py < H))[:, :, None] & ((px >= 0) & (px < H))[:, None, :] & (alpha > 0)
            m_i, r_i, c_i = ok.nonzero(as_tuple=True)
            contrib = alpha[m_i, r_i, c_i, None] * (rgb[m_i] - self._bg)
            img.index_put_((bi[m_i], py[m_i, r_i], px[m_i, c_i]), contrib, accumulate=True)
        return img.round().clamp(0, 255).to(torch.uint8).permute(0, 3, 1, 2).contiguous()

    def _format(self, image: torch.Tensor) -> torch.Tensor:
        return to_float_image(image) if self.config.dtype == "float" else image

    # -- sampling internals ----------------------------------------------------------------------------
    def _sample_spec(self, rng: _Draws, split: str, types: Sequence[str] | None = None) -> dict:
        cfg = self.config
        weights = torch.tensor([float(w) for w in cfg.type_weights])
        if types is not None:
            bad = [t for t in types if t not in SAMPLE_TYPES]
            if bad:
                raise ValueError(f"unknown prompt types {bad}; expected a subset of {SAMPLE_TYPES}")
            weights = weights * torch.tensor([1.0 if t in types else 0.0 for t in SAMPLE_TYPES])
            if weights.sum() <= 0:
                weights = torch.tensor([1.0 if t in types else 0.0 for t in SAMPLE_TYPES])
        combos = self._combos[split]
        if cfg.max_objects < 2 or len(combos) < 2:
            weights = weights * torch.tensor([1.0, 1.0 if cfg.max_objects >= 2 else 0.0, 0.0, 0.0])
        if weights.sum() <= 0:
            raise ValueError(f"no feasible prompt type among {types} with max_objects={cfg.max_objects}")
        kind = SAMPLE_TYPES[rng.weighted(weights.tolist())]
        if kind == "single":
            counts = [1]
        elif kind == "count":
            counts = [rng.randint(2, cfg.max_objects)]
        elif kind == "pair":
            total = rng.randint(2, cfg.max_objects)
            c1 = rng.randint(1, total - 1)
            counts = [c1, total - c1]
        else:
            counts = [1, 1]
        picks = rng.sample(len(combos), len(counts))
        total = sum(counts)
        entities = []
        for count, p in zip(counts, picks):
            colour, shape = combos[p]
            size = None
            if rng.bernoulli(cfg.size_word_prob):
                allowed = SIZE_WORDS if total <= 2 else ("small",)
                size = allowed[rng.randint(0, len(allowed) - 1)]
            entities.append({"colour": colour, "shape": shape, "count": count, "size": size})
        relation = None
        if kind == "relation":
            relation = {"subject": 0, "predicate": RELATIONS[rng.randint(0, len(RELATIONS) - 1)], "object": 1}
        return {"type": kind, "entities": entities, "relation": relation}

    def _layout(self, spec: dict, rng: _Draws) -> list[dict]:
        """Sizes and non-overlapping positions for the spec's objects (relation enforced)."""
        cfg = self.config
        H = cfg.image_size
        ents = spec["entities"]
        n_total = sum(int(e["count"]) for e in ents)
        lo, hi = cfg.size_range_px
        # Crowded images get smaller unnamed objects so that placement succeeds.
        crowd_hi = max(lo, round(hi - (hi - lo) * max(0, n_total - 2) / max(1, cfg.max_objects - 1)))
        (s_lo, s_hi), (l_lo, l_hi) = cfg.small_range_px, cfg.large_range_px
        # Unnamed sizes avoid the gap between "small" and "large", so every object is clearly one of them.
        unnamed = [s for s in range(lo, crowd_hi + 1) if s <= s_hi or s >= l_lo]
        ent_of, sizes, floors = [], [], []
        for ei, e in enumerate(ents):
            for _ in range(int(e["count"])):
                ent_of.append(ei)
                if e.get("size") == "small":
                    sizes.append(rng.randint(s_lo, s_hi))
                elif e.get("size") == "large":
                    sizes.append(rng.randint(l_lo, l_hi))
                else:
                    sizes.append(unnamed[rng.randint(0, len(unnamed) - 1)])
                floors.append(l_lo if e.get("size") == "large" else lo)
        rel = spec.get("relation")
        parties = {}
        if rel is not None:
            parties = {ent_of.index(rel["subject"]): "subject", ent_of.index(rel["object"]): "object"}
        order = sorted(range(len(sizes)), key=lambda j: -sizes[j])
        gap, margin = cfg.min_gap, cfg.margin
        for attempt in range(_MAX_ATTEMPTS):
            if attempt and attempt % 15 == 0:
                sizes = [max(f, s - 1 if not s_hi < s - 1 < l_lo else s_hi) for s, f in zip(sizes, floors)]
            placed: dict[int, tuple[int, int, int]] = {}
            for j in order:
                s = sizes[j]
                hi = H - margin - s
                if hi < margin:
                    break
                other = next((k for k in parties if k != j), None) if j in parties else None
                # All top-left positions, then the ones compatible with the placed objects; pick uniformly.
                pos = np.arange(margin, hi + 1)
                X, Y = pos[None, :], pos[:, None]                            # broadcast to (n, n)
                ok = np.ones((len(pos), len(pos)), dtype=bool)
                for px, py, ps in placed.values():
                    ok &= (X >= px + ps + gap) | (X + s + gap <= px) | (Y >= py + ps + gap) | (Y + s + gap <= py)
                if other in placed:
                    o = placed[other]
                    ok &= (_relation_ok(rel["predicate"], X, Y, s, *o, gap) if parties[j] == "subject"
                           else _relation_ok(rel["predicate"], *o, X, Y, s, gap))
                cand = np.flatnonzero(ok)
                if len(cand) == 0:
                    break
                k = int(cand[rng.randint(0, len(cand) - 1)])
                placed[j] = (int(pos[k % len(pos)]), int(pos[k // len(pos)]), s)
            if len(placed) == len(sizes):
                break
        else:
            raise RuntimeError(f"could not place the objects of spec {spec} in a {H}x{H} image; "
                               "lower max_objects / max_size / min_gap or increase image_size")
        objects = []
        for j in range(len(sizes)):
            x0, y0, s = placed[j]
            e = ents[ent_of[j]]
            objects.append({"shape": e["shape"], "colour": e["colour"], "entity": ent_of[j], "size": s,
                            "size_class": size_class(s, cfg), "x": x0 + s / 2, "y": y0 + s / 2,
                            "bbox": [x0, y0, x0 + s, y0 + s]})
        return objects


def _relation_ok(predicate, sx, sy, ss, ox, oy, os_, gap):
    """Strict layout test for ``subject <predicate> object`` on boxes (x0, y0, size); numpy-broadcasts.

    Stricter than :func:`relation_holds` (which compares centres): the subject's box lies entirely on
    the named side, and the displacement along that axis dominates the other axis.
    """
    dx = np.abs((sx + ss / 2) - (ox + os_ / 2))
    dy = np.abs((sy + ss / 2) - (oy + os_ / 2))
    if predicate == "left of":
        return (sx + ss + gap <= ox) & (dx >= dy)
    if predicate == "right of":
        return (ox + os_ + gap <= sx) & (dx >= dy)
    if predicate == "above":
        return (sy + ss + gap <= oy) & (dy >= dx)
    if predicate == "below":
        return (oy + os_ + gap <= sy) & (dy >= dx)
    raise ValueError(f"unknown relation {predicate!r}")


# ----------------------------------------------------------------------------------------------------
# Webdataset shards
# ----------------------------------------------------------------------------------------------------

def _png_bytes(image: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0          # reproducible archives
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(out_dir: str, n: int, seed: int = 0, split: str = "train", image_size: int = 32,
                 shard_size: int = 1000, config: ShapesConfig | None = None, start: int = 0,
                 progress: bool = True) -> list[str]:
    """Write ``n`` ShapesWorld samples as webdataset tar shards.

    Each sample ``{key}`` (``f"{split}_{index:08d}"``) has members ``{key}.png`` (RGB image),
    ``{key}.txt`` (caption) and ``{key}.json`` (metadata incl. the prompt spec).

    Args:
        out_dir: output folder (created).
        n: number of samples (indices ``start .. start + n - 1``).
        seed: base seed (overrides ``config.base_seed``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: image side, used when ``config`` is None.
        shard_size: samples per shard.
        config: full generator config (its ``image_size`` wins over ``image_size``).
        start: first sample index.
        progress: show a tqdm progress bar.

    Returns:
        The shard paths, in order (``shapes-{split}-{k:06d}.tar``).
    """
    if n < 0 or shard_size < 1:
        raise ValueError(f"need n >= 0 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    cfg = config if config is not None else ShapesConfig(image_size=image_size)
    cfg = dataclasses.replace(cfg, base_seed=int(seed), dtype="uint8")
    world = ShapesWorld(cfg)
    os.makedirs(out_dir, exist_ok=True)
    from tqdm.auto import tqdm

    paths = []
    bar = tqdm(total=n, desc=f"shapes shards ({split})", disable=not progress, unit="img")
    for k, s0 in enumerate(range(0, n, shard_size)):
        path = os.path.join(out_dir, f"shapes-{split}-{k:06d}.tar")
        tmp = path + ".tmp"
        with tarfile.open(tmp, "w") as tar:
            count = min(shard_size, n - s0)
            for c0 in range(0, count, 256):
                idx = range(start + s0 + c0, start + s0 + min(count, c0 + 256))
                images, captions, metas = world.batch(idx, split)
                for img, cap, meta in zip(images, captions, metas):
                    key = f"{split}_{meta['index']:08d}"
                    _add_member(tar, f"{key}.png", _png_bytes(img))
                    _add_member(tar, f"{key}.txt", cap.encode("utf-8"))
                    _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
                bar.update(len(idx))
        os.replace(tmp, path)
        paths.append(path)
    bar.close()
    return paths
