"""GenEval-shapes: GenEval's six categories (Ghosh et al., 2023, arXiv 2310.11513) mirrored on ShapesWorld, scored
with the exact verifier instead of an object detector.

GenEval asks an object detector (plus a zero-shot colour classifier) simple questions about generated images,
with fixed rules per category; ShapesWorld's verifier (:mod:`dream.eval.compositional`) parses an image into
objects (shape, colour, box) exactly, so the same rules apply directly (GenEval's ``evaluation/evaluate_images.py``,
djghosh13/geneval, read for behaviour):

==============  ====================  =========================================================================
category        ShapesWorld prompts   passes when
==============  ====================  =========================================================================
single_object   single                an object of the named shape is present
colors          single                an object of the named shape has the named colour
two_object      pair                  both named shapes are present
color_attr      pair                  both named (colour, shape) objects are present
counting        count                 exactly N objects of the named shape (GenEval's ``include`` N with
                                      ``exclude`` N + 1)
position        relation              both (colour, shape) objects are present and the relation holds for every
                                      subject / object pair, with GenEval's rule: box-centre offset shrunk by
                                      0.1 x (size_a + size_b) per axis, normalised, then dx < -0.5 = "left of",
                                      dx > 0.5 = "right of", dy < -0.5 = "above", dy > 0.5 = "below" (y down)
==============  ====================  =========================================================================

``overall`` is the unweighted mean of the six categories. Beside them: whole-prompt accuracy and per question type
accuracy of the DSG-style verifier questions (existence, colour, count, size, relation), the over-count rate
(counting prompts whose image has *more* objects of the shape than asked: the failure AGSM targets), FID on the
shipped ShapesWorld CNN's features against real held-out images, and a binomial standard error for every rate.

Prompts come from the held-out ``test`` split, drawn with their own seed namespace per ``prompt_seed``; prompts
whose caption is in ``exclude`` (e.g. an alignment method's training prompts) are skipped and replaced.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import torch

from dream.data.shapes import SAMPLE_TYPES, ShapesConfig, ShapesPrompt, ShapesWorld, seed_for
from dream.eval.compositional import QUESTION_TYPES, Verifier, VerifierConfig

__all__ = ["CATEGORIES", "POSITION_THRESHOLD", "geneval_prompts", "relative_position", "geneval_judgements",
           "GenEvalShapes", "binomial_se", "paired_difference"]

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
POSITION_THRESHOLD = 0.1      # GenEval: offsets shrink by 0.1 x (size_a + size_b) before the direction test
_BY_TYPE = {"single": ("single_object", "colors"), "pair": ("two_object", "color_attr"), "count": ("counting",),
            "relation": ("position",)}


def binomial_se(p: float, n: int) -> float:
    """Standard error of a rate ``p`` measured on ``n`` independent trials."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def paired_difference(a: dict, b: dict, key: str = "prompt_pass") -> dict:
    """Mean and standard error of ``b - a`` over the prompts both reports judged on ``key`` (``prompt_pass``, a
    category such as ``counting``, or ``over_count``): two models on the same prompts and seeds."""
    ra, rb = a.get("per_prompt"), b.get("per_prompt")
    if ra is None or rb is None or len(ra) != len(rb):
        raise ValueError("paired_difference needs two reports with per_prompt rows for the same prompts")
    d = [float(y[key]) - float(x[key]) for x, y in zip(ra, rb) if key in x and key in y]
    if not d:
        raise ValueError(f"no prompt has {key!r} in both reports")
    m = sum(d) / len(d)
    var = sum((v - m) ** 2 for v in d) / max(1, len(d) - 1)
    return {"mean": m, "se": math.sqrt(var / len(d)), "n": len(d)}


