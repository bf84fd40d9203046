"""Divergences between the noisy and the clean output: the ``l(f(x + delta_r), f(x))`` of Eq. 2.

Every function takes logits of shape ``[..., C]``, computes in at least float32 with autocast
off, sums over the last (class) dimension and averages over every leading dimension
("batchmean" over examples and, for token-level outputs, positions). An optional ``mask`` of
shape ``[...]`` keeps only the positions where it is true (padding excluded).

The per-position functions below (:func:`sym_kl`, :func:`kl`, :func:`js`, :func:`mse`) are
the formulas as written, and so may be any callable a user passes. :func:`reduce_divergence`
runs them chunk by chunk over positions and, in backward, recomputes each chunk and lets
autograd differentiate it: a
language model's ``[batch, seq, vocab]`` logits are never copied whole in float32 nor held
several times over for backward. Given a :class:`Head`, it takes the last hidden states
instead and makes each chunk's logits itself, so the noisy pass's logits are never built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from .errors import RaptRegError

Divergence = Callable[..., torch.Tensor]

# A chunk holds at least CHUNK_BYTES of float32 [positions, classes] (4 MiB: 32 positions at a
# 32,000-word vocabulary), and at least 1/MAX_CHUNKS of all positions, so that the number of
# chunks (and of kernel launches on a GPU) stays bounded for long batches. The chunk's own
# temporaries (a few float32 copies of it) are the only memory the divergence adds.
CHUNK_BYTES = 4 * 2**20
MAX_CHUNKS = 64


def kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def sym_kl(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Symmetric KL as in MT-DNN's ``SymKlCriterion`` (the framework RAPT was built on).

    ``KL(sg(p_clean) || p_noisy) + KL(sg(p_noisy) || p_clean)``: each direction treats the
    other side as a fixed target (``sg`` = stop-gradient), so the gradient reaches both passes.
    """
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


def check_outputs(
    noisy: torch.Tensor,
    clean: torch.Tensor,
    head: Optional[Head] = None,
    clean_is_hidden: bool = False,
) -> None:
    """Refuse outputs no divergence can compare: other shapes, or not floating point.

    Raises:
        RaptRegError: naming both shapes, or the offending dtype.
    """
    for name, t in (("noisy", noisy), ("clean", clean)):
        if not t.is_floating_point():
            raise RaptRegError(
                f"{name} output has dtype {t.dtype}: the divergence needs floating-point logits, "
                "not class indices or booleans"
            )
    wanted: tuple[int, ...] = tuple(noisy.shape)
    if head is not None:
        vocab, hidden = head.weight.shape
        if noisy.shape[-1:] != (hidden,):
            raise RaptRegError(
                f"the noisy hidden states have shape {tuple(noisy.shape)} but the head's weight "
                f"is {tuple(head.weight.shape)}: pass head= the module applied to them"
            )
        wanted = wanted if clean_is_hidden else (*noisy.shape[:-1], vocab)
    if tuple(clean.shape) != wanted:
        raise RaptRegError(
            f"noisy output has shape {tuple(noisy.shape)} but clean output has shape "
            f"{tuple(clean.shape)}: both passes must return logits of the same shape"
        )


# -- chunk by chunk, differentiated by autograd ---------------------------------------------


