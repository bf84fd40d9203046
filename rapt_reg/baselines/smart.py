"""SMART (Jiang et al., 2020) as MT-DNN's ``SmartPerturbation``, under RAPT's call shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import divergence as div
from ..discovery import BlocksSpec
from ..errors import RaptRegError
from ..noise import scale_noise
from ..regularizer import Output, PerturbationRegularizer, Step, check_int, check_number

SMART_NORMS = ("inf", "l2")
_STABLE_KL_EPS = 1e-6
REENTRANT = (
    "SMART's ascent step needs the gradient with respect to its noise, which reentrant "
    "gradient checkpointing cannot give (torch.utils.checkpoint(use_reentrant=True) allows no "
    "torch.autograd.grad, and runs its region under no_grad). Use use_reentrant=False "
    "(gradient_checkpointing_kwargs={'use_reentrant': False})"
)  # MT-DNN's stable_kl epsilon (fixed there too; not SMART's `epsilon`)


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


class SmartRegularizer(PerturbationRegularizer):
    """SMART's smoothness-inducing adversarial regularizer, as MT-DNN's ``SmartPerturbation``.

    Each call perturbs the embedding output (layer 0: the hidden states entering the first
    block call, positions already added, so nothing is applied twice) and returns
    ``alpha * divergence(f(x + delta), f(x))`` where ``delta`` comes from ``k`` ascent steps:

    1. ``delta ~ N(0, noise_var^2)``: MT-DNN multiplies a standard normal by ``noise_var``, so
       despite its name ``noise_var`` is a *standard deviation*; kept here for parity.
    2. ``k`` times: one noisy pass; ``g = d ascent_loss / d delta`` with the clean output as a
       fixed target; if ``||g||`` is NaN/inf the step is skipped (penalty 0, counted in
       :meth:`stats`, no parameter gradient touched, as MT-DNN returns 0); else
       ``delta <- (delta + step_size * g) / (||delta + step_size * g|| + epsilon)``, the norm
       taken per token over the hidden features (or per sequence with ``per_sequence``).
    3. A last noisy pass with ``delta`` detached gives the penalty (its gradient reaches the
       parameters only).

    As written in MT-DNN, step 2 normalises ``delta + step_size * g`` rather than clipping it
    to a ball, so after one step every token's noise has inf-norm close to 1, whatever
    ``noise_var``. A call costs ``k + 1`` noisy forwards and ``k`` input-gradient passes; the
    backward then runs through the clean and the last noisy graph.

    Parameter map to MT-DNN (``SmartPerturbation`` / ``mt_dnn`` options): ``alpha`` =
    ``adv_alpha``, ``k`` = ``adv_k``, ``step_size`` = ``adv_step_size``, ``noise_var`` =
    ``adv_noise_var``, ``epsilon`` = ``adv_epsilon``, ``norm`` = ``adv_p_norm``,
    ``per_sequence`` = ``adv_norm_level=1``, ``divergence="sym_kl"`` = ``SymKlCriterion`` (the
    default ``adv_loss``), ``ascent_divergence="stable_kl"`` = the ``stable_kl(...,
    reduce=False)`` of the ascent step. Where MT-DNN computes the embedding once per step and
    reuses it, each pass here recomputes it: identical without dropout; with dropout each pass
    draws its own embedding-dropout mask.

    Args:
        model: The model; its blocks are found as for RAPT (``blocks=``, ``prefer=``).
        alpha: Weight of the penalty.
        k: Number of projected ascent steps (``0`` keeps the raw Gaussian noise).
        step_size: Ascent step size.
        noise_var: Standard deviation of the initial noise (MT-DNN's name, see above).
        epsilon: Added to the norm in the projection.
        norm: ``"inf"`` (MT-DNN's default) or ``"l2"``.
        per_sequence: Normalise over each example's positions and features together instead
            of per token (MT-DNN's ``norm_level=1``).
        divergence: Penalty between the final noisy and the clean outputs: ``"sym_kl"`` (default),
            ``"kl"``, ``"js"``, ``"mse"`` or a callable ``(noisy, clean) -> per-position``.
        ascent_divergence: Loss the ascent steps climb, summed over positions as in MT-DNN.
            None: ``"stable_kl"`` (MT-DNN's) unless ``divergence`` is ``"mse"`` or a callable,
            in which case the penalty's own divergence.
        blocks: Override block discovery (a dotted path or a list of modules).
        prefer: Part of a dotted path that wins when the model has several stacks.
        generator: A CPU ``torch.Generator`` seeding the initial noise; None uses the global
            RNG (one draw per call, before any forward).
        nonfinite: ``"raise"`` or ``"skip"`` for a NaN/inf *penalty* (a NaN/inf ascent gradient
            is always skipped, as in MT-DNN).
        head: As for :class:`~rapt_reg.RandomPerturbationRegularizer` (the ascent loss is
            then made from the head's input too).

    Raises:
        ValueError: (a :class:`~rapt_reg.RaptRegError`) for bad arguments or no blocks found.

    Example:
        >>> layer = nn.TransformerEncoderLayer(16, 2, dropout=0.0, batch_first=True)
        >>> model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
        ...                       nn.Linear(16, 3))
        >>> x = torch.randn(2, 5, 16)
        >>> with SmartRegularizer(model, k=1) as reg:
        ...     logits, penalty = reg.pair(lambda: model(x))
        ...     (logits.logsumexp(-1).mean() + penalty).backward()
        >>> bool(penalty > 0)
        True
    """

    _stats_prefix = "smart"
    _noise_knob = "step_size or noise_var"

    def __init__(
        self,
        model: nn.Module,
        *,
        alpha: float = 1.0,
        k: int = 1,
        step_size: float = 1e-3,
        noise_var: float = 1e-5,
        epsilon: float = 1e-6,
        norm: str = "inf",
        per_sequence: bool = False,
        divergence: Union[str, Callable[..., torch.Tensor]] = "sym_kl",
        ascent_divergence: Union[str, Callable[..., torch.Tensor], None] = None,
        blocks: BlocksSpec = None,
        prefer: Optional[str] = "auto",
        generator: Optional[torch.Generator] = None,
        nonfinite: str = "raise",
        head: Union[None, str, nn.Module] = None,
    ) -> None:
        if norm not in SMART_NORMS:
            raise RaptRegError(f"unknown norm {norm!r}: use one of {SMART_NORMS}")
        self.k = check_int("k (ascent steps)", k)
        self.step_size = check_number("step_size", step_size)
        self.noise_var = check_number("noise_var", noise_var)
        self.epsilon = check_number("epsilon", epsilon)
        self.norm, self.per_sequence = norm, bool(per_sequence)
        if ascent_divergence is None:
            plain = divergence == "mse" or callable(divergence)
            ascent_divergence = divergence if plain else "stable_kl"
        self.ascent_divergence = (
            stable_kl if ascent_divergence == "stable_kl" else div.resolve(ascent_divergence)
        )
        super().__init__(
            model,
            alpha=alpha,
            divergence=divergence,
            generator=generator,
            nonfinite=nonfinite,
            blocks=blocks,
            prefer=prefer,
            head=head,
        )

    def _step(self, noisy_forward: Callable[[], Output], step: Step) -> torch.Tensor:
        """``k`` ascent steps on the embedding-output noise, then the penalty pass."""
        if step.segment_ids is not None and self.per_sequence:
            raise RaptRegError(
                "SmartRegularizer(per_sequence=True) does not support segment_ids (packed "
                "rows): use per_sequence=False, whose per-token norm needs no segments"
            )
        noise = _Noise(seed=self._rng.getrandbits(62), noise_mask=step.noise_mask)
        target, mask = step.clean.detach(), step.mask
        for _ in range(self.k):
            with torch.enable_grad():
                noisy = self._noisy_pass(noisy_forward, 0, self._perturb(noise, ascent=True))
                if not noisy.requires_grad:
                    raise RaptRegError(
                        "the noisy output does not depend on the noise (no gradient): does "
                        "noisy_forward run the model under torch.no_grad() or detach its output?"
                    )
                # MT-DNN sums the ascent loss over examples (reduce=False); the core's reduction
                # (masked positions left out, float32) averages, so scale back to a sum.
                mean = self._divergence(self.ascent_divergence, noisy, target, step)
                positions = noisy.shape[:-1].numel() if mask is None else mask.bool().sum()
                leaf = noise.value
                assert leaf is not None  # the pass was verified to have added it
                grad = self._ascent_gradient(mean * positions, leaf)
            if not bool(torch.isfinite(grad.norm())):
                self._skipped += 1
                return self._zero(step.clean)
            with torch.no_grad():
                noise.value = self._project(leaf + self.step_size * grad, noise)
            noise.value.requires_grad_()  # the next ascent pass differentiates with respect to it
        noisy = self._noisy_pass(noisy_forward, 0, self._perturb(noise, ascent=False))
        return self._penalty(noisy, step)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(k={self.k}, step_size={self.step_size}, "
            f"noise_var={self.noise_var}, alpha={self.alpha}, norm={self.norm!r})"
        )

    # -- internals ----------------------------------------------------------------------------

    def _project(self, x: torch.Tensor, noise: _Noise) -> torch.Tensor:
        # MT-DNN's _norm_grad: divide by (norm + epsilon). Not scale_noise's norm, which clamps
        # instead of adding epsilon: with noise_var-sized values (1e-5) the additive 1e-6
        # changes the result by a few percent. scale_noise(norm=None) only zeroes padding.
        x = scale_noise(
            x, eta=0.0, norm=None, batch_dim=noise.batch_dim, noise_mask=noise.noise_mask
        )
        if self.per_sequence:
            dims: tuple[int, ...] = tuple(d for d in range(x.ndim) if d != noise.batch_dim)
        else:
            dims = (-1,)
        if self.norm == "inf":
            size = x.abs().amax(dim=dims, keepdim=True)
        else:
            size = x.square().sum(dim=dims, keepdim=True).sqrt()
        return x / (size + self.epsilon)

    @staticmethod
    def _ascent_gradient(loss: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        """``d loss / d leaf``, or a RaptRegError where reentrant checkpointing forbids it."""
        try:
            return torch.autograd.grad(loss, leaf)[0]
        except RuntimeError as exc:
            if "use_reentrant" not in str(exc):
                raise
            raise RaptRegError(REENTRANT) from exc

    def _perturb(self, noise: _Noise, *, ascent: bool) -> Callable[..., torch.Tensor]:
        """The noise of one pass: drawn at the first, then the current (projected) value."""

        @torch.compiler.disable
        def perturb(hidden: torch.Tensor, batch_dim: int) -> torch.Tensor:
            # Called again with the same hidden states when a checkpointed first block is
            # recomputed in backward: it must return the same tensor (the same leaf, in an
            # ascent pass, so that the gradient reaches it).
            if ascent and not torch.is_grad_enabled():  # inside a reentrant region
                raise RaptRegError(REENTRANT)
            if noise.value is None:
                noise.batch_dim = batch_dim
                gen = self._noise_source(hidden.device, noise.seed)
                work = torch.promote_types(hidden.dtype, torch.float32)
                sample = torch.randn(hidden.shape, generator=gen, device=hidden.device, dtype=work)
                sample = scale_noise(
                    sample * self.noise_var, eta=0.0, norm=None, batch_dim=batch_dim,
                    noise_mask=noise.noise_mask,
                )  # fmt: skip
                noise.value = sample.to(hidden.dtype).requires_grad_(ascent)
            elif noise.value.shape != hidden.shape:
                raise RaptRegError(
                    f"the embedding output changed shape between SMART's passes "
                    f"({tuple(noise.value.shape)} -> {tuple(hidden.shape)}): every call of "
                    "noisy_forward must run the same batch"
                )
            return noise.value if ascent else noise.value.detach()

        return perturb


@dataclass
class _Noise:
    """SMART's current perturbation, shared by the hook closure and the ascent loop."""

    seed: int
    value: Optional[torch.Tensor] = None
    noise_mask: Optional[torch.Tensor] = None  # [batch, seq], as given
    batch_dim: int = 0  # of the embedding output, as the hook saw it
