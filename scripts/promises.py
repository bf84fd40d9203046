"""The promises the pages make, and the tests that prove them.

A sentence of README.md, docs/*.md or CHANGELOG.md's top section that promises a behaviour
carries an invisible tag right after it::

    The model is never altered. <!-- promise: model-unaltered -->

(several ids: ``<!-- promise: a, b -->``), and a test that proves it carries the marker
``@pytest.mark.promise("model-unaltered")`` (on the function, the class, a ``pytest.param``, or
the module's ``pytestmark``). A sentence with a promise word (see ``PROMISE_WORDS``) that is not
one says so with ``<!-- not-a-promise -->``.

    python scripts/promises.py            # rewrite the table in docs/guarantees.md
    python scripts/promises.py --check    # exit 1 if the table is out of date or ids disagree
    python scripts/promises.py --scan     # list untagged sentences with a promise word

The tests' markers are read from the source (``ast``): nothing is imported or run.
"""

from __future__ import annotations

import argparse
import ast
import html
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE_PAGE = "docs/guarantees.md"
BEGIN, END = "<!-- promises:begin -->", "<!-- promises:end -->"
TEST_DIRS = ("tests", "benchmarks")

# Pages whose sentences are scanned. compatibility.md is left out: it is generated from the
# test results by scripts/compat_matrix.py, every cell is a test that ran. CHANGELOG.md is read
# down to its second release heading: older sections are history (what a release changed), and
# what still holds of them is promised on the pages.
EXCLUDED_PAGES = {"docs/compatibility.md": "generated from the test results, cell by cell"}
# Read for tags, but not scanned for untagged promise words: pages of measured figures (how a
# benchmark or a replication was run is a method, not a promise of the library), and sections
# that state limits or describe the tests rather than promise behaviour.
UNSCANNED_PAGES = {
    "docs/benchmarks.md": "measurements",
    "docs/results.md": "measurements",
}
UNSCANNED_SECTIONS = {
    "Not guaranteed",
    "How it is tested",
    "Measured",
    "Measured here",
    "What the defaults do, measured",
    "A worked example: Debian package descriptions",
    "Again, with 0.2.0's RAPT",
}

# Words that mark a sentence as a likely promise of behaviour; tuned on the pages.
PROMISE_WORDS = re.compile(
    r"\b(always|never|exactly|exact|bitwise|guarantee[sd]?|equals?|equal to|the same|same as"
    r"|identical|refused|refuses|refuse|raises?|untouched|unaltered|unchanged|cannot|"
    r"is checked|are checked|every|no error|restores?|works?|left out|no \w+ (?:is |are )?left)\b",
    re.IGNORECASE,
)
TAG = re.compile(r"<!--\s*(promise|not-a-promise)\s*:?\s*(.*?)\s*-->", re.DOTALL)
ID = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")


@dataclass
class Sentence:
    page: str
    line: int
    text: str  # markdown, tags removed
    section: str = ""  # the heading above it
    ids: list[str] = field(default_factory=list)
    opted_out: bool = False


@dataclass
class Claim:
    test: str  # tests/file.py::name
    ids: list[str]


# ---------------------------------------------------------------- pages


def pages(root: Path = ROOT) -> list[str]:
    names = ["README.md", "CHANGELOG.md"]
    names += sorted(p.relative_to(root).as_posix() for p in (root / "docs").glob("*.md"))
    return [n for n in names if n not in EXCLUDED_PAGES]


