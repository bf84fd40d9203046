import os
import sys
from collections.abc import Iterator

import pytest
import torch

# Tests import the shared toy models as `models`; nothing downloads.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
