"""Test configuration: set environment flags before anything imports dream.kernels."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# Shared test helpers live next to this file as plain modules (``from tolerance import gemm_rel_tol``, like
# ``from conftest import REPO``). pytest's default "prepend" import mode already puts this folder on sys.path
# when it loads this conftest; say so explicitly so that other import modes work too.
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))
FIXTURES = REPO / "tests" / "fixtures"
OFFICIAL_TINY = FIXTURES / "official_dream_tiny"


@pytest.fixture(autouse=True)
def _seed():
    """Seed every test; afterwards restore the process-wide torch settings a script's ``main`` may change
    (benchmarks set the thread count and turn autograd off for their whole run)."""
    torch.manual_seed(0)
    grad, threads = torch.is_grad_enabled(), torch.get_num_threads()
    yield
    torch.set_grad_enabled(grad)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def official_tiny():
    if not OFFICIAL_TINY.exists():
        pytest.fail(f"official parity fixture not found at {OFFICIAL_TINY}")
    return OFFICIAL_TINY


# Tiny ops run much faster on one thread (and CI shares 2 cores between pytest and the OS). Every numerical
# tolerance in the suite must also hold at other thread counts (other reduction orders): run with
# DREAM_TEST_THREADS=2 to check.
TEST_THREADS = int(os.environ.get("DREAM_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)


def read_tensorboard(folder) -> dict:
    """Event files in ``folder`` as TensorBoard shows them (restart purges applied):
    ``{"scalars": {tag: [(step, value)]}, "images": {tag: [(step, width, height)]}}``."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as e:
        pytest.fail(f"tensorboard is part of [dev] (`make test` installs it) but cannot be imported: {e}")
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    return {"scalars": {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]},
            "images": {t: [(e.step, e.width, e.height) for e in acc.Images(t)] for t in tags["images"]}}


class FakeWandb:
    """Stands in for the third-party ``wandb`` module: records ``init`` kwargs and every ``run.log`` call."""

    def __init__(self):
        self.inits: list[dict] = []
        self.logs: list[tuple[int, dict]] = []       # (step, data) over all runs, in order
        self.finished: list[dict] = []

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            def log(self, data, step=None):
                fake.logs.append((step, dict(data)))

            def finish(self, **kw):
                fake.finished.append(kw)

        return Run()

    class Image:
        def __init__(self, data):
            self.data = data


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake
