"""Time saved by running the noisy pass without labels (no second LM loss), on a Llama shape.

Usage::

    python benchmarks/noisy_labels.py                 # the issue's shape, 15 rounds
    python benchmarks/noisy_labels.py --rounds 5 --vocab 8000

One ``RaptTrainer`` training step (``compute_loss`` + backward) on a randomly initialised
``LlamaForCausalLM`` (hidden 128, 4 blocks, fp32, batch 4, length 256, a quarter of each row
padding), with the noisy pass given the batch as the Trainer does now (labels dropped) and as
it did before (labels kept, so the model computes a cross-entropy over ``[B, T, V]`` that
nothing uses). The two kinds alternate round by round. On a shared machine wall time swings
with the other processes' load, so the CPU time of this process (``--threads 1`` by default,
so that no thread spins waiting) is measured too; medians are printed, with the median of the
per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from rapt_reg.integrations.transformers import RaptTrainer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq,
    )
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    attention_mask = torch.ones_like(ids)
    attention_mask[:, -args.seq // 4 :] = 0
    batch = {
        "input_ids": ids,
        "attention_mask": attention_mask,
        "labels": ids.masked_fill(attention_mask == 0, -100),
    }
    with tempfile.TemporaryDirectory() as out:
        training = transformers.TrainingArguments(output_dir=out, use_cpu=True, report_to=[])
        trainer = RaptTrainer(model=model, args=training, rapt_kwargs={"min_layer": 0})
        without_labels = trainer._noisy_inputs

        def with_labels(model: Any, inputs: Any) -> dict[str, Any]:
            return dict(inputs)

        kinds = {"labels dropped": without_labels, "labels kept": with_labels}
        clocks = {"wall": time.perf_counter, "cpu": time.process_time}
        times = {(kind, clock): [] for kind in kinds for clock in clocks}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for kind, noisy_inputs in kinds.items():
                trainer._noisy_inputs = noisy_inputs  # type: ignore[method-assign]
                model.zero_grad(set_to_none=True)
                start = {clock: read() for clock, read in clocks.items()}
                trainer.compute_loss(model, dict(batch)).backward()
                if round_:
                    for clock, read in clocks.items():
                        times[kind, clock].append(read() - start[clock])
    print(
        f"vocab {args.vocab}, batch {args.batch}, length {args.seq}, {args.rounds} rounds, "
        f"{args.threads} thread(s)"
    )
    for clock in clocks:
        dropped, kept = times["labels dropped", clock], times["labels kept", clock]
        ratio = statistics.median(d / k for d, k in zip(dropped, kept))
        saved = statistics.median(dropped) - statistics.median(kept)
        print(
            f"  {clock:4s} time per step (median): labels dropped "
            f"{1000 * statistics.median(dropped):.0f} ms, labels kept "
            f"{1000 * statistics.median(kept):.0f} ms; difference {1000 * saved:+.0f} ms; "
            f"dropped/kept per round (median) {ratio:.3f}"
        )


if __name__ == "__main__":
    main()
