"""RAPT in a Lightning ``LightningModule``: a mixin that owns the regularizer's lifetime.

The penalty belongs in ``training_step``'s loss, so the helper is a mixin rather than a
callback (a callback cannot change the loss). It builds the regularizer in ``setup("fit")``,
before the sanity check and before a compiled module first runs, logs the penalty and
:meth:`RandomPerturbationRegularizer.stats`, and removes the hooks in ``teardown``. It imports
nothing from Lightning, so it works with ``lightning`` and ``pytorch_lightning`` alike.

Example:
    >>> import lightning as L  # doctest: +SKIP
    >>> class Classifier(RaptLightningMixin, L.LightningModule):  # doctest: +SKIP
    ...     rapt_kwargs = {"eta": 2.0, "max_layer": 3}
    ...     def __init__(self, model):
    ...         super().__init__()
    ...         self.model = model
    ...     def training_step(self, batch, batch_idx):
    ...         logits, penalty = self.rapt_pair(lambda: self.model(batch["x"]))
    ...         return F.cross_entropy(logits, batch["y"]) + penalty

See ``examples/lightning_example.py`` for a complete script.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from ..errors import RaptRegError
from ..regularizer import Output, RandomPerturbationRegularizer
from .masks import noise_inputs


class RaptLightningMixin:
    """Mixin for a ``LightningModule`` (list it before ``LightningModule``).

    Attributes:
        rapt_kwargs: Keyword arguments for :class:`RandomPerturbationRegularizer`.
        rapt_target: Dotted path of the submodule that holds the blocks (``"model"``), or None
            for the LightningModule itself (discovery looks inside it either way).
        rapt_log: Whether :meth:`rapt_pair` logs ``rapt/penalty`` and the regularizer's stats.
    """

    rapt_kwargs: ClassVar[Mapping[str, Any]] = {}
    rapt_target: ClassVar[Optional[str]] = None
    rapt_log: ClassVar[bool] = True

    @property
    def rapt(self) -> RandomPerturbationRegularizer:
        """The regularizer, built on first use (normally in ``setup("fit")``)."""
        reg = self.__dict__.get("_rapt_regularizer")
        if reg is None:
            if not isinstance(self, nn.Module):
                raise RaptRegError(
                    "RaptLightningMixin must be mixed into a LightningModule: "
                    "class MyModule(RaptLightningMixin, L.LightningModule)"
                )
            target = self if self.rapt_target is None else self.get_submodule(self.rapt_target)
            reg = RandomPerturbationRegularizer(target, **self.rapt_kwargs)
            # A plain attribute, not a submodule: the regularizer holds no parameters and
            # stays out of state_dict and checkpoints.
            self.__dict__["_rapt_regularizer"] = reg
        return reg

    def setup(self, stage: str) -> None:
        """Lightning hook: builds the regularizer when fitting starts."""
        super().setup(stage)  # type: ignore[misc]
        if stage == "fit":
            _ = self.rapt

    def teardown(self, stage: str) -> None:
        """Lightning hook: removes the hooks when fitting ends (the model is as before)."""
        if stage == "fit":
            reg = self.__dict__.pop("_rapt_regularizer", None)
            if reg is not None:
                reg.remove()
        super().teardown(stage)  # type: ignore[misc]

    def rapt_pair(
        self,
        forward: Callable[[], Output],
        *,
        mask: Optional[torch.Tensor] = None,
        batch: Optional[Mapping[str, Any]] = None,
        noise_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> tuple[Output, torch.Tensor]:
        """``self.rapt.pair(forward, mask=mask, ...)``, logging the penalty and the stats.

        Args:
            forward: Zero-argument callable running the model on the batch.
            mask: Positions that count, for token-level outputs.
            batch: The batch, when it is a mapping with transformers' keys: its
                ``attention_mask`` becomes ``noise_mask`` (padding gets no noise) and its
                ``position_ids`` restarts become ``segment_ids`` (packed examples are scaled
                one by one), see :func:`rapt_reg.integrations.masks.noise_inputs`.
            noise_mask: Given explicitly (wins over ``batch``).
            segment_ids: Given explicitly (wins over ``batch``).

        Returns:
            ``(clean_output, penalty)``; add the penalty to the task loss.
        """
        noise = dict(noise_inputs(batch)) if batch is not None else {}
        if noise_mask is not None:
            noise["noise_mask"] = noise_mask
        if segment_ids is not None:
            noise["segment_ids"] = segment_ids
        output, penalty = self.rapt.pair(forward, mask=mask, **noise)
        if self.rapt_log:
            log = self.log  # type: ignore[attr-defined]
            log("rapt/penalty", penalty.detach(), on_step=True, on_epoch=False)
            for key, value in self.rapt.stats().items():
                log(key, value, on_step=True, on_epoch=False)
        return output, penalty
