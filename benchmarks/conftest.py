"""Benchmarks run once each, on tiny sizes, unless ``RAPT_BENCH_FULL=1`` is set.

``pytest`` collects ``benchmarks/`` with ``tests/``: in that default (smoke) mode each body runs
once as a correctness test. ``RAPT_BENCH_FULL=1 pytest benchmarks`` times the issue's sizes
with pytest-benchmark's calibration; ``python benchmarks/compare.py`` is the side-by-side run.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import workloads  # noqa: E402


@pytest.fixture
def bench(benchmark):
    """``bench(fn, *args)``: pytest-benchmark's ``benchmark``, a single run in smoke mode."""

    def run(fn, *args):
        if workloads.full_mode():
            return benchmark(fn, *args)
        return benchmark.pedantic(fn, args=args, rounds=1, iterations=1, warmup_rounds=0)

    return run
