"""The public API changes only on purpose: it must equal the checked-in snapshot."""

import difflib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UPDATE = "python scripts/api_snapshot.py --update"


def _api_snapshot():
    spec = importlib.util.spec_from_file_location("api_snapshot", ROOT / "scripts/api_snapshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.promise("public-api")
def test_public_api_matches_the_snapshot():
    api_snapshot = _api_snapshot()
    expected = api_snapshot.SNAPSHOT.read_text()
    actual = api_snapshot.render()  # of the rapt_reg imported here: the wheel, under CI
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(True), actual.splitlines(True), "tests/public_api.txt", "rapt_reg"
        )
    )
    assert actual == expected, (
        "The public API differs from tests/public_api.txt. If the change is on purpose, run "
        f"`{UPDATE}` and describe the change in CHANGELOG.md, both in the same commit.\n" + diff
    )


@pytest.mark.promise("baselines", "public-api")
def test_snapshot_covers_the_integrations_and_baselines():
    text = _api_snapshot().SNAPSHOT.read_text()
    for name in ("RandomPerturbationRegularizer", "SmartRegularizer", "R3FRegularizer"):
        assert f"class rapt_reg.{name}(" in text
    for name in ("RaptTrainer", "RaptLightningMixin", "with_rapt", "token_mask"):
        assert f"rapt_reg.integrations.{name}" in text
