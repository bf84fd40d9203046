"""Divergences between the noisy and the clean output: the ``l(f(x + delta_r), f(x))`` of Eq. 2.

Every function takes logits of shape ``[..., C]``, computes in at least float32 with autocast
off, sums over the last (class) dimension and averages over every leading dimension
("batchmean" over examples and, for token-level outputs, positions). An optional ``mask`` of
shape ``[...]`` keeps only the positions where it is true (padding excluded).

The per-position functions below (:func:`sym_kl`, :func:`kl`, :func:`js`, :func:`mse`, and the
baselines' :func:`sym_kl_both_sides` and :func:`stable_kl`) are the formulas as written.
:func:`reduce_divergence` does not run them on whole tensors: it computes the same values and
gradients chunk by chunk over positions (see :func:`reduce_divergence`), so that a language
model's ``[batch, seq, vocab]`` logits are never copied whole in float32 nor held several times
over for backward. Any other callable is run as given, on the whole tensors.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .errors import RaptRegError

Divergence = Callable[..., torch.Tensor]

# A chunk holds at least CHUNK_BYTES of float32 [positions, classes] (4 MiB: 32 positions at a
# 32,000-word vocabulary), and at least 1/MAX_CHUNKS of all positions, so that the number of
# chunks (and of kernel launches on a GPU) stays bounded for long batches. The chunk's own
# temporaries (about six float32 copies of it) are the only memory the divergence adds.
CHUNK_BYTES = 4 * 2**20
MAX_CHUNKS = 64

# The epsilon of MT-DNN's stable_kl (fixed there too; distinct from SMART's `epsilon`).
_STABLE_KL_EPS = 1e-6


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def sym_kl(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Symmetric KL as in MT-DNN's ``SymKlCriterion`` (the framework RAPT was built on).

    ``KL(sg(p_clean) || p_noisy) + KL(sg(p_noisy) || p_clean)``: each direction treats the
    other side as a fixed target (``sg`` = stop-gradient), so the gradient reaches both passes.
    """
    log_noisy, log_clean = F.log_softmax(noisy, -1), F.log_softmax(clean, -1)
    return _kl(log_clean.detach(), log_noisy) + _kl(log_noisy.detach(), log_clean)


