"""Sampling and scaling of the perturbation: pure tensor functions.

Algorithm 1, lines 5-6 of the RAPT paper: ``delta ~ N(0, sigma^2 I)``, then
``delta <- eta * delta / ||delta||_inf``. The norm is taken per example, over all of that
example's positions and features, so every example's noise has inf-norm exactly ``eta`` and
``sigma`` cancels.

Padded and packed batches: with ``noise_mask`` (True on real tokens) padding gets no noise
and each example's norm is taken over its real tokens only, so the noise on real tokens does
not depend on how much padding the batch holds; with ``segment_ids`` every (row, segment) pair
of a packed batch is scaled as one example. Both are given ``[batch, seq]``, whatever the
layout of the hidden states (``batch_dim=0``: ``[batch, seq, ...]``; ``batch_dim=1``:
``[seq, batch, ...]``). Everything is vectorised: no host syncs, no boolean indexing.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import RaptRegError

NORMS = ("inf", "l2", None)
ETA_SCALES = ("absolute", "hidden_rms")
"""What eta is measured in: absolute (the paper), or RMS(h) of each example's hidden states."""

# The smallest divisor used when scaling; only reached when a sample is exactly zero (or an
# example has no real token, whose noise is then zero).
_TINY = 1e-30


def _reduce_dims(ndim: int, batch_dim: int, per_token: bool) -> tuple[int, ...]:
    """Dimensions a norm reduces over: all but the batch dim (and the positions, per token)."""
    if per_token:
        return (ndim - 1,)
    return tuple(d for d in range(ndim) if d != batch_dim % ndim)


def check_token_masks(
    noise_mask: Optional[torch.Tensor],
    segment_ids: Optional[torch.Tensor],
    shape: Optional[torch.Size | tuple[int, ...]] = None,
    batch_dim: int = 0,
) -> None:
    """Raise a :class:`~rapt_reg.RaptRegError` unless the masks fit hidden states of ``shape``.

    Args:
        noise_mask: None, or a bool tensor ``[batch, seq]``.
        segment_ids: None, or an integer tensor ``[batch, seq]``.
        shape: Shape of the hidden states; None checks types only.
        batch_dim: Which dimension of ``shape`` indexes examples (the other of the first two
            indexes positions).

    Raises:
        RaptRegError: naming the shapes expected and received, and the fix.
    """
    given = [
        (n, m)
        for n, m in (("noise_mask", noise_mask), ("segment_ids", segment_ids))
        if m is not None
    ]
    for name, value in given:
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise RaptRegError(f"{name} must be a tensor [batch, seq], got {got}")
    if noise_mask is not None and noise_mask.dtype != torch.bool:
        raise RaptRegError(
            f"noise_mask must be a bool tensor (True on real tokens), got {noise_mask.dtype}: "
            "pass attention_mask.bool()"
        )
    if segment_ids is not None and (
        segment_ids.is_floating_point()
        or segment_ids.is_complex()
        or segment_ids.dtype == torch.bool
    ):
        raise RaptRegError(
            f"segment_ids must be an integer tensor (one id per packed example), got "
            f"{segment_ids.dtype}: pass e.g. (position_ids == 0).cumsum(-1)"
        )
    if shape is None or not given:
        return
    if len(shape) < 2 or batch_dim % len(shape) not in (0, 1):
        raise RaptRegError(
            f"noise_mask/segment_ids need hidden states [batch, seq, ...] or [seq, batch, ...], "
            f"but the perturbed hidden states have shape {tuple(shape)} with batch_dim="
            f"{batch_dim}: leave them out for this model"
        )
    batch_dim %= len(shape)
    expected = (shape[batch_dim], shape[1 - batch_dim])
    for name, value in given:
        if tuple(value.shape) != expected:
            raise RaptRegError(
                f"{name} has shape {tuple(value.shape)} but the perturbed hidden states "
                f"{tuple(shape)} (batch_dim={batch_dim}) need [batch, seq] = {expected}: pass "
                f"the {name} of the same batch, as seen by the perturbed blocks (e.g. the "
                "encoder's attention_mask, not the decoder's)"
            )


