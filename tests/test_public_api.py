"""The public API changes only on purpose: it must equal the checked-in snapshot."""

import ast
import difflib
import importlib.util
import inspect
import re
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


def _documented_defaults(page, header):
    """{argument: default} from a markdown table whose header row starts with `header`: the
    first cell names the argument(s) in backticks, the column headed "default" (any case) its
    default(s), '/'-separated for an 'a / b' row."""
    lines = (ROOT / page).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    head = [c.strip().lower() for c in lines[start].strip("|").split("|")]
    column = head.index("default")
    found = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        line = re.sub(r"<!--.*?-->", "", line)  # the promise tags
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[0])
        values = [v.strip() for v in cells[column].split("/")]
        if len(values) != len(names):
            continue
        for name, value in zip(names, values):
            found[name] = value.strip("`")
    return found


@pytest.mark.promise("documented-defaults")
@pytest.mark.parametrize(
    "page, header",
    [
        ("README.md", "| argument |"),
        ("docs/algorithm.md", "| `RandomPerturbationRegularizer(...)` |"),
    ],
)
def test_documented_defaults_are_those_of_the_signature(page, header):
    from rapt_reg import RandomPerturbationRegularizer

    documented = _documented_defaults(page, header)
    parameters = inspect.signature(RandomPerturbationRegularizer).parameters
    checked = 0
    for name, text in documented.items():
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue  # "detected", "discovered": described, not a literal
        assert parameters[name].default == value, f"{page}: {name} is documented as {text}"
        checked += 1
    assert checked >= 6, documented


@pytest.mark.promise("core-size")
def test_the_core_is_at_most_1500_lines_and_algorithm_1_one_function_of_at_most_40():
    import rapt_reg
    from rapt_reg.regularizer import RandomPerturbationRegularizer

    package = Path(rapt_reg.__file__).parent
    core = ("regularizer", "hooks", "replay", "noise", "divergence", "discovery", "errors")
    lines = sum(len((package / f"{name}.py").read_text().splitlines()) for name in core)
    assert lines <= 1500
    assert len(inspect.getsource(RandomPerturbationRegularizer._step).splitlines()) <= 40
