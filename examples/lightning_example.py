"""RAPT in a Lightning ``LightningModule``, end to end on synthetic data.

Run: ``python examples/lightning_example.py --max-steps 20``. The idiom is three lines in
the module: list :class:`~rapt_reg.integrations.lightning.RaptLightningMixin` first, set
``rapt_kwargs``, and call ``self.rapt_pair(...)`` in ``training_step``. The mixin builds the
regularizer when fitting starts, logs ``rapt/penalty`` with the regularizer's stats, and
removes its hooks when fitting ends; validation runs the model untouched.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rapt_reg.integrations.lightning import RaptLightningMixin


class TextClassifier(nn.Module):
    """Embedding, ``nn.TransformerEncoder``, mean pooling, linear head."""

    def __init__(self, vocab: int = 100, dim: int = 32, depth: int = 4, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


class LitClassifier(RaptLightningMixin, L.LightningModule):
    """A LightningModule regularized with RAPT: only ``training_step`` changes."""

    rapt_kwargs = {"eta": 2.0, "max_layer": 3}
    rapt_target = "model"

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, labels = batch
        logits, penalty = self.rapt_pair(lambda: self.model(ids))
        task = F.cross_entropy(logits, labels)
        self.log("train/task", task)
        return task + penalty

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ids, labels = batch
        self.log("val/accuracy", (self.model(ids).argmax(-1) == labels).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def synthetic_data(n: int = 64, seq: int = 8, vocab: int = 100, seed: int = 0) -> TensorDataset:
    """Token sequences whose label is the most frequent of three marker tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    ids[:, : seq // 2] = labels[:, None]  # the marker repeated: learnable in a few steps
    return TensorDataset(ids, labels)


def main(argv: list[str] | None = None) -> LitClassifier:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=20)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    module = LitClassifier(TextClassifier())
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        val_check_interval=min(10, args.max_steps),
    )
    trainer.fit(
        module,
        DataLoader(synthetic_data(), batch_size=8, shuffle=True),
        DataLoader(synthetic_data(seed=1), batch_size=8),
    )
    print({k: round(float(v), 4) for k, v in trainer.callback_metrics.items()})
    return module


if __name__ == "__main__":
    main()
