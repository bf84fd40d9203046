"""RAPT in a transformers ``Trainer``: the penalty is added in ``compute_loss``.

Importing this module imports transformers; ``import rapt_reg`` does not.

For causal LMs, and multimodal models with a text decoder (LLaVA, Qwen2-VL...: their text
decoder is the perturbed stack), the penalty counts the positions whose *next* label is trained
(:func:`causal_token_mask`), for other token-level models those whose own label is
(:func:`token_mask`); the noisy pass runs without labels (no second task loss); padding
(``attention_mask``) gets no noise and packed examples (``position_ids`` restarting at 0) are
scaled one by one (:func:`noise_inputs`). TRL's ``SFTTrainer`` works through
``with_rapt(SFTTrainer)``.

Example:
    >>> from rapt_reg.integrations.transformers import RaptTrainer
    >>> trainer = RaptTrainer(model=model, args=args, train_dataset=train_ds,
    ...                       rapt_kwargs={"eta": 2.0, "max_layer": 3})  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..discovery import multimodal_text_decoder, unwrap_model
from ..errors import RaptRegError
from ..regularizer import RandomPerturbationRegularizer
from .masks import IGNORE_INDEX, causal_token_mask, noise_inputs, token_mask

__all__ = [
    "IGNORE_INDEX",
    "RaptTrainer",
    "RaptTrainerMixin",
    "causal_token_mask",
    "is_causal_lm",
    "noise_inputs",
    "token_mask",
    "with_rapt",
]

MaskFn = Callable[[Mapping[str, Any]], Optional[torch.Tensor]]
NoiseFn = Callable[[Mapping[str, Any]], Mapping[str, torch.Tensor]]

_CAUSAL_LM_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` (wrappers seen through) predicts the next token: its logits are shifted.

    Args:
        model: The model.

    Returns:
        True for the classes of ``AutoModelForCausalLM`` (and any ``*ForCausalLM``) that are
        not encoder-decoders, and for multimodal generative models whose text decoder is not
        an encoder-decoder's (LLaVA, PaliGemma, Idefics3, Qwen2-VL, Mllama...:
        :func:`rapt_reg.discovery.multimodal_text_decoder`).
    """
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    name = type(model).__name__
    if name in _CAUSAL_LM_CLASSES or name.endswith("ForCausalLM"):
        return True
    return multimodal_text_decoder(model) is not None


def _is_trl_sft(trainer: object) -> bool:
    return any(
        cls.__name__ == "SFTTrainer" and cls.__module__.startswith("trl")
        for cls in type(trainer).__mro__
    )


