#!/usr/bin/env bash
# Test what users install. Builds the sdist and the wheel, checks them (twine check --strict),
# installs the wheel (not the source tree) with the test extras into the active Python
# environment, runs the `rapt-reg` console script from it, then the test suite against it.
# Run it in a fresh virtual environment that has torch (README, "Run the tests"); arguments
# go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
dist=$(mktemp -d)
trap 'rm -rf "$dist"' EXIT

python -m pip install build twine
python -m build --outdir "$dist" .
python -m twine check --strict "$dist"/*
wheel=$(ls "$dist"/*.whl)
python -m zipfile -l "$wheel"
python -m pip install "$wheel[test,demo,integrations,engines]"
# Same version as an install already there (an editable one, say): replace it with the wheel.
python -m pip install --force-reinstall --no-deps "$wheel"

# The tree stays off sys.path (in pytest and in every Python it starts); tests/conftest.py
# stops the run if rapt_reg is imported from anywhere but site-packages.
export HF_HUB_OFFLINE=1 PYTHONSAFEPATH=1 RAPT_REG_TEST_INSTALLED=1
(cd "$dist" && rapt-reg --quick)  # writes its results into $dist
python -m pytest "$@"
