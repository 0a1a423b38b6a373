"""``benchmarks/bench_fast_sampling.py`` runs end to end (tiny settings) and writes every number it reports."""
import json
from pathlib import Path

from helpers import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fast_sampling.py"


def test_bench_fast_sampling_smoke(tmp_path):
    mod = load_script(BENCH)
    out = tmp_path / "r.json"
    assert mod.main(["--configs", "shapes", "--rows", "default", "official-loop", "reuse-text-kv", "fast",
                     "--repeats", "1", "--shapes-batch", "4", "--prompts", "8", "--bootstrap", "4",
                     "--num-real", "32", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    sp = r["configs"]["shapes"]["speed"]
    assert sp["default"]["speedup_vs_default_cpu"] == 1.0 and sp["fast"]["speedup_vs_official-loop_cpu"] > 0
    q = r["configs"]["shapes"]["quality"]["0"]
    assert set(q) == {"default", "reuse-text-kv", "fast"}          # the official loop samples like the default
    assert q["reuse-text-kv"]["paired_accuracy_diff"] == 0.0      # exact: the same images
    for k in ("prompt_accuracy_se", "fid_cnn_se", "paired_accuracy_diff_se", "fid_ratio_se", "geneval_overall"):
        assert k in q["fast"]
    assert r["fast_preset"]["reuse_text_kv"] is True
