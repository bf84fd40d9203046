"""Divergences between the noisy and the clean output: the ``l(f(x + delta_r), f(x))`` of Eq. 2.

The per-position functions (:func:`sym_kl`, :func:`kl`, :func:`js`, :func:`mse`, or any callable
a user passes) are the formulas as written: ``(noisy, clean) -> [...]``, reducing the class
dimension of ``[..., C]`` logits. :func:`reduce_divergence` averages one over the positions a
mask keeps, in float32 at least, autocast off, chunk by chunk (autograd differentiates each
chunk), so ``[batch, seq, vocab]`` logits are never copied whole in float32 nor held again for
backward; given a head (:class:`rapt_reg.head.Head`), it makes each chunk's logits itself.
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
# vocabulary) and at least 1/MAX_CHUNKS of the positions (few kernel launches on a GPU). A chunk
# made with a head reads its whole weight three times: HEAD_CHUNK_BYTES, fewer, larger chunks.
CHUNK_BYTES = 4 * 2**20
HEAD_CHUNK_BYTES = 8 * 2**20
MAX_CHUNKS = 64


def kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def sym_kl(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Symmetric KL as MT-DNN's ``SymKlCriterion`` (RAPT's framework): ``KL(sg(p_clean) ||
    p_noisy) + KL(sg(p_noisy) || p_clean)``, the other side a fixed target in each direction
    (``sg``: stop-gradient), so the gradient reaches both passes. Computed with fewer temporaries
    as ``sum(sg(p_clean - p_noisy) * (log p_clean - log p_noisy))``, equal in value and gradient."""
    log_noisy, log_clean = F.log_softmax(noisy, -1), F.log_softmax(clean, -1)
    return ((log_clean.exp() - log_noisy.exp()).detach() * (log_clean - log_noisy)).sum(-1)


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


def _walk(fn: Any, rows: int, sides: int, keep: Any, inputs: Any, wanted: Any,
          grad_out: torch.Tensor) -> tuple[torch.Tensor, list]:  # fmt: skip
    """Chunk by chunk: the sum of fn over the rows ``keep`` keeps (the others zeroed: whatever
    they held, even NaN, reaches nothing), and the gradients of ``grad_out`` times it to the
    ``wanted`` inputs ``(noisy, clean, *weights)``. The first ``sides`` sides are hidden states,
    given to fn as logits ``F.linear(x, *weights)``. Autograd differentiates fn; the linear is
    taken by hand, the weight's gradient accumulating in one buffer."""
    weights, device = inputs[2:], inputs[0].device.type
    grads: list[Any] = [None, None]  # the sides': made at their first gradient
    grads += [torch.zeros_like(w) if want else None for w, want in zip(weights, wanted[2:])]
    asks = [wanted[i] or (i < sides and any(wanted[2:])) for i in range(2)]
    total = inputs[0].new_zeros((), dtype=torch.promote_types(inputs[0].dtype, torch.float32))
    for start in range(0, inputs[0].shape[0], rows):
        part = slice(start, start + rows)
        kept = None if keep is None else keep[part]
        with torch.no_grad(), torch.autocast(device, enabled=False):
            chunk = [x[part] if kept is None else torch.where(kept[:, None], x[part], 0)
                     for x in inputs[:2]]  # fmt: skip
            logits = [F.linear(x, *weights) if i < sides else x for i, x in enumerate(chunk)]
        leaves = [z.detach().requires_grad_(ask) for z, ask in zip(logits, asks)]
        with torch.enable_grad(), torch.autocast(device, enabled=False):
            values = fn(*leaves)
            value = (values if kept is None else torch.where(kept, values, 0.0)).sum()
            total = total + value.detach()
            if not value.requires_grad:  # nothing asked, or fn stops both sides' gradients
                continue
            asked = [z for z in leaves if z.requires_grad]
            dzs = iter(torch.autograd.grad(value, asked, grad_out, allow_unused=True))
        for i, dz in ((i, next(dzs)) for i in range(2) if asks[i]):
            if dz is not None and i < sides:  # through F.linear(x, weight, bias) by hand
                dz = dz.to(weights[0].dtype)
                if grads[2] is not None:
                    grads[2].addmm_(dz.T, chunk[i])
                if grads[3:] and grads[3] is not None:
                    grads[3].add_(dz.sum(0))
                if not wanted[i]:
                    continue
                dz = dz @ weights[0]
            if dz is not None:
                grads[i] = torch.zeros_like(inputs[i]) if grads[i] is None else grads[i]
                grads[i][part] = dz
    return total, grads


class _Chunked(torch.autograd.Function):
    """The mean over kept rows of ``fn(noisy, clean)``, chunk by chunk (:func:`_walk`). Without a
    head, backward recomputes each chunk; with one (and grad mode on: ``early``), forward makes
    the gradients (hidden-state and weight sized) while each chunk's logits exist, and backward
    scales them: one pass over the logits, so such a penalty can be backpropagated once."""

    @staticmethod
    def forward(ctx: Any, fn: Any, rows: int, keep: Any, count: torch.Tensor,  # type: ignore[override]
                hidden_sides: int, early: bool, *inputs: Any) -> Any:  # fmt: skip
        ctx.fn, ctx.rows, ctx.sides = fn, rows, hidden_sides
        ctx.save_for_backward(keep, count, *inputs)
        wanted = ctx.needs_input_grad[6:]
        ctx.early = early and ctx.sides > 0 and any(wanted)
        wanted = [ctx.early and w for w in wanted]  # without early: no gradient here
        total, ctx.grads = _walk(fn, rows, ctx.sides, keep, inputs, wanted, 1 / count)
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple:
        keep, count, *inputs = ctx.saved_tensors
        if not ctx.early:
            grads = _walk(ctx.fn, ctx.rows, ctx.sides, keep, inputs, ctx.needs_input_grad[6:],
                          grad_total / count)[1]  # fmt: skip
        elif ctx.grads is None:
            raise RaptRegError(
                "a penalty made with head= was backpropagated twice (retain_graph=True): its "
                "gradients are made in its forward and handed over once; compute it again"
            )
        else:  # made in forward: scaled in place and handed over (a weight's becomes its .grad)
            grads, ctx.grads = [g if g is None else g.mul_(grad_total) for g in ctx.grads], None
        return (None, None, None, None, None, None, *grads)


