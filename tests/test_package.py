"""Packaging: import safety, the CLI, the two README commands and CI wiring."""
import subprocess
import sys

from conftest import REPO


def test_import_dream_needs_no_triton_transformers_or_diffusers():
    code = ("import sys\n"
            "for m in ('triton', 'transformers', 'diffusers'):\n"
            "    sys.modules[m] = None  # make any import of them fail\n"
            "import dream, dream.models, dream.sampling, dream.masking\n"
            "import dream.kernels\n"
            "assert not dream.kernels.is_available()\n"
            "print(dream.kernels.unavailable_reason())\n"
            "m = dream.create_model('dream_test')\n"
            "print(type(m).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "DREAM" in r.stdout


def test_cli_help_lists_every_command():
    r = subprocess.run([sys.executable, "-m", "dream.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("check-parity", "train", "sample", "eval", "data", "demo"):
        assert cmd in r.stdout


def test_readme_and_ci_use_the_two_make_commands():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
    mk = (REPO / "Makefile").read_text()
    assert ".venv" in mk and '-e ".[dev]"' in mk
