"""ShapesWorld vocabulary, caption templates, :class:`ShapesConfig`, the sample / prompt records and caption parsing.

See :mod:`dream.data.shapes` for the dataset as a whole.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from dream.utils.config import ConfigBase

__all__ = [
    "SHAPES", "PLURALS", "PALETTE", "RELATIONS", "SAMPLE_TYPES", "SPLITS", "NUMBER_WORDS", "SIZE_WORDS",
    "BACKGROUND_NAMES", "ShapesConfig", "ShapesSample", "ShapesPrompt", "parse_caption", "validate_spec",
    "size_class", "relation_holds", "seed_for",
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
SPLITS: tuple[str, ...] = ("train", "val", "test")
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
class ShapesConfig(ConfigBase):
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
        super().__post_init__()
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
