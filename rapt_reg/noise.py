"""Sampling and scaling of the perturbation: pure tensor functions.

Algorithm 1, lines 5-6 of the RAPT paper: ``delta ~ N(0, sigma^2 I)``, then
``delta <- eta * delta / ||delta||_inf``. The norm is taken per example, over all of that
example's positions and features, so every example's noise has inf-norm exactly ``eta`` and
``sigma`` cancels.
"""

from __future__ import annotations

from typing import Optional

import torch

NORMS = ("inf", "l2", None)

# The smallest divisor used when scaling; only reached when a sample is exactly zero.
_TINY = 1e-30


def _reduce_dims(ndim: int, batch_dim: int, per_token: bool) -> tuple[int, ...]:
    """Dimensions a norm reduces over: all but the batch dim (and the positions, per token)."""
    if per_token:
        return (ndim - 1,)
    return tuple(d for d in range(ndim) if d != batch_dim % ndim)


def scale_noise(
    delta: torch.Tensor,
    *,
    eta: float,
    norm: Optional[str] = "inf",
    batch_dim: int = 0,
    per_token: bool = False,
) -> torch.Tensor:
    """Rescale raw noise so that each example (or each token) has norm ``eta``.

    Args:
        delta: Raw noise, e.g. ``[batch, seq, hidden]``.
        eta: Target norm (the paper's eta).
        norm: ``"inf"`` (the paper), ``"l2"``, or ``None`` to return ``delta`` unscaled.
        batch_dim: Which dimension indexes examples.
        per_token: Scale each position's feature vector separately instead of each example.

    Returns:
        A tensor of the same shape and dtype as ``delta``.

    Example:
        >>> d = scale_noise(torch.randn(2, 3, 4), eta=2.0)
        >>> d.flatten(1).abs().amax(1)
        tensor([2., 2.])
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
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

    Returns:
        The noise tensor.
    """
    work_dtype = torch.promote_types(dtype, torch.float32)
    sample_device = generator.device if generator is not None else device
    delta = torch.randn(shape, dtype=work_dtype, device=sample_device, generator=generator)
    delta = scale_noise(delta * sigma, eta=eta, norm=norm, batch_dim=batch_dim, per_token=per_token)
    return delta.to(device=device, dtype=dtype)
