"""Mutation score of the core, per module, with mutmut.

mutmut copies the package into ``mutants/``, makes small changes to it one at a time (a ``+``
for a ``-``, ``None`` for an argument, a dropped call...) and runs the tests that cover the
changed function; a mutant the tests do not notice *survives*. Which modules and tests: the
``[tool.mutmut]`` table of pyproject.toml. The score of a module is

    killed / (mutants - equivalent)

where *killed* counts mutants a test failed on (or that hung past mutmut's timeout), and
*equivalent* are survivors listed in ``scripts/mutation-equivalent.txt``, each with the reason
no test can tell it from the original (e.g. a redundant check, a dtype the next line sets
anyway). Every other survivor counts against the score.

    pip install ".[test,mutation]"
    python scripts/mutation.py                      # every core module (about an hour on 2 cores)
    python scripts/mutation.py --modules replay     # one module (CI runs the two smallest)
    python scripts/mutation.py --survivors --since REV   # survivors against tests new since REV
    python scripts/mutation.py --report             # only read the last run's results
    python scripts/mutation.py --write-docs         # put the table into docs/guarantees.md

mutmut runs every mutant against the tests that execute its function, stopping at the first
failure. To keep a full run near an hour on 2 cores, the generated tests run a fraction of their
cases (``RAPT_REG_MUTATION=1``: 30 of the 300 checkpoint layouts; ``RAPT_HARDENING_SCALE=0.2``),
one intra-op thread each: a mutant only a rarer case would catch counts as a survivor, so the
score is, if anything, low.

It exits 1 when a module scores under ``--min-score`` (default 90) or an entry of the
equivalent list no longer names a surviving mutant (a stale excuse).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "scripts" / "mutation-equivalent.txt"
DOCS = ROOT / "docs" / "guarantees.md"
BEGIN, END = "<!-- mutation:begin -->", "<!-- mutation:end -->"
# mutmut's exit codes (mutmut/stats.py): what counts as killed.
KILLED = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout", 37: "typed"}
# Mutation runs: a fraction of the generated cases (see the docstring), one thread per test.
SCREENING = dict(
    RAPT_REG_MUTATION="1", RAPT_HARDENING_SCALE="0.2", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"
)


def run_mutmut(names: list[str], max_children: int) -> None:
    """``mutmut run`` on ``names``, each mutant's covering tests run fastest first.

    mutmut 3.8.1 hands a mutant's tests to pytest in set order, so a slow test often runs before
    the quick one that fails; sorting them by the durations mutmut measured changes no verdict
    (``-x``: killed if any test fails) and makes a killed mutant cost its quickest failing test.
    """
    os.chdir(ROOT)  # mutmut reads pyproject.toml from the working directory on import
    from mutmut.__main__ import cli
    from mutmut.state import state
    from mutmut.workers import isolation

    for runner in (isolation.ForkServerRunner, isolation.ForkRunner):
        submit = runner.submit

        def fastest_first(self, mutant, tests, *args, _submit=submit):
            durations = state().duration_by_test
            return _submit(self, mutant, sorted(tests, key=lambda t: durations.get(t, 0.0)), *args)

        runner.submit = fastest_first
    os.environ.update(SCREENING)
    try:
        cli(["run", "--max-children", str(max_children), *names])
    except SystemExit as exit:
        if exit.code not in (0, None):
            raise


def _test_bodies(source: str) -> dict[str, str]:
    """Test function name -> its arguments and body (decorators left out: a new marker on an
    old test changes nothing it checks)."""
    bodies = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            bodies[node.name] = ast.dump(node.args) + "".join(ast.dump(n) for n in node.body)
    return bodies


def changed_tests(since: str) -> list[str]:
    """Node ids of the selected tests added or changed (their body) since git revision ``since``."""
    selection = mutmut_table()["pytest_add_cli_args_test_selection"]
    files = subprocess.run(
        ["git", "ls-files", "--", *selection], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    ids = []
    for path in sorted(f for f in files if Path(f).name.startswith("test_")):
        old = subprocess.run(["git", "show", f"{since}:{path}"], cwd=ROOT, capture_output=True)
        before = _test_bodies(old.stdout.decode()) if old.returncode == 0 else {}
        for name, body in _test_bodies((ROOT / path).read_text()).items():
            if before.get(name) != body:
                ids.append(f"{path}::{name}")
    return ids


def rerun_survivors(names: list[str], tests: list[str], max_children: int) -> None:
    """Run each surviving mutant against ``tests`` only (the tests written since the full run:
    every other selected test already passed on it), and record the kills in mutmut's results.

    The mutants are mutmut's own (``mutants/``, switched by ``MUTANT_UNDER_TEST`` as mutmut
    does); one forked pytest per mutant, two at a time, a hung one killed after 120 s.
    """
    shutil.copytree(ROOT / "tests", ROOT / "mutants" / "tests", dirs_exist_ok=True)
    os.environ.update(SCREENING)
    os.chdir(ROOT / "mutants")
    sys.path.insert(0, str(ROOT / "mutants"))
    import pytest

    extra = mutmut_table().get("pytest_add_cli_args", [])
    base = ["-q", "-p", "no:cacheprovider", "-p", "no:randomly", *extra]
    pytest.main(["--collect-only", "-qq", *base, *tests])  # the children fork with it imported
    failing = failing_without_mutants(base, tests)
    tests = [t for t in tests if t not in failing]
    args = ["-x", *base, *tests]
    codes: dict[str, int] = {}
    running: dict[int, tuple[str, float]] = {}
    queue = list(names)
    while queue or running:
        while queue and len(running) < max_children:
            name = queue.pop(0)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                os.environ["MUTANT_UNDER_TEST"] = name
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                os._exit(int(pytest.main(args)))
            running[pid] = (name, time.monotonic())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for child, (_, started) in running.items():
                if time.monotonic() - started > 120:
                    os.kill(child, signal.SIGKILL)
            time.sleep(0.05)
            continue
        name, _ = running.pop(pid)
        codes[name] = os.waitstatus_to_exitcode(status)
        verdict = {0: "survived", 1: "killed", -9: "timeout"}.get(codes[name], "error")
        print(f"{verdict:8} {name} (exit {codes[name]})", flush=True)
    for module in {name.split(".")[1] for name in codes}:
        meta_path = ROOT / "mutants" / "rapt_reg" / f"{module}.py.meta"
        meta = json.loads(meta_path.read_text())
        for name, code in codes.items():
            if name.split(".")[1] == module and code in (1, -9):
                # 1: a test failed; killed (-9) past 120 s: a timeout, as mutmut counts it
                meta["exit_code_by_key"][name] = 1 if code == 1 else 36
        meta_path.write_text(json.dumps(meta))


def failing_without_mutants(base: list[str], tests: list[str]) -> set[str]:
    """The tests that fail on mutmut's copy with no mutant active (as mutmut's own clean run
    checks): e.g. a warning's reported line moves under mutmut's trampolines. Left out."""
    import pytest

    report = Path(os.getcwd()) / "clean-run.txt"

    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        failed = []

        class Collect:
            def pytest_runtest_logreport(self, report: Any) -> None:
                if report.failed:
                    failed.append(report.nodeid)

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        pytest.main([*base, *tests], plugins=[Collect()])
        report.write_text("\n".join(failed))
        os._exit(0)
    os.waitpid(pid, 0)
    failed = set(report.read_text().split())
    for nodeid in sorted(failed):
        print(f"left out (fails with no mutant active): {nodeid}")
    # a parametrized test fails as a whole: leave out its function's id too
    return failed | {nodeid.split("[")[0] for nodeid in failed}


def mutmut_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]


def core_modules() -> list[str]:
    return [Path(path).stem for path in mutmut_table()["only_mutate"]]


def equivalent() -> dict[str, str]:
    """``mutant name  reason`` per line; # starts a comment."""
    found = {}
    for line in EQUIVALENT.read_text().splitlines():
        line = line.split("#", 1)[0].strip() if line.lstrip().startswith("#") else line.strip()
        if line:
            name, _, why = line.partition(" ")
            found[name] = why.strip()
    return found


