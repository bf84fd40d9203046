"""The output layer, for a penalty that never builds the noisy pass's logits (``head=``).

Large-vocabulary language models spend most of a step's memory on ``[batch, seq, vocab]``
logits. With ``head=``, the noisy pass's head is handed no positions (:class:`HeadHook`), and
the divergence is made chunk by chunk from the head's input in both passes and the head's
weight (:class:`Head`, :func:`rapt_reg.divergence.reduce_divergence`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .discovery import unwrap_model
from .errors import RaptRegError
from .hooks import input_key, output_hidden, with_input

HeadSpec = Union[None, str, nn.Module]


@dataclass(frozen=True)
class Head:
    """The output layer making logits ``[..., V]`` from last hidden states ``[..., H]``:
    ``softcap * tanh(scale * (h @ weight.T + bias) / softcap)`` (no tanh without ``softcap``),
    as Cohere (``logit_scale``), Granite (``1 / logits_scaling``) and Gemma 2
    (``final_logit_softcapping``) apply them."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    scale: float = 1.0
    softcap: Optional[float] = None

    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of ``hidden``, in float32 at least."""
        return self.finish(F.linear(hidden, *self.params()))

    def finish(self, linear: torch.Tensor) -> torch.Tensor:
        """The logits from ``hidden @ weight.T + bias``: float32 at least, scaled, soft-capped."""
        logits = linear.to(torch.promote_types(linear.dtype, torch.float32))
        logits = logits * self.scale if self.scale != 1.0 else logits
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap


def find_head(model: nn.Module, head: HeadSpec) -> Optional[tuple[Any, ...]]:
    """``(module, scale, softcap, body)`` of the output layer ``head=`` names (None for None).

    ``"auto"`` is the model's ``get_output_embeddings()``; a string is a dotted path; a module
    must be one of the model's. Its weight ``[vocab, hidden]`` (and bias) make the logits; a
    transformers config's ``logit_scale`` (Cohere), ``logits_scaling`` (Granite, a divisor)
    and ``final_logit_softcapping`` (Gemma 2) are applied after it, as those models do. The
    body is the transformers decoder (``get_decoder()``) whose output the head is given.

    Raises:
        RaptRegError: if there is no such module, or it is not a linear layer.
    """
    if head is None:
        return None
    root = unwrap_model(model)
    module: object = None
    if head == "auto":
        module = getattr(root, "get_output_embeddings", lambda: None)()
    elif isinstance(head, str):
        module = next((m for n, m in root.named_modules() if n == head), None)
    elif any(m is head for m in root.modules()):
        module = head
    weight = getattr(module, "weight", None)
    if getattr(weight, "ds_shape", None) is not None:  # a DeepSpeed ZeRO-3 partition
        raise RaptRegError(
            f"head={head!r}: under DeepSpeed ZeRO-3 the output layer's weight is partitioned "
            "outside its forward, so the penalty cannot make logits from it: use head=None "
            "with ZeRO-3 (head= works under ZeRO-2, DDP and FSDP2)"
        )
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
    get_text_config = getattr(config, "get_text_config", None)
    config = get_text_config(decoder=True) if get_text_config else config
    scale = (getattr(config, "logit_scale", None) or 1.0) / (
        getattr(config, "logits_scaling", None) or 1.0
    )
    body = getattr(root, "get_decoder", lambda: None)()
    body = body if isinstance(body, nn.Module) and body is not root else None
    return module, float(scale), getattr(config, "final_logit_softcapping", None) or None, body


class HeadHook:
    """A pre-forward hook on the output layer that hands over its input while capturing.

    In a clean pass the head runs as usual; in a noisy pass it is handed zero positions, so no
    logits are built. Only the head's first call in a pass is captured. A clean pass that runs
    no head (a fused loss makes its loss from the body's output and the head's weight) hands
    over the body's output instead: every noisy pass checks that it is the head's input. The
    first noisy pass hands the head one position, whose logits :meth:`check` compares with the
    ones the penalty would make: a model that transforms its logits otherwise is refused.
    """

    def __init__(self, module: nn.Module, scale: float, softcap: Optional[float],
                 body: Optional[nn.Module] = None) -> None:  # fmt: skip
        self.module, self._scale, self._softcap = module, scale, softcap
        self._mode: Optional[str] = None
        self._checked, self._fell_back = False, False
        self._captured: list[torch.Tensor] = []
        self._body: list[torch.Tensor] = []
        self._handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True)]
        if body is not None:
            self._handles.append(body.register_forward_hook(self._body_output))

    @contextlib.contextmanager
    def capture(self, mode: str) -> Iterator[list[torch.Tensor]]:
        """The head's input (or the body's output, see above) during the block (``mode``:
        "clean" or "noisy")."""
        self._mode, self._captured, self._body = mode, [], []
        try:
            yield self._captured
        finally:
            self._mode = None
        if mode == "clean":
            self._fell_back = not self._captured
            self._captured += self._body[:1] if self._fell_back else []
        elif self._fell_back and self._body and self._captured:
            head, body = (
                (t.data_ptr(), t.shape, t.stride()) for t in (self._captured[0], self._body[0])
            )
            if head != body:
                raise RaptRegError(
                    f"the head ({type(self.module).__name__}) is not given its body's output as "
                    "it is, so a clean pass that runs no head (a fused loss) cannot be compared: "
                    "make the clean pass compute its logits, or pass head=None"
                )

    def weights(self) -> Head:
        """The head as it is now (a sharded DTensor gathered, differentiably)."""
        weight, bias = (getattr(self.module, name, None) for name in ("weight", "bias"))
        weight, bias = (getattr(t, "full_tensor", lambda t=t: t)() for t in (weight, bias))
        return Head(weight, bias, self._scale, self._softcap)  # type: ignore[arg-type]

    def check(self, logits: torch.Tensor) -> None:
        """On the first noisy pass: its one position's ``logits`` must be the ones made here."""
        if self._checked:
            return
        head = self.weights()
        with torch.no_grad():
            ours = head.logits(self._captured[0][..., :1, :])
        theirs = logits.detach().to(ours.dtype)
        # 3% of the largest logit: what half precision (or autocast, which wrapped forwards
        # may hide) rounds away, and far less than any scale, cap or bias not applied here.
        tolerance = 3e-2 * float(ours.abs().max().clamp_min(1))
        close = ours.shape == theirs.shape and torch.allclose(theirs, ours, rtol=0, atol=tolerance)
        if not close:
            raise RaptRegError(
                f"the model's logits are not its head's ({type(self.module).__name__}) output "
                f"as head= makes them (shape {tuple(theirs.shape)}, expected {tuple(ours.shape)}"
                "): it scales, caps or slices them in a way rapt_reg does not know. Pass "
                "head=None to compare the logits the forward returns"
            )
        self._checked = True

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _body_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._mode is not None and not self._body:
            self._body.append(output_hidden(output))

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
        positions = 0 if self._checked else 1  # one, to be compared, on the first noisy pass
        return (
            with_input(args, kwargs, key, hidden[..., :positions, :])
            if self._mode == "noisy"
            else None
        )
