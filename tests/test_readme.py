"""The README's Python examples run as written (those that need no user-supplied weights)."""
import re

import pytest

from conftest import REPO

BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
RUNNABLE = [b for b in BLOCKS if "/weights/" not in b and "checkpoint-last" not in b]


def test_readme_has_runnable_examples():
    assert len(RUNNABLE) >= 2


@pytest.mark.parametrize("i", range(len(RUNNABLE)))
def test_readme_python_block_runs(i):
    ns: dict = {}
    exec(compile(RUNNABLE[i], f"README block {i}", "exec"), ns)