def geneval_prompts(n: int, prompt_seed: int = 0, split: str = "test", exclude: Iterable[str] = (),
                    types: Optional[Sequence[str]] = None, shapes_config: Optional[ShapesConfig] = None
                    ) -> list[ShapesPrompt]:
    """``n`` prompts from ``split`` (held-out ``test`` by default), the same for the same ``prompt_seed``, none
    of them with a caption in ``exclude``. ``types`` restricts the prompt types (default: all four, with the
    config's ``type_weights``)."""
    if n < 1:
        raise ValueError(f"need at least one prompt, got n={n}")
    world = ShapesWorld(shapes_config or ShapesConfig())
    banned = set(exclude)
    out, i = [], 0
    while len(out) < n:
        if i > 200 * n + 1000:
            raise RuntimeError(f"could not draw {n} prompts outside the {len(banned)} excluded captions")
        g = torch.Generator().manual_seed(seed_for(prompt_seed, f"geneval:{split}", i))
        p = world.random_prompt_specs(1, split, generator=g, types=types)[0]
        i += 1
        if p.caption not in banned:
            out.append(p)
    return out


def relative_position(a: dict, b: dict, threshold: float = POSITION_THRESHOLD) -> set:
    """GenEval's relations of object ``a`` to object ``b`` from their boxes ``[x0, y0, x1, y1]`` (y down)."""
    ca = ((a["bbox"][0] + a["bbox"][2]) / 2, (a["bbox"][1] + a["bbox"][3]) / 2)
    cb = ((b["bbox"][0] + b["bbox"][2]) / 2, (b["bbox"][1] + b["bbox"][3]) / 2)
    da = (a["bbox"][2] - a["bbox"][0], a["bbox"][3] - a["bbox"][1])
    db = (b["bbox"][2] - b["bbox"][0], b["bbox"][3] - b["bbox"][1])
    off = (ca[0] - cb[0], ca[1] - cb[1])
    rev = [max(abs(o) - threshold * (s + t), 0.0) * math.copysign(1.0, o) for o, s, t in zip(off, da, db)]
    if all(abs(r) < 1e-3 for r in rev):
        return set()
    norm = math.hypot(*off)
    dx, dy = rev[0] / norm, rev[1] / norm
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def geneval_judgements(objects: Sequence[dict], spec: dict) -> dict:
    """GenEval's pass / fail per applicable category for one parsed image; ``over_count`` for counting prompts."""
    ents = spec["entities"]
    shapes = [o["shape"] for o in objects]

    def has(e, colour=True):
        return any(o["shape"] == e["shape"] and (not colour or o["colour"] == e["colour"]) for o in objects)

    kind = spec["type"]
    if kind == "single":
        return {"single_object": has(ents[0], False), "colors": has(ents[0])}
    if kind == "pair":
        return {"two_object": all(has(e, False) for e in ents), "color_attr": all(has(e) for e in ents)}
    if kind == "count":
        e = ents[0]
        n = shapes.count(e["shape"])
        return {"counting": n == int(e.get("count", 1)), "over_count": n > int(e.get("count", 1))}
    if kind == "relation":
        rel = spec["relation"]
        s, o = ents[rel["subject"]], ents[rel["object"]]
        subj = [x for x in objects if (x["colour"], x["shape"]) == (s["colour"], s["shape"])]
        obj = [x for x in objects if (x["colour"], x["shape"]) == (o["colour"], o["shape"])]
        ok = bool(subj) and bool(obj) and all(rel["predicate"] in relative_position(a, b)
                                              for a in subj for b in obj if a is not b)
        return {"position": ok}
    raise ValueError(f"unknown prompt type {kind!r} (one of {SAMPLE_TYPES})")


