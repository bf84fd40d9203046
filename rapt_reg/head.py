"""The output layer, for a penalty that never builds the noisy pass's logits (``head=``).

Large-vocabulary language models spend most of a step's memory on ``[batch, seq, vocab]``
logits. With ``head=``, the noisy pass's head is handed no positions (:class:`HeadHook`), and
the divergence is made chunk by chunk from the head's input in both passes and the head's
weight (:class:`rapt_reg.divergence.Head`, :func:`rapt_reg.divergence.reduce_divergence`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional, Union

import torch
from torch import nn

from .discovery import _submodule, unwrap_model
from .errors import RaptRegError
from .hooks import input_key, with_input


def find_head(
    model: nn.Module, head: Union[None, str, nn.Module]
) -> tuple[Optional[nn.Module], float, Optional[float]]:
    """The output layer ``head=`` names, with the scale and soft-cap the model applies after it.

    ``"auto"`` is the model's ``get_output_embeddings()``; a string is a dotted path; a module
    must be one of the model's. The head must hold a weight ``[vocab, hidden]`` (and maybe a
    bias) applied as ``h @ weight.T + bias``; a transformers config's
    ``final_logit_softcapping`` (Gemma 2), ``logit_scale`` (Cohere) and ``logits_scaling``
    (Granite) are followed.

    Returns:
        ``(module, scale, softcap)``; ``(None, 1.0, None)`` for ``head=None``.

    Raises:
        RaptRegError: if there is no such module, or it is not a linear layer.
    """
    if head is None:
        return None, 1.0, None
    root = unwrap_model(model)
    if head == "auto":
        get = getattr(root, "get_output_embeddings", None)
        module = get() if callable(get) else None
    elif isinstance(head, str):
        module = _submodule(root, head)
    else:
        module = head if any(m is head for m in root.modules()) else None
    weight = getattr(module, "weight", None)
    if (
        not isinstance(module, nn.Module)
        or not isinstance(weight, torch.Tensor)
        or weight.ndim != 2
    ):
        raise RaptRegError(
            f"head={head!r}: {type(root).__name__} has no such linear output layer (a module "
            "whose weight [vocab, hidden] makes the logits). Pass head= the module, or "
            "head=None to compare the logits the forward returns"
        )
    config = getattr(root, "config", None)
    get_text = getattr(config, "get_text_config", None)
    config = get_text(decoder=True) if callable(get_text) else config
    scale = (getattr(config, "logit_scale", None) or 1.0) / (
        getattr(config, "logits_scaling", None) or 1.0
    )
    softcap = getattr(config, "final_logit_softcapping", None) or None
    return module, float(scale), softcap


class HeadHook:
    """A pre-forward hook on the output layer: it hands over the layer's input while capturing.

    In a clean pass the head runs as usual; in a noisy pass it is handed zero positions, so the
    noisy pass builds no logits: the penalty makes them chunk by chunk from the captured input
    (:class:`rapt_reg.divergence.Head`). Only the head's first call of a pass is captured.
    """

    def __init__(self, module: nn.Module) -> None:
        self._mode: Optional[str] = None
        self._captured: list[torch.Tensor] = []
        self._handle = module.register_forward_pre_hook(self._pre, with_kwargs=True)

    @contextlib.contextmanager
    def capture(self, mode: str) -> Iterator[list[torch.Tensor]]:
        """Capture the head's input during the block (``mode``: "clean" or "noisy")."""
        self._mode, self._captured = mode, []
        try:
            yield self._captured
        finally:
            self._mode = None

    def remove(self) -> None:
        self._handle.remove()

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        if self._mode is None or self._captured:
            return None
        key = input_key(args, kwargs)
        hidden = None if key is None else args[0] if key == 0 else kwargs[key]
        if hidden is None or hidden.ndim < 2:
            raise RaptRegError(
                f"the head ({type(module).__name__}) was called without [..., positions, "
                "hidden] states, so the penalty cannot be made from its input: pass head=None"
            )
        self._captured.append(hidden)
        if self._mode == "noisy":
            return with_input(args, kwargs, key, hidden[..., :0, :])
        return None
