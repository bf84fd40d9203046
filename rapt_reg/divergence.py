"""Divergences between the noisy and the clean output: the ``l(f(x + delta_r), f(x))`` of Eq. 2.

The per-position functions (:func:`sym_kl`, :func:`kl`, :func:`js`, :func:`mse`, or any callable
a user passes) are the formulas as written: ``(noisy, clean) -> [...]``, reducing the class
dimension of ``[..., C]`` logits. :func:`reduce_divergence` averages one over the positions a
mask keeps, in float32 at least and with autocast off, chunk by chunk: in backward it
recomputes each chunk and lets autograd differentiate it, so ``[batch, seq, vocab]`` logits are
never copied whole in float32 nor held again for backward. Given a head
(:class:`rapt_reg.head.Head`), it makes each chunk's logits from the last hidden states itself.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from .errors import RaptRegError

if TYPE_CHECKING:
    from .head import Head

Divergence = Callable[..., torch.Tensor]

# A chunk holds at least CHUNK_BYTES of float32 [positions, classes] (32 positions at a 32,000
# vocabulary) and at least 1/MAX_CHUNKS of the positions (few kernel launches on a GPU).
CHUNK_BYTES = 4 * 2**20
MAX_CHUNKS = 64


def kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def sym_kl(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Symmetric KL as MT-DNN's ``SymKlCriterion`` (the framework RAPT was built on):
    ``KL(sg(p_clean) || p_noisy) + KL(sg(p_noisy) || p_clean)``, each direction with the other
    side a fixed target (``sg``: stop-gradient), so the gradient reaches both passes."""
    log_noisy, log_clean = F.log_softmax(noisy, -1), F.log_softmax(clean, -1)
    return kl_terms(log_clean.detach(), log_noisy) + kl_terms(log_noisy.detach(), log_clean)


