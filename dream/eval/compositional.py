"""Exact compositional verifier for ShapesWorld images (a rule-based stand-in for a VQA model).

Pipeline (vectorised over the batch; connected-component labelling by ``scipy.ndimage.label``):

1. **Colour segmentation.** Each pixel ``x`` is compared with every palette colour ``c`` along the segment
   from the background ``bg`` to ``c`` (anti-aliasing and blur mix a colour with the background, so edge
   pixels lie on that segment): its colour is the one with the smallest angle between ``x - bg`` and
   ``c - bg``; it is foreground when its projection ``t`` onto that colour (0 = background, 1 = colour) is
   >= ``fg_threshold`` and the angle is small enough.
2. **Connected components** per colour (8-connectivity, after a ``merge_radius`` dilation so that
   fragments of one generated object merge); components below ``min_area_frac`` of the image are ignored.
3. **Shape** by template matching on the soft colour map ``t`` of each component: soft IoU with every
   shape template (square, circle, triangle, cross), drawn anti-aliased, sharp and 3x3-blurred, in two
   boxes: the thresholded bounding box, and the square box implied by the blur-invariant colour mass and
   mass centroid. The best-matching shape wins.
4. **Size** ("small" / "large") from the side implied by the colour mass and the shape's area ratio.

Questions are generated from a prompt spec in the style of TIFA (arXiv 2303.11897) and Davidsonian Scene
Graph (DSG, arXiv 2310.18235): existence ("is there a square?"), colour ("is the square red?"), count
("are there exactly three red squares?"), size ("is the red square small?") and relation ("is the green
square left of the red circle?"). DSG dependencies: colour depends on existence; count, size and
relation depend on the colour question(s) of their entities; a question whose parent fails counts as
failed. Design after the project's alignment spec E.3 (rule-based VQA); re-implemented from that
description.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dream.data.shapes import (PALETTE, PLURALS, SHAPES, ShapesConfig, ShapesPrompt, shape_mask,
                               parse_caption, relation_holds, shape_template_area, size_class, validate_spec)
from dream.utils.config import ConfigBase

__all__ = ["VerifierConfig", "Verifier", "questions_from_spec", "answer_questions", "dsg_scores",
           "colour_accuracy", "shape_accuracy", "QUESTION_TYPES"]

QUESTION_TYPES: tuple[str, ...] = ("existence", "colour", "count", "size", "relation")


@dataclass(frozen=True)
class VerifierConfig(ConfigBase):
    """Thresholds of the rule-based parser."""

    fg_threshold: float = 0.4          # min projection t of (x - bg) onto (colour - bg): 0 = bg, 1 = colour
                                       # (0.4 keeps the corners of a square under a 3x3 box blur: 4/9)
    max_colour_tan: float = 0.5        # max tan(angle) between (x - bg) and (colour - bg) (~26.6 degrees)
    min_area_frac: float = 0.008       # components smaller than this fraction of H*W are ignored (8 px at 32)
    merge_radius: int = 1              # dilation (px) before labelling: same-colour fragments this close merge
    connectivity: int = 8              # 4 or 8

    def __post_init__(self):
        super().__post_init__()
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity}")
        if self.merge_radius < 0 or not 0 < self.fg_threshold < 1.5 or self.max_colour_tan <= 0:
            raise ValueError("need merge_radius >= 0, 0 < fg_threshold < 1.5 and max_colour_tan > 0")


# ----------------------------------------------------------------------------------------------------
# Questions (DSG-style, from a prompt spec)
# ----------------------------------------------------------------------------------------------------

def _as_spec(spec) -> dict:
    if isinstance(spec, ShapesPrompt):
        return spec.spec
    if isinstance(spec, str):
        return parse_caption(spec)
    if isinstance(spec, dict) and "spec" in spec and "entities" not in spec:
        return spec["spec"]
    return spec


def questions_from_spec(spec) -> list[dict]:
    """DSG-style questions for a prompt spec (or a caption, a :class:`ShapesPrompt` or sample metadata).

    Returns:
        A list of question dicts with keys ``id``, ``type`` (one of :data:`QUESTION_TYPES`), ``text``,
        ``parents`` (ids of the questions it depends on) and the fields needed to answer it.
    """
    spec = _as_spec(spec)
    validate_spec(spec)
    qs: list[dict] = []

    def add(q: dict) -> int:
        q["id"] = len(qs)
        qs.append(q)
        return q["id"]

    exist_ids: dict[str, int] = {}
    colour_ids: list[int] = []
    for e in spec["entities"]:
        shape, colour = e["shape"], e["colour"]
        if shape not in exist_ids:
            exist_ids[shape] = add({"type": "existence", "text": f"is there a {shape}?", "shape": shape,
                                    "parents": []})
        cid = add({"type": "colour", "text": f"is the {shape} {colour}?", "shape": shape, "colour": colour,
                   "parents": [exist_ids[shape]]})
        colour_ids.append(cid)
        n = int(e.get("count", 1))
        if n >= 2:
            add({"type": "count", "text": f"are there exactly {n} {colour} {PLURALS[shape]}?", "shape": shape,
                 "colour": colour, "count": n, "parents": [cid]})
        if e.get("size"):
            add({"type": "size", "text": f"is the {colour} {shape} {e['size']}?", "shape": shape,
                 "colour": colour, "size": e["size"], "parents": [cid]})
    rel = spec.get("relation")
    if rel is not None:
        s, o = spec["entities"][rel["subject"]], spec["entities"][rel["object"]]
        add({"type": "relation",
             "text": f"is the {s['colour']} {s['shape']} {rel['predicate']} the {o['colour']} {o['shape']}?",
             "subject": (s["colour"], s["shape"]), "object": (o["colour"], o["shape"]),
             "predicate": rel["predicate"], "parents": [colour_ids[rel["subject"]], colour_ids[rel["object"]]]})
    return qs


def answer_questions(questions: Sequence[dict], objects: Sequence[dict]) -> list[bool]:
    """Answer questions exactly from a list of objects (detected ones, or ground-truth metadata objects).

    Objects need ``shape``, ``colour``, ``x``, ``y`` and ``size_class``.
    """
    answers = []
    for q in questions:
        t = q["type"]
        if t == "existence":
            a = any(o["shape"] == q["shape"] for o in objects)
        elif t in ("colour", "count", "size"):
            match = [o for o in objects if o["shape"] == q["shape"] and o["colour"] == q["colour"]]
            if t == "colour":
                a = len(match) > 0
            elif t == "count":
                a = len(match) == q["count"]
            else:
                a = any(o["size_class"] == q["size"] for o in match)
        elif t == "relation":
            subj = [o for o in objects if (o["colour"], o["shape"]) == tuple(q["subject"])]
            obj = [o for o in objects if (o["colour"], o["shape"]) == tuple(q["object"])]
            a = any(a_ is not b_ and relation_holds(q["predicate"], (a_["x"], a_["y"]), (b_["x"], b_["y"]))
                    for a_ in subj for b_ in obj)
        else:
            raise ValueError(f"unknown question type {t!r}")
        answers.append(bool(a))
    return answers


def dsg_scores(questions: Sequence[dict], answers: Sequence[bool]) -> list[bool]:
    """DSG dependency rule: a question counts as passed only if it and all its ancestors passed."""
    out: list[bool] = []
    for q, a in zip(questions, answers):
        out.append(bool(a) and all(out[p] for p in q["parents"]))
    return out


# ----------------------------------------------------------------------------------------------------
# Image parser
# ----------------------------------------------------------------------------------------------------

class Verifier:
    """Parses ShapesWorld-style images into objects and scores them against prompt specs.

    Args:
        shapes_config: the dataset config (palette, background, image size for size words).
        config: parser thresholds.
        value_range: range of float inputs (uint8 inputs are always [0, 255]).
    """

    def __init__(self, shapes_config: ShapesConfig | None = None, config: VerifierConfig | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0)):
        self.shapes_config = shapes_config if shapes_config is not None else ShapesConfig()
        self.config = config if config is not None else VerifierConfig()
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.colours = tuple(self.shapes_config.colours)
        self.shapes = SHAPES
        self._palette = torch.tensor([PALETTE[c] for c in self.colours], dtype=torch.float32) / 255.0
        self._bg = torch.tensor(self.shapes_config.background, dtype=torch.float32) / 255.0
        self._cvec = self._palette - self._bg                                # (K, 3) colour directions
        self._c2 = (self._cvec * self._cvec).sum(1)                          # (K,)
        self._areas = torch.tensor([shape_template_area(s) for s in SHAPES])

    # -- input -------------------------------------------------------------------------------------------
    def _to_unit(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (3, H, W) or (B, 3, H, W), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            return images.float() / 255.0
        if not images.is_floating_point():
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        lo, hi = self.value_range
        return ((images.float() - lo) / (hi - lo)).clamp(0, 1)

    # -- parsing -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def parse(self, images: torch.Tensor) -> list[list[dict]]:
        """Detect objects in images (uint8 or float, (3, H, W) or (B, 3, H, W)).

        Returns:
            Per image, a list of objects (largest first): ``colour``, ``shape``, ``x``, ``y`` (bbox centre,
            px), ``bbox`` ``[x0, y0, x1, y1]`` (exclusive ends), ``area`` (px), ``size`` (longest bbox side),
            ``side`` (side of the shape's box estimated from the colour mass, robust to blur), ``size_class``
            (from ``side``) and ``shape_iou`` (IoU with the chosen template).
        """
        x = self._to_unit(images).cpu()                                      # (B, 3, H, W) in [0, 1]
        B, _, H, W = x.shape
        d = x - self._bg.view(1, 3, 1, 1)                                    # offset from the background
        comps = self._components(d, self._segment(d))
        results: list[list[dict]] = [[] for _ in range(B)]
        if comps is None:
            return results
        iou = self._template_iou(comps)                                      # (N, S)
        best_iou, best_shape = iou.max(1)
        # Side of the shape's box from its colour mass: mass = template_area(shape) * side^2.
        side = (comps["mass"] / self._areas[best_shape]).sqrt()
        scale = self.shapes_config.image_size / H
        bid, kid, box, area = comps["bid"], comps["kid"], comps["box"], comps["area"]
        order = sorted(range(len(bid)), key=lambda i: (-int(area[i]), i))
        for i in order:
            x0, y0, x1, y1 = (int(v) for v in box[i])
            results[int(bid[i])].append({
                "colour": self.colours[int(kid[i])], "shape": SHAPES[int(best_shape[i])],
                "x": (x0 + x1) / 2, "y": (y0 + y1) / 2, "bbox": [x0, y0, x1, y1], "area": int(area[i]),
                "size": max(x1 - x0, y1 - y0), "side": float(side[i]),
                "size_class": size_class(float(side[i]) * scale, self.shapes_config),
                "shape_iou": float(best_iou[i])})
        return results

    def _segment(self, d: torch.Tensor) -> torch.Tensor:
        """Foreground masks per palette colour (B, K, H, W) bool from background offsets ``d`` (B, 3, H, W)."""
        cfg = self.config
        B, _, H, W = d.shape
        c, c2 = self._cvec, self._c2
        d2 = (d * d).sum(1)                                                  # (B, H, W)
        # t >= fg_threshold implies |d|^2 >= fg_threshold^2 |c|^2: only those pixels are examined.
        cand = d2 >= cfg.fg_threshold ** 2 * float(c2.min()) - 1e-6
        bi, yi, xi = cand.nonzero(as_tuple=True)
        dv = d.permute(0, 2, 3, 1)[bi, yi, xi]                               # (P, 3)
        dot = dv @ c.T                                                       # (P, K)
        par2 = dot.clamp_min(0) ** 2 / c2                                    # |parallel part|^2
        tan2 = torch.where(dot > 0, (d2[bi, yi, xi, None] - par2).clamp_min(0) / par2.clamp_min(1e-12),
                           torch.full_like(dot, float("inf")))
        tan2_best, best = tan2.min(1)                                        # smallest angle wins
        t_best = dot.gather(1, best[:, None])[:, 0] / c2[best]               # 0 = background, 1 = colour
        fg = (t_best >= cfg.fg_threshold) & (tan2_best <= cfg.max_colour_tan ** 2)
        masks = torch.zeros(B, c.shape[0], H, W, dtype=torch.bool)
        masks[bi[fg], best[fg], yi[fg], xi[fg]] = True
        return masks

    def _components(self, d: torch.Tensor, masks: torch.Tensor) -> dict | None:
        """Connected components per colour (after a ``merge_radius`` dilation); ``None`` if none is kept.

        Returns per kept component: ``bid`` image, ``kid`` colour, ``box`` ``[x0, y0, x1, y1]`` of its
        foreground pixels, ``area``, colour ``mass`` and mass ``centroid`` (x, y) over the grown region,
        and the grown region's pixels (``gid``, ``gy``, ``gx``) with their soft colour strength ``tv``.
        """
        try:
            from scipy import ndimage
        except ImportError as e:  # pragma: no cover - scipy ships with scikit-learn / the dev extra
            raise ImportError("the compositional verifier needs scipy (scipy.ndimage.label): pip install scipy") from e

        cfg = self.config
        B, K, H, W = masks.shape
        grown = _dilate(masks, cfg.merge_radius)
        structure = np.zeros((3, 3, 3, 3), dtype=bool)
        structure[1, 1] = True if cfg.connectivity == 8 else np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
        glabels_np, n = ndimage.label(grown.numpy(), structure=structure)
        if n == 0:
            return None
        glabels = torch.from_numpy(glabels_np)                               # int32
        pix = masks.nonzero()                                                # (P, 4): b, k, y, x
        lab = glabels[tuple(pix.T)].long()
        area = torch.bincount(lab, minlength=n + 1)
        big = torch.iinfo(torch.int64).max

        def reduce(vals, how, init):
            return torch.full((n + 1,), init, dtype=torch.int64).scatter_reduce(0, lab, vals, how)

        bid, kid = reduce(pix[:, 0], "amax", 0), reduce(pix[:, 1], "amax", 0)
        box = torch.stack([reduce(pix[:, 3], "amin", big), reduce(pix[:, 2], "amin", big),
                           reduce(pix[:, 3], "amax", -1) + 1, reduce(pix[:, 2], "amax", -1) + 1], 1)
        keep = area >= max(1.0, cfg.min_area_frac * H * W)
        keep[0] = False
        ids = keep.nonzero().flatten()
        if len(ids) == 0:
            return None
        remap = torch.full((n + 1,), -1, dtype=torch.long)
        remap[ids] = torch.arange(len(ids))
        gpix = glabels.nonzero()                                             # grown region incl. blurred rims
        gid = remap[glabels[tuple(gpix.T)].long()]
        sel = gid >= 0
        gpix, gid = gpix[sel], gid[sel]
        gb, gk, gy, gx = gpix.unbind(1)
        tv = ((d[gb, :, gy, gx] * self._cvec[gk]).sum(1) / self._c2[gk]).clamp(0, 1)
        N = len(ids)
        mass = torch.zeros(N).index_add_(0, gid, tv)
        cx = torch.zeros(N).index_add_(0, gid, tv * (gx.float() + 0.5)) / mass.clamp_min(1e-6)
        cy = torch.zeros(N).index_add_(0, gid, tv * (gy.float() + 0.5)) / mass.clamp_min(1e-6)
        return {"bid": bid[ids], "kid": kid[ids], "box": box[ids], "area": area[ids], "mass": mass,
                "centroid": torch.stack([cx, cy], 1), "gid": gid, "gy": gy, "gx": gx, "tv": tv}

    def _template_iou(self, comps: dict) -> torch.Tensor:
        """Shape scores (N, S): soft IoU of each component's colour map with each shape template.

        Two box hypotheses per shape: the thresholded bounding box, and a square box whose side follows
        from the colour mass and whose position from the mass centroid (both blur-invariant); each is
        drawn sharp and 3x3-box-blurred. The best of the four is the shape's score.
        """
        box, mass, cen = comps["box"], comps["mass"], comps["centroid"]
        N, S, ss, pad = len(box), len(SHAPES), 2, self.config.merge_radius + 1
        bw, bh = (box[:, 2] - box[:, 0]).float(), (box[:, 3] - box[:, 1]).float()
        # Hypothesis boxes (x0, y0, w, h) in crop coordinates (crop origin = bbox origin - pad): (N, S, 2).
        side = (mass[:, None] / self._areas[None]).sqrt()                    # (N, S)
        cx = cen[:, 0:1] - box[:, 0:1] + pad
        cy = cen[:, 1:2] - box[:, 1:2] + pad
        cy_off = torch.tensor([2.0 / 3.0 if s == "triangle" else 0.5 for s in SHAPES])   # centroid depth
        hx0 = torch.stack([torch.full((N, S), float(pad)), cx - side / 2], -1)
        hy0 = torch.stack([torch.full((N, S), float(pad)), cy - side * cy_off], -1)
        hw = torch.stack([bw[:, None].expand(N, S), side], -1).clamp_min(1.0)
        hh = torch.stack([bh[:, None].expand(N, S), side], -1).clamp_min(1.0)
        # Bucket components by crop size so that one big blob does not inflate every crop.
        need = torch.maximum(bw, bh) + 2 * pad
        bucket = ((need / 4).ceil() * 4).long()
        out = torch.empty(N, S)
        for size in bucket.unique().tolist():
            ids = (bucket == size).nonzero().flatten()
            loc = torch.full((N,), -1, dtype=torch.long)
            loc[ids] = torch.arange(len(ids))
            sel = loc[comps["gid"]] >= 0
            li = loc[comps["gid"][sel]]
            yy = comps["gy"][sel] - box[comps["gid"][sel], 1] + pad
            xx = comps["gx"][sel] - box[comps["gid"][sel], 0] + pad
            inb = (yy >= 0) & (yy < size) & (xx >= 0) & (xx < size)
            crops = torch.zeros(len(ids), size, size)
            crops[li[inb], yy[inb], xx[inb]] = comps["tv"][sel][inb]
            g = torch.arange(size, dtype=torch.float32)
            offsets = (torch.arange(ss, dtype=torch.float32) + 0.5) / ss    # subsample positions in a pixel
            chunk = max(1, int(1e6) // (S * 2 * size * size))
            for c0 in range(0, len(ids), chunk):
                cid = ids[c0:c0 + chunk]
                nb = len(cid)
                x0, y0 = hx0[cid][..., None, None], hy0[cid][..., None, None]
                w, h = hw[cid][..., None, None], hh[cid][..., None, None]
                sharp = torch.zeros(nb, S, 2, size, size)                    # anti-aliased templates
                for oy in offsets:
                    v = (g.view(-1, 1) + oy - y0) / h                         # (nb, S, 2, size, 1)
                    for ox in offsets:
                        u = (g.view(1, -1) + ox - x0) / w                     # (nb, S, 2, 1, size)
                        for k, name in enumerate(SHAPES):
                            sharp[:, k] += shape_mask(name, u[:, k], v[:, k])
                sharp /= ss * ss
                blur = _box3(sharp)                                          # (nb, S, 2, size, size)
                a = crops[c0:c0 + chunk].view(nb, 1, 1, size, size)
                ious = [torch.minimum(a, tpl).sum((-1, -2)) / torch.maximum(a, tpl).sum((-1, -2)).clamp_min(1e-6)
                        for tpl in (sharp, blur)]
                out[cid] = torch.maximum(*ious).amax(-1)
        allowed = torch.tensor([s in self.shapes_config.shapes for s in SHAPES])
        return torch.where(allowed.view(1, S), out, torch.full_like(out, -1.0))


    # -- scoring -----------------------------------------------------------------------------------------
    def score(self, images: torch.Tensor, specs: Sequence, details: bool = True) -> dict:
        """Score images against prompt specs (dicts, captions, :class:`ShapesPrompt` or sample metadata).

        Returns:
            ``accuracy`` (per question type, DSG-scored: a question counts only if its parents passed),
            ``tifa_accuracy`` (per type, without dependencies), ``question_accuracy`` (all questions, DSG),
            ``dsg_score`` / ``tifa_score`` (mean per-prompt fraction of passed questions),
            ``prompt_accuracy`` (fraction of prompts with every question passed), ``num_images`` and,
            with ``details``, per-sample ``questions``, ``answers``, ``passed`` and ``objects``.
        """
        x = images[None] if images.dim() == 3 else images
        specs = list(specs)
        if len(specs) != x.shape[0]:
            raise ValueError(f"got {x.shape[0]} images but {len(specs)} specs")
        parsed = self.parse(x)
        per_type = {t: [0, 0] for t in QUESTION_TYPES}
        per_type_raw = {t: [0, 0] for t in QUESTION_TYPES}
        all_pass, dsg, tifa, n_q, n_ok = [], [], [], 0, 0
        out_details = []
        for objs, spec in zip(parsed, specs):
            qs = questions_from_spec(spec)
            ans = answer_questions(qs, objs)
            passed = dsg_scores(qs, ans)
            for q, a, p in zip(qs, ans, passed):
                per_type[q["type"]][0] += int(p)
                per_type[q["type"]][1] += 1
                per_type_raw[q["type"]][0] += int(a)
                per_type_raw[q["type"]][1] += 1
            n_q += len(qs)
            n_ok += sum(passed)
            all_pass.append(all(passed))
            dsg.append(sum(passed) / max(1, len(qs)))
            tifa.append(sum(ans) / max(1, len(qs)))
            if details:
                out_details.append({"questions": qs, "answers": ans, "passed": passed, "objects": objs})
        n = max(1, len(specs))
        result = {
            "accuracy": {t: v[0] / v[1] for t, v in per_type.items() if v[1]},
            "tifa_accuracy": {t: v[0] / v[1] for t, v in per_type_raw.items() if v[1]},
            "question_accuracy": n_ok / max(1, n_q),
            "dsg_score": sum(dsg) / n, "tifa_score": sum(tifa) / n,
            "prompt_accuracy": sum(all_pass) / n, "num_images": len(specs),
        }
        if details:
            result["details"] = out_details
        return result

    def attribute_predictions(self, images: torch.Tensor) -> list[dict | None]:
        """The largest detected object per image (``None`` if nothing was detected)."""
        return [objs[0] if objs else None for objs in self.parse(images)]

    def colour_accuracy(self, images: torch.Tensor, targets: Sequence) -> float:
        """Fraction of single-object images whose largest object has the target colour.

        ``targets``: colour names, or single-entity specs / captions / prompts.
        """
        return self._attribute_accuracy(images, targets, "colour")

    def shape_accuracy(self, images: torch.Tensor, targets: Sequence) -> float:
        """Fraction of single-object images whose largest object has the target shape."""
        return self._attribute_accuracy(images, targets, "shape")

    def _attribute_accuracy(self, images, targets, key: str) -> float:
        targets = list(targets)
        preds = self.attribute_predictions(images)
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} images but {len(targets)} targets")
        vocab = PALETTE if key == "colour" else SHAPES
        hits = 0
        for p, tgt in zip(preds, targets):
            if not (isinstance(tgt, str) and tgt in vocab):
                tgt = _as_spec(tgt)["entities"][0][key]
            hits += int(p is not None and p[key] == tgt)
        return hits / max(1, len(targets))



def _box3(x: torch.Tensor) -> torch.Tensor:
    """3x3 box blur (zero padding) over the last two dims, as separable shifted sums."""
    p = F.pad(x, (1, 1, 1, 1))
    rows = p[..., :, :-2] + p[..., :, 1:-1] + p[..., :, 2:]
    return (rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]) / 9.0


def _dilate(masks: torch.Tensor, r: int) -> torch.Tensor:
    """Binary dilation of (..., H, W) bool masks by a (2r+1)x(2r+1) square (separable shifted ORs)."""
    if r <= 0:
        return masks
    H, W = masks.shape[-2:]
    p = F.pad(masks.to(torch.uint8), (r, r, 0, 0)).bool()
    rows = torch.zeros_like(masks)
    for dx in range(2 * r + 1):
        rows |= p[..., :, dx:dx + W]
    p = F.pad(rows.to(torch.uint8), (0, 0, r, r)).bool()
    out = torch.zeros_like(masks)
    for dy in range(2 * r + 1):
        out |= p[..., dy:dy + H, :]
    return out


def colour_accuracy(images: torch.Tensor, targets: Sequence, verifier: Verifier | None = None) -> float:
    """Colour accuracy of single-object images (see :meth:`Verifier.colour_accuracy`)."""
    return (verifier or Verifier()).colour_accuracy(images, targets)


def shape_accuracy(images: torch.Tensor, targets: Sequence, verifier: Verifier | None = None) -> float:
    """Shape accuracy of single-object images (see :meth:`Verifier.shape_accuracy`)."""
    return (verifier or Verifier()).shape_accuracy(images, targets)
