"""Run the compatibility tests and write docs/compatibility.md from their results.

Usage::

    python scripts/compat_matrix.py                 # every test, slow ones included
    python scripts/compat_matrix.py --fast          # leave out tests marked slow
    python scripts/compat_matrix.py -o /tmp/compat.md

The tests run in this process through a small pytest plugin that records, for every test,
its function, its parameters' id, its outcome (passed, failed, expected failure, skipped) with
the reason, and what the test recorded with ``record_property``. Nothing in the page is typed
by hand but the labels below: a cell says what its test said. The exit status is pytest's, so
a failing test fails the script (the page is written anyway, showing the failure).
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = [
    "tests/test_architectures.py",
    "tests/test_stacks.py",
    "tests/test_distributed.py",
    "tests/test_fsdp.py",
    "tests/test_checkpoint.py",
    "tests/test_pair.py",
    "tests/test_causal_lm.py",
    "tests/test_integrations.py",
]
PACKAGES = ["torch", "transformers", "peft", "accelerate", "lightning"]

ARCHITECTURES = {
    "bert": "BERT",
    "roberta": "RoBERTa",
    "distilbert": "DistilBERT",
    "albert": "ALBERT (one shared layer, 4 calls)",
    "deberta_v2": "DeBERTa-v2",
    "electra": "ELECTRA (embedding projection)",
    "gpt2": "GPT-2",
    "llama": "Llama",
    "t5": "T5 (encoder-decoder)",
    "vit": "ViT",
    "modernbert": "ModernBERT",
    "torch_encoder": "`nn.TransformerEncoder` (batch first: nested tensors, fast path)",
    "torch_encoder_seq_first": "`nn.TransformerEncoder` (sequence first)",
    "timm_vit": "timm-shaped ViT (`blocks` Sequential)",
    "index_loop": "hand-written, blocks called by index",
}
ARCHITECTURE_CHECKS = {
    "test_finds_the_configured_blocks": "blocks found = depth",
    "test_noise_reaches_the_output_at_every_layer": "noise reaches the output (every layer)",
    "test_training_steps_update_the_model": "training steps",
    "test_model_is_exactly_as_before": "model as before",
    "test_eval_mode_gives_zero_and_leaves_outputs_alone": "eval mode",
    "test_transformers_gradient_checkpointing_gives_the_same_gradients": "HF checkpointing",
}
ARCHITECTURE_NOTES = {
    "blocks found = depth": "discovery, with no hint, finds the stack whose block calls per "
    "forward equal the configured number of layers",
    "noise reaches the output (every layer)": "for each layer 0..depth and both `reg(...)` and "
    "`reg.pair(...)`: penalty > 0 with dropout off, finite gradients reaching the blocks, and "
    "`pair` gives the same penalty and gradients as `reg`",
    "training steps": "three AdamW steps with the penalty: finite loss, parameters updated",
    "model as before": "train- and eval-mode outputs bitwise equal before construction, after "
    "penalty calls and after `remove()`; after `remove()` every module, attribute and hook "
    "object (by identity), parameter (identity, `requires_grad`), training flag, buffer and "
    "`state_dict` value exactly as before",
    "eval mode": "in eval mode the penalty is 0 with a warning and the output is unchanged",
    "HF checkpointing": "`gradient_checkpointing_enable()` (non-reentrant), dropout on, "
    "same seeds: the same penalties and gradients as without checkpointing",
}
STACKS = {
    "test_bf16_autocast_gives_a_finite_float32_penalty": "Mixed precision",
    "test_fp16_autocast_with_grad_scaler_on_gpu": "Mixed precision",
    "test_gradient_accumulation_sums_micro_batch_gradients": "Gradient accumulation",
    "test_frozen_parameters_stay_without_gradients": "Frozen parameters",
    "test_fully_frozen_model_is_refused_with_a_fix": "Frozen parameters",
    "test_checkpoint_around_each_block_gives_the_same_gradients": "Gradient checkpointing",
    "test_reentrant_checkpoint_pair_matches_pair_without_checkpointing": "Gradient checkpointing",
    "test_checkpoint_spanning_several_blocks_gives_the_same_gradients": "Gradient checkpointing",
    "test_checkpoint_with_two_noisy_passes_before_backward": "Gradient checkpointing",
    "test_any_checkpoint_layout_gives_the_unchecked_gradients": "Gradient checkpointing",
    "test_checkpoint_sequential_is_exact": "Gradient checkpointing",
    "test_at_least_300_layouts_were_generated": "Gradient checkpointing",
    "test_transformers_reentrant_checkpointing_gives_the_same_gradients": (
        "Gradient checkpointing"
    ),
    "test_compiled_after_the_regularizer_gets_the_noise": "torch.compile",
    "test_fifty_compiled_steps_recompile_at_most_max_layer_plus_one": "torch.compile",
    "test_fifty_compiled_steps_recompile_bound_pair_and_layer_zero": "torch.compile",
    "test_compiled_and_run_before_is_refused_with_the_fix": "torch.compile",
    "test_regularizer_sees_through_the_compiled_wrapper": "torch.compile",
    "test_deepcopy_of_a_model_with_hooks_is_independent": "Model copies",
    "test_gradients_are_reduced_and_equal_across_ranks": "DDP (gloo, 2 processes)",
    "test_fsdp2_gives_ddp_gradients_with_ranks_on_different_layers": "FSDP2 (gloo, 2 processes)",
    "test_data_parallel_is_refused_naming_ddp": "nn.DataParallel",
    "test_batchnorm_statistics_equal_the_two_call_form": "pair = two calls",
    "test_moe_router_logits_and_aux_loss_equal_the_two_call_form": "pair = two calls",
    "test_lora_model_is_seen_through": "PEFT / LoRA",
    "test_accelerate_prepare_bf16_with_accumulation": "accelerate",
    "test_lightning_module_with_the_mixin_trains": "Lightning",
    "test_lightning_mixin_outside_a_module_is_refused": "Lightning",
    "test_trainer_trains_and_logs_the_penalty": "transformers Trainer",
    "test_trainer_loss_is_the_task_loss_plus_the_penalty": "transformers Trainer",
    "test_trainer_evaluates_and_predicts_without_noise": "transformers Trainer",
    "test_trainer_accumulation_gives_the_gradients_of_the_whole_batch": "transformers Trainer",
    "test_trainer_clips_the_accumulated_gradient": "transformers Trainer",
    "test_trainer_clean_pass_is_the_parents_loss": "transformers Trainer",
    "test_trainer_penalty_leaves_out_untrained_positions_and_padding_gets_no_noise": (
        "transformers Trainer"
    ),
    "test_trainer_with_model_init_builds_the_regularizer_on_each_model": "transformers Trainer",
    "test_trainer_with_torch_compile_gets_the_noise": "transformers Trainer",
    "test_with_rapt_subclasses_any_trainer": "transformers Trainer",
    "test_with_rapt_seq2seq_trainer_trains_one_step": "transformers Trainer",
    "test_causal_lm_noisy_pass_has_no_labels_and_noise_skips_padding": "transformers Trainer",
    "test_seq2seq_noisy_pass_gets_decoder_inputs_from_the_labels": "transformers Trainer",
    "test_sft_trainer_with_rapt": "TRL SFTTrainer",
    "test_sft_trainer_with_lora_and_packing": "TRL SFTTrainer",
    "test_sft_trainer_refuses_other_loss_types": "TRL SFTTrainer",
    "test_lightning_rapt_pair_takes_the_masks_from_the_batch": "Lightning",
    "test_import_works_with_torch_alone": "Lazy imports",
    "test_import_loads_no_optional_framework": "Lazy imports",
}
SYMBOLS = {"passed": "✅", "failed": "❌", "xfailed": "⚠️", "skipped": "–"}


@dataclass
class Result:
    """One test's outcome, as the plugin saw it."""

    nodeid: str
    function: str
    params: str
    outcome: Optional[str] = None  # None: collected but not run (deselected)
    reason: str = ""
    properties: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """pytest plugin: one :class:`Result` per collected test."""

    def __init__(self) -> None:
        self.results: dict[str, Result] = {}

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            function = getattr(item, "originalname", item.name)
            callspec = getattr(item, "callspec", None)
            self.results[item.nodeid] = Result(
                item.nodeid, function, callspec.id if callspec else ""
            )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        result = self.results.get(report.nodeid)
        if result is None:
            return
        result.properties.update(dict(report.user_properties))
        if result.outcome == "failed":
            return
        if report.failed:
            result.outcome, result.reason = "failed", f"failed in {report.when}"
        elif hasattr(report, "wasxfail") and report.skipped:
            result.outcome, result.reason = "xfailed", report.wasxfail.removeprefix("reason: ")
        elif report.skipped:
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            result.outcome, result.reason = "skipped", reason.removeprefix("Skipped: ")
        elif report.when == "call":
            result.outcome = "passed"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _humanize(function: str) -> str:
    return function.removeprefix("test_").replace("_", " ").capitalize()


