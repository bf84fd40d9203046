"""RAPT's Algorithm 1, lines 5-6, as pure tensor functions without host syncs: draw
``delta ~ N(0, sigma^2 I)``, then ``delta <- eta * delta / ||delta||_inf`` per example."""

from __future__ import annotations

from typing import Optional

import torch

from .errors import RaptRegError

NORMS = ("inf", "l2", None)
ETA_SCALES = ("absolute", "hidden_rms")  # eta's unit: absolute (the paper) or an example's RMS(h)


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


def _groups(x: torch.Tensor, batch_dim: int, mask: torch.Tensor | None, ids: torch.Tensor | None):
    """Check the masks; ``x`` as ``[batch, positions, features]`` zeroed off ``mask``; the mask."""
    check_token_masks(mask, ids, tuple(x.shape), batch_dim)
    groups = (x.movedim(batch_dim, 0) if x.ndim > 1 else x.reshape(-1, 1)).unsqueeze(-1).flatten(2)
    keep = groups.new_ones(groups.shape[:2], dtype=torch.bool) if mask is None else mask
    keep = keep.to(groups.device)[..., None]
    return torch.where(keep, groups, 0.0), keep


def _total(values: torch.Tensor, per_token: bool, segment_ids: torch.Tensor | None, reduce: str):
    """``values`` ``[batch, positions]`` (>= 0) reduced over each one's token, segment or row."""
    if per_token:
        return values
    if segment_ids is None:
        return values.amax(1, keepdim=True) if reduce == "amax" else values.sum(1, keepdim=True)
    sorted_ids, order = segment_ids.to(values.device).sort(dim=1)
    rank = sorted_ids.diff(dim=1, prepend=sorted_ids[:, :1]).ne(0).cumsum(1)  # 0, 1, ... a row
    group = torch.empty_like(order).scatter_(1, order, rank)
    return torch.zeros_like(values).scatter_reduce(1, group, values, reduce=reduce).gather(1, group)


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
        noise_mask: Optional bool ``[batch, seq]``: only True (real) tokens get noise, set the norm.
        segment_ids: Optional integer ``[batch, seq]``: each (row, id) pair is one example.

    Example:
        >>> mask = torch.tensor([[True, True], [True, False]])
        >>> scale_noise(torch.tensor([[1.0, -4.0], [0.5, 8.0]]), eta=2.0, noise_mask=mask).tolist()
        [[0.5, -2.0], [2.0, 0.0]]
    """
    if norm not in NORMS:
        raise RaptRegError(f"norm must be one of {NORMS}, got {norm!r}")
    groups, _ = _groups(delta, batch_dim, noise_mask, segment_ids)
    if norm is not None:
        if norm == "inf":
            size = _total(groups.abs().amax(-1), per_token, segment_ids, "amax")
        else:
            size = _total(groups.square().sum(-1), per_token, segment_ids, "sum").sqrt()
        groups = groups * (eta / size.clamp_min(1e-30))[..., None]  # 0: all zero, or no real token
    return groups.reshape(delta.movedim(batch_dim, 0).shape).movedim(0, batch_dim)


def hidden_rms(
    hidden: torch.Tensor,
    *,
    batch_dim: int = 0,
    per_token: bool = False,
    noise_mask: Optional[torch.Tensor] = None,
    segment_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The scale of ``eta_scale="hidden_rms"``: RMS of ``hidden`` per example (segment, token) over
    its real tokens, detached, float32 at least, broadcastable; args as for :func:`scale_noise`."""
    work = hidden.detach().to(torch.promote_types(hidden.dtype, torch.float32))
    groups, keep = _groups(work, batch_dim, noise_mask, segment_ids)
    total = _total(groups.square().sum(-1), per_token, segment_ids, "sum")
    count = _total(keep[..., 0] * float(groups.shape[-1]), per_token, segment_ids, "sum")
    rms = (total / count.clamp_min(1.0)).sqrt()
    rms = rms.reshape((*rms.shape[: hidden.ndim], *(1,) * (hidden.ndim - 2)))
    return rms.movedim(0, batch_dim) if hidden.ndim else rms


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
    """Draw ``delta ~ N(0, sigma^2 I)``, rescale it with :func:`scale_noise`, times ``scale`` (e.g.
    :func:`hidden_rms`: norm ``eta * scale``), on the generator's device in float32 at least; then
    cast to ``dtype`` (norm rounded once) on ``device``."""
    work_dtype = torch.promote_types(dtype, torch.float32)
    sample_device = generator.device if generator is not None else device
    masks = {"noise_mask": noise_mask, "segment_ids": segment_ids}
    raw = sigma * torch.randn(shape, dtype=work_dtype, device=sample_device, generator=generator)
    delta = scale_noise(raw, eta=eta, norm=norm, batch_dim=batch_dim, per_token=per_token, **masks)
    return (delta if scale is None else delta * scale.to(delta)).to(device=device, dtype=dtype)