def _visible_lines(page: str, text: str) -> list[tuple[int, str]]:
    """The page's lines that hold prose, numbered from 1: no code, math, directives, generated
    regions, headings or (for CHANGELOG.md) released sections."""
    out: list[tuple[int, str]] = []
    fence = None
    skip_until = None
    releases = 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence:
            if stripped.startswith(fence):
                fence = None
            out.append((number, ""))
            continue
        if skip_until:
            if stripped == skip_until:
                skip_until = None
            out.append((number, ""))
            continue
        if stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            out.append((number, ""))
            continue
        if stripped == "\\[":
            skip_until = "\\]"
            out.append((number, ""))
            continue
        begin = re.fullmatch(r"<!--\s*([\w-]+):begin\s*-->", stripped)
        if begin:  # a generated region (this script's table, the noise-scale tables, ...)
            skip_until = f"<!-- {begin.group(1)}:end -->"
            out.append((number, ""))
            continue
        if page == "CHANGELOG.md" and stripped.startswith("## "):
            releases += 1
            if releases == 2:
                break
        if stripped.startswith("#"):
            out.append((number, "\0" + stripped.lstrip("#").strip()))  # a heading
            continue
        if stripped.startswith((":::", "<!-- Generated")) or line.startswith("    "):
            out.append((number, ""))  # mkdocstrings directives and their options
            continue
        if re.fullmatch(r"\|?[\s:|-]+\|?", stripped) and "-" in stripped:
            out.append((number, ""))  # a table's separator row
            continue
        out.append((number, line))
    return out


_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "Eq.", "Alg.", "et al.", "No.")
# A sentence ends at . ! or ? (maybe closing a parenthesis or bold) before a space and a capital,
# a code span, a parenthesis, bold, a link, a tag or inline math.
_SPLIT = re.compile(r"(?:(?<=[.!?])|(?<=[.!?]\))|(?<=[.!?]\*\*))\s+(?=[A-Z`*(\[<\\\"])")


def _split_sentences(text: str) -> list[str]:
    for abbreviation in _ABBREVIATIONS:
        text = text.replace(abbreviation, abbreviation.replace(".", "\0"))
    parts = [p.replace("\0", ".") for p in _SPLIT.split(text) if p.strip()]
    # A tag opening a piece belongs to the sentence before it.
    out: list[str] = []
    for part in parts:
        while out and part.startswith("<!--") and "-->" in part:
            end = part.index("-->") + 3
            out[-1] += " " + part[:end]
            part = part[end:].lstrip()
        if part:
            out.append(part)
    return out


def _units(page: str, text: str) -> list[tuple[int, str, str]]:
    """Paragraphs cut into sentences; each list item and each table row is one unit. Each with
    its line and the heading above it."""
    units: list[tuple[int, str, str]] = []
    block: list[tuple[int, str]] = []
    section = ""

    def flush() -> None:
        if block:
            joined = " ".join(line.strip() for _, line in block)
            for sentence in _split_sentences(joined):
                units.append((block[0][0], sentence, section))
            block.clear()

    for number, line in _visible_lines(page, text):
        stripped = line.strip()
        if line.startswith("\0"):
            flush()
            section = line[1:]
        elif not stripped:
            flush()
        elif stripped.startswith("|"):
            flush()
            units.append((number, stripped, section))
        elif re.match(r"([-*+]|\d+\.)\s", stripped):
            flush()
            block.append((number, re.sub(r"^([-*+]|\d+\.)\s+", "", stripped)))
        else:
            block.append((number, line))
    flush()
    return units


def read_page(page: str, root: Path = ROOT) -> list[Sentence]:
    text = (root / page).read_text(encoding="utf-8")
    sentences = []
    for line, unit, section in _units(page, text):
        ids: list[str] = []
        opted_out = False
        # a tag written in a code span is shown, not meant: mask code spans while looking
        masked = re.sub(r"`[^`]*`", lambda m: "\0" * len(m.group(0)), unit)
        tags = list(TAG.finditer(masked))
        for tag in tags:
            kind, body = tag.groups()
            if kind == "promise":
                ids += [i.strip() for i in body.split(",") if i.strip()]
            else:
                opted_out = True
        for tag in reversed(tags):
            unit = unit[: tag.start()] + unit[tag.end() :]
        bare = re.sub(r"\s+", " ", unit).strip()
        if bare:
            sentences.append(Sentence(page, line, bare, section, ids, opted_out))
    return sentences


def read_pages(root: Path = ROOT) -> list[Sentence]:
    return [s for page in pages(root) for s in read_page(page, root)]


def untagged_candidates(sentences: list[Sentence]) -> list[Sentence]:
    """Sentences with a promise word and neither a promise tag nor an opt-out."""
    return [
        s
        for s in sentences
        if not s.ids
        and not s.opted_out
        and s.page not in UNSCANNED_PAGES
        and s.section not in UNSCANNED_SECTIONS
        and PROMISE_WORDS.search(_plain(s.text))
    ]


