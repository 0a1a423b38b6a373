"""TIFA / DSG scoring on hand-made question sets, ShapesWorld question sets, and every selection policy."""
import json

import pytest
import torch

from dream.align.questions import (dsg_score, faithfulness, load_question_sets, save_question_sets,
                                   shapes_question_sets, tifa_score)
from dream.align.selection import SelectionConfig, random_like, select

TIFA = [
    {"id": 0, "caption": "two red circles", "question": "is there a circle?", "choices": ["yes", "no"],
     "answer": "yes", "element_type": "object"},
    {"id": 1, "caption": "two red circles", "question": "how many circles?", "choices": ["1", "2", "3", "4"],
     "answer": "2", "element_type": "counting"},
    {"id": 2, "caption": "two red circles", "question": "what color are the circles?",
     "choices": ["red", "blue", "green"], "answer": "red", "element_type": "color"},
]
# DSG: 0 = circle exists; 1 (colour) depends on 0; 2 (count) depends on 1; 3 (other) depends on 0
DSG = [{"id": 0, "question": "is there a circle?", "parents": []},
       {"id": 1, "question": "are the circles red?", "parents": [0]},
       {"id": 2, "question": "are there two circles?", "parents": [1]},
       {"id": 3, "question": "is the circle round?", "parents": [0]}]


def test_tifa_is_accuracy_over_questions():
    assert tifa_score(TIFA, ["yes", "2", "red"]) == 1.0
    assert tifa_score(TIFA, ["yes", "3", "red"]) == pytest.approx(2 / 3)
    assert tifa_score(TIFA, ["YES ", "2", "Blue"]) == pytest.approx(2 / 3)          # case / space insensitive
    with pytest.raises(ValueError, match="3 questions but 2 answers"):
        tifa_score(TIFA, ["yes", "2"])


def test_dsg_zeroes_children_of_failed_parents_using_raw_parent_answers():
    assert dsg_score(DSG, ["yes", "yes", "yes", "yes"]) == 1.0
    assert dsg_score(DSG, ["no", "yes", "yes", "yes"]) == pytest.approx(1 / 4)      # 1, 3 zeroed; 2 keeps its
    # raw parent (1) said yes, so 2 survives a failed grandparent: one pass over raw parent answers (DSG's rule)
    assert dsg_score(DSG, ["yes", "no", "yes", "yes"]) == pytest.approx(2 / 4)      # 2 zeroed by its parent
    assert dsg_score(DSG, ["yes", "yes", "no", "no"]) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="parents"):
        dsg_score([{"id": 0, "question": "q", "parents": [7]}], ["yes"])


def test_faithfulness_modes():
    qa = {"tifa": TIFA, "dsg": DSG}
    ans = {"tifa": ["yes", "3", "red"], "dsg": ["yes", "no", "yes", "yes"]}
    assert faithfulness(qa, ans, "tifa") == pytest.approx(2 / 3)
    assert faithfulness(qa, ans, "dsg") == pytest.approx(0.5)
    assert faithfulness(qa, ans, "mean") == pytest.approx((2 / 3 + 0.5) / 2)
    with pytest.raises(ValueError, match="needs question sets"):
        faithfulness({"dsg": DSG}, ans, "tifa")
    with pytest.raises(ValueError, match="unknown faithfulness mode"):
        faithfulness(qa, ans, "vqa")


def test_shapes_question_sets_and_file_round_trip(tmp_path):
    spec = {"type": "relation", "entities": [{"colour": "red", "shape": "square", "count": 1, "size": "small"},
                                             {"colour": "blue", "shape": "circle", "count": 1, "size": None}],
            "relation": {"subject": 0, "predicate": "left of", "object": 1}}
    qa = shapes_question_sets(spec, "a small red square left of a blue circle")
    kinds = {q["element_type"] for q in qa["tifa"]}
    assert {"object", "color", "size", "spatial"} <= kinds
    spatial = [q for q in qa["tifa"] if q["element_type"] == "spatial"][0]
    assert spatial["answer"] == "left of" and spatial["answer"] in spatial["choices"]
    rel = [q for q in qa["dsg"] if q["element_type"] == "relation"][0]
    colour_ids = [q["id"] for q in qa["dsg"] if q["element_type"] == "colour"]
    assert sorted(rel["parents"]) == sorted(colour_ids)
    f = save_question_sets(tmp_path / "qa.jsonl", ["p"], [qa])
    prompts, sets = load_question_sets(f)
    assert prompts == ["p"] and sets[0] == json.loads(json.dumps(qa))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "tifa": [dict(TIFA[0], answer="maybe")]}) + "\n")
    with pytest.raises(ValueError, match="answers not among the choices"):
        load_question_sets(bad)


S_F = torch.tensor([[0.95, 1.00, 0.50],     # prompt 0: candidate 1 most faithful
                    [0.80, 0.85, 0.70],     # prompt 1: nothing passes theta_f
                    [0.92, 0.92, 0.99],     # prompt 2: candidate 2 fails aesthetics
                    [1.00, float("nan"), 0.90]])   # prompt 3: a failed judge (NaN) never passes
S_A = torch.tensor([[0.90, 0.61, 0.99],
                    [1.00, 1.00, 1.00],
                    [0.70, 0.95, 0.10],
                    [0.65, 1.00, 0.99]])


def test_selection_policies_and_thresholds():
    assert select(S_F, S_A) == [(0, 1), (2, 1), (3, 0)]                                # S_F, then S_A on ties
    assert select(S_F, S_A, SelectionConfig(policy="aesthetic_among_faithful")) == [(0, 0), (2, 1), (3, 2)]
    assert select(S_F, S_A, SelectionConfig(policy="sum")) == [(0, 0), (2, 1), (3, 2)]
    assert select(S_F, S_A, SelectionConfig(keep_all_passing=True)) == [(0, 0), (0, 1), (2, 0), (2, 1), (3, 0),
                                                                        (3, 2)]
    assert select(S_F, S_A, SelectionConfig(theta_a=0.0)) == [(0, 1), (2, 2), (3, 0)]  # no aesthetic filter
    assert select(S_F, None, SelectionConfig(theta_f=0.8)) == [(0, 1), (1, 1), (2, 2), (3, 0)]
    assert select(S_F, S_A, SelectionConfig(theta_f=1.0)) == [(0, 1), (3, 0)]
    with pytest.raises(ValueError, match="unknown selection policy"):
        SelectionConfig(policy="best")
    with pytest.raises(ValueError, match="theta_f"):
        SelectionConfig(theta_f=1.5)


def test_random_control_keeps_prompts_and_count():
    sel = select(S_F, S_A)
    g = torch.Generator().manual_seed(0)
    picks = [random_like(sel, 3, g) for _ in range(50)]
    for r in picks:
        assert [p for p, _ in r] == [p for p, _ in sel]
    assert len({k for r in picks for _, k in r}) == 3      # every candidate index gets picked somewhere
