"""The pages' promises and the tests' claims agree (scripts/promises.py), and the reader of both
does what it says on small made-up pages and tests."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("promises", ROOT / "scripts" / "promises.py")
promises = importlib.util.module_from_spec(_spec)
sys.modules["promises"] = promises  # dataclasses look their module up
_spec.loader.exec_module(promises)


@pytest.fixture(scope="module")
def found():
    sentences, claims = promises.read_pages(), promises.read_tests()
    return sentences, claims, promises.problems(sentences, claims)


def _listing(items):
    return "\n".join(f"  {item}" for item in items)


@pytest.mark.promise("promises-have-tests")
def test_every_promise_is_claimed_by_a_test(found):
    missing = found[2]["promised, claimed by no test"]
    assert not missing, (
        f"{len(missing)} promise ids on the pages are claimed by no test "
        f'(add @pytest.mark.promise("<id>") to the test that proves each):\n{_listing(missing)}'
    )


def test_no_test_claims_a_promise_no_page_makes(found):
    stale = found[2]["claimed by a test, promised by no page (stale)"]
    assert not stale, f"tests claim ids no page tags (stale):\n{_listing(stale)}"


def test_ids_are_short_kebab_case(found):
    assert not found[2]["malformed ids"]


def test_every_sentence_with_a_promise_word_is_tagged_or_opted_out(found):
    untagged = found[2]["untagged sentences with a promise word"]
    assert not untagged, (
        "sentences that read like promises carry neither <!-- promise: id --> nor "
        f"<!-- not-a-promise --> (reword a vague one rather than opt it out):\n{_listing(untagged)}"
    )


@pytest.mark.promise("promises-have-tests")
def test_the_table_in_guarantees_is_up_to_date(found):
    sentences, claims, _ = found
    assert promises.current_table() == promises.render(sentences, claims), (
        "docs/guarantees.md's promise table is out of date: run python scripts/promises.py"
    )


def test_the_checkers_run_in_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    for checker in promises.CHECKERS:
        assert f"python {checker}" in ci


_COLLECTOR = """
import json, os

def pytest_collection_modifyitems(session, config, items):
    found = {}
    for item in items:
        ids = [i for mark in item.iter_markers("promise") for i in mark.args]
        if ids:
            found.setdefault(item.nodeid.split("[")[0], set()).update(ids)
    with open(os.environ["PROMISES_OUT"], "w") as out:
        json.dump({test: sorted(ids) for test, ids in found.items()}, out)
"""


@pytest.mark.slow
def test_the_marks_read_from_the_source_are_those_pytest_collects(tmp_path):
    """The script reads marks with ast (fast, imports nothing); pytest's own collection of the
    whole suite must find the same tests with the same ids."""
    (tmp_path / "promise_collector.py").write_text(_COLLECTOR)
    env = dict(os.environ, PROMISES_OUT=str(tmp_path / "found.json"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        + ["-p", "promise_collector", *promises.TEST_DIRS],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    collected = json.loads((tmp_path / "found.json").read_text())
    read = {c.test: sorted(set(c.ids)) for c in promises._test_claims_in(ROOT)}
    assert collected == read


# -- the reader, on made-up pages and tests ------------------------------------------------------


def _tree(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


def test_a_tag_belongs_to_the_sentence_before_it(tmp_path):
    root = _tree(
        tmp_path,
        {
            "page.md": """\
            # Title

            Tag it `<!-- not-a-promise -->` when it is not. <!-- promise: shown -->
            First it is exact. <!-- promise: a-one --> Then it is
            checked, and never wrong. <!-- promise: b, c --> A plain sentence.
            Noise that is always there. <!-- not-a-promise -->

            ```python
            x = 1  # always exact, never read: code
            ```

            | Set-up | What happens |
            |---|---|
            | a bad one | refused <!-- promise: d --> |

            - an item that is never tagged
            """
        },
    )
    sentences = promises.read_page("page.md", root)
    by_text = {s.text: s for s in sentences}
    shown = by_text["Tag it `<!-- not-a-promise -->` when it is not."]
    assert shown.ids == ["shown"] and not shown.opted_out
    assert by_text["First it is exact."].ids == ["a-one"]
    assert by_text["Then it is checked, and never wrong."].ids == ["b", "c"]
    assert by_text["A plain sentence."].ids == []
    assert by_text["Noise that is always there."].opted_out
    assert by_text["| a bad one | refused |"].ids == ["d"]
    assert not any("x = 1" in s.text for s in sentences)
    untagged = promises.untagged_candidates(sentences)
    assert [s.text for s in untagged] == ["an item that is never tagged"]


def test_the_changelog_is_read_down_to_its_first_release(tmp_path):
    root = _tree(
        tmp_path,
        {
            "CHANGELOG.md": """\
            # Changelog

            ## [Unreleased]
            - Now always exact. <!-- promise: new -->

            ## [0.1.0]
            - Was never exact. <!-- promise: old -->
            """
        },
    )
    assert [s.ids for s in promises.read_page("CHANGELOG.md", root)] == [["new"]]


def test_marks_are_read_from_functions_classes_params_and_pytestmark(tmp_path):
    root = _tree(
        tmp_path,
        {
            "tests/test_a.py": """\
            import pytest

            pytestmark = [pytest.mark.slow, pytest.mark.promise("module-wide")]


            @pytest.mark.promise("one", "two")
            def test_function():
                pass


            @pytest.mark.parametrize("x", [1, pytest.param(2, marks=pytest.mark.promise("param"))])
            def test_parametrized(x):
                pass


            @pytest.mark.promise("whole-class")
            class TestGroup:
                @pytest.mark.promise("method")
                def test_method(self):
                    pass
            """,
            "tests/test_b.py": "def test_unmarked():\n    pass\n",
        },
    )
    (root / "benchmarks").mkdir()
    claims = {c.test: c.ids for c in promises._test_claims_in(root)}
    assert claims == {
        "tests/test_a.py::test_function": ["module-wide", "one", "two"],
        "tests/test_a.py::test_parametrized": ["module-wide", "param"],
        "tests/test_a.py::TestGroup::test_method": ["module-wide", "whole-class", "method"],
    }


def test_a_computed_id_is_refused(tmp_path):
    root = _tree(
        tmp_path,
        {
            "tests/test_a.py": """\
            import pytest

            ID = "x"

            @pytest.mark.promise(ID)
            def test_function():
                pass
            """
        },
    )
    (root / "benchmarks").mkdir()
    with pytest.raises(ValueError, match="string literals"):
        promises._test_claims_in(root)


def test_problems_name_unclaimed_and_stale_ids():
    sentences = [promises.Sentence("p.md", 1, "It is exact.", "", ["made"])]
    claims = [promises.Claim("tests/test_x.py::test_y", ["claimed"])]
    found = promises.problems(sentences, claims)
    assert found["promised, claimed by no test"] == ["made"]
    assert found["claimed by a test, promised by no page (stale)"] == [
        "claimed (tests/test_x.py::test_y)"
    ]
    table = promises.render(sentences, claims)
    assert "**0 of 1 promise sentences are checked by a named test**" in table
    assert "    | `made`: It is exact. | p.md | **none** |" in table
    assert "    | It is exact. | p.md | `made` (**no test**) |" in table
