"""From per-seed results to an answer: summaries, paired intervals, verdicts, table and plots.

The statistics use numpy (the ``demo`` extra); nothing here trains. The interval of a paired
difference is Student's t-interval over the seeds' differences (exact quantiles, valid at two
seeds, wide there as it should be); the exact sign-flip test and a percentile bootstrap are
reported alongside. A method is called better or worse than the reference only with at least
:data:`MIN_SEEDS` seeds, when the t-interval excludes 0 and the sign-flip test agrees.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rapt_reg.compare.training import METHODS, RunResult, Variant

__all__ = [
    "MIN_SEEDS",
    "MethodSummary",
    "Paired",
    "bootstrap_interval",
    "format_table",
    "paired",
    "plot_summary",
    "seeds_needed",
    "sign_flip_p",
    "single_class_warnings",
    "summarize",
    "summary_figure",
    "sweep_figure",
    "t_interval",
    "t_quantile",
    "verdict",
    "write_atomic",
]

#: Bootstrap resamples of the seeds for the percentile interval reported alongside.
RESAMPLES = 10_000

#: Fewest seeds for a verdict: below 6 the exact sign-flip test cannot reach p < 0.05 (with
#: 5 seeds its smallest p-value is 2/32 = 0.0625), whatever the differences are.
MIN_SEEDS = 6

#: Sign-flip tests enumerate every sign pattern up to this many seeds, and sample beyond.
EXACT_SIGN_FLIPS = 16

#: Label of the majority-class baseline row.
BASELINE = "Majority class"


# --------------------------------------------------------------------------- statistics


def _t_two_sided(t: float, df: int) -> float:
    # P(|T| <= t) for Student's t with an integer number of degrees of freedom, in closed form
    # (Abramowitz and Stegun 26.7.3 and 26.7.4).
    theta = math.atan(t / math.sqrt(df))
    cos2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:
        term, total = 1.0, 0.0
        for k in range(1, (df - 1) // 2 + 1):  # cos, 2/3 cos^3, 2*4/(3*5) cos^5, ...
            term = math.cos(theta) if k == 1 else term * cos2 * (2 * k - 2) / (2 * k - 1)
            total += term
        return (2 / math.pi) * (theta + s * total)
    term, total = 1.0, 1.0
    for k in range(1, df // 2):  # 1, 1/2 cos^2, 1*3/(2*4) cos^4, ...
        term *= cos2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(level: float, df: int) -> float:
    """The ``t`` with ``P(|T| <= t) = level`` for Student's t with ``df`` degrees of freedom.

    Exact (the closed form, inverted by bisection) up to 1,000 degrees of freedom; beyond,
    the Cornish-Fisher expansion about the normal quantile, which is within 1e-6 there.

    Example:
        >>> round(t_quantile(0.95, 1), 3), round(t_quantile(0.95, 4), 3)
        (12.706, 2.776)
    """
    if df > 1000:
        z = statistics.NormalDist().inv_cdf((1 + level) / 2)
        return (
            z
            + (z**3 + z) / (4 * df)
            + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
        )
    low, high = 0.0, 1.0
    while _t_two_sided(high, df) < level:
        high *= 2
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_two_sided(mid, df) < level else (low, mid)
    return (low + high) / 2


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Student's t-interval of the mean: ``mean ± t(level, n-1) * sd / sqrt(n)``.

    Returns:
        ``(low, high)``; NaN for fewer than two values.
    """
    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def sign_flip_p(values: Sequence[float], resamples: int = 100_000, seed: int = 0) -> float:
    """Two-sided p-value of the sign-flip (paired permutation) test of a zero mean.

    Under "no difference" each seed's difference is as likely to have either sign; the
    p-value is the share of the ``2**n`` sign patterns whose mean is at least as far from 0
    as the observed one: exact up to :data:`EXACT_SIGN_FLIPS` values, sampled (seeded) beyond.
    """
    import numpy as np

    data = np.asarray(values, dtype=float)
    n = data.size
    if n == 0:
        return math.nan
    observed = abs(data.mean()) - 1e-12
    if n <= EXACT_SIGN_FLIPS:
        patterns = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
        means = np.abs(((1 - 2 * patterns) * data).mean(axis=1))
        return float((means >= observed).mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(resamples, n))
    hits = int((np.abs((signs * data).mean(axis=1)) >= observed).sum())
    return (hits + 1) / (resamples + 1)


