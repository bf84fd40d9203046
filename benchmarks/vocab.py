"""Peak memory and step time of standard, RAPT, SMART and R3F against the vocabulary size.

A Llama-shaped causal LM (``LlamaConfig``: hidden 128, 4 blocks, 4 heads, random weights, fp32),
batch 4; per vocabulary size the sequence length given with it. Every step frees the model's
output before its backward, as a Trainer does (``model(**batch).loss``): the fair baseline.
``rapt_head`` is RAPT with ``head="auto"``; a method named ``<method>+fused`` makes its clean
pass's loss with a chunked cross-entropy from the body's output (Liger's fused loss, on CPU):
no logits at all, and its extra copies are counted against ``standard+fused``. Run from the
repository root::

    python benchmarks/vocab.py --json benchmarks/vocab.json            # the figures, "after"
    PYTHONPATH=/tmp/before python benchmarks/vocab.py --label before --json benchmarks/vocab.json
    python benchmarks/vocab.py --from-json benchmarks/vocab.json         # table + plot only
    python benchmarks/vocab.py --smoke                                   # seconds: it runs

Each (vocabulary, method) is measured in two fresh subprocesses. Time: after a warm-up step
(AdamW's state), the CPU time of each step (``time.process_time``, one torch thread), with the
default allocator. Memory, as ``compare.py`` measures it: ``MALLOC_MMAP_THRESHOLD_=65536``, so
that every tensor is mapped on allocation and unmapped when freed and the resident set follows
the live tensors; before each step the gradients are freed and the kernel's peak-RSS counter
reset; the step's peak RSS above that baseline is its own memory. The worst of the steps is
kept (RAPT's depends on its layer r). Time is not measured in the memory process because
there every large temporary costs fresh page faults, which the default allocator avoids by
reusing freed memory.

The headline figure is RAPT's *extra logits copies*: (peak of the method - peak of standard)
divided by the size of one fp32 ``[batch, seq, vocab]`` logits tensor. ``--label`` names the
code measured (``rapt_reg`` is imported from ``PYTHONPATH`` first, so a checkout of older code
can be measured by the same script); runs with different labels are kept side by side in the
JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
import workloads  # noqa: E402

METHODS = ("standard", "rapt", "rapt_head", "smart", "r3f", "standard+fused", "rapt_head+fused")
BATCH = 4
# vocabulary -> sequence length; 128k runs at 128 positions (a quarter of the memory per copy
# of 256) so that the old code's peak fits next to other jobs on a 24 GiB machine.
SIZES = {8000: 256, 32000: 256, 128000: 128}
SMOKE_SIZES = {512: 16, 2048: 8}
GOAL_COPIES = 0.5  # issue 18: RAPT's extra peak with head=, against the fair baseline


def logits_mib(vocab: int, seq: int, batch: int = BATCH) -> float:
    """Size of one fp32 ``[batch, seq, vocab]`` logits tensor, in MiB."""
    return batch * seq * vocab * 4 / 2**20


def measure(
    method: str, vocab: int, seq: int, steps: int, *, hidden: int, blocks: int, what: str = "both"
) -> dict:
    """One method on one vocabulary size, in this process: per-step CPU seconds and peak MiB."""
    base = workloads.llama(vocab, hidden=hidden, blocks=blocks, heads=max(1, hidden // 32))
    inputs = workloads.lm_batch(vocab, BATCH, seq)
    name, _, fused = method.partition("+")
    trainee = workloads.Trainee(name, base, inputs, fused=bool(fused))
    del base
    torch.manual_seed(0)  # RAPT draws its layers from the global RNG: the same in every run
    figures: dict[str, list[float]] = {}
    if what in ("time", "both"):
        trainee.step()
        figures["seconds"] = []
        for _ in range(steps):
            start = time.process_time()
            trainee.step()
            figures["seconds"].append(time.process_time() - start)
    if what in ("memory", "both"):
        torch.manual_seed(0)
        figures["peaks_mib"] = compare.peak_step_mib(trainee, steps)
    trainee.remove()
    return figures


def run_child(args: argparse.Namespace, method: str, vocab: int, seq: int) -> dict:
    """Time in one fresh process (default allocator), memory in another (every tensor mapped)."""
    figures = {}
    for what, env in (
        ("time", {**os.environ, "HF_HUB_OFFLINE": "1"}),
        ("memory", {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}),
    ):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", method, str(vocab), str(seq)]
        cmd += ["--steps", str(args.steps), "--threads", str(args.threads), "--what", what]
        cmd += ["--hidden", str(args.hidden), "--blocks", str(args.blocks)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{method} at vocabulary {vocab} failed:\n{done.stderr[-3000:]}")
        figures.update(json.loads(done.stdout.strip().splitlines()[-1]))
    return figures


def summarise(raw: dict, vocab: int, seq: int) -> dict:
    """Worst peak, median time, and both against standard, per method."""
    copy = logits_mib(vocab, seq)
    rows = {}
    for method, figures in raw.items():
        # Each against its own baseline: a fused method against standard with the fused loss.
        standard = raw["standard+fused" if method.endswith("+fused") else "standard"]
        peak = max(figures["peaks_mib"])
        rows[method] = {
            "peak_mib": peak,
            "extra_mib": peak - max(standard["peaks_mib"]),
            "extra_copies": (peak - max(standard["peaks_mib"])) / copy,
            "step_s": statistics.median(figures["seconds"]),
            "time_ratio": statistics.median(figures["seconds"])
            / statistics.median(standard["seconds"]),
            **figures,
        }
    return {"vocab": vocab, "seq": seq, "batch": BATCH, "logits_mib": copy, "methods": rows}


def table(results: dict) -> str:
    """Markdown: one row per vocabulary and method, every label side by side."""
    labels = list(results["runs"])
    head = "| vocabulary (length) | one logits copy | method |"
    rule = "|---|---:|---|"
    for label in labels:
        head += f" peak MiB ({label}) | extra copies ({label}) | step s ({label}) | × std |"
        rule += "---:|---:|---:|---:|"
    rows = [head, rule]
    first = results["runs"][labels[0]]
    for i, size in enumerate(first):
        methods = {m: None for run in results["runs"].values() for m in run[i]["methods"]}
        for method in methods:
            row = f"| {size['vocab']:,} ({size['seq']}) | {size['logits_mib']:.0f} MiB | {method} |"
            for label in labels:
                sizes = results["runs"][label]
                m = sizes[i]["methods"].get(method) if i < len(sizes) else None
                if m is None:
                    row += " - | - | - | - |"
                    continue
                row += (
                    f" {m['peak_mib']:.0f} | {m['extra_copies']:.2f} | {m['step_s']:.2f} "
                    f"| {m['time_ratio']:.2f} |"
                )
            rows.append(row)
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"before": "--", "after": "-"}
    colours = {
        "rapt": "tab:blue", "smart": "tab:orange", "r3f": "tab:green", "rapt_head": "tab:purple",
        "rapt_head+fused": "tab:red",
    }  # fmt: skip
    for label, sizes in results["runs"].items():
        vocabs = [s["vocab"] for s in sizes]
        shown = [m for m in METHODS if m in sizes[0]["methods"] and not m.startswith("standard")]
        for method in shown:
            copies = [s["methods"][method]["extra_copies"] for s in sizes]
            times = [s["methods"][method]["time_ratio"] for s in sizes]
            kw = dict(
                ls=styles.get(label, ":"),
                color=colours[method],
                marker="o",
                label=f"{method} ({label})",
            )
            axes[0].plot(vocabs, copies, **kw)
            axes[1].plot(vocabs, times, **kw)
    axes[0].axhline(GOAL_COPIES, color="red", lw=0.8, ls=":", label=f"RAPT goal ≤ {GOAL_COPIES}")
    for ax, title in (
        (axes[0], "extra peak memory over standard, in fp32 logits copies"),
        (axes[1], "step CPU time × standard"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("vocabulary size")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(f"{v}:{s}" for v, s in SIZES.items()))
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=4, help="measured steps per method")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--label", default="after", help="name of the code measured")
    parser.add_argument("--json", type=Path, help="add the figures to this file")
    parser.add_argument("--from-json", type=Path, help="report and plot saved figures only")
    parser.add_argument("--plot", type=Path, default=Path("docs/img/vocab.png"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 step: seconds")
    parser.add_argument(
        "--inprocess", action="store_true", help="no subprocesses (one heap: less faithful)"
    )
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "VOCAB", "SEQ"))
    parser.add_argument("--what", choices=["time", "memory", "both"], default="both")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        method, vocab, seq = args.child
        figures = measure(
            method,
            int(vocab),
            int(seq),
            args.steps,
            hidden=args.hidden,
            blocks=args.blocks,
            what=args.what,
        )
        print(json.dumps(figures))
        return figures
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        fused = any(m.endswith("+fused") for m in args.methods)
        baselines = {"standard", *(["standard+fused"] if fused else [])}
        if not baselines <= set(args.methods) or set(args.methods) - set(METHODS):
            parser.error(f"--methods must include standard and come from {METHODS}")
        sizes = dict(SMOKE_SIZES) if args.smoke else {}
        if not args.smoke:
            for item in args.sizes.split(","):
                vocab, seq = item.split(":")
                sizes[int(vocab)] = int(seq)
        if args.smoke:
            args.steps, args.hidden, args.blocks = 1, 32, 4
        import rapt_reg

        log(f"machine: {compare.machine()}; rapt_reg from {os.path.dirname(rapt_reg.__file__)}")
        measured = []
        for vocab, seq in sizes.items():
            raw = {}
            for method in args.methods:
                if args.inprocess:
                    raw[method] = measure(
                        method, vocab, seq, args.steps, hidden=args.hidden, blocks=args.blocks
                    )
                else:
                    raw[method] = run_child(args, method, vocab, seq)
                log(f"  {args.label} vocab {vocab} seq {seq} {method}: {raw[method]}")
            measured.append(summarise(raw, vocab, seq))
        results = {"runs": {}}
        if args.json and args.json.exists():
            results = json.loads(args.json.read_text())
        results["runs"][args.label] = measured
        results.setdefault("machine", {})[args.label] = compare.machine()
        results.setdefault("rapt_reg", {})[args.label] = os.path.dirname(rapt_reg.__file__)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    log(table(results))
    if args.plot:
        plot(results, args.plot)
        log(f"plot written to {args.plot}")
    return results


if __name__ == "__main__":
    main()