def chunk_rows(positions: int, classes: int, size: int = CHUNK_BYTES) -> int:
    """Positions per chunk: ``size`` bytes of float32, and at least 1/:data:`MAX_CHUNKS`."""
    return max(1, size // (4 * max(classes, 1)), -(-positions // MAX_CHUNKS))


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
    """``per_position(noisy, clean)`` averaged over the positions ``mask`` keeps: a float32 (or
    float64) scalar.

    Chunk by chunk over positions, each chunk cast to float32 (float64 stays float64) on its
    own, autocast off, recomputed in backward (with ``head``: differentiated in the forward):
    what this adds is one chunk's temporaries (with ``head``, and the gradients of the hidden
    states and the head's weight). Logits that cannot be viewed as ``[positions, C]`` are
    copied once in their own dtype; to leave positions out, pass a mask rather than a slice.

    Args:
        per_position: ``(noisy, clean) -> [...]``, such as :func:`sym_kl`.
        noisy: The noisy pass's logits ``[..., C]`` (with ``head``: its hidden states).
        clean: The clean pass's logits (with ``clean_is_hidden``: its hidden states).
        mask: Optional boolean (or 0/1) ``[...]``: only positions where it is true count, so
            whatever the others hold (even NaN) reaches neither the value nor a gradient; no
            true entry gives 0. Applied with ``torch.where``: no host sync, no gathered copy.
        chunk_positions: Positions per chunk (None: ``max(4 MiB / (4 * C), positions / 64)``,
            8 MiB with a head, :func:`chunk_rows`).
        head: Make each chunk's logits from hidden states with this head (and its weights'
            gradients).
        clean_is_hidden: ``clean`` holds hidden states for ``head`` (else logits).

    Raises:
        RaptRegError: for outputs not floating point or of other shapes, a mask that does not
            match their leading dimensions, or ``chunk_positions`` not a positive int.
    """
    for name, t in (("noisy", noisy), ("clean", clean)):
        if not t.is_floating_point():
            raise RaptRegError(
                f"{name} output has dtype {t.dtype}: the divergence needs floating-point logits, "
                "not class indices or booleans"
            )
    if head is not None and noisy.shape[-1:] != head.weight.shape[1:]:
        raise RaptRegError(
            f"the noisy hidden states have shape {tuple(noisy.shape)} but the head's weight "
            f"is {tuple(head.weight.shape)}: pass head= the module applied to them"
        )
    classes = noisy.shape[-1] if head is None else head.weight.shape[0]
    if clean.shape != (*noisy.shape[:-1], noisy.shape[-1] if clean_is_hidden else classes):
        raise RaptRegError(
            f"noisy output has shape {tuple(noisy.shape)} but clean output has shape "
            f"{tuple(clean.shape)}: both passes must return logits of the same shape"
        )
    if mask is not None and mask.shape != noisy.shape[:-1]:
        raise RaptRegError(
            f"mask has shape {tuple(mask.shape)} but the outputs' leading dimensions are "
            f"{tuple(noisy.shape[:-1])}: pass one entry per position (e.g. the attention mask)"
        )
    if chunk_positions is not None and (type(chunk_positions) is not int or chunk_positions < 1):
        raise RaptRegError(f"chunk_positions must be an int >= 1 or None, got {chunk_positions!r}")
    work = torch.promote_types(noisy.dtype, torch.float32)
    positions = noisy.shape[:-1].numel()
    keep = None if mask is None else mask.to(device=noisy.device, dtype=torch.bool).reshape(-1)
    # fn is given logits: with a head, the linear ones its weights made (scaled, capped here)
    finish = (lambda z: z.to(work)) if head is None else head.finish
    clean_finish = finish if clean_is_hidden else (lambda z: z.to(work))

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return per_position(finish(a), clean_finish(b))

    size = CHUNK_BYTES if head is None else HEAD_CHUNK_BYTES
    rows = chunk_positions or chunk_rows(positions, classes, size)
    flat = (x.reshape(positions, x.shape[-1]) for x in (noisy, clean))
    weights = () if head is None else head.params()
    # The mean over kept positions; an all-false mask (or no position) gives 0 / 1 = 0.
    count = (noisy.new_tensor(positions) if keep is None else keep.sum()).clamp_min(1).to(work)
    sides = 0 if head is None else 1 + clean_is_hidden  # hidden states given with a head
    grad = torch.is_grad_enabled()
    with torch.autocast(device_type=noisy.device.type, enabled=False):
        return _Chunked.apply(fn, rows, keep, count, sides, grad, *flat, *weights)
