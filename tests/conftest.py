import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import rapt_reg

# Tests import the shared toy models as `models`; nothing downloads.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
IMPORTED_FROM = Path(rapt_reg.__file__).resolve().parent

if os.environ.get("RAPT_REG_TEST_INSTALLED") == "1":
    # scripts/test-wheel.sh: the suite must test the installed wheel, never the source tree.
    # PYTHONSAFEPATH (not only -P) so that the tests' own `python -c` children keep the tree
    # off sys.path too.
    if ROOT in IMPORTED_FROM.parents or "site-packages" not in IMPORTED_FROM.parts:
        pytest.exit(f"RAPT_REG_TEST_INSTALLED=1 but rapt_reg was imported from {IMPORTED_FROM}", 4)
    if os.environ.get("PYTHONSAFEPATH") != "1" or not sys.flags.safe_path:
        pytest.exit(
            "RAPT_REG_TEST_INSTALLED=1 needs PYTHONSAFEPATH=1 (keeps the tree off sys.path)", 4
        )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if os.environ.get("RAPT_REG_MUTATION") == "1" and item.get_closest_marker("slow_for_mutation"):
        pytest.skip("left out of mutation runs (scripts/mutation.py): seconds per mutant")


def pytest_report_header() -> str:
    return f"rapt_reg {rapt_reg.__version__} imported from {IMPORTED_FROM}"


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread while a test module runs (request it, or use it from a conftest).

    The test models are so small that a second thread only adds synchronisation: on 2 cores
    shared with other jobs, tiny-model tests took 6-20x the CPU time with 2 threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def accelerator_state() -> Iterator[None]:
    """accelerate keeps process-wide state; start and end each test from a clean one."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(True)
    yield
    state.AcceleratorState._reset_state(True)
