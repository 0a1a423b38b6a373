"""Question sets and faithfulness scores: TIFA (Hu et al., 2023, arXiv 2303.11897) and DSG (Cho et al., 2024,
arXiv 2310.18235), as DreamSync (arXiv 2311.17946) scores its candidates.

A question set belongs to one prompt and is a list of question dicts in one of two layouts (the public ones):

* **TIFA** (``Yushi-Hu/tifa``): ``{"id", "caption", "question", "choices", "answer", "element_type"}``; a VQA
  answer counts when it equals ``answer`` (free-form answers are first mapped to the nearest choice);
  faithfulness = fraction of questions answered correctly.
* **DSG** (``j-min/DSG``): ``{"id", "question", "parents"}``, yes/no questions whose expected answer is "yes";
  a question scores 1 when answered "yes" and 0 when any of its parents was answered "no" (one pass over the
  raw parent answers); faithfulness = mean score.

Either layout may carry a ``"query"``: the same question in structured form (what a rule-based VQA model such as
the ShapesWorld verifier answers from, see :mod:`dream.align.judges`). :func:`shapes_question_sets` writes both
layouts, with queries, for a ShapesWorld prompt spec.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from dream.data.shapes import NUMBER_WORDS, PLURALS, RELATIONS, SIZE_WORDS
from dream.eval.compositional import questions_from_spec

__all__ = ["tifa_score", "dsg_score", "faithfulness", "shapes_question_sets", "load_question_sets",
           "save_question_sets", "question_style", "MODES"]

MODES = ("tifa", "dsg", "mean")


def _norm(a) -> str:
    return str(a).strip().lower()


def question_style(questions: Sequence[dict]) -> str:
    """"tifa" (multiple choice with answers) or "dsg" (yes/no with parents) for a question set."""
    if not questions:
        raise ValueError("empty question set")
    if all("choices" in q and "answer" in q for q in questions):
        return "tifa"
    if all("parents" in q for q in questions):
        return "dsg"
    raise ValueError("a question set must be TIFA-style (choices, answer) or DSG-style (parents) throughout; "
                     f"got keys {sorted(set().union(*questions))}")


def tifa_score(questions: Sequence[dict], answers: Sequence[str]) -> float:
    """Fraction of TIFA questions whose (choice-mapped) answer equals the expected one."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    return sum(_norm(a) == _norm(q["answer"]) for q, a in zip(questions, answers)) / max(1, len(questions))