def kl(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """One-way ``KL(sg(p_clean) || p_noisy)``: the clean prediction is the fixed target (VAT)."""
    return _kl(F.log_softmax(clean, -1).detach(), F.log_softmax(noisy, -1))


def js(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence, gradients through both sides."""
    log_noisy, log_clean = F.log_softmax(noisy, -1), F.log_softmax(clean, -1)
    log_mid = torch.logaddexp(log_noisy, log_clean) - math.log(2.0)
    return 0.5 * (_kl(log_noisy, log_mid) + _kl(log_clean, log_mid))


def mse(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the last dimension, for regression heads."""
    return (noisy - clean).square().sum(-1)


def sym_kl_both_sides(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """fairseq R3F's symmetric KL: ``KL(p_clean || p_noisy) + KL(p_noisy || p_clean)``.

    Unlike :func:`sym_kl` neither side is a fixed target: the gradient of each direction
    reaches both passes through both arguments.
    """
    log_noisy, log_clean = F.log_softmax(noisy, -1), F.log_softmax(clean, -1)
    return _kl(log_clean, log_noisy) + _kl(log_noisy, log_clean)


def _log_odds(p: torch.Tensor) -> torch.Tensor:
    return -(1.0 / (p + _STABLE_KL_EPS) - 1.0 + _STABLE_KL_EPS).log()


def stable_kl(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """MT-DNN's ``stable_kl`` per position: the loss SMART's ascent steps climb.

    ``2 * sum_c p_c * (r(p_c) - r(q_c))`` with ``p = softmax(noisy)``, ``q = softmax(clean)``
    and ``r(x) = -log(1 / (x + 1e-6) - 1 + 1e-6)`` (about the log-odds), the ``r`` terms
    detached, so its gradient reaches ``noisy`` only through ``p``.
    """
    p, q = F.softmax(noisy, -1), F.softmax(clean.detach(), -1)
    return 2.0 * (p * (_log_odds(p.detach()) - _log_odds(q))).sum(-1)


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


def check_outputs(noisy: torch.Tensor, clean: torch.Tensor) -> None:
    """Refuse outputs no divergence can compare: different shapes, or not floating point.

    Raises:
        RaptRegError: naming both shapes, or the offending dtype.
    """
    for name, t in (("noisy", noisy), ("clean", clean)):
        if not t.is_floating_point():
            raise RaptRegError(
                f"{name} output has dtype {t.dtype}: the divergence needs floating-point logits, "
                "not class indices or booleans"
            )
    if noisy.shape != clean.shape:
        raise RaptRegError(
            f"noisy output has shape {tuple(noisy.shape)} but clean output has shape "
            f"{tuple(clean.shape)}: both passes must return logits of the same shape"
        )


# -- chunked values and gradients ---------------------------------------------------------------
#
# Per chunk of positions, in the working dtype: ``values`` is the per-position divergence (the
# same expression as the formula above), ``grads`` its gradient with respect to the noisy and
# the clean logits for an upstream gradient ``g`` ([n, 1]) per position, or None for a side the
# formula gives no gradient (a stop-gradient target). Each gradient is the formula's, written
# out: through log_softmax, an upstream gradient ``u`` on the log-probabilities ``lp`` becomes
# ``u - exp(lp) * sum(u)``.


def _softmax_back(u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Gradient on the logits from ``u`` on ``log_softmax`` (whose ``exp`` is ``p``)."""
    return u - p * u.sum(-1, keepdim=True)


def _sym_kl_grads(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, both: bool) -> tuple:
    lp, lq = F.log_softmax(a, -1), F.log_softmax(b, -1)
    p, q = lp.exp(), lq.exp()
    # sym_kl: KL(sg(q) || p) differentiates through lp only, KL(sg(p) || q) through lq only.
    # sym_kl_both_sides: each KL through both sides; d/dlp of sum p (lp - lq) is p (lp - lq) + p.
    u_noisy, u_clean = -q * g, -p * g
    if both:
        diff = lp - lq
        u_noisy = u_noisy + (p * diff + p) * g
        u_clean = u_clean + (q - q * diff) * g
    return _softmax_back(u_noisy, p), _softmax_back(u_clean, q)


def _kl_grads(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> tuple:
    p, q = F.softmax(a, -1), F.softmax(b, -1)
    return _softmax_back(-q * g, p), None  # the clean side is a fixed target


def _js_grads(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> tuple:
    # With m = (p + q) / 2, d JS / d lp = p (lp - log m) / 2: the terms through log m cancel.
    lp, lq = F.log_softmax(a, -1), F.log_softmax(b, -1)
    p, q = lp.exp(), lq.exp()
    log_mid = torch.logaddexp(lp, lq) - math.log(2.0)
    half_g = 0.5 * g
    return (
        _softmax_back(p * (lp - log_mid) * half_g, p),
        _softmax_back(q * (lq - log_mid) * half_g, q),
    )


def _mse_grads(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> tuple:
    step = 2.0 * (a - b) * g
    return step, -step


def _stable_kl_grads(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> tuple:
    p, q = F.softmax(a, -1), F.softmax(b, -1)
    u = 2.0 * (_log_odds(p) - _log_odds(q)) * g  # d/dp; softmax backward: p * (u - sum p u)
    return p * (u - (p * u).sum(-1, keepdim=True)), None


# per-position function -> gradient function of its chunks (looked up by identity)
_GRADS: list[tuple[Divergence, Callable[..., tuple]]] = [
    (sym_kl, lambda a, b, g: _sym_kl_grads(a, b, g, both=False)),
    (sym_kl_both_sides, lambda a, b, g: _sym_kl_grads(a, b, g, both=True)),
    (kl, _kl_grads),
    (js, _js_grads),
    (mse, _mse_grads),
    (stable_kl, _stable_kl_grads),
]
_NOISY_ONLY = (kl, stable_kl)  # their clean side gets no gradient at all


def _grads_of(per_position: Divergence) -> Optional[Callable[..., tuple]]:
    return next((grads for fn, grads in _GRADS if fn is per_position), None)


def _chunk(
    x: torch.Tensor, keep: Optional[torch.Tensor], start: int, stop: int, work: torch.dtype
) -> torch.Tensor:
    """Rows ``start:stop`` of ``x`` in ``work``, zero where ``keep`` is false (even NaN there)."""
    rows = x[start:stop]
    if keep is not None:
        rows = torch.where(keep[start:stop, None], rows, rows.new_zeros(()))
    return rows.to(work)


class _ChunkedSum(torch.autograd.Function):
    """``sum over kept positions of per_position(noisy, clean)``, chunk by chunk.

    Forward keeps only its inputs (the logits themselves, alive anyway); backward recomputes
    each chunk's softmaxes and writes the two gradients chunk by chunk.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        noisy: torch.Tensor,
        clean: torch.Tensor,
        keep: Optional[torch.Tensor],
        per_position: Divergence,
        grads_of_chunk: Callable[..., tuple],
        rows: int,
        work: torch.dtype,
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=work, device=noisy.device)
        for start in range(0, noisy.shape[0], rows):
            stop = start + rows
            values = per_position(
                _chunk(noisy, keep, start, stop, work), _chunk(clean, keep, start, stop, work)
            )
            if keep is not None:
                values = torch.where(keep[start:stop], values, values.new_zeros(()))
            total = total + values.sum()
        ctx.save_for_backward(noisy, clean, keep)
        noisy_only = any(per_position is fn for fn in _NOISY_ONLY)
        ctx.plan = (grads_of_chunk, rows, work, noisy_only)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple:
        noisy, clean, keep = ctx.saved_tensors
        grads_of_chunk, rows, work, noisy_only = ctx.plan
        want_noisy, want_clean = ctx.needs_input_grad[:2]
        grad_noisy = torch.empty_like(noisy) if want_noisy else None
        grad_clean = torch.empty_like(clean) if want_clean and not noisy_only else None
        if grad_noisy is None and grad_clean is None:
            return None, None, None, None, None, None, None
        upstream = grad_total.to(work)
        with torch.autocast(device_type=noisy.device.type, enabled=False):
            for start in range(0, noisy.shape[0], rows):
                stop = start + rows
                g = upstream.expand(min(stop, noisy.shape[0]) - start, 1)
                if keep is not None:
                    g = torch.where(keep[start:stop, None], g, g.new_zeros(()))
                grads = grads_of_chunk(
                    _chunk(noisy, keep, start, stop, work),
                    _chunk(clean, keep, start, stop, work),
                    g,
                )
                for out, grad in zip((grad_noisy, grad_clean), grads):
                    if out is not None:
                        out[start:stop] = grad
        return grad_noisy, grad_clean, None, None, None, None, None


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
) -> torch.Tensor:
    """Apply ``per_position`` in float32 (autocast off) and average over the leading dims.

    For the divergences of this module (:func:`sym_kl`, :func:`kl`, :func:`js`, :func:`mse`,
    and the baselines' :func:`sym_kl_both_sides` and :func:`stable_kl`) the value and both
    gradients are computed chunk by chunk over positions, each chunk cast to float32 (float64
    stays float64) on its own: the memory this adds is one chunk's temporaries, never a
    float32 copy of the whole logits, and backward recomputes each chunk's softmaxes instead of
    keeping them. A chunk holds ``max(4 MiB / (4 * C), positions / 64)`` positions
    (:func:`chunk_rows`; ``chunk_positions`` overrides it). Values and gradients are the
    formulas' (to rounding). Logits that cannot be viewed as ``[positions, C]`` (sliced along
    the sequence, say) are copied once in their own dtype: to leave a position out, pass a mask
    rather than a slice. Any other callable runs on the whole tensors as given (masked
    positions zeroed).

    Args:
        per_position: A function ``(noisy, clean) -> [...]`` such as :func:`sym_kl`.
        noisy: Logits of the perturbed pass, ``[..., C]``.
        clean: Logits of the clean pass, same shape.
        mask: Optional boolean (or 0/1) ``[...]`` tensor; only positions where it is true are
            compared, so whatever the padded positions hold (even NaN) never reaches the
            penalty or its gradient. A mask with no true entry gives 0. Applied with
            ``torch.where``: no host synchronisation, no gathered copy.
        chunk_positions: Positions per chunk for the built-in divergences (None: by size).

    Returns:
        A float32 (or float64) scalar.

    Raises:
        RaptRegError: if shapes differ, the outputs are not floating point, the mask does
            not match the leading dimensions, or ``chunk_positions`` is not a positive int.
    """
    check_outputs(noisy, clean)
    keep = None
    if mask is not None:
        if mask.shape != noisy.shape[:-1]:
            raise RaptRegError(
                f"mask has shape {tuple(mask.shape)} but the outputs' leading dimensions are "
                f"{tuple(noisy.shape[:-1])}: pass one entry per position (e.g. the attention mask)"
            )
        keep = mask.to(device=noisy.device, dtype=torch.bool)
    if chunk_positions is not None and (
        isinstance(chunk_positions, bool)
        or not isinstance(chunk_positions, int)
        or chunk_positions < 1
    ):
        raise RaptRegError(f"chunk_positions must be an int >= 1 or None, got {chunk_positions!r}")
    work = torch.promote_types(noisy.dtype, torch.float32)
    positions, classes = noisy.shape[:-1].numel(), noisy.shape[-1]
    # The mean over kept positions; an all-false mask (or no position) gives 0 / 1 = 0.
    count = max(positions, 1) if keep is None else keep.sum().clamp_min(1)
    grads_of_chunk = _grads_of(per_position)
    with torch.autocast(device_type=noisy.device.type, enabled=False):
        if grads_of_chunk is not None:
            total = _ChunkedSum.apply(
                noisy.reshape(positions, classes),
                clean.reshape(positions, classes),
                None if keep is None else keep.reshape(positions),
                per_position,
                grads_of_chunk,
                chunk_positions or chunk_rows(positions, classes),
                work,
            )
            return total / count
        if keep is not None:  # zero (not gather) what is masked, so NaN there cannot leak
            noisy = torch.where(keep[..., None], noisy, noisy.new_zeros(()))
            clean = torch.where(keep[..., None], clean, clean.new_zeros(()))
        values = per_position(noisy.to(work), clean.to(work))
        if keep is not None:
            values = torch.where(keep, values, values.new_zeros(()))
        return values.sum() / count
