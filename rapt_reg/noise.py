"""Sampling and scaling of the perturbation: pure tensor functions.

Algorithm 1, lines 5-6 of the RAPT paper: ``delta ~ N(0, sigma^2 I)``, then
``delta <- eta * delta / ||delta||_inf``, the norm taken per example over all of its positions
and features, so every example's noise has inf-norm exactly ``eta`` and ``sigma`` cancels.

One vectorised path (no host syncs): states viewed batch-first as ``[batch, positions,
features]``, norms over the positions a ``noise_mask`` keeps; masks are ``[batch, seq]`` in any
layout (:func:`scale_noise`), so padding changes no example's noise.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import RaptRegError

NORMS = ("inf", "l2", None)
ETA_SCALES = ("absolute", "hidden_rms")
"""What eta is measured in: absolute (the paper), or RMS(h) of each example's hidden states."""

_TINY = 1e-30  # the smallest divisor: reached only by an all-zero sample (or no real token)


def check_token_masks(
    noise_mask: Optional[torch.Tensor],
    segment_ids: Optional[torch.Tensor],
    shape: Optional[tuple[int, ...]] = None,
    batch_dim: int = 0,
    stack: str = "",
) -> None:
    """Refuse masks other than bool / integer ``[batch, seq]`` of hidden states of ``shape``
    (None: types only) whose ``batch_dim`` indexes examples; the error names ``stack``."""
    both = {"noise_mask": noise_mask, "segment_ids": segment_ids}
    given = {name: mask for name, mask in both.items() if mask is not None}
    for name, value in given.items():
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise RaptRegError(f"{name} must be a tensor [batch, seq], got {got}")
    if noise_mask is not None and noise_mask.dtype != torch.bool:
        raise RaptRegError(
            f"noise_mask must be a bool tensor (True on real tokens), got {noise_mask.dtype}: "
            "pass attention_mask.bool()"
        )
    ids = torch.int64 if segment_ids is None else segment_ids.dtype
    if ids.is_floating_point or ids.is_complex or ids == torch.bool:
        raise RaptRegError(
            f"segment_ids must be an integer tensor (one id per packed example), got {ids}: "
            "pass e.g. (position_ids == 0).cumsum(-1)"
        )
    if shape is None or not given:
        return
    where = f"the hidden states of {stack!r}" if stack else "the perturbed hidden states"
    fix = "pass blocks= naming the stack whose [batch, seq] they describe"
    if len(shape) < 2 or batch_dim % len(shape) not in (0, 1):
        raise RaptRegError(
            f"noise_mask/segment_ids need hidden states [batch, seq, ...] or [seq, batch, ...], "
            f"but {where} have shape {tuple(shape)} with batch_dim={batch_dim}: leave them out "
            f"for this model, or {fix}"
        )
    batch_dim %= len(shape)
    expected = (shape[batch_dim], shape[1 - batch_dim])
    for name, value in given.items():
        if tuple(value.shape) != expected:
            raise RaptRegError(
                f"{name} has shape {tuple(value.shape)} but {where} {tuple(shape)} (batch_dim="
                f"{batch_dim}) need [batch, seq] = {expected}: pass the {name} of the same batch "
                f"as those blocks see it (the encoder's, not the decoder's), or {fix}"
            )


def _groups(x: torch.Tensor, batch_dim: int, noise_mask: Optional[torch.Tensor]):
    """``x`` as ``[batch, positions, features]`` and ``noise_mask`` as ``[..., 1]`` (None: all)."""
    first = x.movedim(batch_dim, 0) if x.ndim else x.reshape(1)
    positions = first.shape[1] if first.ndim > 1 else 1
    groups = first.reshape(first.shape[0], positions, math.prod(first.shape[2:]))
    if noise_mask is None:
        return groups, groups.new_ones((*groups.shape[:2], 1), dtype=torch.bool)
    return groups, noise_mask.to(groups.device)[..., None]


def _total(values: torch.Tensor, per_token: bool, segment_ids: Optional[torch.Tensor], reduce: str):
    """``values`` ``[batch, positions]`` (>= 0) reduced ("amax"/"sum") over each one's group:
    the position (``per_token``), its (row, segment) pair (segment ids ranked by sorting each
    row, so any integers work), or its row."""
    if per_token:
        return values
    if segment_ids is None:
        return values.amax(1, keepdim=True) if reduce == "amax" else values.sum(1, keepdim=True)
    sorted_ids, order = segment_ids.to(values.device).sort(dim=1)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = torch.empty_like(order).scatter_(1, order, starts.long().cumsum(1) - 1)
    totals = torch.zeros_like(values).scatter_reduce(1, group, values, reduce=reduce)
    return totals.gather(1, group)


