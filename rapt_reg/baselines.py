"""SMART and R3F, the regularizers RAPT is compared with, under RAPT's call shape.

Both take ``reg(noisy_forward, clean_output, mask=None)`` and ``reg.pair(forward)`` like
:class:`~rapt_reg.RandomPerturbationRegularizer`, install their hooks once at construction
(idle outside a call, nothing stored on the user's modules) and are removed with
:meth:`remove` or by leaving a ``with`` block.

- :class:`SmartRegularizer` follows MT-DNN's ``SmartPerturbation`` (the code the SMART and
  RAPT papers were run with): noise on the embedding output (layer 0, the input of the first
  block, reached through the same hooks RAPT uses), ``k`` projected ascent steps, then a
  symmetric KL between the adversarial and the clean outputs.
- :class:`R3FRegularizer` follows fairseq's ``sentence_prediction_r3f`` criterion: uniform or
  normal noise on the *token* embeddings (the output of the input-embedding module, before
  positions, scaling or LayerNorm are applied) and a symmetric KL with gradients on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from . import divergence as div
from .discovery import BlocksSpec, unwrap_model
from .divergence import stable_kl, sym_kl_both_sides
from .errors import RaptRegError
from .hooks import NoisyPass
from .noise import check_token_masks, token_mask_like
from .regularizer import Output, PerturbationRegularizer, check_number, logits_of
from .replay import carry

SMART_NORMS = ("inf", "l2")
R3F_NOISE = ("uniform", "normal")


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
        prefer: Optional[str] = "encoder",
        generator: Optional[torch.Generator] = None,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__(
            model, alpha=alpha, divergence=divergence, generator=generator, nonfinite=nonfinite
        )
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise RaptRegError(f"k (ascent steps) must be an int >= 0, got {k!r}")
        if norm not in SMART_NORMS:
            raise RaptRegError(f"unknown norm {norm!r}: use one of {SMART_NORMS}")
        self.k = k
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
        self.stacks = self._find_stacks(blocks, prefer)
        self._seed = 0
        self._seed_rng()
        self._hooks = self._install()

    def __call__(
        self,
        noisy_forward: Callable[[], Output],
        clean_output: Output,
        *,
        mask: Optional[torch.Tensor] = None,
        noise_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run ``k + 1`` noisy passes (``k`` ascent steps, then the penalty pass).

        Args:
            noisy_forward: Zero-argument callable running the model on the batch that
                produced ``clean_output``; it is called ``k + 1`` times.
            clean_output: The clean forward's output (a tensor or has ``.logits``).
            mask: Optional boolean ``[...]`` mask over the leading dims of the logits; positions
                where it is false count neither in the ascent loss nor in the penalty.
            noise_mask: Optional bool ``[batch, seq]``, True on real tokens: padding gets no
                noise, initial or after an ascent step (and, with ``per_sequence``, each
                example's norm is taken over its real tokens).
            segment_ids: Accepted for the shared call shape; SMART's noise is normalised per
                token, so packed segments need nothing. Refused with ``per_sequence=True``.

        Returns:
            ``alpha * divergence(noisy, clean)``; zero when the model is in eval mode or the
            ascent gradient was not finite.

        Raises:
            RaptRegError: if the noise did not reach the model or the penalty is not finite
                (with ``nonfinite="raise"``).
        """
        self._check_callable(noisy_forward)
        check_token_masks(noise_mask, segment_ids)
        if segment_ids is not None and self.per_sequence:
            raise RaptRegError(
                "SmartRegularizer(per_sequence=True) does not support segment_ids (packed "
                "rows): use per_sequence=False, whose per-token norm needs no segments"
            )
        clean_logits = logits_of(clean_output)
        if not self._training():
            return self._eval_penalty(clean_logits)
        self._seed = self._draw_seed()
        noise = _Noise(noise_mask=noise_mask)
        target = clean_logits.detach()
        for _ in range(self.k):
            with torch.enable_grad():
                noisy_logits = self._noisy_pass(noisy_forward, noise, ascent=True)
                if not noisy_logits.requires_grad:
                    raise RaptRegError(
                        "the noisy output does not depend on the noise (no gradient): does "
                        "noisy_forward run the model under torch.no_grad()?"
                    )
                # MT-DNN sums the ascent loss over examples (reduce=False); the core's reduction
                # (masked positions left out, float32) averages, so scale back to a sum.
                mean = div.reduce_divergence(self.ascent_divergence, noisy_logits, target, mask)
                positions = noisy_logits.shape[:-1].numel() if mask is None else mask.bool().sum()
                leaf = noise.value
                assert leaf is not None  # the pass was verified to have added it
                (grad,) = torch.autograd.grad(mean * positions, leaf)
            if not bool(torch.isfinite(grad.norm())):
                self._skipped += 1
                return self._zero(clean_logits)
            with torch.no_grad():
                noise.value = self._project(leaf + self.step_size * grad, noise.keep)
            noise.value.requires_grad_()  # the next ascent pass differentiates with respect to it
        noisy_logits = self._noisy_pass(noisy_forward, noise, ascent=False)
        return self._penalty(noisy_logits, clean_logits, mask)

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before. Safe to call twice."""
        self._hooks.remove()
        self._last_noise_ratio = None

    def __repr__(self) -> str:
        where = ", ".join(repr(s.path or s.names[0]) for s in self.stacks)
        return (
            f"{type(self).__name__}(blocks={where}, k={self.k}, step_size={self.step_size}, "
            f"noise_var={self.noise_var}, alpha={self.alpha}, norm={self.norm!r})"
        )

    # -- internals ----------------------------------------------------------------------------

    def _batch_dim(self) -> int:
        return self._hooks.batch_dim(0) if len(self.stacks) == 1 else 0

    def _project(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        # MT-DNN's _norm_grad: divide by (norm + epsilon). Not rapt_reg.noise.scale_noise, which
        # clamps instead of adding epsilon: with noise_var-sized values (1e-5) the additive
        # 1e-6 changes the result by a few percent.
        if keep is not None:
            x = torch.where(keep, x, 0.0)
        if self.per_sequence:
            dims: tuple[int, ...] = tuple(d for d in range(x.ndim) if d != self._batch_dim())
        else:
            dims = (-1,)
        if self.norm == "inf":
            size = x.abs().amax(dim=dims, keepdim=True)
        else:
            size = x.square().sum(dim=dims, keepdim=True).sqrt()
        return x / (size + self.epsilon)

    def _noisy_pass(
        self, forward: Callable[[], Output], noise: _Noise, *, ascent: bool
    ) -> torch.Tensor:
        """The logits of one pass with ``noise`` on the embedding output."""

        def perturb(hidden: torch.Tensor, batch_dim: int) -> torch.Tensor:
            # Called again with the same hidden states when a checkpointed first block is
            # recomputed in backward: it must return the same tensor (the same leaf, in an
            # ascent pass, so that the gradient reaches it).
            if noise.value is None:
                gen = self._noise_source(hidden.device, self._seed)
                sample = torch.randn(
                    hidden.shape,
                    generator=gen,
                    device=hidden.device,
                    dtype=torch.promote_types(hidden.dtype, torch.float32),
                )
                sample = sample * self.noise_var
                if noise.noise_mask is not None:
                    noise.keep = token_mask_like(noise.noise_mask, hidden, batch_dim)
                    sample = torch.where(noise.keep, sample, 0.0)
                noise.value = sample.to(hidden.dtype).requires_grad_(ascent)
            elif noise.value.shape != hidden.shape:
                raise RaptRegError(
                    f"the embedding output changed shape between SMART's passes "
                    f"({tuple(noise.value.shape)} -> {tuple(hidden.shape)}): every call of "
                    "noisy_forward must run the same batch"
                )
            return noise.value if ascent else noise.value.detach()

        p = NoisyPass(layer=0, perturb=perturb)
        self._run_noisy(self._hooks, forward, p)
        return carry(logits_of(p.output), p.replay)


@dataclass
class _Noise:
    """SMART's current perturbation, shared by the hook closure and the ascent loop."""

    value: Optional[torch.Tensor] = None
    noise_mask: Optional[torch.Tensor] = None  # [batch, seq], as given
    keep: Optional[torch.Tensor] = None  # the same, broadcastable to the hidden states