def bootstrap_interval(
    values: Sequence[float], level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``, resampling them with replacement.

    Too narrow with few values (with two it is their range): reported beside the t-interval,
    never used for a verdict.

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


def seeds_needed(values: Sequence[float], most: int = 10_000) -> Optional[int]:
    """Seeds at which the t-interval would exclude 0 if the mean and spread stayed as seen.

    At least :data:`MIN_SEEDS`; ``None`` when the mean is 0 (no difference to find) or more
    than ``most`` would be needed, or with fewer than two values (no spread seen).
    """
    if len(values) < 2:
        return None
    mean, sd = abs(statistics.fmean(values)), statistics.stdev(values)

    def tells(n: int) -> bool:  # the half-width shrinks as n grows: a binary search finds n
        return t_quantile(0.95, n - 1) * sd / math.sqrt(n) < mean

    if mean <= 1e-12 or not tells(most):
        return None
    low, high = MIN_SEEDS - 1, most  # tells(high) holds; tells(low) is taken not to
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if tells(mid) else (mid, high)
    return high


# --------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class Paired:
    """A method against the reference (standard fine-tuning), seed by seed, in fractions.

    Attributes:
        reference: Name of the method compared with.
        deltas: The method's accuracy minus the reference's, per seed.
        delta: Mean of ``deltas``.
        ci95: 95% t-interval of that mean over seeds (NaN with one seed).
        bootstrap_ci95: 95% percentile bootstrap interval, for comparison.
        p_value: Two-sided p-value of the exact sign-flip test.
        wins: Seeds where the method was more accurate than the reference.
        ties: Seeds where the two were exactly as accurate.
        losses: Seeds where the method was less accurate.
        time_ratio: Median step time over the reference's, per seed, averaged.
        f1_delta: Mean paired difference of macro-F1.
        f1_ci95: Its 95% t-interval.
        needed: :func:`seeds_needed` of the deltas.
    """

    reference: str
    deltas: list[float]
    delta: float
    ci95: tuple[float, float]
    bootstrap_ci95: tuple[float, float]
    p_value: float
    wins: int
    ties: int
    losses: int
    time_ratio: float
    f1_delta: float
    f1_ci95: tuple[float, float]
    needed: Optional[int]

    @property
    def decided(self) -> int:
        """+1 better, -1 worse, 0 not told: at least :data:`MIN_SEEDS` seeds, the t-interval
        on one side of 0 and the sign-flip test at p < 0.05."""
        low, high = self.ci95
        if len(self.deltas) < MIN_SEEDS or not self.p_value < 0.05:
            return 0
        return 1 if low > 0 else -1 if high < 0 else 0


@dataclass(frozen=True)
class MethodSummary:
    """Figures of one method over the seeds done.

    Attributes:
        method: The variant's name (``"rapt"``, ``"rapt[eta=1]"``, ...).
        label: Its label in tables.
        seeds: The seeds, in order.
        accuracy: Accuracy per seed.
        macro_f1: Macro-F1 per seed.
        perturbed_accuracy: Accuracy on the perturbed copy per seed (empty without one).
        step_time: Median step time (seconds) per seed.
        paired: Against the reference (``None`` for the reference itself).
        predicted: Per seed, how many held-out examples went to each class.
    """

    method: str
    label: str
    seeds: list[int]
    accuracy: list[float]
    macro_f1: list[float]
    perturbed_accuracy: list[float]
    step_time: list[float]
    paired: Optional[Paired]
    predicted: list[list[int]]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(
    mine: Sequence[RunResult], reference: Sequence[RunResult], name: str = "standard"
) -> Paired:
    """Compare one method's runs with the reference's runs of the same seeds.

    Args:
        mine: The method's runs.
        reference: The reference method's runs; only seeds both have are compared.
        name: The reference's name.

    Returns:
        The paired figures.
    """
    base = {r.seed: r for r in reference}
    pairs = [(r, base[r.seed]) for r in mine if r.seed in base]
    deltas = [r.accuracy - b.accuracy for r, b in pairs]
    f1 = [r.macro_f1 - b.macro_f1 for r, b in pairs]
    tolerance = 1e-12
    return Paired(
        reference=name,
        deltas=deltas,
        delta=statistics.fmean(deltas),
        ci95=t_interval(deltas),
        bootstrap_ci95=bootstrap_interval(deltas),
        p_value=sign_flip_p(deltas),
        wins=sum(d > tolerance for d in deltas),
        ties=sum(abs(d) <= tolerance for d in deltas),
        losses=sum(d < -tolerance for d in deltas),
        time_ratio=statistics.fmean(r.median_step_time / b.median_step_time for r, b in pairs),
        f1_delta=statistics.fmean(f1),
        f1_ci95=t_interval(f1),
        needed=seeds_needed(deltas),
    )


def reference_of(methods: Sequence[str]) -> str:
    """The method the others are paired with: standard if run, else the first one listed."""
    return "standard" if "standard" in methods else methods[0]


def summarize(
    results: Sequence[RunResult],
    methods: Sequence[str],
    labels: Optional[Mapping[str, str]] = None,
) -> list[MethodSummary]:
    """One summary per method that has results, in the order of ``methods``.

    Args:
        results: Runs of any seeds; a method is paired with the reference (standard, or the
            first method when standard is not run) over the seeds both have.
        methods: Which methods (variant names) to report, in order.
        labels: Name -> label (default: :data:`~rapt_reg.compare.training.METHODS`).
    """
    labels = METHODS if labels is None else labels
    reference = reference_of(methods)
    base = [r for r in results if r.method == reference]
    rows = []
    for method in methods:
        mine = sorted((r for r in results if r.method == method), key=lambda r: r.seed)
        if not mine:
            continue
        both = method != reference and {r.seed for r in base} & {r.seed for r in mine}
        rows.append(
            MethodSummary(
                method=method,
                label=labels.get(method, method),
                seeds=[r.seed for r in mine],
                accuracy=[r.accuracy for r in mine],
                macro_f1=[r.macro_f1 for r in mine],
                perturbed_accuracy=[
                    r.perturbed_accuracy for r in mine if not math.isnan(r.perturbed_accuracy)
                ],
                step_time=[r.median_step_time for r in mine],
                paired=paired(mine, base, reference) if both else None,
                predicted=[r.predicted for r in mine],
            )
        )
    return rows


def _signed(points: float) -> str:
    # A true minus sign reads better than a hyphen in prose; -0.04 reads as +0.0, not -0.0.
    rounded = round(points, 1) + 0.0
    return f"{rounded:+.1f}".replace("-", "\u2212")


def _seeds(n: int) -> str:
    return f"{n} seed{'s' * (n != 1)}"


def verdict(row: MethodSummary, reference: str = "Standard") -> str:
    """One plain sentence: how much the method differs from the reference, how sure, at what
    cost, and (when it cannot tell yet) about how many seeds would.

    Example: "RAPT: +0.5 points (95% interval −0.2 to +1.1, sign-flip p = 0.31) over
    standard, 1.6× the time per step: not distinguishable from standard at 10 seeds; at this
    spread about 40 seeds would tell a difference this size."
    """
    p = row.paired
    if p is None:
        return f"{row.label}: the reference the others are compared with."
    ref = reference.lower() if reference == "Standard" else reference
    n = len(p.deltas)
    cost = f"{p.time_ratio:.1f}× the time per step"
    if n < 2:
        return (
            f"{row.label}: {_signed(100 * p.delta)} points over {ref} with one seed, {cost}: "
            f"one seed gives no interval; run at least {MIN_SEEDS} seeds (--seeds {MIN_SEEDS})."
        )
    low, high = (100 * x for x in p.ci95)
    figures = (
        f"{row.label}: {_signed(100 * p.delta)} points (95% interval {_signed(low)} to "
        f"{_signed(high)}, sign-flip p = {p.p_value:.2f}) over {ref}, {cost}"
    )
    if p.decided:
        return f"{figures}: {'better' if p.decided > 0 else 'worse'} than {ref} at {n} seeds."
    low_, high_ = p.ci95
    if n >= MIN_SEEDS and (low_ > 0 or high_ < 0):
        return (
            f"{figures}: not distinguishable from {ref} at {n} seeds (the interval excludes 0 "
            f"but the sign-flip test does not agree, p = {p.p_value:.2f}); more seeds would tell."
        )
    if p.needed is None:
        more = (
            "the mean difference is 0, so more seeds would only narrow the interval around it"
            if abs(p.delta) <= 1e-12
            else "at this spread it would take more than 10,000 seeds to tell"
        )
    else:
        more = f"at this spread about {p.needed} seeds would tell a difference this size"
    if n < MIN_SEEDS:
        return f"{figures}: too few seeds to tell ({n}; a verdict needs {MIN_SEEDS}); {more}."
    return f"{figures}: not distinguishable from {ref} at {n} seeds; {more}."


def single_class_warnings(
    rows: Sequence[MethodSummary], classes: Sequence[str], majority: Sequence[float] = ()
) -> list[str]:
    """A warning per method that predicted one class for every held-out example of a seed.

    Such a run learnt nothing the majority-class baseline does not know; when every method
    does it, the comparison says nothing about the regularisers.
    """
    lines = []
    for row in rows:
        seeds = [
            s for s, counts in zip(row.seeds, row.predicted) if sum(c > 0 for c in counts) == 1
        ]
        if not seeds:
            continue
        counts = row.predicted[row.seeds.index(seeds[0])]
        cls = classes[next(i for i, c in enumerate(counts) if c)]
        where = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
        lines.append(
            f"warning: {row.label} predicted one class ({cls!r}) for every held-out example in "
            f"{where}: it learnt nothing beyond the majority class; train longer (--steps) or "
            "with a higher --lr"
        )
    if rows and len(lines) == len(rows):
        lines.append(
            "warning: every method collapsed to one class: the differences above say nothing "
            "about the regularisers"
        )
    return lines


def unbalanced(counts: Sequence[int]) -> bool:
    """True when the largest class is at least 1.5 times the smallest (macro-F1 is shown)."""
    return max(counts) >= 1.5 * min(counts)


def _cell(values: Sequence[float], scale: float = 100, digits: int = 1) -> str:
    mean, std = _mean_std(values)
    text = f"{scale * mean:.{digits}f}"
    return f"{text} ± {scale * std:.{digits}f}" if len(values) > 1 else text


def format_table(
    rows: Sequence[MethodSummary],
    perturbation: Optional[str] = None,
    f1: bool = False,
    reference: str = "Standard",
    baseline: Optional[Mapping[str, Sequence[float]]] = None,
) -> str:
    """Render summaries as a Markdown table (mean ± std over seeds).

    Args:
        rows: From :func:`summarize`.
        perturbation: Name of the test-time perturbation (adds its column), e.g. ``"typos 20%"``.
        f1: Add a macro-F1 column (for unbalanced classes).
        reference: Label of the method the differences are taken against.
        baseline: ``{"accuracy": [...], "macro_f1": [...]}`` of the majority-class baseline,
            one value per seed; adds its row last.

    Returns:
        The table, one line per row, without a trailing newline.
    """
    ref = reference.lower() if reference == "Standard" else reference
    head = ["Method", "Accuracy (%)"]
    if f1:
        head.append("Macro-F1 (%)")
    if perturbation:
        head.append(f"Accuracy, {perturbation} (%)")
    head += [
        f"Δ vs {ref} (points, 95% interval)",
        "Sign-flip p",
        "Wins / ties / losses",
        "Step (ms)",
        "× time",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "|".join("---:" for _ in head[1:]) + "|"]
    for r in rows:
        cells = [r.label, _cell(r.accuracy)]
        if f1:
            cells.append(_cell(r.macro_f1))
        if perturbation:
            cells.append(_cell(r.perturbed_accuracy))
        p = r.paired
        if p is None:
            cells += ["–", "–", "–"]
        else:
            low, high = (100 * x for x in p.ci95)
            interval = f"{_signed(low)} to {_signed(high)}" if len(p.deltas) > 1 else "one seed"
            cells += [
                f"{_signed(100 * p.delta)} ({interval})",
                f"{p.p_value:.2f}",
                f"{p.wins} / {p.ties} / {p.losses}",
            ]
        cells.append(_cell(r.step_time, 1000, 0))
        cells.append("1.00" if p is None else f"{p.time_ratio:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if baseline is not None:
        cells = [BASELINE, _cell(baseline["accuracy"])]
        if f1:
            cells.append(_cell(baseline["macro_f1"]))
        if perturbation:
            cells.append("–")
        lines.append("| " + " | ".join(cells + ["–"] * 5) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots

_PALETTE = ["#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def _spread(values: Sequence[float], width: float = 0.3) -> list[float]:
    # Vertical offsets that put equal values side by side instead of on top of each other.
    seen: dict[float, list[int]] = {}
    for i, v in enumerate(values):
        seen.setdefault(round(v, 9), []).append(i)
    offsets = [0.0] * len(values)
    for members in seen.values():
        if len(members) > 1:
            step = min(0.18, 2 * width / (len(members) - 1))
            for k, i in enumerate(members):
                offsets[i] = (k - (len(members) - 1) / 2) * step
    return offsets


def summary_figure(
    rows: Sequence[MethodSummary],
    title: str,
    reference: str = "Standard",
    baseline: Optional[float] = None,
) -> Any:
    """The figure of :func:`plot_summary`: one row per method, three panels side by side.

    Accuracy (mean ± std over seeds, each seed a dot, the axis from 0 to 100), the paired
    difference to the reference with its 95% t-interval (each seed a cross, equal ones side by
    side), and the time per step as a ratio to the reference's. Method names are written once,
    on the left, horizontally, so that they cannot overlap.

    Args:
        rows: From :func:`summarize`.
        title: Figure title.
        reference: Label of the method the differences are taken against.
        baseline: Mean accuracy of the majority-class baseline (a dashed line), if known.

    Returns:
        The matplotlib figure (not yet saved).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {r.method: _PALETTE[i % len(_PALETTE)] for i, r in enumerate(rows)}
    n = len(rows)
    fig, axes = plt.subplots(
        1, 3, figsize=(13, 1.6 + 0.45 * n), sharey=True, gridspec_kw={"width_ratios": [4, 4, 3]}
    )
    ys = list(range(n))[::-1]  # the first method on top
    labels = [r.label for r in rows]

    ax = axes[0]
    means = [100 * _mean_std(r.accuracy)[0] for r in rows]
    stds = [100 * _mean_std(r.accuracy)[1] for r in rows]
    ax.barh(ys, means, height=0.6, color=[colors[r.method] for r in rows], alpha=0.8)
    ax.errorbar(means, ys, xerr=stds, fmt="none", ecolor="black", capsize=3)
    for y, r in zip(ys, rows):
        points = [100 * a for a in r.accuracy]
        ax.plot(points, [y + o for o in _spread(points)], ".", color="black", markersize=4)
    if baseline is not None:
        ax.axvline(100 * baseline, color="black", linestyle="--", linewidth=0.8)
        ax.text(100 * baseline, n - 0.45, " majority class", fontsize=7, va="bottom")
    ax.set_xlim(0, 100)
    ax.set_xlabel("held-out accuracy (%), mean ± std; dots: seeds")
    ax.set_yticks(ys, labels)
    ax.set_ylim(-0.6, n - 0.4 + (0.35 if baseline is not None else 0))

    ax = axes[1]
    ref = reference.lower() if reference == "Standard" else reference
    for y, r in zip(ys, rows):
        p = r.paired
        if p is None:
            ax.text(
                0,
                y,
                f"{r.label}: the reference",
                ha="center",
                va="center",
                fontsize=8,
                color="#555555",
            )
            continue
        points = [100 * d for d in p.deltas]
        ax.plot(points, [y + o for o in _spread(points)], "x", color="black", alpha=0.6)
        if len(p.deltas) > 1:
            low, high = (100 * x for x in p.ci95)
            ax.errorbar(
                [100 * p.delta],
                [y],
                xerr=[[100 * p.delta - low], [high - 100 * p.delta]],
                fmt="o",
                capsize=5,
                color=colors[r.method],
            )
        else:
            ax.plot([100 * p.delta], [y], "o", color=colors[r.method])
    ax.axvline(0.0, color="black", linewidth=0.8)
    reach = [
        abs(100 * x)
        for r in rows
        if r.paired is not None
        for x in (*r.paired.deltas, *r.paired.ci95)
        if not math.isnan(x)
    ]
    half = max([1.0, *reach]) * 1.15  # symmetric about 0, at least ±1 point
    ax.set_xlim(-half, half)
    ax.set_xlabel(f"accuracy − {ref}'s, points; ×: seeds")
    ax.set_title(f"Paired difference to {ref}, 95% t-interval", fontsize=10)
    axes[0].set_title("Held-out accuracy", fontsize=10)

    ax = axes[2]
    ratios = [1.0 if r.paired is None else r.paired.time_ratio for r in rows]
    ax.barh(ys, ratios, height=0.6, color=[colors[r.method] for r in rows], alpha=0.8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlim(0, max(ratios) * 1.15)
    ax.set_xlabel(f"× {ref}'s time per step")
    ax.set_title("Time per step", fontsize=10)
    for axis in axes[1:]:
        axis.tick_params(axis="y", left=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def sweep_figure(
    rows: Sequence[MethodSummary], variants: Sequence[Variant], title: str
) -> Optional[Any]:
    """The paper's Figures 2 and 3 on the user's data: Δ against a swept setting.

    The x-axis is ``max_layer`` when it is swept (0 shown as "embed"), else ``eta``, else
    ``alpha``; one line per setting of the other swept values; each point is the mean paired
    difference to the reference with its 95% t-interval.

    Returns:
        The figure, or ``None`` when no setting has two values among the RAPT variants.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = {r.method: r.paired for r in rows if r.paired is not None}
    swept = [v for v in variants if v.swept and v.name in pairs]
    names = {k for v in swept for k, _ in v.swept}
    axis_name = next((k for k in ("max_layer", "eta", "alpha") if k in names), None)
    if axis_name is None:
        return None
    xs = sorted({dict(v.swept)[axis_name] for v in swept if axis_name in dict(v.swept)})
    if len(xs) < 2:
        return None
    lines: dict[tuple[str, str], list[Variant]] = {}
    symbols = {"eta": "η", "alpha": "α"}
    for v in swept:
        others = [(k, x) for k, x in v.swept if k != axis_name]
        if len(others) < len(v.swept):
            shown = ", ".join(f"{symbols.get(k, k)}={x:g}" for k, x in others)
            label = METHODS[v.method] + (f" ({shown})" if shown else "")
            lines.setdefault((v.method, label), []).append(v)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    reach = [abs(100 * x) for p in pairs.values() for x in (p.delta, *p.ci95) if not math.isnan(x)]
    half = max([1.0, *reach]) * 1.15  # symmetric about 0, at least ±1 point
    ax.set_ylim(-half, half)
    width = 0.25 / max(1, len(lines))
    for i, ((_, label), members) in enumerate(lines.items()):
        members.sort(key=lambda v: dict(v.swept)[axis_name])
        shift = (i - (len(lines) - 1) / 2) * width
        pos = [xs.index(dict(v.swept)[axis_name]) + shift for v in members]
        mids = [100 * pairs[v.name].delta for v in members]
        lows = [100 * pairs[v.name].ci95[0] for v in members]
        highs = [100 * pairs[v.name].ci95[1] for v in members]
        err: Optional[list[list[float]]] = [
            [m - lo for m, lo in zip(mids, lows)],
            [hi - m for m, hi in zip(mids, highs)],
        ]
        if any(math.isnan(lo) for lo in lows):
            err = None  # one seed: no interval
        ax.errorbar(
            pos,
            mids,
            yerr=err,
            fmt="-o",
            capsize=4,
            label=label,
            color=_PALETTE[(i + 1) % len(_PALETTE)],
        )
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(
        range(len(xs)), ["embed" if axis_name == "max_layer" and x == 0 else f"{x:g}" for x in xs]
    )
    ax.set_xlabel(axis_name)
    reference = next(iter(pairs.values())).reference
    ax.set_ylabel(f"accuracy − {reference}'s (points)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def plot_summary(
    rows: Sequence[MethodSummary],
    path: Path,
    title: str,
    reference: str = "Standard",
    baseline: Optional[float] = None,
) -> None:
    """Write :func:`summary_figure` as a PNG (whole or not at all)."""
    _save(summary_figure(rows, title, reference, baseline), path)


def plot_sweep(
    rows: Sequence[MethodSummary], variants: Sequence[Variant], path: Path, title: str
) -> bool:
    """Write :func:`sweep_figure` as a PNG if there is a sweep; say whether there was."""
    fig = sweep_figure(rows, variants, title)
    if fig is None:
        return False
    _save(fig, path)
    return True


def write_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def summary_json(rows: Sequence[MethodSummary], reference: str = "Standard") -> dict[str, Any]:
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
                "reference": p.reference,
                "delta": p.delta,
                "ci95": list(p.ci95),
                "interval": "t",
                "bootstrap_ci95": list(p.bootstrap_ci95),
                "sign_flip_p": p.p_value,
                "deltas": p.deltas,
                "wins": p.wins,
                "ties": p.ties,
                "losses": p.losses,
                "time_ratio": p.time_ratio,
                "macro_f1_delta": p.f1_delta,
                "macro_f1_ci95": list(p.f1_ci95),
                "seeds_needed": p.needed,
                "verdict": verdict(r, reference),
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
