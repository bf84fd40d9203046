"""Two versions of rapt_reg side by side: RAPT/standard and RAPT/SMART step-time ratios of each.

Each version runs in a worker process of its own (``rapt_reg`` imported from the directory
given, first on ``PYTHONPATH``; the benchmark code, ``workloads.py``, is this checkout's for
both), on the same model and batch (``compare.py``'s BERT shape, ``RAPT_BENCH_FULL`` sizes).
Round after round the workers take turns, each timing standard, RAPT (pair, layers 1-3) and
SMART (k=1) in a rotated order; a round's ratios are paired within the round, and the table
shows their medians over rounds. Run from the repository root::

    git worktree add /tmp/old <commit>      # the version to compare with
    python benchmarks/versions.py --old /tmp/old --rounds 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("standard", "rapt", "smart")


def worker(steps: int) -> None:
    """Read a round number per line; answer with that round's mean CPU step time per method."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import workloads

    torch.set_num_threads(1)
    base = workloads.bert(workloads.FULL)
    inputs = workloads.batch(base, workloads.FULL)
    trainees = {m: workloads.Trainee(m, base, inputs) for m in METHODS}
    for trainee in trainees.values():
        trainee.step()  # warm-up: AdamW state
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        r = int(line)
        order = METHODS[r % 3 :] + METHODS[: r % 3]
        times = {}
        for method in order:
            start = time.process_time()
            for _ in range(steps):
                trainees[method].step()
            times[method] = (time.process_time() - start) / steps
        print(json.dumps(times), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="a checkout of the older code")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps)
    here = Path(__file__).resolve()
    workers = {}
    for label, path in (("old", args.old), ("new", here.parents[1])):
        env = {**os.environ, "PYTHONPATH": str(path), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, str(here), "--worker", "--old", str(args.old)]
        cmd += ["--steps", str(args.steps)]
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert json.loads(proc.stdout.readline())["ready"]  # type: ignore[union-attr]
        workers[label] = proc
    ratios: dict[str, dict[str, list[float]]] = {v: {"standard": [], "smart": []} for v in workers}
    for r in range(args.rounds):
        for label in list(workers)[r % 2 :] + list(workers)[: r % 2]:  # who goes first alternates
            proc = workers[label]
            proc.stdin.write(f"{r}\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            times = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            for to in ("standard", "smart"):
                ratios[label][to].append(times["rapt"] / times[to])
        print(
            f"round {r + 1}: "
            + ", ".join(f"{v} RAPT/std {ratios[v]['standard'][-1]:.3f}" for v in workers)
        )
    for proc in workers.values():
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait()
    print("| version | RAPT / standard | RAPT / SMART |\n|---|---:|---:|")
    for label in workers:
        row = [statistics.median(ratios[label][to]) for to in ("standard", "smart")]
        print(f"| {label} | {row[0]:.3f} | {row[1]:.3f} |")
    new, old = (
        {to: statistics.median(ratios[v][to]) for to in ("standard", "smart")}
        for v in ("new", "old")
    )
    print(
        " ".join(f"new / old, RAPT/{to}: {new[to] / old[to]:.3f}." for to in ("standard", "smart"))
    )


if __name__ == "__main__":
    main()
