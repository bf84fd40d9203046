"""Side by side: one training step of each method, round after round; medians and ratios.

Run from the repository root::

    python benchmarks/compare.py                     # the issue's sizes, a few minutes
    python benchmarks/compare.py --smoke --memory off  # seconds: checks that it runs

Time: each method has its own copy of the model and its own AdamW. In every round each method
runs ``--steps`` steps in a rotated order, and the round's mean step time is kept; the table
shows the median over rounds and, for ratios, the median over rounds of the per-round ratio
(paired, so that a slow spell of the machine cancels). Times are CPU time of the process
(``time.process_time``) with one torch thread by default: on a shared machine other processes
stretch wall time, not the work done; wall-time ratios are shown beside them.

Memory: each method runs in a fresh subprocess (``MALLOC_MMAP_THRESHOLD_`` fixed, so freed
tensors go back to the system at once). After one warm-up step (which allocates AdamW's
state), before each of six steps, the gradients are freed and the kernel's peak-RSS counter
is reset (``/proc/self/clear_refs``): the peak RSS above that baseline is the step's own
memory (activations, gradients, temporaries). The table shows the worst step. Linux only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads  # noqa: E402

import rapt_reg  # noqa: E402

GOALS = {
    # RAPT's step is the paper's: a whole clean and a whole noisy pass, one backward (2x a
    # standard step at most, plus the noise); the paper reports RAPT at 0.78x SMART's time.
    "rapt_vs_standard": 2.05,
    "rapt_vs_smart": 0.78,
    "idle_hooks": 0.01,
    "discovery_ms": 5.0,
    "rapt_memory": 1.9,
}
MINILM = workloads.Shape(blocks=6, hidden=384, heads=12, seq=64, batch=16, vocab=30522)


@dataclass
class ModelResult:
    """Per-method figures for one model."""

    name: str
    blocks: int
    seconds: dict[str, list[float]] = field(default_factory=dict)
    wall_seconds: dict[str, list[float]] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)
    peak_mib_median: dict[str, float] = field(default_factory=dict)

    def median(self, method: str) -> float:
        return statistics.median(self.seconds[method])

    def ratio(self, method: str, to: str = "standard", *, wall: bool = False) -> float:
        times = self.wall_seconds if wall else self.seconds
        return statistics.median(a / b for a, b in zip(times[method], times[to]))

    def memory_ratio(self, method: str, *, median: bool = False) -> float:
        peaks = self.peak_mib_median if median else self.peak_mib
        if method not in peaks or peaks.get("standard", 0.0) <= 0:
            return float("nan")
        return peaks[method] / peaks["standard"]


def _clock() -> float:
    # CPU time of this process, not wall time: the machines these run on are shared, and
    # another process's load stretches wall time but not the work done here. With one torch
    # thread the two agree on an idle machine.
    return time.process_time()


# -- time ---------------------------------------------------------------------------------------


def time_methods(
    base: torch.nn.Module,
    size: workloads.Shape,
    methods: Sequence[str],
    *,
    rounds: int,
    steps: int,
    log: Callable[[str], None],
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved CPU and wall step times per method."""
    inputs = workloads.batch(base, size)
    trainees = {m: workloads.Trainee(m, base, inputs) for m in methods}
    try:
        for trainee in trainees.values():
            trainee.step()  # warm-up: AdamW state, lazy initialisation
        seconds: dict[str, list[float]] = {m: [] for m in methods}
        wall: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(rounds):
            order = list(methods[r % len(methods) :]) + list(methods[: r % len(methods)])
            gc.collect()
            for method in order:
                trainee = trainees[method]
                start, wall_start = _clock(), time.perf_counter()
                for _ in range(steps):
                    trainee.step()
                seconds[method].append((_clock() - start) / steps)
                wall[method].append((time.perf_counter() - wall_start) / steps)
            log(
                f"  round {r + 1}/{rounds}: "
                + ", ".join(f"{m} {seconds[m][-1]:.3f}s" for m in methods)
            )
    finally:
        for trainee in trainees.values():
            trainee.remove()
    return seconds, wall


