"""The hypothesis settings of the hardening tests (registered, never loaded globally).

``RAPT_HARDENING_SCALE`` multiplies every ``max_examples`` (e.g. 20 for a nightly fuzz run, 0.2
for scripts/mutation.py's first screening of mutants); CI runs the default of 1 and the counts in
docs/guarantees.md.
"""

import os
from collections import Counter

from hypothesis import HealthCheck, settings

# What one run tried, printed at the end of the session (see conftest.py).
TALLY: Counter = Counter()

SCALE = float(os.environ.get("RAPT_HARDENING_SCALE", "1"))

settings.register_profile(
    "rapt-hardening",
    deadline=None,
    max_examples=max(1, round(150 * SCALE)),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
FUZZ = settings.get_profile("rapt-hardening")


def examples(n: int) -> settings:
    """The hardening profile with ``n`` examples per CI run (times the scale)."""
    return settings(FUZZ, max_examples=max(1, round(n * SCALE)))
