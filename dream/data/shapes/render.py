"""ShapesWorld rendering: shape masks, the seeded draw helper and the :class:`ShapesWorld` generator."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from .config import (_COUNT_TEMPLATES, _PAIR_TEMPLATES, _RELATION_PHRASES, _RELATION_TEMPLATES, _SINGLE_TEMPLATES,
                     BACKGROUND_NAMES, PALETTE, RELATIONS, SAMPLE_TYPES, SHAPES, SPLITS, SIZE_WORDS, ShapesConfig, ShapesPrompt,
                     ShapesSample, _entity_phrase, seed_for, size_class, validate_spec)

# ----------------------------------------------------------------------------------------------------
# Drawing helpers
# ----------------------------------------------------------------------------------------------------

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
# Generator
# ----------------------------------------------------------------------------------------------------

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