# ---------------------------------------------------------------- tests


def _is_promise_mark(node: ast.AST) -> bool:
    # pytest.mark.promise(...) or mark.promise(...)
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "promise"
        and isinstance(node.func.value, ast.Attribute)
        and node.func.value.attr == "mark"
    )


def _mark_ids(node: ast.AST, where: str) -> list[str]:
    """The ids of every promise mark inside node (a decorator, pytestmark's value, a param)."""
    ids = []
    for sub in ast.walk(node):
        if _is_promise_mark(sub):
            assert isinstance(sub, ast.Call)
            for arg in sub.args:
                if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
                    raise ValueError(f"{where}: promise ids must be string literals")
                ids.append(arg.value)
            if not sub.args or sub.keywords:
                raise ValueError(f"{where}: write pytest.mark.promise('id', ...)")
    return ids


def _test_claims(path: str, tree: ast.Module) -> list[Claim]:
    module_ids: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            module_ids += _mark_ids(node.value, f"{path}: pytestmark")
    claims: list[Claim] = []

    def visit(body: list[ast.stmt], prefix: str, inherited: list[str]) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                own = [i for d in node.decorator_list for i in _mark_ids(d, f"{path}::{node.name}")]
                visit(node.body, f"{prefix}{node.name}::", inherited + own)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{path}::{prefix}{node.name}"
                own = [i for d in node.decorator_list for i in _mark_ids(d, name)]
                if own and not node.name.startswith("test"):
                    raise ValueError(f"{name}: a promise mark on a function that is not a test")
                ids = inherited + own
                if ids and node.name.startswith("test"):
                    claims.append(Claim(name, list(dict.fromkeys(ids))))

    visit(tree.body, "", module_ids)
    return claims


# Checks that run outside pytest, in CI (.ci/run), and claim promises with a top-level
# ``PROMISES = ("id", ...)``: a page rendered in a browser is not a unit test's business.
CHECKERS = ("scripts/check_docs.py",)


def _checker_claims(path: str, tree: ast.Module) -> list[Claim]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "PROMISES" for t in node.targets
        ):
            ids = ast.literal_eval(node.value)
            return [Claim(f"{path} (CI)", list(ids))]
    return []


def read_tests(root: Path = ROOT) -> list[Claim]:
    """The claims of the tests under tests/ and benchmarks/, and of the CI checkers."""
    claims = []
    for path in CHECKERS:
        source = (root / path).read_text(encoding="utf-8")
        claims += _checker_claims(path, ast.parse(source, path))
    return claims + _test_claims_in(root)


def _test_claims_in(root: Path) -> list[Claim]:
    claims = []
    for folder in TEST_DIRS:
        for file in sorted((root / folder).rglob("*.py")):
            source = file.read_text(encoding="utf-8")
            if "promise" not in source:
                continue
            path = file.relative_to(root).as_posix()
            claims += _test_claims(path, ast.parse(source, path))
    return claims


# ---------------------------------------------------------------- the table


