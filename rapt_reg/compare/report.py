"""From per-seed results to an answer: summaries, paired intervals, verdicts, table and plot.

The statistics use numpy (the ``demo`` extra); nothing here trains.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rapt_reg.compare.training import METHODS, RunResult

__all__ = [
    "MethodSummary",
    "Paired",
    "bootstrap_interval",
    "format_table",
    "paired",
    "plot_summary",
    "summarize",
    "verdict",
    "write_atomic",
]

#: Bootstrap resamples of the seeds for the 95% interval.
RESAMPLES = 10_000


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``, resampling them with replacement.

    Args:
        values: One value per seed (for example, a method's accuracy minus standard's).
        level: Coverage of the interval.
        resamples: Number of bootstrap resamples.
        seed: Seed of the resampling, so the same values give the same interval.

    Returns:
        ``(low, high)``; both equal the value itself for a single value.
    """
    import numpy as np

    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Paired:
    """A method against standard fine-tuning, seed by seed (fractions, not points).

    Attributes:
        deltas: The method's accuracy minus standard's, per seed.
        delta: Mean of ``deltas``.
        ci95: 95% bootstrap interval of that mean, over seeds.
        wins: Seeds where the method was more accurate than standard.
        ties: Seeds where the two were exactly as accurate.
        losses: Seeds where the method was less accurate.
        time_ratio: Median step time over standard's, per seed, averaged.
        f1_delta: Mean paired difference of macro-F1.
        f1_ci95: Its 95% bootstrap interval.
    """

    deltas: list[float]
    delta: float
    ci95: tuple[float, float]
    wins: int
    ties: int
    losses: int
    time_ratio: float
    f1_delta: float
    f1_ci95: tuple[float, float]


@dataclass(frozen=True)
class MethodSummary:
    """Figures of one method over the seeds done.

    Attributes:
        method: Name from :data:`~rapt_reg.compare.training.METHODS`.
        label: Its label in tables.
        seeds: The seeds, in order.
        accuracy: Accuracy per seed.
        macro_f1: Macro-F1 per seed.
        perturbed_accuracy: Accuracy on the perturbed copy per seed (empty without one).
        step_time: Median step time (seconds) per seed.
        paired: Against standard (``None`` for standard itself or without standard).
    """

    method: str
    label: str
    seeds: list[int]
    accuracy: list[float]
    macro_f1: list[float]
    perturbed_accuracy: list[float]
    step_time: list[float]
    paired: Optional[Paired]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(mine: Sequence[RunResult], standard: Sequence[RunResult]) -> Paired:
    """Compare one method's runs with standard's runs of the same seeds.

    Args:
        mine: The method's runs.
        standard: Standard fine-tuning's runs; only seeds both have are compared.

    Returns:
        The paired figures.
    """
    base = {r.seed: r for r in standard}
    pairs = [(r, base[r.seed]) for r in mine if r.seed in base]
    deltas = [r.accuracy - b.accuracy for r, b in pairs]
    f1 = [r.macro_f1 - b.macro_f1 for r, b in pairs]
    tolerance = 1e-12
    return Paired(
        deltas=deltas,
        delta=statistics.fmean(deltas),
        ci95=bootstrap_interval(deltas),
        wins=sum(d > tolerance for d in deltas),
        ties=sum(abs(d) <= tolerance for d in deltas),
        losses=sum(d < -tolerance for d in deltas),
        time_ratio=statistics.fmean(r.median_step_time / b.median_step_time for r, b in pairs),
        f1_delta=statistics.fmean(f1),
        f1_ci95=bootstrap_interval(f1),
    )


def summarize(results: Sequence[RunResult], methods: Sequence[str]) -> list[MethodSummary]:
    """One summary per method that has results, in the order of ``methods``.

    Args:
        results: Runs of any seeds; a method is paired with standard over the seeds both have.
        methods: Which methods to report, in order.
    """
    standard = [r for r in results if r.method == "standard"]
    rows = []
    for method in methods:
        mine = sorted((r for r in results if r.method == method), key=lambda r: r.seed)
        if not mine:
            continue
        both = (
            standard
            and method != "standard"
            and {r.seed for r in standard} & {r.seed for r in mine}
        )
        rows.append(
            MethodSummary(
                method=method,
                label=METHODS[method],
                seeds=[r.seed for r in mine],
                accuracy=[r.accuracy for r in mine],
                macro_f1=[r.macro_f1 for r in mine],
                perturbed_accuracy=[
                    r.perturbed_accuracy for r in mine if not math.isnan(r.perturbed_accuracy)
                ],
                step_time=[r.median_step_time for r in mine],
                paired=paired(mine, standard) if both else None,
            )
        )
    return rows


def _signed(points: float) -> str:
    # A true minus sign reads better than a hyphen in prose; -0.04 reads as +0.0, not -0.0.
    rounded = round(points, 1) + 0.0
    return f"{rounded:+.1f}".replace("-", "\u2212")


def verdict(row: MethodSummary) -> str:
    """One plain sentence: how much the method differs from standard, how sure, at what cost.

    Example: "RAPT: +0.5 points (95% interval −0.2 to +1.1) over standard, 1.6× the time per
    step: not distinguishable from standard at 10 seeds."
    """
    p = row.paired
    if p is None:
        return f"{row.label}: the baseline the others are compared with."
    n = len(p.deltas)
    low, high = (100 * x for x in p.ci95)
    cost = f"{p.time_ratio:.1f}× the time per step"
    if n < 2:
        return (
            f"{row.label}: {_signed(100 * p.delta)} points over standard with one seed, {cost}: "
            "one seed gives no interval; run more seeds before reading anything into it."
        )
    if low > 0:
        finding = f"better than standard at {n} seeds"
    elif high < 0:
        finding = f"worse than standard at {n} seeds"
    else:
        finding = f"not distinguishable from standard at {n} seeds"
    return (
        f"{row.label}: {_signed(100 * p.delta)} points (95% interval {_signed(low)} to "
        f"{_signed(high)}) over standard, {cost}: {finding}."
    )