def results(module: str) -> dict[str, int | None]:
    meta = ROOT / "mutants" / "rapt_reg" / f"{module}.py.meta"
    if not meta.exists():
        raise SystemExit(f"no results for {module}: run `python scripts/mutation.py` first")
    return json.loads(meta.read_text())["exit_code_by_key"]


def score(module: str, excuses: dict[str, str]) -> dict:
    codes = results(module)
    unchecked = [name for name, code in codes.items() if code is None]
    if unchecked:
        raise SystemExit(f"{module}: {len(unchecked)} mutants not run yet (e.g. {unchecked[0]})")
    killed = sum(code in KILLED for code in codes.values())
    survivors = sorted(name for name, code in codes.items() if code not in KILLED)
    excused = [name for name in survivors if name in excuses]
    counted = len(codes) - len(excused)
    return {
        "module": module,
        "mutants": len(codes),
        "killed": killed,
        "equivalent": len(excused),
        "survived": len(survivors) - len(excused),
        "score": 100.0 * killed / counted if counted else 100.0,
        "statuses": Counter("killed" if c in KILLED else f"exit {c}" for c in codes.values()),
        "unexcused": [name for name in survivors if name not in excuses],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| Module | Mutants | Killed | Equivalent | Survived | Score |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| `rapt_reg/{row['module']}.py` | {row['mutants']} | {row['killed']} | "
            f"{row['equivalent']} | {row['survived']} | {row['score']:.1f}% |"
        )
    return "\n".join(lines)