def dsg_score(questions: Sequence[dict], answers: Sequence[str]) -> float:
    """DSG score: mean over questions of 1[answer is yes], zeroed where any parent's raw answer is not yes."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    raw = {q["id"]: _norm(a) == "yes" for q, a in zip(questions, answers)}
    missing = {p for q in questions for p in q.get("parents", ()) if p not in raw}
    if missing:
        raise ValueError(f"DSG parents {sorted(missing)} are not question ids of this set")
    s = [raw[q["id"]] and all(raw[p] for p in q.get("parents", ())) for q in questions]
    return sum(s) / max(1, len(s))


def faithfulness(qa: dict, answers: dict, mode: str = "dsg") -> float:
    """S_F of one image from the answers to a prompt's question sets.

    Args:
        qa: ``{"tifa": [...], "dsg": [...]}`` (either may be absent); answers: the same keys, one answer per
            question. mode: ``tifa``, ``dsg`` or ``mean`` (average of both sets).
    """
    if mode not in MODES:
        raise ValueError(f"unknown faithfulness mode {mode!r} ({' | '.join(MODES)})")
    scores = {}
    if qa.get("tifa") and mode in ("tifa", "mean"):
        scores["tifa"] = tifa_score(qa["tifa"], answers["tifa"])
    if qa.get("dsg") and mode in ("dsg", "mean"):
        scores["dsg"] = dsg_score(qa["dsg"], answers["dsg"])
    if not scores:
        raise ValueError(f"mode {mode!r} needs question sets of that style, got {sorted(k for k in qa if qa[k])}")
    return sum(scores.values()) / len(scores)


# ----------------------------------------------------------------------------------------------------
# ShapesWorld question sets
# ----------------------------------------------------------------------------------------------------
def _tifa_set(spec: dict, caption: str) -> list[dict]:
    out: list[dict] = []

    def add(question, choices, answer, element_type, query):
        out.append({"id": len(out), "caption": caption, "question": question, "choices": list(choices),
                    "answer": answer, "element_type": element_type, "query": query})

    counts = [str(n) for n in sorted(NUMBER_WORDS)]
    seen = set()
    for e in spec["entities"]:
        shape, colour, n = e["shape"], e["colour"], int(e.get("count", 1))
        if shape not in seen:
            seen.add(shape)
            add(f"is there a {shape}?", ("yes", "no"), "yes", "object", {"kind": "exists", "shape": shape})
        add(f"is there a {colour} {shape}?", ("yes", "no"), "yes", "color",
            {"kind": "exists", "shape": shape, "colour": colour})
        if n >= 2:
            add(f"how many {colour} {PLURALS[shape]} are there?", counts, str(n), "counting",
                {"kind": "count", "shape": shape, "colour": colour})
        if e.get("size"):
            add(f"is the {colour} {shape} small or large?", SIZE_WORDS, e["size"], "size",
                {"kind": "size_of", "shape": shape, "colour": colour})
    rel = spec.get("relation")
    if rel is not None:
        s, o = spec["entities"][rel["subject"]], spec["entities"][rel["object"]]
        add(f"where is the {s['colour']} {s['shape']} relative to the {o['colour']} {o['shape']}?", RELATIONS,
            rel["predicate"], "spatial", {"kind": "relation_of", "subject": [s["colour"], s["shape"]],
                                          "object": [o["colour"], o["shape"]]})
    return out


def _dsg_set(spec: dict) -> list[dict]:
    out = []
    for q in questions_from_spec(spec):
        query = {k: v for k, v in q.items() if k not in ("id", "text", "parents")}
        out.append({"id": q["id"], "question": q["text"], "parents": list(q["parents"]), "element_type": q["type"],
                    "query": query})
    return out


def shapes_question_sets(spec: dict, caption: Optional[str] = None) -> dict:
    """``{"tifa": [...], "dsg": [...]}`` for a ShapesWorld prompt spec: TIFA multiple-choice questions (existence,
    colour, counting, size, spatial) and DSG yes/no questions with their dependency graph (existence -> colour ->
    count / size / relation), each with a structured ``query``."""
    caption = caption if caption is not None else spec.get("caption", "")
    return {"tifa": _tifa_set(spec, caption), "dsg": _dsg_set(spec)}


def save_question_sets(path: Union[str, os.PathLike], prompts: Sequence[str], sets: Sequence[dict]) -> Path:
    """JSON lines ``{"prompt", "tifa", "dsg"}``, one per prompt."""
    if len(prompts) != len(sets):
        raise ValueError(f"{len(prompts)} prompts but {len(sets)} question sets")
    path = Path(path)
    path.write_text("".join(json.dumps({"prompt": p, **s}) + "\n" for p, s in zip(prompts, sets)))
    return path


def load_question_sets(path: Union[str, os.PathLike]) -> tuple[list[str], list[dict]]:
    """Read ``save_question_sets`` output (prompts, sets). Each set is checked: TIFA questions need ``choices``
    with ``answer`` among them, DSG questions ``parents`` that are ids of the same set."""
    prompts, sets = [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if "prompt" not in d:
            raise ValueError(f"{path}, line {n}: missing 'prompt'")
        qa = {k: d[k] for k in ("tifa", "dsg") if d.get(k)}
        if not qa:
            raise ValueError(f"{path}, line {n}: no 'tifa' or 'dsg' questions")
        for k, qs in qa.items():
            if question_style(qs) != k:
                raise ValueError(f"{path}, line {n}: the '{k}' questions are not {k.upper()}-style")
            if k == "tifa":
                bad = [q["question"] for q in qs if _norm(q["answer"]) not in {_norm(c) for c in q["choices"]}]
                if bad:
                    raise ValueError(f"{path}, line {n}: answers not among the choices: {bad}")
            else:
                dsg_score(qs, ["yes"] * len(qs))          # checks the parent ids
        prompts.append(d["prompt"])
        sets.append(qa)
    return prompts, sets