# -- memory -------------------------------------------------------------------------------------


def _proc_status_mib(field_name: str) -> float:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field_name}")
    return int(match.group(1)) / 1024


def peak_step_mib(trainee: workloads.Trainee, steps: int = 6) -> list[float]:
    """Each step's peak RSS above the resident model and optimizer state, ``steps`` steps.

    Per step, because RAPT's peak depends on its layer r (r = 1 keeps the most blocks in the
    noisy graph): the largest is the method's worst step, the median its typical one.
    """
    trainee.step()
    gc.collect()
    peaks = []
    for _ in range(steps):
        trainee.optimizer.zero_grad(set_to_none=True)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak-RSS counter to the current RSS
        baseline = _proc_status_mib("VmRSS")
        trainee.step()
        peaks.append(_proc_status_mib("VmHWM") - baseline)
    return peaks


def _build(model: str, smoke: bool) -> tuple[torch.nn.Module, workloads.Shape]:
    if model == "minilm":
        return workloads.minilm(), (workloads.SMOKE if smoke else MINILM)
    size = workloads.SMOKE if smoke else workloads.FULL
    return workloads.bert(size), size


Built = tuple[torch.nn.Module, workloads.Shape]


def memory_child(model: str, method: str, smoke: bool, built: Optional[Built] = None) -> list:
    base, size = built or _build(model, smoke)
    trainee = workloads.Trainee(method, base, workloads.batch(base, size))
    return peak_step_mib(trainee, steps=2 if smoke else 6)


