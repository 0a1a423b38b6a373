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
from .config import (BACKGROUND_NAMES, NUMBER_WORDS, PALETTE, PLURALS, RELATIONS, SAMPLE_TYPES, SHAPES, SIZE_WORDS,
                     SPLITS, ShapesConfig, ShapesPrompt, ShapesSample, parse_caption, relation_holds, seed_for,
                     size_class, validate_spec)
from .negatives import hard_negative_specs, spec_key
from .render import ShapesWorld, shape_mask, shape_template_area, to_float_image
from .shards import write_shards

__all__ = [
    "SHAPES", "PLURALS", "PALETTE", "RELATIONS", "SAMPLE_TYPES", "SPLITS", "NUMBER_WORDS", "SIZE_WORDS",
    "BACKGROUND_NAMES", "ShapesConfig", "ShapesSample", "ShapesPrompt", "ShapesWorld", "write_shards",
    "parse_caption", "validate_spec", "size_class", "relation_holds", "shape_mask", "shape_template_area",
    "seed_for", "to_float_image", "hard_negative_specs", "spec_key",
]