def _cell(result: Optional[Result]) -> str:
    return "n/a" if result is None else SYMBOLS[result.outcome]


def _architecture_table(results: list[Result]) -> list[str]:
    by_cell = {
        (r.params, ARCHITECTURE_CHECKS[r.function]): r
        for r in results
        if r.function in ARCHITECTURE_CHECKS
    }
    blocks = {
        r.params: r.properties.get("blocks", "")
        for r in results
        if r.function == "test_finds_the_configured_blocks"
    }
    columns = list(ARCHITECTURE_CHECKS.values())
    lines = [
        "| Architecture | Blocks found | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for key, label in ARCHITECTURES.items():
        cells = [_cell(by_cell.get((key, column))) for column in columns]
        lines.append(f"| {label} | `{blocks.get(key, '?')}` | " + " | ".join(cells) + " |")
    lines.append("")
    words = {"xfailed": "known limitation", "skipped": "not run", "failed": "failed"}
    for (key, column), r in by_cell.items():
        if r.outcome in words:
            lines.append(f"- {ARCHITECTURES[key]}, {column}: {words[r.outcome]} ({r.reason}).")
    return lines


def _stack_table(results: list[Result]) -> list[str]:
    lines = ["| Stack | Check | Variant | Result |", "|---|---|---|---|"]
    for stack in dict.fromkeys(STACKS.values()):
        for r in results:
            if STACKS.get(r.function) != stack:
                continue
            result = SYMBOLS[r.outcome]
            if r.properties:
                result += " " + ", ".join(f"{k} = {v}" for k, v in r.properties.items())
            if r.outcome in ("xfailed", "skipped"):
                result += f"; {r.reason}" if r.properties else f" {r.reason}"
            variant = f"`{r.params}`" if r.params else ""
            lines.append(f"| {stack} | {_humanize(r.function)} | {variant} | {result} |")
    return lines


def render(results: list[Result], selection: str) -> str:
    """The Markdown page."""
    unmapped = [r.nodeid for r in results if r.function not in ARCHITECTURE_CHECKS | STACKS.keys()]
    counts = {k: sum(r.outcome == k for r in results) for k in SYMBOLS}
    versions = ", ".join(f"{p} {_version(p)}" for p in PACKAGES)
    notes = [f"- **{name}**: {text}." for name, text in ARCHITECTURE_NOTES.items()]
    page = [
        "# Compatibility",
        "",
        "<!-- Generated by scripts/compat_matrix.py from the test results: do not edit. -->",
        "",
        "Every cell is a test that ran: tiny models built from configs (hidden size 32, 2-4 "
        "layers, no download), handed to `RandomPerturbationRegularizer` with no hints. "
        "Regenerate with `python scripts/compat_matrix.py`.",
        "",
        f"Tested with Python {platform.python_version()}, {versions}, on "
        f"{platform.system()} {platform.machine()} ({selection}). "
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['xfailed']} known "
        f"limitations, {counts['skipped']} skipped.",
        "",
        "✅ passed · ❌ failed · ⚠️ known limitation (expected failure, reason given) · "
        "– not run here (reason given) · n/a does not apply",
        "",
        "## Architectures",
        "",
        *_architecture_table(results),
        "",
        *notes,
        "",
        "## Training stacks",
        "",
        *_stack_table(results),
        "",
        "The tests are `tests/test_architectures.py`, `tests/test_stacks.py`, "
        "`tests/test_distributed.py` and `tests/test_integrations.py`; a check's name is its "
        "test's name.",
        "",
    ]
    if unmapped:
        page += ["Tests not placed in a table: " + ", ".join(f"`{n}`" for n in unmapped), ""]
    return "\n".join(page)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "compatibility.md")
    parser.add_argument("--fast", action="store_true", help="leave out tests marked slow")
    args = parser.parse_args(argv)

    recorder = Recorder()
    pytest_args = [*(str(ROOT / f) for f in TEST_FILES), "-q", "-p", "no:cacheprovider"]
    if args.fast:
        pytest_args += ["-m", "not slow"]
    status = pytest.main(pytest_args, plugins=[recorder])
    results = [r for r in recorder.results.values() if r.outcome is not None]
    if not results:
        print("no tests were collected", file=sys.stderr)
        return int(status) or 1
    args.output.write_text(render(results, "slow tests left out" if args.fast else "all tests"))
    print(f"wrote {args.output}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