EmbeddingsSpec = Union[str, nn.Module, Sequence[Union[str, nn.Module]], None]


def find_token_embeddings(model: nn.Module, embeddings: EmbeddingsSpec = None) -> list[str]:
    """Dotted paths of the modules whose output is the token embeddings of ``model``.

    Without ``embeddings``: the model's ``get_input_embeddings()`` (transformers models) and
    every ``nn.Embedding`` sharing its weight (T5's encoder embeds through its own
    ``embed_tokens``, tied to ``shared``); for other models, their only ``nn.Embedding``.

    Raises:
        RaptRegError: when nothing (or several unrelated embeddings) could be the token
            embeddings; the message lists them and names ``embeddings=``.
    """
    model = unwrap_model(model)
    names = {id(m): n for n, m in model.named_modules()}
    if embeddings is not None:
        items = [embeddings] if isinstance(embeddings, (str, nn.Module)) else list(embeddings)
        paths = []
        for item in items:
            if isinstance(item, str):
                try:
                    model.get_submodule(item)
                except AttributeError as exc:
                    raise RaptRegError(f"embeddings={item!r} is not a submodule: {exc}") from None
                paths.append(item)
            elif isinstance(item, nn.Module) and id(item) in names:
                paths.append(names[id(item)])
            else:
                raise RaptRegError(
                    f"embeddings= entry {item!r} is not a submodule of {type(model).__name__}: "
                    "pass modules of the model itself or dotted paths"
                )
        if not paths:
            raise RaptRegError("embeddings= is empty: pass a dotted path or a module")
        return paths
    all_embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    get_input = getattr(model, "get_input_embeddings", None)
    source = get_input() if callable(get_input) else None
    if isinstance(source, nn.Module) and id(source) in names:
        weight = getattr(source, "weight", None)
        tied = [
            n
            for n, m in all_embeddings
            if m is not source and weight is not None and m.weight is weight
        ]
        return [names[id(source)], *tied]
    if len(all_embeddings) == 1:
        return [all_embeddings[0][0]]
    listed = ", ".join(n for n, _ in all_embeddings) or "none"
    raise RaptRegError(
        f"cannot tell which module of {type(model).__name__} makes the token embeddings "
        f"(nn.Embedding modules: {listed}; no get_input_embeddings()). Pass "
        "embeddings='<dotted path>' naming the module whose output the noise goes on."
    )