def scale_noise(
    delta: torch.Tensor,
    *,
    eta: float,
    norm: Optional[str] = "inf",
    batch_dim: int = 0,
    per_token: bool = False,
    noise_mask: Optional[torch.Tensor] = None,
    segment_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Rescale raw noise so that each example (or position) has norm ``eta``; zero padding.

    Args:
        delta: Raw noise, e.g. ``[batch, seq, hidden]``.
        eta: Target norm (the paper's eta).
        norm: ``"inf"`` (the paper), ``"l2"``, or ``None`` (unscaled; padding still zeroed).
        batch_dim: Which dimension indexes examples.
        per_token: Scale each position (the dimension after the batch's) on its own.
        noise_mask: Optional bool ``[batch, seq]``, True on real tokens: the others get no
            noise, and an example's norm is over its real tokens (none: no noise).
        segment_ids: Optional integer ``[batch, seq]``: each (row, id) pair is one example.

    Example:
        >>> _ = torch.manual_seed(0)  # float rounding: other draws may give 1.9999999
        >>> d = scale_noise(torch.randn(2, 3, 4), eta=2.0)
        >>> d.flatten(1).abs().amax(1)
        tensor([2., 2.])
        >>> mask = torch.tensor([[True, True, False], [True, False, False]])
        >>> d = scale_noise(torch.randn(2, 3, 4), eta=2.0, noise_mask=mask)
        >>> bool((d[~mask] == 0).all()), d[0, :2].abs().max().item(), d[1, 0].abs().max().item()
        (True, 2.0, 2.0)
    """
    if norm not in NORMS:
        raise RaptRegError(f"norm must be one of {NORMS}, got {norm!r}")
    check_token_masks(noise_mask, segment_ids, tuple(delta.shape), batch_dim)
    groups, keep = _groups(delta, batch_dim, noise_mask)
    groups = torch.where(keep, groups, 0.0)
    if norm is not None:
        if norm == "inf":
            size = _total(groups.abs().amax(-1), per_token, segment_ids, "amax")
        else:
            size = _total(groups.square().sum(-1), per_token, segment_ids, "sum").sqrt()
        groups = groups * (eta / size.clamp_min(_TINY))[..., None]
    return groups.reshape(delta.movedim(batch_dim, 0).shape).movedim(0, batch_dim)


def hidden_rms(
    hidden: torch.Tensor,
    *,
    batch_dim: int = 0,
    per_token: bool = False,
    noise_mask: Optional[torch.Tensor] = None,
    segment_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """RMS of ``hidden`` per example (segment, position) over its real tokens, no gradient.

    ``eta_scale="hidden_rms"`` multiplies the noise by it, so that ``eta`` is relative to the
    hidden states' size. Arguments as for :func:`scale_noise`; the result is float32 (at
    least), broadcastable to ``hidden`` (size 1 along the dims reduced over).

    Example:
        >>> hidden_rms(torch.full((2, 3, 4), 3.0)).flatten()
        tensor([3., 3.])
    """
    check_token_masks(noise_mask, segment_ids, tuple(hidden.shape), batch_dim)
    work = hidden.detach().to(torch.promote_types(hidden.dtype, torch.float32))
    groups, keep = _groups(work, batch_dim, noise_mask)
    total = _total(torch.where(keep, groups.square(), 0.0).sum(-1), per_token, segment_ids, "sum")
    count = _total(keep[..., 0] * float(groups.shape[-1]), per_token, segment_ids, "sum")
    rms = (total / count.clamp_min(1.0)).sqrt()
    if hidden.ndim < 2:
        return rms.reshape(hidden.shape)
    return rms.reshape(*rms.shape[:2], *(1,) * (hidden.ndim - 2)).movedim(0, batch_dim)


def sample_noise(
    shape: torch.Size | tuple[int, ...],
    *,
    eta: float,
    sigma: float = 1.0,
    norm: Optional[str] = "inf",
    batch_dim: int = 0,
    per_token: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: Optional[torch.Generator] = None,
    noise_mask: Optional[torch.Tensor] = None,
    segment_ids: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Draw ``delta ~ N(0, sigma^2 I)`` and rescale it with :func:`scale_noise`.

    Drawn (on the generator's device) and scaled in float32 at least, cast to ``dtype`` last
    (a half-precision noise's norm is ``eta`` rounded once), returned on ``device``. ``scale``
    (e.g. :func:`hidden_rms`) multiplies it before the cast: the norm becomes ``eta * scale``.
    """
    work_dtype = torch.promote_types(dtype, torch.float32)
    sample_device = generator.device if generator is not None else device
    delta = torch.randn(shape, dtype=work_dtype, device=sample_device, generator=generator)
    masks = {"noise_mask": noise_mask, "segment_ids": segment_ids}
    delta = scale_noise(
        delta * sigma, eta=eta, norm=norm, batch_dim=batch_dim, per_token=per_token, **masks
    )
    if scale is not None:
        delta = delta * scale.to(device=delta.device, dtype=work_dtype)
    return delta.to(device=device, dtype=dtype)
