"""Official-checkpoint parity: every output of the official fixture within 1e-4 (target 1e-5)."""
import subprocess
import sys

from dream.parity import run_parity


def test_official_fixture_every_output(official_tiny):
    rows = run_parity(official_tiny)
    bad = [(n, e) for n, e, ok in rows if not ok]
    assert not bad, f"parity failures: {bad}"
    # the target: <= 1e-5 for every float output, gradients included
    assert max(e for _, e, _ in rows) <= 1e-5
    names = {n.split(" ")[0] for n, _, _ in rows}
    for required in ("enc_out", "text_features", "z", "dnet_out_cfg", "loss_total", "grads", "gen_z_sel",
                     "sample_out", "sad_best_idx", "sad_scores_all"):
        assert required in names


def test_check_parity_cli_exit_codes(official_tiny, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "dream.cli", "check-parity", str(official_tiny)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 failed" in ok.stdout
    # a corrupted fixture (one output perturbed) must make the command fail
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "fx"
    shutil.copytree(official_tiny, bad)
    io = load_file(str(bad / "io.safetensors"))
    io["z"] = io["z"] + 1e-2 * io["z"].abs().max()
    save_file(io, str(bad / "io.safetensors"))
    res = subprocess.run([sys.executable, "-m", "dream.cli", "check-parity", str(bad)], capture_output=True, text=True)
    assert res.returncode != 0
    assert any(line.startswith("z ") and "FAIL" in line for line in res.stdout.splitlines())