class GenEvalShapes:
    """Scores generated ShapesWorld images: the schema of ``dream eval geneval-shapes``.

    Args:
        shapes_config: the world the prompts come from (image size, palette).
        verifier_config: thresholds of the evaluation verifier (default: :class:`VerifierConfig` defaults; an
            alignment method should select with another variant, see :mod:`dream.align.judges`).
        num_real: real held-out images for FID; ``fid_cnn=False`` skips FID.
    """

    def __init__(self, shapes_config: Optional[ShapesConfig] = None, verifier_config: Optional[VerifierConfig] = None,
                 num_real: int = 1000, fid_cnn: bool = True):
        self.world = ShapesWorld(shapes_config or ShapesConfig())
        self.verifier = Verifier(self.world.config, verifier_config)
        self._fid = None
        if fid_cnn:
            from dream.eval.shapes_features import load_shapes_feature_extractor

            self._fid = load_shapes_feature_extractor()
            real = self.world.batch(range(num_real), "test")[0]
            with torch.no_grad():
                self._real = self._stats(self._fid(real))

    @staticmethod
    def _stats(f: torch.Tensor):
        f = f.double()
        return f.mean(0), torch.cov(f.T)

    def fid(self, images: torch.Tensor) -> float:
        """FID of ``images`` against the real held-out set, on the ShapesWorld CNN's features."""
        from dream.eval.fid import frechet_distance

        if self._fid is None:
            raise RuntimeError("built with fid_cnn=False")
        with torch.no_grad():
            fake = self._stats(self._fid(images.clamp(-1, 1) if images.is_floating_point() else images))
        return float(frechet_distance(*self._real, *fake))

    def evaluate(self, images: torch.Tensor, prompts: Sequence[ShapesPrompt], seconds_per_image: float = None,
                 per_prompt: bool = True) -> dict:
        """The full report for images generated from ``prompts`` (one image per prompt, same order). With
        ``per_prompt`` it also lists, per prompt, whether every question passed and each category's verdict (for
        paired comparisons of two models on the same prompts: :func:`paired_difference`)."""
        prompts = list(prompts)
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts")
        if not prompts:
            raise ValueError("no prompts to evaluate")
        specs = [p.spec for p in prompts]
        sc = self.verifier.score(images, specs, details=True)
        cats = {c: [] for c in CATEGORIES}
        over = []
        per_type = {t: [0, 0] for t in QUESTION_TYPES}
        rows = []
        for d, spec in zip(sc["details"], specs):
            j = geneval_judgements(d["objects"], spec)
            rows.append({"prompt_pass": bool(all(d["passed"])), **{k: bool(v) for k, v in j.items()}})
            for c in CATEGORIES:
                if c in j:
                    cats[c].append(j[c])
            if "over_count" in j:
                over.append(j["over_count"])
            for q, p in zip(d["questions"], d["passed"]):
                per_type[q["type"]][0] += int(p)
                per_type[q["type"]][1] += 1
        n = len(prompts)
        geneval = {c: (sum(v) / len(v) if v else float("nan")) for c, v in cats.items()}
        geneval_se = {c: binomial_se(geneval[c], len(v)) for c, v in cats.items()}
        present = [c for c in CATEGORIES if cats[c]]
        geneval["overall"] = sum(geneval[c] for c in present) / len(present)
        geneval_se["overall"] = math.sqrt(sum(geneval_se[c] ** 2 for c in present)) / len(present)
        pt = {t: v[0] / v[1] for t, v in per_type.items() if v[1]}
        pa = sc["prompt_accuracy"]
        out = {
            "prompt_accuracy": pa, "prompt_accuracy_se": binomial_se(pa, n),
            "per_type": pt, "per_type_se": {t: binomial_se(pt[t], per_type[t][1]) for t in pt},
            "per_type_n": {t: per_type[t][1] for t in pt},
            "geneval": geneval, "geneval_se": geneval_se, "geneval_n": {c: len(v) for c, v in cats.items()},
            "over_count_rate": sum(over) / len(over) if over else float("nan"),
            "over_count_rate_se": binomial_se(sum(over) / len(over), len(over)) if over else float("nan"),
            "question_accuracy": sc["question_accuracy"], "dsg_score": sc["dsg_score"], "tifa_score": sc["tifa_score"],
            "n_prompts": n,
        }
        if per_prompt:
            out["per_prompt"] = rows
        if self._fid is not None:
            out["fid_cnn"] = self.fid(images)
        if seconds_per_image is not None:
            out["seconds_per_image"] = seconds_per_image
        return out

    def run(self, generate: Callable[[list[str]], torch.Tensor], prompts: Sequence[ShapesPrompt]) -> dict:
        """Generate one image per prompt with ``generate(captions) -> (N, 3, H, W)`` and evaluate them."""
        import time

        t0 = time.time()
        images = generate([p.caption for p in prompts])
        return self.evaluate(images, prompts, seconds_per_image=(time.time() - t0) / max(1, len(prompts)))