def unbalanced(counts: Sequence[int]) -> bool:
    """True when the largest class is at least 1.5 times the smallest (macro-F1 is shown)."""
    return max(counts) >= 1.5 * min(counts)


def _cell(values: Sequence[float], scale: float = 100, digits: int = 1) -> str:
    mean, std = _mean_std(values)
    text = f"{scale * mean:.{digits}f}"
    return f"{text} ± {scale * std:.{digits}f}" if len(values) > 1 else text


def format_table(
    rows: Sequence[MethodSummary], perturbation: Optional[str] = None, f1: bool = False
) -> str:
    """Render summaries as a Markdown table (mean ± std over seeds).

    Args:
        rows: From :func:`summarize`.
        perturbation: Name of the test-time perturbation (adds its column), e.g. ``"typos 20%"``.
        f1: Add a macro-F1 column (for unbalanced classes).

    Returns:
        The table, one line per row, without a trailing newline.
    """
    head = ["Method", "Accuracy (%)"]
    if f1:
        head.append("Macro-F1 (%)")
    if perturbation:
        head.append(f"Accuracy, {perturbation} (%)")
    head += ["Δ vs standard (points, 95% interval)", "Wins / ties / losses", "Step (ms)", "× time"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "|".join("---:" for _ in head[1:]) + "|"]
    for r in rows:
        cells = [r.label, _cell(r.accuracy)]
        if f1:
            cells.append(_cell(r.macro_f1))
        if perturbation:
            cells.append(_cell(r.perturbed_accuracy))
        p = r.paired
        if p is None:
            cells += ["–", "–"]
        else:
            low, high = (100 * x for x in p.ci95)
            interval = f"{_signed(low)} to {_signed(high)}" if len(p.deltas) > 1 else "one seed"
            cells += [
                f"{_signed(100 * p.delta)} ({interval})",
                f"{p.wins} / {p.ties} / {p.losses}",
            ]
        cells.append(_cell(r.step_time, 1000, 0))
        cells.append(
            "1.00" if r.method == "standard" else "–" if p is None else f"{p.time_ratio:.2f}"
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(rows: Sequence[MethodSummary], path: Path, title: str) -> None:
    """Draw accuracy (mean ± std), the paired difference with its 95% interval, and time.

    Args:
        rows: From :func:`summarize`.
        path: Where to write the PNG.
        title: Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#9467bd"]
    colors = {m: palette[i % len(palette)] for i, m in enumerate(METHODS)}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))

    ax = axes[0]
    means = [100 * _mean_std(r.accuracy)[0] for r in rows]
    stds = [100 * _mean_std(r.accuracy)[1] for r in rows]
    ax.bar(
        [r.label for r in rows],
        means,
        yerr=stds if any(stds) else None,
        capsize=4,
        color=[colors[r.method] for r in rows],
        ecolor="black",
    )
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, low - 10), min(100.0, max(m + s for m, s in zip(means, stds)) + 3))
    ax.set_title("Held-out accuracy (%), mean ± std over seeds", fontsize=10)

    ax = axes[1]
    others = [r for r in rows if r.paired is not None]
    for y, (r, p) in enumerate((r, r.paired) for r in others if r.paired is not None):
        ax.errorbar(
            [100 * p.delta],
            [y],
            xerr=[[100 * (p.delta - p.ci95[0])], [100 * (p.ci95[1] - p.delta)]],
            fmt="o",
            capsize=5,
            color=colors[r.method],
        )
        ax.plot([100 * d for d in p.deltas], [y] * len(p.deltas), "x", color="black", alpha=0.5)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(others)), [r.label for r in others])
    ax.set_ylim(-0.7, max(0.7, len(others) - 0.3))
    ax.set_xlabel("accuracy − standard's, points (×: one seed)")
    ax.set_title("Paired difference, 95% bootstrap interval", fontsize=10)

    ax = axes[2]
    ratios = [1.0 if r.paired is None else r.paired.time_ratio for r in rows]
    ax.bar([r.label for r in rows], ratios, color=[colors[r.method] for r in rows])
    ax.set_title("Time per step (× standard)", fontsize=10)
    for axis in (axes[0], axes[2]):
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def summary_json(rows: Sequence[MethodSummary]) -> dict[str, Any]:
    """The ``methods`` and ``paired`` parts of ``results.json`` (fractions, not points)."""
    methods: dict[str, Any] = {}
    pairs: dict[str, Any] = {}
    for r in rows:
        methods[r.method] = {
            "label": r.label,
            "seeds": r.seeds,
            "accuracy": r.accuracy,
            "macro_f1": r.macro_f1,
            "perturbed_accuracy": r.perturbed_accuracy,
            "median_step_seconds": r.step_time,
        }
        if r.paired is not None:
            p = r.paired
            pairs[r.method] = {
                "delta": p.delta,
                "ci95": list(p.ci95),
                "deltas": p.deltas,
                "wins": p.wins,
                "ties": p.ties,
                "losses": p.losses,
                "time_ratio": p.time_ratio,
                "macro_f1_delta": p.f1_delta,
                "macro_f1_ci95": list(p.f1_ci95),
                "verdict": verdict(r),
            }
    return {"methods": methods, "paired": pairs}


def dumps(payload: dict[str, Any]) -> str:
    """JSON text of a payload, with NaN written as null (strict JSON readers refuse NaN)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(payload), indent=2, allow_nan=False)
