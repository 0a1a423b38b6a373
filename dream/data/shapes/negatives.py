"""Hard negatives of a ShapesWorld prompt: the same scene with one attribute changed.

A hard negative keeps the prompt's objects and changes exactly one thing: a count (+-1), a colour, a shape, the
relation's predicate, or (for two entities) the binding of colours to shapes. Such captions are what an
image-text scorer must tell apart from the prompt (DREAM as its own judge, :mod:`dream.align.judges`), and the
in-batch negatives that contrastive soft-token methods (SoftREPA arXiv 2503.08250, AGSM arXiv 2605.30038) push
against. Every returned spec is valid for the world's config and differs from the prompt's caption.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from .config import RELATIONS, ShapesConfig, validate_spec

__all__ = ["hard_negative_specs", "spec_key"]


def spec_key(spec: dict) -> str:
    """A canonical string of what a spec asks for (ignores paraphrase), to tell specs apart."""
    ents = tuple((e["colour"], e["shape"], int(e.get("count", 1)), e.get("size")) for e in spec["entities"])
    rel = spec.get("relation")
    r = None if rel is None else (rel["subject"], rel["predicate"], rel["object"])
    return repr((spec["type"], ents, r))


def _variants(spec: dict, cfg: ShapesConfig) -> list[tuple[str, dict]]:
    """(kind of change, spec) for every one-attribute change."""
    out = []
    ents = spec["entities"]
    for i, e in enumerate(ents):
        for c in cfg.colours:
            if c != e["colour"]:
                s = copy.deepcopy(spec)
                s["entities"][i]["colour"] = c
                out.append(("colour", s))
        for sh in cfg.shapes:
            if sh != e["shape"]:
                s = copy.deepcopy(spec)
                s["entities"][i]["shape"] = sh
                out.append(("shape", s))
        if spec["type"] in ("count", "pair"):
            n = int(e.get("count", 1))
            for m in (n - 1, n + 1):
                lo = 2 if spec["type"] == "count" else 1
                if lo <= m:
                    s = copy.deepcopy(spec)
                    s["entities"][i]["count"] = m
                    out.append(("count", s))
    if spec.get("relation") is not None:
        for p in RELATIONS:
            if p != spec["relation"]["predicate"]:
                s = copy.deepcopy(spec)
                s["relation"]["predicate"] = p
                out.append(("relation", s))
    if len(ents) == 2 and ents[0]["colour"] != ents[1]["colour"]:
        s = copy.deepcopy(spec)                               # attribute binding: swap the colours
        s["entities"][0]["colour"], s["entities"][1]["colour"] = ents[1]["colour"], ents[0]["colour"]
        out.append(("binding", s))
    return out


def hard_negative_specs(spec: dict, n: int, config: Optional[ShapesConfig] = None,
                        generator: Optional[torch.Generator] = None) -> list[dict]:
    """Up to ``n`` distinct hard negatives of ``spec`` (fewer if the world allows fewer). The kinds of change
    (count, relation, binding, shape, colour) take turns, so a few negatives already cover every kind the prompt
    allows; the order within and across kinds is drawn with ``generator`` (fixed without one)."""
    cfg = config or ShapesConfig()
    seen, groups = {spec_key(spec)}, {}
    for kind, s in _variants(spec, cfg):
        k = spec_key(s)
        if k in seen:
            continue
        try:
            validate_spec(s, cfg)
        except ValueError:
            continue                                           # e.g. too many objects, or a duplicate entity
        seen.add(k)
        groups.setdefault(kind, []).append(s)
    order = [k for k in ("count", "relation", "binding", "shape", "colour") if k in groups]
    if generator is not None:
        order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
        for k in order:
            groups[k] = [groups[k][i] for i in torch.randperm(len(groups[k]), generator=generator).tolist()]
    out, depth = [], 0
    while len(out) < n and any(depth < len(groups[k]) for k in order):
        out += [groups[k][depth] for k in order if depth < len(groups[k])]
        depth += 1
    return out[:n]