def write_docs(rows: list[dict]) -> None:
    text = DOCS.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOCS} has no {BEGIN} ... {END} block")
    mutmut = subprocess.run(
        [sys.executable, "-m", "pip", "show", "mutmut"], capture_output=True, text=True
    ).stdout
    version = next((ln.split()[-1] for ln in mutmut.splitlines() if ln.startswith("Version")), "?")
    block = (
        f"{BEGIN}\nMeasured {datetime.date.today().isoformat()} with mutmut {version} "
        "(`python scripts/mutation.py --write-docs`):\n\n"
        f"{table(rows)}\n{END}"
    )
    head, rest = text.split(BEGIN, 1)
    DOCS.write_text(head + block + rest.split(END, 1)[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", help="comma-separated, e.g. noise,replay (default: all)")
    parser.add_argument("--report", action="store_true", help="read the last run, run nothing")
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="re-run the last run's survivors against the tests new or changed since --since",
    )
    parser.add_argument("--since", help="git revision the full run's tests were at")
    parser.add_argument("--write-docs", action="store_true", help="update docs/guarantees.md")
    parser.add_argument("--min-score", type=float, default=90.0)
    parser.add_argument("--max-children", type=int, default=2)
    args = parser.parse_args()
    modules = args.modules.split(",") if args.modules else core_modules()
    unknown = sorted(set(modules) - set(core_modules()))
    if unknown:
        parser.error(f"not a mutated module: {unknown}; see [tool.mutmut] in pyproject.toml")

    if not args.report:
        if args.survivors:
            if not args.since:
                parser.error("--survivors needs --since (the revision of the full run's tests)")
            names = [name for module in modules for name in score(module, {})["unexcused"]]
            tests = changed_tests(args.since)
            print(f"{len(names)} survivors, {len(tests)} tests new or changed since {args.since}")
            if names and tests:
                rerun_survivors(names, tests, args.max_children)
        else:
            all_modules = set(modules) == set(core_modules())
            # all: mutmut resumes where an interrupted run stopped
            names = [] if all_modules else [f"rapt_reg.{module}.*" for module in modules]
            run_mutmut(names, args.max_children)

    excuses = equivalent()
    rows = [score(module, excuses) for module in modules]
    print(table(rows))
    failed = False
    for row in rows:
        if row["score"] < args.min_score:
            failed = True
            print(f"\n{row['module']}: {row['score']:.1f}% < {args.min_score}%; survivors:")
            print("\n".join(f"  mutmut show {name}" for name in row["unexcused"]))
    all_codes = {name: code for module in modules for name, code in results(module).items()}
    stale = [
        name
        for name in excuses
        if name.split(".")[1] in modules and all_codes.get(name, 1) in KILLED
    ]
    if stale:
        failed = True
        print("\nequivalent-list entries that no longer name a survivor (remove them):")
        print("\n".join(f"  {name}" for name in stale))
    if args.write_docs:
        write_docs(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
