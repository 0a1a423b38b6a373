"""Test configuration: set environment flags before anything imports dream.kernels."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
OFFICIAL_TINY = FIXTURES / "official_dream_tiny"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def official_tiny():
    if not OFFICIAL_TINY.exists():
        pytest.fail(f"official parity fixture not found at {OFFICIAL_TINY}")
    return OFFICIAL_TINY


# Tiny ops run much faster on one thread (and CI shares 2 cores between pytest and the OS). Every numerical
# tolerance in the suite must also hold at other thread counts (other reduction orders): run with
# DREAM_TEST_THREADS=2 to check.
TEST_THREADS = int(os.environ.get("DREAM_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)