def _plain(text: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links -> their text
    return text.replace("**", "")


def _cell(sentence: Sentence) -> str:
    text = _plain(sentence.text)
    if text.startswith("|"):  # a table row: its cells, joined
        cells = [c.strip() for c in text.strip("|").split("|")]
        text = " → ".join(c for c in cells if c)
    if text.endswith(")") and text.count(")") > text.count("("):
        text = text[:-1]  # the close of a parenthesis the sentence ends
    if text.startswith("(") and text.count("(") > text.count(")"):
        text = text[1:]
    # A pipe ends a table cell: escaped in text, written as an entity in code (where markdown
    # would show the backslash).
    text = re.sub(
        r"`([^`]*\|[^`]*)`",
        lambda m: "<code>" + html.escape(m.group(1)).replace("|", "&#124;") + "</code>",
        text,
    )
    return text.replace("|", "\\|")


def _short(test: str) -> str:
    return test.removeprefix("tests/")


def render(sentences: list[Sentence], claims: list[Claim]) -> str:
    """The generated region of docs/guarantees.md: the count, then (folded) each promise with
    where it is made and the tests that claim it, then every promise sentence."""
    by_id: dict[str, list[str]] = {}
    for claim in claims:
        for i in claim.ids:
            by_id.setdefault(i, []).append(claim.test)
    tagged = [s for s in sentences if s.ids]
    proven = [s for s in tagged if all(i in by_id for i in s.ids)]
    first: dict[str, Sentence] = {}  # quoted from this page first, where it makes the promise
    pages: dict[str, dict[str, int]] = {}
    for s in sorted(tagged, key=lambda s: s.page != TABLE_PAGE):
        for i in s.ids:
            first.setdefault(i, s)
    for s in tagged:
        for i in s.ids:
            pages.setdefault(i, {}).setdefault(s.page, 0)
            pages[i][s.page] += 1
    lines = [
        BEGIN,
        "<!-- Generated by scripts/promises.py from the pages' tags and the tests' markers:"
        " do not edit. -->",
        "",
        f"**{len(proven)} of {len(tagged)} promise sentences are checked by a named test** "
        f"({len(first)} distinct promises, claimed by {len({c.test for c in claims})} tests; "
        "the pages: README.md, CHANGELOG.md's unreleased section, docs/). Regenerate with "
        "`python scripts/promises.py`.",
        "",
        f'??? note "The {len(first)} promises and the tests that claim them"',
        "",
        "    Tests are under `tests/` unless named otherwise; a promise is quoted as it is"
        " made on this page when it is, else where it is first made.",
        "",
        "    | Promise | Made in | Tests |",
        "    |---|---|---|",
    ]
    for i, s in first.items():
        tests = sorted(set(by_id.get(i, [])))
        shown = "<br>".join(f"`{_short(t)}`" for t in tests) or "**none**"
        made = ", ".join(
            f"{page.removeprefix('docs/')}" + (f" ×{n}" if n > 1 else "")
            for page, n in pages[i].items()
        )
        lines.append(f"    | `{i}`: {_cell(s)} | {made} | {shown} |")
    lines += [
        "",
        f'??? note "The {len(tagged)} promise sentences, page by page"',
        "",
        "    | Sentence | Where | Promises |",
        "    |---|---|---|",
    ]
    for s in tagged:
        ids = ", ".join(f"`{i}`" + ("" if i in by_id else " (**no test**)") for i in s.ids)
        where = f"{s.page} § {_plain(s.section).replace('`', '')}" if s.section else s.page
        lines.append(f"    | {_cell(s)} | {where} | {ids} |")
    lines.append(END)
    return "\n".join(lines)


def problems(sentences: list[Sentence], claims: list[Claim]) -> dict[str, list[str]]:
    """Everything that keeps the pages and the tests from agreeing, by kind."""
    made = {i for s in sentences for i in s.ids}
    claimed = {i for c in claims for i in c.ids}
    return {
        "malformed ids": sorted(i for i in made | claimed if not ID.match(i)),
        "promised, claimed by no test": sorted(made - claimed),
        "claimed by a test, promised by no page (stale)": sorted(
            f"{i} ({', '.join(c.test for c in claims if i in c.ids)})" for i in claimed - made
        ),
        "untagged sentences with a promise word": [
            f"{s.page}:{s.line}: {s.text[:160]}" for s in untagged_candidates(sentences)
        ],
    }


def current_table(root: Path = ROOT) -> str:
    text = (root / TABLE_PAGE).read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def write_table(table: str, root: Path = ROOT) -> None:
    path = root / TABLE_PAGE
    text = path.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:start] + table + text[end:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on any disagreement")
    parser.add_argument("--scan", action="store_true", help="list untagged promise sentences")
    args = parser.parse_args(argv)
    sentences, claims = read_pages(), read_tests()
    if args.scan:
        for s in untagged_candidates(sentences):
            print(f"{s.page}:{s.line}: {s.text}")
        return 0
    table = render(sentences, claims)
    found = problems(sentences, claims)
    if not args.check:
        write_table(table)
    elif current_table() != table:
        found["table"] = [f"{TABLE_PAGE} is out of date: run python scripts/promises.py"]
    failed = False
    for kind, items in found.items():
        if items:
            failed = True
            print(f"{kind} ({len(items)}):")
            print("".join(f"  {item}\n" for item in items), end="")
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
