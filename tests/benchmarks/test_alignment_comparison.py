"""``benchmarks/alignment_comparison.py`` end to end at toy size on the shipped models and committed artefacts:
rows on the same prompts, paired differences to each model's base, and a missing artefact reported as missing."""
import json

from conftest import REPO
from helpers import load_script

BENCH = REPO / "benchmarks" / "alignment_comparison.py"


def test_alignment_comparison_smoke(tmp_path, monkeypatch):
    mod = load_script(BENCH)
    monkeypatch.setattr(mod, "ROWS", mod.ROWS + [("SD", "+nothing", "sd_tiny.shapes", {"lora": "no/such/adapter"})])
    out = tmp_path / "r.json"
    rows = ["DREAM base", "DREAM +AGSM", "SD base", "SD +SoftREPA", "SD +nothing"]
    assert mod.main(["--prompts", "6", "--num-real", "32", "--batch-size", "6", "--work", str(tmp_path / "w"),
                     "--out", str(out), "--rows", *rows]) == 0
    r = json.loads(out.read_text())
    assert set(r["rows"]) == {"DREAM base", "DREAM +AGSM", "SD base", "SD +SoftREPA"}
    assert r["missing"] == {"SD +nothing": "no/such/adapter not found"}
    for key in ("DREAM +AGSM", "SD +SoftREPA"):
        d = r["rows"][key]["paired_vs_base"]["prompt_pass"]
        assert d["n"] == 6 and -1.0 <= d["mean"] <= 1.0
    assert all(r["rows"][k]["n_prompts"] == 6 for k in r["rows"])
    assert "paired_vs_base" not in r["rows"]["SD base"]
