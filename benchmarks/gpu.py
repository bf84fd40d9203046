"""Step time and peak memory of standard, RAPT, SMART and R3F on a CUDA device, in bf16.

Two models, from their configs with random weights: BERT-base-shaped
(``BertConfig()`` defaults: 12 blocks, hidden 768, vocabulary 30,522; sequence
classification, batch 32, length 128) and the Llama shape of ``benchmarks/vocab.py`` (hidden
128, 4 blocks, vocabulary 32,000; causal LM, batch 4, length 256). Run from the repository
root on a machine with a GPU::

    python benchmarks/gpu.py --json benchmarks/gpu.json
    python benchmarks/gpu.py --sync-debug          # also: do the steps synchronise the host?
    python benchmarks/gpu.py --device cpu --smoke  # seconds, anywhere: checks that it runs

Per model and method: its own copy of the model and AdamW (fp32 weights, the step under
``torch.autocast("cuda", dtype=torch.bfloat16)``; ``--precision bf16`` casts the weights
instead), ``--warmup`` steps, then ``--steps`` timed steps, each ended by
``torch.cuda.synchronize()``; the median is reported. Peak memory is
``torch.cuda.max_memory_allocated()`` during the timed steps minus the memory allocated
before them (model, optimizer state, batch): the step's own activations, gradients and
temporaries. With ``--sync-debug`` one more step of each method runs under
``torch.cuda.set_sync_debug_mode("error")`` and the first synchronising call is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads  # noqa: E402

METHODS = ("standard", "rapt", "smart", "r3f")
BERT_BASE = workloads.Shape(blocks=12, hidden=768, heads=12, seq=128, batch=32, vocab=30522)
LLAMA = {"vocab": 32000, "hidden": 128, "blocks": 4, "seq": 256, "batch": 4}
SMOKE_BERT = workloads.SMOKE
SMOKE_LLAMA = {"vocab": 256, "hidden": 32, "blocks": 4, "seq": 16, "batch": 2}
NO_CUDA = (
    "benchmarks/gpu.py needs a CUDA device and torch.cuda.is_available() is False here "
    "(torch {version}). Run it on a machine with a GPU, or pass --device cpu --smoke to check "
    "that the script runs; the CPU figures in docs/benchmarks.md stand without it."
)


def build(model: str, smoke: bool) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str]:
    """The model, its batch, and a description."""
    if model == "bert":
        size = SMOKE_BERT if smoke else BERT_BASE
        net = workloads.bert(size)
        return net, workloads.batch(net, size), f"BERT-base-shaped ({size})"
    shape = SMOKE_LLAMA if smoke else LLAMA
    net = workloads.llama(shape["vocab"], hidden=shape["hidden"], blocks=shape["blocks"], heads=4)
    batch = workloads.lm_batch(shape["vocab"], shape["batch"], shape["seq"])
    return net, batch, f"Llama-shaped causal LM ({shape})"


class Runner:
    """One method: its copy of the model, AdamW, regularizer, and ``step()``."""

    def __init__(
        self,
        method: str,
        base: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        device: torch.device,
        precision: str,
    ) -> None:
        self.model = copy.deepcopy(base).to(device).train()
        if precision == "bf16":
            self.model.to(torch.bfloat16)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        make = workloads.METHODS[method][1]
        self.regularizer = make(self.model) if make is not None else None
        self.labels = batch["labels"].to(device)
        self.inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        self.device, self.autocast = device, precision == "autocast"

    def _forward(self) -> Any:
        return self.model(**self.inputs)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if self.regularizer is None:
                output, penalty = self._forward(), 0.0
            else:
                output, penalty = self.regularizer.pair(self._forward)
            logits = output.logits.float() if output.logits.ndim == 2 else output.logits
            if logits.ndim == 3:  # causal LM, labels already shifted
                loss = F.cross_entropy(logits.flatten(0, 1), self.labels.flatten())
            else:
                loss = F.cross_entropy(logits, self.labels)
        (loss + penalty).backward()
        self.optimizer.step()

    def remove(self) -> None:
        if self.regularizer is not None:
            self.regularizer.remove()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(runner: Runner, warmup: int, steps: int, sync_debug: bool) -> dict[str, Any]:
    device = runner.device
    for _ in range(warmup):
        runner.step()
    _sync(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    result: dict[str, Any] = {"seconds": seconds, "step_ms": 1e3 * statistics.median(seconds)}
    if cuda:
        result["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if sync_debug:
        result["sync_debug"] = sync_debug_step(runner)
    return result


def sync_debug_step(runner: Runner) -> str:
    """One step under ``set_sync_debug_mode("error")``: "no sync", or the first one's message."""
    if runner.device.type != "cuda":
        return "n/a (not CUDA)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        runner.step()
    except RuntimeError as exc:
        return "synchronised: " + str(exc).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "no sync"


def table(models: dict[str, dict[str, Any]]) -> str:
    lines = []
    for figures in models.values():
        methods = figures["methods"]
        std = methods["standard"]
        lines += [
            f"\n### {figures['description']}\n",
            "| method | step ms (median) | × standard | peak MiB | × standard | sync debug |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for method, m in methods.items():
            peak = m.get("peak_mib")
            peak_s = "-" if peak is None else f"{peak:.0f}"
            ratio = (
                "-" if peak is None or not std.get("peak_mib") else f"{peak / std['peak_mib']:.2f}"
            )
            lines.append(
                f"| {workloads.METHODS[method][0]} | {m['step_ms']:.1f} "
                f"| {m['step_ms'] / std['step_ms']:.2f} | {peak_s} | {ratio} "
                f"| {m.get('sync_debug', '-')} |"
            )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    parser.add_argument("--precision", choices=["autocast", "bf16"], default="autocast")
    parser.add_argument("--models", type=lambda s: s.split(","), default=["bert", "llama"])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--sync-debug",
        action="store_true",
        help='one step per method under torch.cuda.set_sync_debug_mode("error")',
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 step each")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if set(args.methods) - set(METHODS) or "standard" not in args.methods:
        parser.error(f"--methods must include standard and come from {METHODS}")
    if set(args.models) - {"bert", "llama"}:
        parser.error("--models: bert, llama")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(NO_CUDA.format(version=torch.__version__))
    if args.smoke:
        args.warmup, args.steps = 1, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"device: {name}; torch {torch.__version__}; precision {args.precision}")
    figures: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "args": {k: str(v) for k, v in vars(args).items()},
        "models": {},
    }
    for model in args.models:
        base, batch, description = build(model, args.smoke)
        methods = {}
        for method in args.methods:
            runner = Runner(method, base, batch, device, args.precision)
            methods[method] = measure(runner, args.warmup, args.steps, args.sync_debug)
            log(f"  {model} {method}: {methods[method]['step_ms']:.1f} ms")
            runner.remove()
            del runner
            if device.type == "cuda":
                torch.cuda.empty_cache()
        figures["models"][model] = {"description": description, "methods": methods}
    log(table(figures["models"]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
