"""Step time and peak memory of standard, RAPT, SMART and R3F on a CUDA device, in bf16.

Two models, from their configs with random weights: BERT-base-shaped
(``BertConfig()`` defaults: 12 blocks, hidden 768, vocabulary 30,522; sequence
classification, batch 32, length 128) and the Llama shape of ``benchmarks/vocab.py`` (hidden
128, 4 blocks, vocabulary 32,000; causal LM, batch 4, length 256). Run from the repository
root on a machine with a GPU::

    python benchmarks/gpu.py --json benchmarks/gpu.json
    python benchmarks/gpu.py --sync-debug          # also: do the steps synchronise the host?
    python benchmarks/gpu.py --device cpu --smoke  # seconds, anywhere: checks that it runs
    python benchmarks/gpu.py --models zero3        # the ZeRO-3 run alone

Per model and method: its own copy of the model and AdamW (fp32 weights, the step under
``torch.autocast("cuda", dtype=torch.bfloat16)``; ``--precision bf16`` casts the weights
instead), ``--warmup`` steps, then ``--steps`` timed steps, each ended by
``torch.cuda.synchronize()``; the median is reported. Peak memory is
``torch.cuda.max_memory_allocated()`` during the timed steps minus the memory allocated
before them (model, optimizer state, batch): the step's own activations, gradients and
temporaries. With ``--sync-debug`` one more step of each method runs under
``torch.cuda.set_sync_debug_mode("error")`` and the first synchronising call is reported.

``zero3`` (in the default ``--models``) is the Llama shape again under DeepSpeed ZeRO-3 on the
one device (world size 1: each step gathers and frees the partitioned weights around every
block, RAPT's noisy pass included), standard and RAPT only; the engine keeps fp32 weights and
the step runs under the same autocast. It needs CUDA and ``deepspeed`` (``pip install
"rapt-reg[engines]"``) and is skipped with the reason in the figures otherwise (its correctness
on 2 ranks is tested on CPU by ``tests/test_engines.py``).
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
ZERO3_METHODS = ("standard", "rapt")
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
    engine = ", DeepSpeed ZeRO-3 on one device" if model == "zero3" else ""
    return net, batch, f"Llama-shaped causal LM ({shape}){engine}"


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
        self.update(loss + penalty)

    def update(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()

    def remove(self) -> None:
        if self.regularizer is not None:
            self.regularizer.remove()


class Zero3Runner(Runner):
    """A :class:`Runner` whose model is a DeepSpeed ZeRO-3 engine on this one device."""

    def __init__(self, *args: Any) -> None:
        """Takes :class:`Runner`'s arguments."""
        import deepspeed

        super().__init__(*args)
        # One process of its own group (a launcher would have set these).
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            os.environ.setdefault(name, value)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        if self.device.type == "cpu":  # plain gloo: no shared-memory op to compile (minutes)
            from deepspeed.accelerator import get_accelerator

            shm = get_accelerator().create_op_builder("ShareMemCommBuilder")
            deepspeed.ops.__compatible_ops__[shm.NAME] = False
        deepspeed.init_distributed(dist_backend="gloo" if self.device.type == "cpu" else None)
        config = {
            "train_micro_batch_size_per_gpu": len(self.labels),
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": next(self.model.parameters()).dtype == torch.bfloat16},
            "zero_allow_untested_optimizer": True,
        }
        # The regularizer Runner built hooks the blocks of self.model, which the engine wraps.
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, config=config
        )

    def _forward(self) -> Any:
        return self.engine(**self.inputs)

    def update(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def remove(self) -> None:
        super().remove()
        self.engine.destroy()


def zero3_unavailable(device: torch.device) -> Optional[str]:
    """Why the ZeRO-3 run cannot run here, or None."""
    if device.type != "cuda":
        return "needs CUDA (tests/test_engines.py runs ZeRO-3 on CPU ranks)"
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return "needs deepspeed: pip install 'rapt-reg[engines]'"
    return None


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
    parser.add_argument("--models", type=lambda s: s.split(","), default=["bert", "llama", "zero3"])
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
    if set(args.models) - {"bert", "llama", "zero3"}:
        parser.error("--models: bert, llama, zero3")
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
        runner_cls, methods_run = Runner, args.methods
        if model == "zero3":
            skipped = zero3_unavailable(device)
            if skipped is not None:
                log(f"  zero3: skipped, {skipped}")
                figures["skipped"] = {"zero3": skipped}
                continue
            runner_cls = Zero3Runner
            methods_run = [m for m in args.methods if m in ZERO3_METHODS]
        base, batch, description = build(model, args.smoke)
        methods = {}
        for method in methods_run:
            runner = runner_cls(method, base, batch, device, args.precision)
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