def kl(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """One-way ``KL(sg(p_clean) || p_noisy)``: the clean prediction is the fixed target (VAT)."""
    return kl_terms(F.log_softmax(clean, -1).detach(), F.log_softmax(noisy, -1))


def js(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence, gradients through both sides."""
    log_noisy, log_clean = F.log_softmax(noisy, -1), F.log_softmax(clean, -1)
    log_mid = torch.logaddexp(log_noisy, log_clean) - math.log(2.0)
    return 0.5 * (kl_terms(log_noisy, log_mid) + kl_terms(log_clean, log_mid))


def mse(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the last dimension, for regression heads."""
    return (noisy - clean).square().sum(-1)


DIVERGENCES: dict[str, Divergence] = {"sym_kl": sym_kl, "kl": kl, "js": js, "mse": mse}


def resolve(divergence: Union[str, Divergence]) -> Divergence:
    """Turn a name from :data:`DIVERGENCES` or a callable into a per-position divergence."""
    if callable(divergence):
        return divergence
    if divergence not in DIVERGENCES:
        raise RaptRegError(
            f"unknown divergence {divergence!r}: use one of {sorted(DIVERGENCES)} or pass a "
            "callable (noisy_logits, clean_logits) -> per-position values of shape [...]"
        )
    return DIVERGENCES[divergence]


def check_outputs(noisy: torch.Tensor, clean: torch.Tensor, head: Optional[Head] = None,
                  clean_is_hidden: bool = False) -> None:  # fmt: skip
    """Refuse outputs no divergence can compare: other shapes, or not floating point."""
    for name, t in (("noisy", noisy), ("clean", clean)):
        if not t.is_floating_point():
            raise RaptRegError(
                f"{name} output has dtype {t.dtype}: the divergence needs floating-point logits, "
                "not class indices or booleans"
            )
    wanted: tuple[int, ...] = tuple(noisy.shape)
    if head is not None:
        if noisy.shape[-1:] != head.weight.shape[1:]:
            raise RaptRegError(
                f"the noisy hidden states have shape {tuple(noisy.shape)} but the head's weight "
                f"is {tuple(head.weight.shape)}: pass head= the module applied to them"
            )
        wanted = wanted if clean_is_hidden else (*wanted[:-1], head.weight.shape[0])
    if tuple(clean.shape) != wanted:
        raise RaptRegError(
            f"noisy output has shape {tuple(noisy.shape)} but clean output has shape "
            f"{tuple(clean.shape)}: both passes must return logits of the same shape"
        )


def _rows_sum(fn: Callable[..., torch.Tensor], keep: Any, a: Any, b: Any, params: Any) -> Any:
    """``fn(a, b, *params)`` summed over the rows ``keep`` holds: the others are zeroed first,
    so whatever they hold, even NaN, reaches nothing."""
    if keep is not None:
        a, b = (torch.where(keep[:, None], x, x.new_zeros(())) for x in (a, b))
    values = fn(a, b, *params)
    return (values if keep is None else torch.where(keep, values, values.new_zeros(()))).sum()


class _Chunked(torch.autograd.Function):
    """``sum over kept rows of fn(noisy[rows], clean[rows], *params)``, ``rows`` at a time.

    Forward keeps only its inputs; backward recomputes each chunk with autograd on and asks
    autograd for its gradients, written row by row (``params``': summed).
    """

    @staticmethod
    def forward(
        ctx: Any, fn: Any, rows: int, keep: Any, noisy: Any, clean: Any, *params: Any
    ) -> Any:  # type: ignore[override]
        ctx.fn, ctx.rows = fn, rows
        ctx.save_for_backward(keep, noisy, clean, *params)
        total = noisy.new_zeros((), dtype=torch.promote_types(noisy.dtype, torch.float32))
        for start in range(0, noisy.shape[0], rows):
            part = slice(start, start + rows)
            kept = None if keep is None else keep[part]
            total = total + _rows_sum(fn, kept, noisy[part], clean[part], params)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple:
        keep, *inputs = ctx.saved_tensors
        wanted = ctx.needs_input_grad[3:]
        grads: list[Any] = [None] * len(inputs)
        with torch.enable_grad(), torch.autocast(inputs[0].device.type, enabled=False):
            for start in range(0, inputs[0].shape[0], ctx.rows):
                part = slice(start, start + ctx.rows)
                rows = [(x[part] if i < 2 else x).detach() for i, x in enumerate(inputs)]
                leaves = [x.requires_grad_(w) for x, w in zip(rows, wanted)]
                kept = None if keep is None else keep[part]
                value = _rows_sum(ctx.fn, kept, leaves[0], leaves[1], leaves[2:])
                asked = [i for i, w in enumerate(wanted) if w]
                if not value.requires_grad:
                    continue
                got = torch.autograd.grad(
                    value, [leaves[i] for i in asked], grad_total, allow_unused=True
                )
                for i, g in zip(asked, got):
                    if g is not None:
                        grads[i] = torch.zeros_like(inputs[i]) if grads[i] is None else grads[i]
                        target = grads[i][part] if i < 2 else grads[i]
                        target.add_(g)
        return (None, None, None, *grads)


def chunk_rows(positions: int, classes: int) -> int:
    """Positions per chunk: :data:`CHUNK_BYTES` of float32, and at least 1/:data:`MAX_CHUNKS`."""
    return max(1, CHUNK_BYTES // (4 * max(classes, 1)), -(-positions // MAX_CHUNKS))


def reduce_divergence(
    per_position: Divergence,
    noisy: torch.Tensor,
    clean: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    chunk_positions: Optional[int] = None,
    head: Optional[Head] = None,
    clean_is_hidden: bool = False,
) -> torch.Tensor:
    """``per_position(noisy, clean)`` averaged over the positions ``mask`` keeps.

    Chunk by chunk over positions, each chunk cast to float32 (float64 stays float64) on its
    own, autocast off, recomputed in backward: the memory this adds is one chunk's temporaries.
    Logits that cannot be viewed as ``[positions, C]`` (sliced along the sequence) are copied
    once in their own dtype; to leave positions out, pass a mask rather than a slice.

    Args:
        per_position: ``(noisy, clean) -> [...]``, such as :func:`sym_kl`.
        noisy: The noisy pass's logits ``[..., C]`` (with ``head``: its hidden states).
        clean: The clean pass's logits (with ``head`` and ``clean_is_hidden``: its hidden
            states).
        mask: Optional boolean (or 0/1) ``[...]``: only positions where it is true count, so
            whatever the others hold (even NaN) reaches neither the value nor a gradient; no
            true entry gives 0. Applied with ``torch.where``: no host sync, no gathered copy.
        chunk_positions: Positions per chunk (None: ``max(4 MiB / (4 * C), positions / 64)``,
            :func:`chunk_rows`).
        head: Make each chunk's logits from hidden states with this head (its weights get
            their gradients too).
        clean_is_hidden: ``clean`` holds hidden states for ``head`` (else logits).

    Returns:
        A float32 (or float64) scalar.

    Raises:
        RaptRegError: for outputs of other shapes or not floating point, a mask that does not
            match the leading dimensions, or ``chunk_positions`` not a positive int.
    """
    check_outputs(noisy, clean, head, clean_is_hidden)
    if mask is not None and mask.shape != noisy.shape[:-1]:
        raise RaptRegError(
            f"mask has shape {tuple(mask.shape)} but the outputs' leading dimensions are "
            f"{tuple(noisy.shape[:-1])}: pass one entry per position (e.g. the attention mask)"
        )
    if chunk_positions is not None and (
        isinstance(chunk_positions, bool)
        or not isinstance(chunk_positions, int)
        or chunk_positions < 1
    ):
        raise RaptRegError(f"chunk_positions must be an int >= 1 or None, got {chunk_positions!r}")
    work = torch.promote_types(noisy.dtype, torch.float32)
    positions = noisy.shape[:-1].numel()
    keep = None if mask is None else mask.to(device=noisy.device, dtype=torch.bool).reshape(-1)

    def fn(a: torch.Tensor, b: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        if head is None:
            return per_position(a.to(work), b.to(work))
        b = head.logits(b, *weights) if clean_is_hidden else b.to(work)
        return per_position(head.logits(a, *weights), b)

    classes = noisy.shape[-1] if head is None else head.weight.shape[0]
    with torch.autocast(device_type=noisy.device.type, enabled=False):
        total = _Chunked.apply(
            fn,
            chunk_positions or chunk_rows(positions, classes),
            keep,
            noisy.reshape(positions, noisy.shape[-1]),
            clean.reshape(positions, clean.shape[-1]),
            *(() if head is None else head.params()),
        )
    # The mean over kept positions; an all-false mask (or no position) gives 0 / 1 = 0.
    return total / (max(positions, 1) if keep is None else keep.sum().clamp_min(1))