def _keep(noise_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``noise_mask`` on ``like``'s device, broadcastable to batch-first ``like``."""
    return noise_mask.to(like.device).reshape(*noise_mask.shape, *(1,) * (like.ndim - 2))


def token_mask_like(
    noise_mask: torch.Tensor, hidden: torch.Tensor, batch_dim: int = 0
) -> torch.Tensor:
    """``noise_mask`` ``[batch, seq]`` as a bool tensor broadcastable to ``hidden``'s layout.

    Raises:
        RaptRegError: if it does not fit (see :func:`check_token_masks`).
    """
    check_token_masks(noise_mask, None, hidden.shape, batch_dim)
    keep = noise_mask.to(hidden.device)
    keep = keep.t() if batch_dim % hidden.ndim == 1 else keep
    return keep.reshape(*keep.shape, *(1,) * (hidden.ndim - 2))


def _segment_total(values: torch.Tensor, segment_ids: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per position, the ``reduce`` ("amax" or "sum") of ``values`` over its (row, segment).

    Any integer ids work (not only contiguous runs from 0): sorting each row ranks them into
    group numbers in ``[0, seq)``, which ``scatter_reduce`` can index, all on the device.
    """
    ids = segment_ids.to(values.device)
    sorted_ids, order = ids.sort(dim=1)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = torch.empty_like(order).scatter_(1, order, starts.long().cumsum(1) - 1)
    # values >= 0 here, so zeros are a neutral start for "amax" as well as for "sum".
    totals = torch.zeros_like(values).scatter_reduce(1, group, values, reduce=reduce)
    return totals.gather(1, group)


def _group_total(
    per_position: torch.Tensor, per_token: bool, segment_ids: Optional[torch.Tensor], reduce: str
) -> torch.Tensor:
    """``per_position`` ``[batch, seq]`` reduced over each position's example (or segment)."""
    if per_token:
        return per_position
    if segment_ids is not None:
        return _segment_total(per_position, segment_ids, reduce)
    if reduce == "amax":
        return per_position.amax(1, keepdim=True)
    return per_position.sum(1, keepdim=True)


def _masked_scale(
    delta: torch.Tensor,
    eta: float,
    norm: str,
    per_token: bool,
    noise_mask: Optional[torch.Tensor],
    segment_ids: Optional[torch.Tensor],
) -> torch.Tensor:
    """:func:`scale_noise` with masks, on batch-first ``delta`` ``[batch, seq, ...]``."""
    if noise_mask is not None:
        delta = torch.where(_keep(noise_mask, delta), delta, 0.0)
    features = tuple(range(2, delta.ndim))
    if norm == "inf":
        size = delta.abs().amax(dim=features) if features else delta.abs()
        size = _group_total(size, per_token, segment_ids, "amax")
    else:
        size = delta.square().sum(dim=features) if features else delta.square()
        size = _group_total(size, per_token, segment_ids, "sum").sqrt()
    size = size.reshape(*size.shape, *(1,) * len(features))
    return delta * (eta / size.clamp_min(_TINY))


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
    """Rescale raw noise so that each example (or each token) has norm ``eta``.

    Args:
        delta: Raw noise, e.g. ``[batch, seq, hidden]``.
        eta: Target norm (the paper's eta).
        norm: ``"inf"`` (the paper), ``"l2"``, or ``None`` to return ``delta`` unscaled
            (masked positions still zeroed).
        batch_dim: Which dimension indexes examples.
        per_token: Scale each position's feature vector separately instead of each example.
        noise_mask: Optional bool ``[batch, seq]``, True on real tokens. False positions get
            exactly zero noise, and each example's norm is taken over its True positions
            only. An example with no True position gets no noise (zero, not an error).
        segment_ids: Optional integer ``[batch, seq]`` for packed rows: each (row, segment id)
            pair is scaled as one example. Ignored with ``per_token``.

    Returns:
        A tensor of the same shape and dtype as ``delta``.

    Raises:
        RaptRegError: for an unknown ``norm``, or masks that do not fit ``delta``.

    Example:
        >>> d = scale_noise(torch.randn(2, 3, 4), eta=2.0)
        >>> d.flatten(1).abs().amax(1)
        tensor([2., 2.])
        >>> mask = torch.tensor([[True, True, False], [True, False, False]])
        >>> d = scale_noise(torch.randn(2, 3, 4), eta=2.0, noise_mask=mask)
        >>> bool((d[~mask] == 0).all())
        True
        >>> torch.stack([d[0, :2].abs().max(), d[1, :1].abs().max()]).round(decimals=4)
        tensor([2., 2.])
    """
    if norm not in NORMS:
        raise RaptRegError(f"norm must be one of {NORMS}, got {norm!r}")
    if noise_mask is not None or segment_ids is not None:
        check_token_masks(noise_mask, segment_ids, delta.shape, batch_dim)
        first = delta.movedim(batch_dim, 0)
        if norm is None:
            scaled = (
                first if noise_mask is None else torch.where(_keep(noise_mask, first), first, 0.0)
            )
        else:
            scaled = _masked_scale(first, eta, norm, per_token, noise_mask, segment_ids)
        return scaled.movedim(0, batch_dim)
    if norm is None:
        return delta
    dims = _reduce_dims(delta.ndim, batch_dim, per_token)
    if not dims:  # one number per example: it is its own norm (reducing over () means all)
        size = delta.abs()
    elif norm == "inf":
        size = delta.abs().amax(dim=dims, keepdim=True)
    else:
        size = delta.square().sum(dim=dims, keepdim=True).sqrt()
    return delta * (eta / size.clamp_min(_TINY))


def hidden_rms(
    hidden: torch.Tensor,
    *,
    batch_dim: int = 0,
    per_token: bool = False,
    noise_mask: Optional[torch.Tensor] = None,
    segment_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Root mean square of ``hidden`` per example (or segment, or token), over real tokens.

    The scale ``eta_scale="hidden_rms"`` multiplies the noise by: with it, each example's
    noise has inf-norm ``eta * RMS(h)``, so ``eta`` is relative to that example's hidden
    states. Computed without gradient, in float32 (at least).

    Args:
        hidden: Hidden states, e.g. ``[batch, seq, hidden]``.
        batch_dim: Which dimension indexes examples.
        per_token: One RMS per position (over its features) instead of per example.
        noise_mask: Optional bool ``[batch, seq]``: only True positions count (as in
            :func:`scale_noise`); an example without any has RMS 0.
        segment_ids: Optional integer ``[batch, seq]``: one RMS per (row, segment).

    Returns:
        A tensor with ``hidden``'s number of dims, broadcastable to it (size 1 along the dims
        reduced over), of dtype float32 or float64.

    Example:
        >>> hidden_rms(torch.full((2, 3, 4), 3.0)).flatten()
        tensor([3., 3.])
    """
    work = hidden.detach().to(torch.promote_types(hidden.dtype, torch.float32))
    if noise_mask is None and segment_ids is None:
        dims = _reduce_dims(work.ndim, batch_dim, per_token)
        if not dims:
            return work.abs()
        return work.square().mean(dim=dims, keepdim=True).sqrt()
    check_token_masks(noise_mask, segment_ids, work.shape, batch_dim)
    first = work.movedim(batch_dim, 0)
    features = tuple(range(2, first.ndim))
    square = first.square()
    count = torch.full(
        first.shape[:2], float(math.prod(first.shape[2:])), dtype=first.dtype, device=first.device
    )
    if noise_mask is not None:
        square = torch.where(_keep(noise_mask, first), square, 0.0)
        count = torch.where(noise_mask.to(first.device), count, 0.0)
    total = square.sum(dim=features) if features else square
    total = _group_total(total, per_token, segment_ids, "sum")
    count = _group_total(count, per_token, segment_ids, "sum")
    rms = (total / count.clamp_min(1.0)).sqrt()
    return rms.reshape(*rms.shape, *(1,) * len(features)).movedim(0, batch_dim)


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

    The sample and its scaling are computed in at least float32 and cast to ``dtype`` at the
    end, so a half-precision model gets noise whose norm is ``eta`` rounded once.

    Args:
        shape: Shape of the hidden states to perturb.
        eta: Target norm per example (the paper's eta); unused when ``norm`` is None.
        sigma: Standard deviation of the raw Gaussian (cancels unless ``norm`` is None).
        norm: ``"inf"``, ``"l2"`` or ``None`` (raw ``N(0, sigma^2)`` noise).
        batch_dim: Which dimension indexes examples.
        per_token: Scale each position separately.
        dtype: dtype of the returned noise.
        device: Device of the returned noise (the generator's device if it has one).
        generator: Source of randomness; the global RNG when None.
        noise_mask: Bool ``[batch, seq]``, True on real tokens (see :func:`scale_noise`).
        segment_ids: Integer ``[batch, seq]`` for packed rows (see :func:`scale_noise`).
        scale: Optional tensor broadcastable to ``shape`` (e.g. :func:`hidden_rms` of the
            hidden states) multiplying the scaled noise before the cast: the norm becomes
            ``eta * scale``.

    Returns:
        The noise tensor.
    """
    work_dtype = torch.promote_types(dtype, torch.float32)
    sample_device = generator.device if generator is not None else device
    delta = torch.randn(shape, dtype=work_dtype, device=sample_device, generator=generator)
    delta = scale_noise(
        delta * sigma,
        eta=eta,
        norm=norm,
        batch_dim=batch_dim,
        per_token=per_token,
        noise_mask=noise_mask,
        segment_ids=segment_ids,
    )
    if scale is not None:
        delta = delta * scale.to(device=delta.device, dtype=work_dtype)
    return delta.to(device=device, dtype=dtype)