class RaptTrainerMixin:
    """Adds the RAPT penalty to the loss of any ``Trainer`` subclass (list it first).

    The clean pass is the parent's ``compute_loss`` (label smoothing, ``compute_loss_func``
    and loss kwargs keep working); the noisy pass runs the model on the same inputs without
    the labels (``self.label_names``), so no second task loss is computed; an encoder-decoder
    gets ``decoder_input_ids`` made from the labels instead. Evaluation and prediction run
    unchanged: the penalty (and the noise) exists only when the model is training.

    A clean pass whose loss makes no logits, a fused one (TRL's ``SFTTrainer`` always fuses its
    LM head; ``use_liger_kernel=True`` fuses the cross-entropy), is kept as it is: the
    regularizer is then built with ``head="auto"`` unless ``rapt_kwargs`` says otherwise, and
    the penalty is made from the head's input, chunk by chunk (:mod:`rapt_reg.head`). With
    ``rapt_kwargs={"head": None}``, TRL's clean pass is ``transformers.Trainer.compute_loss``
    instead (the model's own loss, with logits; TRL's metrics are then not logged and a
    ``loss_type`` other than ``"nll"`` is refused).

    The regularizer is built on ``self.model`` at the first training step, so a model made by
    ``model_init`` or compiled by ``torch_compile=True`` is handled: the hooks are in place
    before the compiled model first runs. It is rebuilt if the Trainer's model is replaced.

    Args:
        rapt_regularizer: A ready regularizer (built on the Trainer's model) to use as is.
        rapt_kwargs: Keyword arguments for :class:`RandomPerturbationRegularizer` when it is
            built here (ignored with ``rapt_regularizer``).
        rapt_mask: ``inputs -> mask`` of the output positions that count in the penalty. None
            (default): :func:`causal_token_mask` for causal LMs (:func:`is_causal_lm`),
            :func:`token_mask` otherwise.
        rapt_noise: ``inputs -> {"noise_mask": ..., "segment_ids": ...}`` (either key may be
            left out) handed to the regularizer; :func:`noise_inputs` by default (from
            ``attention_mask`` and ``position_ids``). None gives noise to every position.
        rapt_allow_neftune: Train with NEFTune (``neftune_noise_alpha`` in the arguments)
            anyway. Refused by default: NEFTune's noise on the input embeddings reaches the
            clean pass too, so the penalty would compare two noisy passes.
        *args: Passed to the Trainer.
        **kwargs: Passed to the Trainer.

    Attributes:
        rapt: The regularizer (None before the first training step).

    Raises:
        RaptRegError: if both ``rapt_regularizer`` and ``rapt_kwargs`` are given, or if the
            arguments turn NEFTune on and ``rapt_allow_neftune`` is False.
    """

    def __init__(
        self,
        *args: Any,
        rapt_regularizer: Optional[RandomPerturbationRegularizer] = None,
        rapt_kwargs: Optional[Mapping[str, Any]] = None,
        rapt_mask: Optional[MaskFn] = None,
        rapt_noise: Optional[NoiseFn] = noise_inputs,
        rapt_allow_neftune: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if rapt_regularizer is not None and rapt_kwargs is not None:
            raise RaptRegError(
                "pass either rapt_regularizer (a ready regularizer) or rapt_kwargs (to build "
                "one here), not both"
            )
        alpha = getattr(self, "neftune_noise_alpha", None)  # the Trainer's, from its args
        if alpha is not None and not rapt_allow_neftune:
            raise RaptRegError(
                f"NEFTune (neftune_noise_alpha={alpha}) adds noise to the input embeddings in "
                "every training forward, the clean pass included, so the RAPT penalty would "
                "compare two noisy passes instead of a noisy one with the clean one (it is not "
                "0 even at eta=0): set neftune_noise_alpha=None, or pass "
                "rapt_allow_neftune=True to combine them anyway"
            )
        self.rapt: Optional[RandomPerturbationRegularizer] = rapt_regularizer
        self._rapt_given = rapt_regularizer is not None
        self._rapt_kwargs = dict(rapt_kwargs or {})
        self._rapt_mask = rapt_mask
        self._rapt_noise = rapt_noise
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
        fused = getattr(self.args, "use_liger_kernel", False) or _is_trl_sft(self)  # type: ignore[attr-defined]
        kwargs = {"head": "auto"} if fused else {}  # no logits: a penalty that needs none
        self.rapt = RandomPerturbationRegularizer(model, **{**kwargs, **self._rapt_kwargs})
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
        if _is_trl_sft(self) and reg.head is None:
            parent = self._plain_trainer_loss(inputs)
        # What kind of model it is is asked of the Trainer's own model (the regularizer's):
        # ``model`` may be an engine that unwrap_model does not see through (DeepSpeed's).
        mask_fn = self._rapt_mask
        if mask_fn is None:
            mask_fn = causal_token_mask if is_causal_lm(reg.model) else token_mask
        mask = mask_fn(inputs)
        noise = dict(self._rapt_noise(inputs)) if self._rapt_noise is not None else {}
        noisy_inputs = self._noisy_inputs(reg.model, inputs)  # before the parent pops "labels"
        task: list[torch.Tensor] = []

        def forward() -> Any:
            if task:
                return model(**noisy_inputs)
            # The clean pass: the parent's loss (and outputs, unless the head's input is taken
            # instead: TRL would recompute its logits for them).
            outputs = parent(
                model, inputs, return_outputs=return_outputs or reg.head is None, **extra
            )
            task.append(outputs[0] if isinstance(outputs, tuple) else outputs)
            return outputs[1] if isinstance(outputs, tuple) else None

        outputs, penalty = reg.pair(forward, mask=mask, **noise)
        self._rapt_penalties.append(penalty.detach())  # logged as computed, never divided
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            # The parent's loss is already normalised over the accumulated batch, so the
            # Trainer will not divide it by the accumulation steps: the penalty (a mean
            # over this micro-batch) is divided here instead.
            penalty = penalty / self._accumulation_steps()
        loss = task[0] + penalty
        return (loss, outputs) if return_outputs else loss

    def _noisy_inputs(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The inputs of the noisy pass: the batch without its labels (only logits are used).

        An encoder-decoder that makes its decoder inputs from the labels gets them made here
        (``prepare_decoder_input_ids_from_labels``); one that cannot keeps its labels.
        """
        label_names = getattr(self, "label_names", None) or ["labels"]
        dropped = {*label_names, "shift_labels"}
        noisy = {k: v for k, v in inputs.items() if k not in dropped}
        labels = inputs.get("labels")
        config = getattr(unwrap_model(model), "config", None)
        needs_decoder_inputs = (
            getattr(config, "is_encoder_decoder", False)
            and isinstance(labels, torch.Tensor)
            and "decoder_input_ids" not in inputs
            and "decoder_inputs_embeds" not in inputs
        )
        if needs_decoder_inputs:
            prepare = getattr(unwrap_model(model), "prepare_decoder_input_ids_from_labels", None)
            if not callable(prepare):
                return dict(inputs)
            noisy["decoder_input_ids"] = prepare(labels=labels)
        return noisy

    def _plain_trainer_loss(self, inputs: dict[str, Any]) -> Callable[..., Any]:
        """``transformers.Trainer.compute_loss`` on this trainer: TRL's SFT clean pass."""
        loss_type = getattr(getattr(self, "args", None), "loss_type", "nll")
        if loss_type != "nll":
            raise RaptRegError(
                f"RAPT with TRL's SFTTrainer supports loss_type='nll' only, got {loss_type!r}: "
                "the penalty needs the clean pass's logits, which TRL's fused LM head does "
                "not make, so the clean loss is the model's own NLL"
            )
        inputs["use_cache"] = False  # as SFTTrainer does: no cache in training
        return functools.partial(Trainer.compute_loss, self)  # type: ignore[arg-type]

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
        """Adds the regularizer's stats and ``rapt_penalty`` to the logs: the mean of the
        penalties of the micro-batches since the last log, each as the regularizer computed it
        (before any division for gradient accumulation)."""
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
    (``rapt_regularizer``, ``rapt_kwargs``, ``rapt_mask``, ``rapt_noise``,
    ``rapt_allow_neftune``).
    """


def with_rapt(trainer_cls: type[Trainer]) -> type[Trainer]:
    """A subclass of ``trainer_cls`` (any Trainer subclass) that adds the RAPT penalty.

    Args:
        trainer_cls: e.g. ``transformers.Seq2SeqTrainer``, or a Trainer of another library
            such as TRL's ``SFTTrainer``.

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
