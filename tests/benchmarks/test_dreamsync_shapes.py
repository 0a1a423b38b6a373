"""``benchmarks/dreamsync_shapes.py`` end to end at toy size on the shipped dream_tiny.shapes: the main run, the
random-selection control, DREAM as its own judge, the part-way scoring cost, the reproduction with the combined
adapter; every number the README quotes is in the JSON."""
import json

from conftest import REPO
from helpers import load_script

BENCH = REPO / "benchmarks" / "dreamsync_shapes.py"


def test_dreamsync_shapes_smoke(tmp_path):
    mod = load_script(BENCH)
    out = tmp_path / "r.json"
    assert mod.main(["--out", str(tmp_path / "w"), "--prompts", "8", "--k", "2", "--keep", "1", "--rounds", "1",
                     "--eval-prompts", "6", "--num-real", "32", "--repro-seeds", "1", "--smoke", "--quiet",
                     "--lora", '{"rank": 4, "min_steps": 2, "max_steps": 2}', "--results", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["rounds"][0]["selection"]["kept"] > 0           # the shipped model passes some candidates
    assert r["base"]["n_prompts"] == 6 and len(r["rounds"]) == 1
    for name in ("random_selection", "self_judge"):
        assert r[name]["gains_final_vs_base"]["prompt_accuracy"]["n"] == 6
    g = r["gains_final_vs_base"]
    assert {"prompt_accuracy", "per_type", "fid_ratio"} <= set(g)
    assert set(r["reproduction"]) == {"prompt_seed_1"}
    cost = r["self_judge_cost"]
    assert cost["keep"] == 1 and cost["k"] == 2 and cost["cost_ratio_partial_over_all_k"] > 0
