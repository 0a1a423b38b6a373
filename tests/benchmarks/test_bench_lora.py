"""``benchmarks/bench_lora.py`` runs end to end on dream_test (one step per configuration, one sampling repeat)
and writes the fields the README quotes; the LoRA worker trains only the adapter."""
import json
import sys
from pathlib import Path

from helpers import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_lora.py"


def test_bench_lora_smoke(tmp_path):
    mod = load_script(BENCH)
    out = tmp_path / "r.json"
    assert mod.main(["--sizes", "dream_test:2", "--steps", "1", "--warmup", "0", "--sample-config", "dream_test",
                     "--sample-batch", "2", "--sample-iter", "2", "--sample-repeats", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    t = res["train"][0]
    assert t["full"]["trainable_params"] == t["full"]["params"]
    assert 0 < t["lora"]["trainable_params"] < t["full"]["params"] / 10
    assert t["lora"]["peak_rss_mb"] > 0 and t["img_s_ratio_lora_over_full_cpu"] > 0
    s = res["sampling"]
    assert s["fused_has_base_modules_and_shapes"] and s["max_abs_diff_fused_vs_unfused"] < 1e-3
    assert s["max_abs_diff_unfused_vs_base"] > 1e-4
    assert {"fused_over_base_min_cpu", "unfused_over_base_cpu", "base_again_over_base_cpu"} <= set(s)
    sys.modules.pop("bench_lora_under_test", None)
