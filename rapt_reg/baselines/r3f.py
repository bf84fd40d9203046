"""R3F (Aghajanyan et al., 2020) under RAPT's call shape and noise path."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..discovery import BlocksSpec
from ..divergence import kl_terms
from ..errors import RaptRegError
from ..noise import scale_noise
from ..regularizer import Output, PerturbationRegularizer, Step, check_number

R3F_NOISE = ("uniform", "normal")


def sym_kl_both_sides(noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """fairseq R3F's symmetric KL: ``KL(p_clean || p_noisy) + KL(p_noisy || p_clean)``.

    Unlike :func:`sym_kl` neither side is a fixed target: the gradient of each direction
    reaches both passes through both arguments.
    """
    log_noisy, log_clean = F.log_softmax(noisy, -1), F.log_softmax(clean, -1)
    return kl_terms(log_clean, log_noisy) + kl_terms(log_noisy, log_clean)


class R3FRegularizer(PerturbationRegularizer):
    """R3F as fairseq's ``sentence_prediction_r3f`` criterion, on the embedding output.

    One noisy pass per call, with ``U(-eps, eps)`` (or ``N(0, eps^2)``) noise added to the
    embedding output, the hidden states entering the first block call (layer 0, RAPT's
    embedding layer, through the same hooks and checkpoint replay), and the symmetric KL with
    gradients on both sides (:func:`~rapt_reg.divergence.sym_kl_both_sides`), averaged over
    examples. Two departures from fairseq, for one noise path: fairseq perturbs the *token*
    embeddings (before positions and LayerNorm) and detaches them, so the embedding table gets
    no gradient through its noisy pass; here the noise goes where SMART's and RAPT's does and
    the gradient flows through (which is what keeps it exact under reentrant checkpointing).

    Args:
        model: The model; its blocks are found as for RAPT (``blocks=``, ``prefer=``).
        eps: Noise size: ``U(-eps, eps)`` (``noise="uniform"``, fairseq's default) or
            ``N(0, eps^2)`` (``"normal"``).
        noise: ``"uniform"`` or ``"normal"``.
        alpha: Weight of the penalty (fairseq's ``r3f_lambda``).
        divergence: None for fairseq's symmetric KL, or any divergence RAPT accepts.
        blocks: Override block discovery (a dotted path or a list of modules).
        prefer: Part of a dotted path that wins when the model has several stacks.
        generator: A CPU ``torch.Generator`` seeding this regularizer's RNG once.
        nonfinite: ``"raise"`` or ``"skip"`` for a NaN/inf penalty.
        head: As for :class:`~rapt_reg.RandomPerturbationRegularizer`.

    Raises:
        ValueError: (a :class:`~rapt_reg.RaptRegError`) for bad arguments or no blocks found.

    Example:
        >>> layer = nn.TransformerEncoderLayer(8, 2, dropout=0.0, batch_first=True)
        >>> model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
        ...                       nn.Linear(8, 3))
        >>> with R3FRegularizer(model, eps=0.1) as reg:
        ...     logits, penalty = reg.pair(lambda: model(torch.randn(4, 3, 8)))
        >>> bool(penalty > 0)
        True
    """

    _stats_prefix = "r3f"
    _noise_knob = "eps"

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float = 1e-5,
        noise: str = "uniform",
        alpha: float = 1.0,
        divergence: Union[str, Callable[..., torch.Tensor], None] = None,
        blocks: BlocksSpec = None,
        prefer: Optional[str] = "auto",
        generator: Optional[torch.Generator] = None,
        nonfinite: str = "raise",
        head: Union[None, str, nn.Module] = None,
    ) -> None:
        if noise not in R3F_NOISE:
            raise RaptRegError(f"unknown noise {noise!r}: use one of {R3F_NOISE}")
        self.eps, self.noise = check_number("eps", eps), noise
        super().__init__(
            model,
            alpha=alpha,
            divergence=sym_kl_both_sides if divergence is None else divergence,
            generator=generator,
            nonfinite=nonfinite,
            blocks=blocks,
            prefer=prefer,
            head=head,
        )

    def _step(self, noisy_forward: Callable[[], Output], step: Step) -> torch.Tensor:
        """One noisy pass with R3F's noise at the embedding output; the penalty."""
        seed, noise_mask = self._rng.getrandbits(62), step.noise_mask  # not step: its logits

        @torch.compiler.disable
        def delta(hidden: torch.Tensor, batch_dim: int) -> torch.Tensor:
            gen = self._noise_source(hidden.device, seed)
            work = torch.promote_types(hidden.dtype, torch.float32)
            draw = torch.rand if self.noise == "uniform" else torch.randn
            sample = draw(hidden.shape, generator=gen, device=hidden.device, dtype=work)
            sample = (
                sample * (2 * self.eps) - self.eps if self.noise == "uniform" else sample * self.eps
            )
            # Elementwise noise: segments need nothing; padding gets none.
            sample = scale_noise(
                sample, eta=0.0, norm=None, batch_dim=batch_dim, noise_mask=noise_mask
            )
            return sample.to(hidden.dtype)

        noisy = self._noisy_pass(noisy_forward, 0, delta)
        return self._penalty(noisy, step)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps}, noise={self.noise!r}, alpha={self.alpha})"
