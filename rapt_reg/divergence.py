"""Divergences between the noisy and the clean output: the ``l(f(x + delta_r), f(x))`` of Eq. 2.

Every function takes logits of shape ``[..., C]``, computes in at least float32 with autocast
off, sums over the last (class) dimension and averages over every leading dimension
("batchmean" over examples and, for token-level outputs, positions). An optional ``mask`` of
shape ``[...]`` keeps only the positions where it is true (padding excluded).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from .errors import RaptRegError

Divergence = Callable[..., torch.Tensor]


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


def reduce_divergence(
    per_position: Divergence,
    noisy: torch.Tensor,
    clean: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Apply ``per_position`` in float32 (autocast off) and average over the leading dims.

    Args:
        per_position: A function ``(noisy, clean) -> [...]`` such as :func:`sym_kl`.
        noisy: Logits of the perturbed pass, ``[..., C]``.
        clean: Logits of the clean pass, same shape.
        mask: Optional boolean (or 0/1) ``[...]`` tensor; only positions where it is true are
            compared, so whatever the padded positions hold (even NaN) never reaches the
            penalty or its gradient. A mask with no true entry gives 0.

    Returns:
        A float32 (or float64) scalar.

    Raises:
        RaptRegError: if shapes differ, the outputs are not floating point, or the mask does
            not match the leading dimensions.
    """
    check_outputs(noisy, clean)
    if mask is not None:
        if mask.shape != noisy.shape[:-1]:
            raise RaptRegError(
                f"mask has shape {tuple(mask.shape)} but the outputs' leading dimensions are "
                f"{tuple(noisy.shape[:-1])}: pass one entry per position (e.g. the attention mask)"
            )
        keep = mask.to(device=noisy.device, dtype=torch.bool)
        noisy, clean = noisy[keep], clean[keep]
    work = torch.promote_types(noisy.dtype, torch.float32)
    with torch.autocast(device_type=noisy.device.type, enabled=False):
        values = per_position(noisy.to(work), clean.to(work))
        return values.mean() if values.numel() else values.sum()