@dataclass(frozen=True)
class Head:
    """The output layer that turns last hidden states ``[..., H]`` into logits ``[..., V]``.

    ``logits = softcap * tanh((h @ weight.T + bias) * scale / softcap)`` (no tanh when
    ``softcap`` is None): a linear head, optionally scaled (Cohere's ``logit_scale``, Granite's
    ``1 / logits_scaling``) and soft-capped (Gemma 2's ``final_logit_softcapping``).
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    scale: float = 1.0
    softcap: Optional[float] = None

    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    def logits(self, hidden: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        """The logits of ``hidden`` (in float32 at least), with ``params`` for the weights."""
        work = torch.promote_types(hidden.dtype, torch.float32)
        logits = F.linear(hidden, *params).to(work)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _rows_sum(fn: Callable[..., torch.Tensor], keep, a, b, params) -> torch.Tensor:
    """``fn(a, b, *params)`` summed over the rows ``keep`` holds: rows left out are zeroed
    first, so whatever they hold, even NaN, reaches nothing."""
    if keep is not None:
        a, b = (torch.where(keep[:, None], x, x.new_zeros(())) for x in (a, b))
    values = fn(a, b, *params)
    if keep is not None:
        values = torch.where(keep, values, values.new_zeros(()))
    return values.sum()


class _Chunked(torch.autograd.Function):
    """``sum over kept rows of fn(noisy[rows], clean[rows], *params)``, ``rows`` at a time.

    Forward keeps only its inputs; backward recomputes each chunk with autograd on and asks
    autograd for its gradients, written row by row (``params``' summed).
    """

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., torch.Tensor], rows: int, keep, noisy, clean, *params):  # type: ignore[override]
        ctx.fn, ctx.rows = fn, rows
        ctx.save_for_backward(keep, noisy, clean, *params)
        total = noisy.new_zeros((), dtype=torch.promote_types(noisy.dtype, torch.float32))
        for start in range(0, noisy.shape[0], rows):
            part = slice(start, start + rows)
            keep_rows = None if keep is None else keep[part]
            total = total + _rows_sum(fn, keep_rows, noisy[part], clean[part], params)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple:
        keep, *inputs = ctx.saved_tensors
        wanted = ctx.needs_input_grad[3:]
        grads: list[Optional[torch.Tensor]] = [None] * len(inputs)
        with torch.enable_grad(), torch.autocast(inputs[0].device.type, enabled=False):
            for start in range(0, inputs[0].shape[0], ctx.rows):
                part = slice(start, start + ctx.rows)
                rows = [x[part] if i < 2 else x for i, x in enumerate(inputs)]
                leaves = [x.detach().requires_grad_(w) for x, w in zip(rows, wanted)]
                keep_rows = None if keep is None else keep[part]
                value = _rows_sum(ctx.fn, keep_rows, leaves[0], leaves[1], leaves[2:])
                if not value.requires_grad:
                    continue
                asked = [x for x, w in zip(leaves, wanted) if w]
                got = iter(torch.autograd.grad(value, asked, grad_total, allow_unused=True))
                for i, want in enumerate(wanted):
                    got_part = next(got) if want else None
                    if got_part is None:
                        continue
                    if grads[i] is None:
                        grads[i] = torch.zeros_like(inputs[i])
                    if i < 2:
                        grads[i][start : start + ctx.rows] = got_part  # type: ignore[index]
                    else:
                        grads[i] += got_part  # type: ignore[operator]
        return (None, None, None, *grads)


def chunk_rows(positions: int, classes: int) -> int:
    """Positions per chunk: :data:`CHUNK_BYTES` of float32, and at least 1/:data:`MAX_CHUNKS`."""
    by_bytes = CHUNK_BYTES // (4 * max(classes, 1))
    return max(1, by_bytes, -(-positions // MAX_CHUNKS))


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
    """``per_position(noisy, clean)`` in float32 (autocast off), averaged over the leading dims.

    The value and the gradients are those of the formula, computed chunk by chunk over
    positions, each chunk cast to float32 (float64 stays float64) on its own and recomputed
    in backward, where autograd differentiates it: the memory this adds is one chunk's
    temporaries, never a float32 copy of the whole logits. A chunk holds
    ``max(4 MiB / (4 * C), positions / 64)`` positions (:func:`chunk_rows`;
    ``chunk_positions`` overrides it). Logits that cannot be viewed as ``[positions, C]``
    (sliced along the sequence, say) are copied once in their own dtype: to leave a position
    out, pass a mask rather than a slice.

    Args:
        per_position: A function ``(noisy, clean) -> [...]`` such as :func:`sym_kl` (any
            callable that reduces over the last dimension, position by position).
        noisy: Logits of the perturbed pass ``[..., C]``, or with ``head`` its last hidden
            states ``[..., H]``.
        clean: Logits of the clean pass (same shape as the noisy logits), or with ``head``
            and ``clean_is_hidden`` its last hidden states.
        mask: Optional boolean (or 0/1) ``[...]`` tensor; only positions where it is true are
            compared, so whatever the padded positions hold (even NaN) never reaches the
            penalty or its gradient. A mask with no true entry gives 0. Applied with
            ``torch.where``: no host synchronisation, no gathered copy.
        chunk_positions: Positions per chunk (None: by size).
        head: Make the logits from hidden states with this head, chunk by chunk; its weights
            get their gradients through the chunks too.
        clean_is_hidden: ``clean`` holds hidden states for ``head`` (else logits).

    Returns:
        A float32 (or float64) scalar.

    Raises:
        RaptRegError: if shapes differ, the outputs are not floating point, the mask does
            not match the leading dimensions, or ``chunk_positions`` is not a positive int.
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
    classes = noisy.shape[-1] if head is None else head.weight.shape[0]
    keep = None if mask is None else mask.to(device=noisy.device, dtype=torch.bool).reshape(-1)
    params = () if head is None else head.params()

    def fn(a: torch.Tensor, b: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        if head is None:
            return per_position(a.to(work), b.to(work))
        b = head.logits(b, *weights) if clean_is_hidden else b.to(work)
        return per_position(head.logits(a, *weights), b)

    with torch.autocast(device_type=noisy.device.type, enabled=False):
        total = _Chunked.apply(
            fn,
            chunk_positions or chunk_rows(positions, classes),
            keep,
            noisy.reshape(positions, noisy.shape[-1]),
            clean.reshape(positions, clean.shape[-1]),
            *params,
        )
    # The mean over kept positions; an all-false mask (or no position) gives 0 / 1 = 0.
    count = max(positions, 1) if keep is None else keep.sum().clamp_min(1)
    return total / count
