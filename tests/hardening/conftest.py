"""One intra-op thread for the hardening tests, restored afterwards.

Their models are tiny (dim <= 16): a second thread buys nothing and, on a loaded 2-core runner,
OpenMP's spinning threads made them 10-20 times slower.
"""

import pytest

from ._profile import TALLY


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every hardening test runs under the suite's one-thread fixture (tests/conftest.py)."""
    yield


def pytest_terminal_summary(terminalreporter):
    if TALLY:
        counts = ", ".join(f"{n} {what}" for what, n in sorted(TALLY.items()))
        terminalreporter.write_line(f"rapt-reg hardening tried: {counts}")