class R3FRegularizer(PerturbationRegularizer):
    """R3F (Aghajanyan et al., 2020) as fairseq's ``sentence_prediction_r3f`` criterion.

    One noisy pass per call, with noise added to the *token embeddings*: the output of the
    model's input-embedding module (found by :func:`find_token_embeddings`: for BERT
    ``word_embeddings``, for T5 the encoder's ``embed_tokens``), before positions, scaling,
    LayerNorm or dropout are applied. As in fairseq the noisy pass starts from the embeddings
    *detached* (``token_embeddings.detach().clone() + noise``), so the embedding table gets no
    gradient through the noisy pass, and the symmetric KL keeps gradients on both sides
    (:func:`sym_kl_both_sides`), averaged over examples (fairseq's ``sum / batch size``).
    Only the first call of an embedding module in a forward is perturbed (the encoder's, in
    an encoder-decoder model).

    Args:
        model: The model.
        eps: Noise size: ``U(-eps, eps)`` (``noise="uniform"``, fairseq's default) or
            ``N(0, eps^2)`` (``"normal"``).
        noise: ``"uniform"`` or ``"normal"``.
        alpha: Weight of the penalty (fairseq's ``r3f_lambda``).
        divergence: None for fairseq's symmetric KL, or any divergence RAPT accepts.
        embeddings: Override discovery of the token-embedding module: a dotted path, a
            module, or a list of them (the first that runs in a forward is perturbed).
        generator: A CPU ``torch.Generator`` seeding the noise; None uses the global RNG.
        nonfinite: ``"raise"`` or ``"skip"`` for a NaN/inf penalty.

    Raises:
        ValueError: (a :class:`~rapt_reg.RaptRegError`) for bad arguments, or when the token
            embeddings cannot be found.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(24, 3))
        >>> ids = torch.randint(0, 10, (4, 3))
        >>> with R3FRegularizer(model, eps=0.1) as reg:
        ...     logits, penalty = reg.pair(lambda: model(ids))
        >>> bool(penalty > 0), reg.embeddings
        (True, ['0'])
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
        embeddings: EmbeddingsSpec = None,
        generator: Optional[torch.Generator] = None,
        nonfinite: str = "raise",
    ) -> None:
        super().__init__(
            model,
            alpha=alpha,
            divergence=sym_kl_both_sides if divergence is None else divergence,
            generator=generator,
            nonfinite=nonfinite,
        )
        if noise not in R3F_NOISE:
            raise RaptRegError(f"unknown noise {noise!r}: use one of {R3F_NOISE}")
        self.eps = check_number("eps", eps)
        self.noise = noise
        self.embeddings = find_token_embeddings(model, embeddings)
        root = unwrap_model(model)
        self._modules = [root.get_submodule(path) for path in self.embeddings]
        self._armed: Optional[_R3FPass] = None
        self._seed = 0
        self._seed_rng()
        self._handles: Optional[list[Any]] = [
            m.register_forward_hook(self._hook) for m in dict.fromkeys(self._modules)
        ]

    def __call__(
        self,
        noisy_forward: Callable[[], Output],
        clean_output: Output,
        *,
        mask: Optional[torch.Tensor] = None,
        noise_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run ``noisy_forward`` once with noise on the token embeddings; return the penalty.

        Args:
            noisy_forward: Zero-argument callable running the model on the same batch.
            clean_output: The clean forward's output (a tensor or has ``.logits``).
            mask: Optional ``[...]`` mask over the leading dims of the logits.
            noise_mask: Optional bool ``[batch, seq]``, True on real tokens: padding gets no
                noise (the token embeddings must be ``[batch, seq, hidden]``).
            segment_ids: Accepted for the shared call shape; R3F's noise is elementwise, so
                packed segments need nothing.

        Returns:
            ``alpha * divergence(noisy, clean)``; zero in eval mode.

        Raises:
            RaptRegError: if no token-embedding module ran in the noisy pass, or the penalty is
                not finite (with ``nonfinite="raise"``).
        """
        self._check_callable(noisy_forward)
        check_token_masks(noise_mask, segment_ids)
        clean_logits = logits_of(clean_output)
        if not self._training():
            return self._eval_penalty(clean_logits)
        if self._handles is None:
            raise RaptRegError("this regularizer was removed: build a new one")
        if self._armed is not None:
            raise RaptRegError(
                "a regularizer call was made inside another one's forward pass of the same "
                "regularizer: call it once per step, outside the model's forward"
            )
        self._seed = self._draw_seed()
        self._armed = state = _R3FPass(noise_mask=noise_mask)
        try:
            noisy_logits = logits_of(noisy_forward())
        finally:
            self._armed = None
        if state.ratio is None:
            raise RaptRegError(
                f"the noise did not reach the model: none of {self.embeddings} ran during the "
                "noisy pass (was it given inputs_embeds instead of token ids?). Pass "
                "embeddings='<dotted path>' naming the module that makes the token embeddings."
            )
        self._last_noise_ratio = state.ratio
        return self._penalty(noisy_logits, clean_logits, mask)

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before. Safe to call twice."""
        for handle in self._handles or ():
            handle.remove()
        self._handles = None
        self._last_noise_ratio = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(embeddings={self.embeddings}, eps={self.eps}, "
            f"noise={self.noise!r}, alpha={self.alpha})"
        )

    @torch.compiler.disable
    def _sample(self, like: torch.Tensor) -> torch.Tensor:
        gen = self._noise_source(like.device, self._seed)
        work = torch.promote_types(like.dtype, torch.float32)
        if self.noise == "uniform":
            sample = torch.rand(like.shape, generator=gen, device=like.device, dtype=work)
            sample = sample * (2 * self.eps) - self.eps
        else:
            sample = torch.randn(like.shape, generator=gen, device=like.device, dtype=work)
            sample = sample * self.eps
        return sample.to(like.dtype)

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        state = self._armed
        if state is None or state.ratio is not None:
            return None
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            raise RaptRegError(
                f"the token-embedding module {type(module).__name__} returned "
                f"{type(output).__name__}, not a floating-point tensor: pass embeddings= "
                "naming a module that returns the embeddings"
            )
        delta = self._sample(output)
        if state.noise_mask is not None:
            delta = torch.where(token_mask_like(state.noise_mask, output), delta, 0.0)
        with torch.no_grad():
            state.ratio = delta.float().norm() / output.detach().float().norm().clamp_min(1e-30)
        return output.detach() + delta


@dataclass
class _R3FPass:
    ratio: Optional[torch.Tensor] = None
    noise_mask: Optional[torch.Tensor] = None