def memory_methods(
    model: str, methods: Sequence[str], *, smoke: bool, threads: int, mode: str
) -> dict[str, list[float]]:
    if mode == "off":
        return {}
    if mode == "inprocess":  # less faithful (one heap for all), but quick: for the smoke test
        built = _build(model, smoke)
        return {m: memory_child(model, m, smoke, built) for m in methods}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    peaks = {}
    for method in methods:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", model, method]
        cmd += ["--threads", str(threads)] + (["--smoke"] if smoke else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        peaks[method] = json.loads(out.strip().splitlines()[-1])["peaks_mib"]
    return peaks


# -- idle hooks, discovery ----------------------------------------------------------------------


def idle_hook_overhead(
    size: workloads.Shape, *, rounds: int, reps: int, null_reps: int = 3000
) -> dict[str, float]:
    """Forward (training mode, grad on) with RAPT's hooks idle, against the bare model."""
    model = workloads.bert(size)
    inputs = workloads.batch(model, size)
    inputs.pop("labels")
    ratios, bare_times = [], []

    def timed() -> float:
        start = _clock()
        for _ in range(reps):
            model(**inputs)
        return (_clock() - start) / reps

    timed()
    for r in range(rounds):
        reg = rapt_reg.RandomPerturbationRegularizer(model)
        if r % 2:
            hooked = timed()
            reg.remove()
            bare = timed()
        else:
            reg.remove()
            bare = timed()
            reg = rapt_reg.RandomPerturbationRegularizer(model)
            hooked = timed()
            reg.remove()
        ratios.append(hooked / bare - 1)
        bare_times.append(bare)
    per_call_us = _idle_hook_cost_us(size.blocks, null_reps)
    forward = statistics.median(bare_times)
    return {
        "forward_s": forward,
        "measured_overhead": statistics.median(ratios),
        "hook_cost_us": per_call_us,
        "bound_overhead": per_call_us * 1e-6 / forward,
    }


def _idle_hook_cost_us(blocks: int, reps: int = 3000) -> float:
    """Time the idle hooks add to one forward of ``blocks`` blocks that do nothing else."""

    class NullBlock(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = torch.nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Null(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(NullBlock() for _ in range(blocks))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    model, x = Null(), torch.zeros(1)

    def timed() -> float:
        start = _clock()
        for _ in range(reps):
            model(x)
        return (_clock() - start) / reps

    diffs = []
    for _ in range(7):
        bare = timed()
        reg = rapt_reg.RandomPerturbationRegularizer(model, max_layer=1)
        hooked = timed()
        reg.remove()
        diffs.append(hooked - bare)
    return statistics.median(diffs) * 1e6


def discovery_ms(blocks: int, reps: int = 30) -> dict[str, float]:
    model = workloads.bert(workloads.SMOKE, blocks=blocks)
    found, built = [], []
    for _ in range(reps):
        start = _clock()
        rapt_reg.find_transformer_blocks(model)
        found.append(_clock() - start)
        start = _clock()
        rapt_reg.RandomPerturbationRegularizer(model).remove()
        built.append(_clock() - start)
    return {
        "blocks": blocks,
        "find_ms": 1e3 * statistics.median(found),
        "construct_ms": 1e3 * statistics.median(built),
    }


# -- report -------------------------------------------------------------------------------------


def table(result: ModelResult) -> str:
    rows = [
        "| method | step CPU s (median) | × standard | × SMART | (wall: × standard) "
        "| peak memory, worst step (MiB) | × standard | (median step: × standard) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in result.seconds:
        label = workloads.METHODS[method][0]
        vs_smart = f"{result.ratio(method, 'smart'):.2f}" if "smart" in result.seconds else "-"
        peak = result.peak_mib.get(method)
        rows.append(
            f"| {label} | {result.median(method):.3f} | {result.ratio(method):.2f} | {vs_smart} "
            f"| ({result.ratio(method, wall=True):.2f}) "
            f"| {'-' if peak is None else f'{peak:.0f}'} "
            f"| {'-' if peak is None else f'{result.memory_ratio(method):.2f}'} "
            f"| {'-' if peak is None else f'({result.memory_ratio(method, median=True):.2f})'} |"
        )
    return "\n".join(rows)


def goals(bert: ModelResult, hooks: dict[str, float], found: dict[str, float]) -> list[str]:
    def line(name: str, value: float, goal: float, unit: str = "") -> str:
        mark = "met" if value <= goal else f"MISSED by {value - goal:.2g}{unit}"
        return f"- {name}: {value:.4g}{unit} (goal ≤ {goal:g}{unit}): {mark}"

    lines = []
    if "rapt" in bert.seconds:
        lines.append(
            line("RAPT step / standard step", bert.ratio("rapt"), GOALS["rapt_vs_standard"])
        )
    if "rapt" in bert.seconds and "smart" in bert.seconds:
        ratio = bert.ratio("rapt", "smart")
        lines.append(line("RAPT step / SMART(k=1) step", ratio, GOALS["rapt_vs_smart"]))
    lines += [
        line(
            "idle hooks, share of a forward (their measured cost)",
            100 * hooks["bound_overhead"],
            100 * GOALS["idle_hooks"],
            "%",
        ),
        f"  (the idle hooks cost {hooks['hook_cost_us']:.1f} µs per forward; timing whole "
        f"forwards with and without them gives {100 * hooks['measured_overhead']:+.2f}% of "
        f"{hooks['forward_s'] * 1e3:.0f} ms, median of paired rounds)",
        line(f"discovery, {found['blocks']} blocks", found["find_ms"], 5.0, " ms"),
    ]
    if bert.peak_mib and "rapt" in bert.peak_mib:
        worst = bert.memory_ratio("rapt")
        lines.append(line("RAPT step peak memory / standard (worst step)", worst, 1.9))
        lines.append(f"  (median step: {bert.memory_ratio('rapt', median=True):.3g})")
    return lines


def plot(results: Sequence[ModelResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(results[0].seconds)
    width = 0.8 / len(results)
    for i, result in enumerate(results):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(methods))]
        times = [result.ratio(m) for m in methods]
        mems = [result.memory_ratio(m) for m in methods]
        for ax, values in ((axes[0], times), (axes[1], mems)):
            bars = ax.bar(xs, values, width, label=result.name)
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    labels = [workloads.METHODS[m][0].replace(" (", "\n(") for m in methods]
    for ax, title, goal in (
        (axes[0], "step time × standard (median of per-round ratios)", 1.90),
        (axes[1], "peak memory of the worst step × standard", 1.9),
    ):
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(goal, color="red", ls="--", lw=0.8, label=f"RAPT goal ≤ {goal}")
        ax.set_xticks(range(len(methods)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.2)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            match = re.search(r"model name\s*:\s*(.+)", info.read())
        cpu = match.group(1) if match else cpu
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"with {torch.get_num_threads()} thread(s), Python {platform.python_version()}"
    )


def run_model(
    name: str, model: str, args: argparse.Namespace, log: Callable[[str], None]
) -> ModelResult:
    base, size = _build(model, args.smoke)
    log(f"{name}: {size}")
    seconds, wall = time_methods(
        base, size, args.methods, rounds=args.rounds, steps=args.steps, log=log
    )
    result = ModelResult(name=name, blocks=size.blocks, seconds=seconds, wall_seconds=wall)
    del base
    gc.collect()
    peaks = memory_methods(
        model, args.methods, smoke=args.smoke, threads=args.threads, mode=args.memory
    )
    result.peak_mib = {m: max(p) for m, p in peaks.items()}
    result.peak_mib_median = {m: statistics.median(p) for m, p in peaks.items()}
    return result


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="steps per method per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable)")
    parser.add_argument(
        "--methods", type=lambda s: s.split(","), default=list(workloads.ENCODER_METHODS)
    )
    parser.add_argument("--models", type=lambda s: s.split(","), default=["bert", "minilm"])
    parser.add_argument(
        "--memory", choices=["subprocess", "inprocess", "off"], default="subprocess"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, not minutes")
    parser.add_argument("--plot", type=Path, default=Path("docs/img/benchmarks.png"))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--from-json", type=Path, help="report and plot saved figures only")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "METHOD"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        peaks = memory_child(*args.memory_child, smoke=args.smoke)
        print(json.dumps({"peaks_mib": peaks}))
        return {"peaks_mib": peaks}
    unknown = set(args.methods) - set(workloads.METHODS)
    if unknown or "standard" not in args.methods:
        parser.error(f"--methods must include standard and come from {list(workloads.METHODS)}")

    if args.from_json:
        figures = json.loads(args.from_json.read_text())
        results = [ModelResult(**m) for m in figures["models"]]
        report(results, figures["idle_hooks"], figures["discovery"], args.plot, log)
        return figures
    log(f"machine: {machine()}")
    names = {"bert": "BERT-shaped, 12 blocks (random init)", "minilm": "MiniLM-L6 (pretrained)"}
    if args.smoke:
        names = {"bert": "BERT-shaped, smoke size", "minilm": "MiniLM-L6, smoke batch"}
    results = [run_model(names[m], m, args, log) for m in args.models]
    if args.smoke:
        hooks = idle_hook_overhead(workloads.SMOKE, rounds=2, reps=1, null_reps=100)
        found = discovery_ms(4, reps=3)
    else:
        hooks = idle_hook_overhead(workloads.FULL, rounds=10, reps=3)
        found = discovery_ms(workloads.DISCOVERY_BLOCKS)
    figures = {
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "models": [asdict(r) for r in results],
        "idle_hooks": hooks,
        "discovery": found,
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    report(results, hooks, found, args.plot, log)
    return figures


def report(
    results: Sequence[ModelResult],
    hooks: dict[str, float],
    found: dict[str, float],
    plot_path: Optional[Path],
    log: Callable[[str], None],
) -> None:
    """Log the tables and the goals, and write the plot."""
    for result in results:
        log(f"\n### {result.name}\n\n{table(result)}")
    log("\n### Goals (BERT-shaped model)\n")
    for line in goals(results[0], hooks, found):
        log(line)
    log(f"\ndiscovery + hook installation: {found['construct_ms']:.2f} ms")
    if plot_path:
        plot(results, plot_path)
        log(f"plot written to {plot_path}")


if __name__ == "__main__":
    main()
