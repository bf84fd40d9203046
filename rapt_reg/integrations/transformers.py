"""RAPT in a transformers ``Trainer``: the penalty is added in ``compute_loss``.

Importing this module imports transformers; ``import rapt_reg`` does not.

Example:
    >>> from rapt_reg.integrations.transformers import RaptTrainer
    >>> trainer = RaptTrainer(model=model, args=args, train_dataset=train_ds,
    ...                       rapt_kwargs={"eta": 2.0, "max_layer": 3})  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers import Trainer

from ..discovery import unwrap_model
from ..errors import RaptRegError
from ..regularizer import RandomPerturbationRegularizer

MaskFn = Callable[[Mapping[str, Any]], Optional[torch.Tensor]]

IGNORE_INDEX = -100


def token_mask(inputs: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """Which positions of a token-level output count in the penalty, from the batch alone.

    Token-level labels (integer ``[batch, seq]``, as for causal LM, token classification and
    seq2seq) mark ignored positions with -100: padding, and whatever the collator left out.
    Sequence-level labels (``[batch]``, or float multi-label ``[batch, classes]``) and
    batches without labels need no mask.

    Args:
        inputs: The batch handed to ``compute_loss``.

    Returns:
        A boolean ``[batch, seq]`` mask, or None.
    """
    labels = inputs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.ndim >= 2 and not labels.is_floating_point():
        return labels != IGNORE_INDEX
    return None


class RaptTrainerMixin:
    """Adds the RAPT penalty to the loss of any ``Trainer`` subclass (list it first).

    The clean pass is the parent's ``compute_loss`` (label smoothing, ``compute_loss_func``
    and loss kwargs keep working); the noisy pass reuses it up to the perturbed layer through
    :meth:`RandomPerturbationRegularizer.pair`. Evaluation and prediction run unchanged.

    The regularizer is built on ``self.model`` at the first training step, so a model made by
    ``model_init`` or compiled by ``torch_compile=True`` is handled: the hooks are in place
    before the compiled model first runs. It is rebuilt if the Trainer's model is replaced.

    Args:
        rapt_regularizer: A ready regularizer (built on the Trainer's model) to use as is.
        rapt_kwargs: Keyword arguments for :class:`RandomPerturbationRegularizer` when it is
            built here (ignored with ``rapt_regularizer``).
        rapt_mask: ``inputs -> mask`` for token-level outputs; :func:`token_mask` by default.
        *args: Passed to the Trainer.
        **kwargs: Passed to the Trainer.

    Attributes:
        rapt: The regularizer (None before the first training step).
    """

    def __init__(
        self,
        *args: Any,
        rapt_regularizer: Optional[RandomPerturbationRegularizer] = None,
        rapt_kwargs: Optional[Mapping[str, Any]] = None,
        rapt_mask: MaskFn = token_mask,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if rapt_regularizer is not None and rapt_kwargs is not None:
            raise RaptRegError(
                "pass either rapt_regularizer (a ready regularizer) or rapt_kwargs (to build "
                "one here), not both"
            )
        self.rapt: Optional[RandomPerturbationRegularizer] = rapt_regularizer
        self._rapt_given = rapt_regularizer is not None
        self._rapt_kwargs = dict(rapt_kwargs or {})
        self._rapt_mask = rapt_mask
        self._rapt_penalties: list[torch.Tensor] = []

    def _regularizer(self) -> RandomPerturbationRegularizer:
        model = unwrap_model(self.model)  # type: ignore[attr-defined]
        if self.rapt is not None and unwrap_model(self.rapt.model) is model:
            return self.rapt
        if self._rapt_given:
            raise RaptRegError(
                "rapt_regularizer was built on another model than the Trainer's "
                f"({type(model).__name__}): build it on trainer.model, or pass rapt_kwargs "
                "and let the Trainer build it"
            )
        if self.rapt is not None:  # model_init replaced the model: hooks go with the old one
            self.rapt.remove()
        self.rapt = RandomPerturbationRegularizer(model, **self._rapt_kwargs)
        return self.rapt

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Any] = None,
    ) -> Any:
        """The parent's loss plus the RAPT penalty (training only)."""
        parent = super().compute_loss  # type: ignore[misc]
        # Passed on only when given: transformers < 4.46 has no such argument.
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        if not model.training or not torch.is_grad_enabled():
            return parent(model, inputs, return_outputs=return_outputs, **extra)
        reg = self._regularizer()
        mask = self._rapt_mask(inputs)
        noisy_inputs = dict(inputs)  # the parent may pop "labels" from inputs
        task: list[torch.Tensor] = []

        def forward() -> Any:
            if not task:  # the clean pass: the parent's loss and outputs
                loss, outputs = parent(model, inputs, return_outputs=True, **extra)
                task.append(loss)
                return outputs
            return model(**noisy_inputs)

        outputs, penalty = reg.pair(forward, mask=mask)
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            # The parent's loss is already normalised over the accumulated batch, so the
            # Trainer will not divide it by the accumulation steps: the penalty (a mean
            # over this micro-batch) is divided here instead.
            penalty = penalty / self._accumulation_steps()
        self._rapt_penalties.append(penalty.detach())
        loss = task[0] + penalty
        return (loss, outputs) if return_outputs else loss

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Optional[Any]) -> bool:
        # The Trainer's own rule (training_step) for whether it divides the loss itself.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    def _accumulation_steps(self) -> int:
        steps = getattr(self, "current_gradient_accumulation_steps", None)
        return int(steps or self.args.gradient_accumulation_steps)  # type: ignore[attr-defined]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the mean penalty since the last log and the regularizer's stats to the logs."""
        if self._rapt_penalties and "loss" in logs and self.rapt is not None:
            logs = {
                **logs,
                "rapt_penalty": float(torch.stack(self._rapt_penalties).float().mean()),
                **self.rapt.stats(),
            }
            self._rapt_penalties.clear()
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class RaptTrainer(RaptTrainerMixin, Trainer):
    """``transformers.Trainer`` with the RAPT penalty added to the training loss.

    Takes the Trainer's arguments plus those of :class:`RaptTrainerMixin`
    (``rapt_regularizer``, ``rapt_kwargs``, ``rapt_mask``).
    """


def with_rapt(trainer_cls: type[Trainer]) -> type[Trainer]:
    """A subclass of ``trainer_cls`` (any Trainer subclass) that adds the RAPT penalty.

    Args:
        trainer_cls: e.g. ``transformers.Seq2SeqTrainer`` or a Trainer of another library.

    Returns:
        ``class Rapt<name>(RaptTrainerMixin, trainer_cls)``.

    Raises:
        RaptRegError: if ``trainer_cls`` is not a ``transformers.Trainer`` subclass.
    """
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise RaptRegError(
            f"with_rapt() needs a transformers.Trainer subclass, got {trainer_cls!r}"
        )
    return type(f"Rapt{trainer_cls.__name__}", (RaptTrainerMixin, trainer_cls), {})
