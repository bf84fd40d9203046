"""RandomPerturbationRegularizer: RAPT (Algorithm 1, Eq. 2) as one extra loss term."""

from __future__ import annotations

import abc
import math
import random
import warnings
from typing import Any, Callable, Optional, TypeVar, Union

import torch
from torch import nn

from . import divergence as div
from .discovery import (
    BlocksSpec,
    BlockStack,
    ambiguity_error,
    find_block_stacks,
    resolve_blocks,
)
from .errors import RaptRegError
from .hooks import NoisyPass, Perturb, StackHooks
from .noise import ETA_SCALES, NORMS, check_token_masks, hidden_rms, sample_noise
from .replay import carry

Output = Any
"""A model output: a logits tensor ``[..., C]`` or an object with a ``.logits`` tensor."""

NONFINITE_POLICIES = ("raise", "skip")

# Deferred checks (non-finite penalty, exactly-zero penalty) are read on the host at most this
# many calls apart, and at every stats(): a step adds no tensor-to-host conversion.
CHECK_EVERY = 100

_Reg = TypeVar("_Reg", bound="PerturbationRegularizer")


def logits_of(output: Output) -> torch.Tensor:
    """The logits tensor of a model output (a tensor, or anything with ``.logits``)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    raise RaptRegError(
        f"cannot find logits in a {type(output).__name__}: the forward must return a tensor "
        "[..., C] or an object with a .logits tensor (wrap it: lambda: model(x)[0])"
    )


def check_number(name: str, value: float, *, allow_zero: bool = True) -> float:
    """``value`` as a float, or a RaptRegError if it is not a finite number >= 0 (> 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RaptRegError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise RaptRegError(f"{name} must be finite and {bound}, got {value!r}")
    return float(value)


class _Gate:
    """Stops the gradient of a non-finite penalty, decided on the device.

    The penalty's finiteness is known only after the divergence ran, as a device tensor; the
    logits enter the divergence through :func:`~rapt_reg.replay.carry` with this gate, so a
    non-finite penalty reaches no weight and nothing is read on the host.
    """

    open: Optional[torch.Tensor] = None

    def filter(self, grad: torch.Tensor) -> torch.Tensor:
        assert self.open is not None  # set right after the forward
        return torch.where(self.open, grad, 0.0)


class PerturbationRegularizer(abc.ABC):
    """The call shape RAPT, SMART and R3F share, and what goes with it.

    ``reg(noisy_forward, clean_output, mask=None)`` runs the noisy pass(es) and returns
    ``alpha * divergence(noisy, clean)``; ``reg.pair(forward, mask=None)`` runs the clean pass,
    then exactly that; ``remove()`` (or leaving a ``with`` block) takes the hooks away. In eval
    mode the penalty is 0 (said once). Subclasses implement ``__call__`` and ``remove``.
    """

    _stats_prefix = "rapt"
    _noise_knob = "the noise"  # named in the non-finite error

    def __init__(
        self,
        model: nn.Module,
        *,
        alpha: float,
        divergence: Union[str, Callable[..., torch.Tensor]],
        generator: Optional[torch.Generator],
        nonfinite: str,
    ) -> None:
        if isinstance(model, type) or not isinstance(model, nn.Module):
            raise RaptRegError(
                f"model must be an nn.Module instance, got {model!r}"
                + (": instantiate it first" if isinstance(model, type) else "")
            )
        if isinstance(model, nn.DataParallel):
            raise RaptRegError(
                "nn.DataParallel is not supported: its replicas run in threads that would share "
                "this regularizer's hooks and noise. Use DistributedDataParallel (one process "
                "per device, torch.distributed) and build the regularizer on the DDP model."
            )
        if nonfinite not in NONFINITE_POLICIES:
            raise RaptRegError(f"unknown nonfinite={nonfinite!r}: use one of {NONFINITE_POLICIES}")
        if generator is not None and (
            not isinstance(generator, torch.Generator) or generator.device.type != "cpu"
        ):
            raise RaptRegError("generator must be a CPU torch.Generator (noise is seeded from it)")
        self.model = model
        self.alpha = check_number("alpha", alpha)
        self.divergence = div.resolve(divergence)
        self.nonfinite = nonfinite
        self.stacks: list[BlockStack] = []
        self._generator = generator
        self._rng = random.Random()  # seeded by _seed_rng(), once every argument is checked
        self._noise_generators: dict[torch.device, torch.Generator] = {}
        self._warned_eval = False
        self._last_noise_ratio: Optional[torch.Tensor] = None
        self._skipped = 0  # steps known (on the host) to have been skipped
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (finite, zero) per call

    @abc.abstractmethod
    def __call__(
        self,
        noisy_forward: Callable[[], Output],
        clean_output: Output,
        *,
        mask: Optional[torch.Tensor] = None,
        noise_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The penalty for one step (see the subclasses)."""

    def pair(
        self,
        forward: Callable[[], Output],
        *,
        mask: Optional[torch.Tensor] = None,
        noise_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> tuple[Output, torch.Tensor]:
        """Run the clean pass, then ``self(forward, clean_output, mask=mask)``.

        Exactly the two-call form, so buffers (BatchNorm statistics), auxiliary outputs (MoE
        router logits), collectives (DDP, FSDP) and gradients are those of
        ``clean = forward(); penalty = reg(forward, clean)``.

        Args:
            forward: Zero-argument callable running the model on the batch.
            mask: As in ``__call__``.
            noise_mask: As in ``__call__``.
            segment_ids: As in ``__call__``.

        Returns:
            ``(clean_output, penalty)``.
        """
        self._check_callable(forward, "forward")
        check_token_masks(noise_mask, segment_ids)  # refused before any forward runs
        clean_output = forward()
        penalty = self(
            forward, clean_output, mask=mask, noise_mask=noise_mask, segment_ids=segment_ids
        )
        return clean_output, penalty

    @property
    def skipped_steps(self) -> int:
        """Steps whose penalty was not finite and was replaced by 0 (reads pending checks)."""
        self._read_checks()
        return self._skipped

    def stats(self) -> dict[str, float]:
        """Telemetry for logging: noise-to-hidden norm ratio of the last pass, skipped steps.

        Reading them is a host sync; this is also where deferred checks raise (see
        ``nonfinite``).
        """
        ratio = self._last_noise_ratio
        return {
            f"{self._stats_prefix}/noise_to_hidden_ratio": math.nan
            if ratio is None
            else float(ratio),
            f"{self._stats_prefix}/skipped_steps": float(self.skipped_steps),
        }

    @property
    def last_noise_to_hidden_ratio(self) -> Optional[float]:
        """``||delta|| / ||h||`` where the last noise went (whole batch, Frobenius norms)."""
        return None if self._last_noise_ratio is None else float(self._last_noise_ratio)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to draw the same layers and noise as an uninterrupted one.

        The global RNG (dropout) is not part of it: save ``torch.get_rng_state()`` with it.
        """
        return {"format": 1, "rng": self._rng.getstate(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if not isinstance(state, dict) or state.get("format") != 1:
            raise RaptRegError(
                "not a rapt_reg state dict (expected the dict returned by reg.state_dict())"
            )
        self._rng.setstate(_as_rng_state(state["rng"]))
        self._skipped = int(state["skipped_steps"])
        self._pending = []

    @abc.abstractmethod
    def remove(self) -> None:
        """Remove every hook; the model is exactly as before. Safe to call twice."""

    def __enter__(self: _Reg) -> _Reg:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- for subclasses -------------------------------------------------------------------------

    def _find_stacks(
        self, blocks: BlocksSpec, prefer: Optional[str], batch_dim: Optional[int] = None
    ) -> list[BlockStack]:
        """Discover (or resolve ``blocks=``) the candidate stacks; installs nothing."""
        if blocks is not None:
            stacks = [resolve_blocks(self.model, blocks)]
        else:
            stacks = find_block_stacks(self.model, prefer=prefer)
        if batch_dim is not None:
            stacks = [s.with_batch_dim(batch_dim) for s in stacks]
        return stacks

    def _seed_rng(self) -> None:
        """Seed this regularizer's RNG: one draw from the generator (or the global RNG).

        Layers and seeds then come from this Python RNG, so a step draws without touching any
        tensor or the global RNG. Subclasses call it last, with the hooks, so that a refused
        constructor draws nothing.
        """
        self._rng.seed(int(torch.randint(0, 2**62, (), generator=self._generator)))

    def _install(self) -> StackHooks:
        """Hook the blocks of ``self.stacks``: the constructor's last step, after every check."""
        return StackHooks(
            [s.blocks for s in self.stacks],
            [s.batch_dim for s in self.stacks],
            [s.calls_per_forward > len(s.blocks) for s in self.stacks],
        )

    @property
    def stack(self) -> BlockStack:
        """The stack of blocks being perturbed (raises while a forward has yet to choose one)."""
        if not self.stacks:
            raise RaptRegError(f"{type(self).__name__} does not perturb a stack of blocks")
        if len(self.stacks) > 1:
            raise ambiguity_error(self.stacks)
        return self.stacks[0]

    def _run_noisy(self, hooks: StackHooks, forward: Callable[[], Output], p: NoisyPass) -> None:
        """Run ``forward`` with ``p`` armed, on an RNG stream of its own; verify the noise."""
        stream = hooks.replays.stream(self._rng.getrandbits(62), self._devices())
        with stream, hooks.armed(p):
            p.output = forward()
        self._settle_stack(hooks, p)
        self._verify(p)
        self._last_noise_ratio = p.noise_ratio

    def _settle_stack(self, hooks: StackHooks, p: NoisyPass) -> None:
        """After a forward: refuse an ambiguous model, or keep only the stack that ran."""
        if p.others:
            assert p.stack is not None
            raise ambiguity_error([self.stacks[i] for i in (p.stack, *p.others)])
        if p.stack is not None and len(self.stacks) > 1:
            hooks.keep_only(p.stack)
            self.stacks = [self.stacks[p.stack]]
        if len(self.stacks) == 1 and self.stacks[0].batch_dim is None and p.calls:
            self.stacks = [self.stacks[0].with_batch_dim(hooks.batch_dim(0))]

    def _verify(self, p: NoisyPass) -> None:
        """Raise, naming the causes, when the noise of a finished pass did not reach the model."""
        if p.applied:
            return
        where = ", ".join(repr(s.path or ",".join(s.names)) for s in self.stacks)
        if p.calls == 0:
            raise RaptRegError(
                f"the noise did not reach the model: no block of {where} ran during the noisy "
                "pass. Likely causes: (1) the model was compiled with torch.compile and run "
                "before this regularizer was built, so its graph ignores the hooks - build the "
                "regularizer first, or call torch._dynamo.reset(); (2) the forward uses other "
                "modules than these - pass blocks='<dotted path>'; (3) noisy_forward did not "
                "run the model."
            )
        raise RaptRegError(
            f"the noise did not reach the model: layer {p.layer} was chosen but the noisy pass "
            f"made only {p.calls} block calls of {where}. Use max_layer <= {p.calls}, or pass "
            "blocks= naming the stack this forward runs."
        )

    def _training(self) -> bool:
        if self.stacks:
            return any(b.training for s in self.stacks for b in s.blocks)
        return self.model.training

    def _devices(self) -> set[torch.device]:
        return {p.device for p in self.model.parameters()}

    def _check_callable(self, fn: object, name: str = "noisy_forward") -> None:
        if not callable(fn):
            raise RaptRegError(
                f"{name} must be a zero-argument callable, got {type(fn).__name__}: pass "
                "lambda: model(**batch)"
            )

    def _eval_penalty(self, clean_logits: torch.Tensor) -> torch.Tensor:
        if not self._warned_eval:
            warnings.warn(
                f"the model is in eval mode: {type(self).__name__} adds noise only in training "
                "mode, so the penalty is 0 (call model.train() to regularize). This is said once.",
                stacklevel=3,
            )
            self._warned_eval = True
        return self._zero(clean_logits)

    @staticmethod
    def _zero(logits: torch.Tensor) -> torch.Tensor:
        return logits.new_zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))

    def _draw_seed(self) -> int:
        """A noise seed for this step, from this regularizer's own RNG (no tensor involved)."""
        return self._rng.getrandbits(62)

    def _noise_source(self, device: torch.device, seed: int) -> torch.Generator:
        """This regularizer's generator on ``device``, seeded with ``seed``."""
        gen = self._noise_generators.get(device)
        if gen is None:
            gen = self._noise_generators[device] = torch.Generator(device=device)
        return gen.manual_seed(seed)

    def _penalty(
        self,
        noisy_logits: torch.Tensor,
        clean_logits: torch.Tensor,
        mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """``alpha * divergence``, with the ``nonfinite`` policy applied on the device.

        A non-finite value is replaced by 0 and its gradient stopped, without a host sync; the
        step is counted, and with ``nonfinite="raise"`` the error is raised at the next check
        (the next :meth:`stats` call, or at most ``CHECK_EVERY`` calls later).
        """
        div.check_outputs(noisy_logits, clean_logits)
        if torch.is_grad_enabled() and not (
            noisy_logits.requires_grad or clean_logits.requires_grad
        ):
            raise RaptRegError(
                "neither output requires grad, so the penalty cannot train anything: are the "
                "parameters frozen, or was the clean pass run under torch.no_grad()? "
                "(To only log the penalty, call the regularizer under torch.no_grad().)"
            )
        self._maybe_read_checks()
        gate = _Gate()
        noisy, clean = carry(noisy_logits, gate), carry(clean_logits, gate)
        value = div.reduce_divergence(self.divergence, noisy, clean, mask)
        gate.open = finite = torch.isfinite(value).detach()
        penalty = self.alpha * torch.where(finite, value, torch.zeros_like(value))
        zero = (value == 0).detach() if noisy_logits.numel() else torch.zeros_like(finite)
        if mask is not None:
            zero = zero & mask.any()
        self._pending.append((finite, zero))
        return penalty

    def _maybe_read_checks(self) -> None:
        if len(self._pending) >= CHECK_EVERY:
            self._read_checks()

    def _read_checks(self) -> None:
        """Read the deferred checks on the host (one sync) and act on them."""
        if not self._pending:
            return
        finite = torch.stack([f for f, _ in self._pending]).cpu()
        zero = torch.stack([z for _, z in self._pending]).cpu()
        self._pending = []
        bad = int((~finite).sum())
        self._skipped += bad
        if bad and self.nonfinite == "raise":
            raise RaptRegError(
                f"the {type(self).__name__} penalty was NaN/inf in {bad} of the last "
                f"{len(finite)} steps (those steps' penalty was replaced by 0 and reached no "
                "weight): the noisy or the clean output holds NaN/inf. Check the clean loss and "
                f"the learning rate, lower {self._noise_knob}, or pass nonfinite='skip' to skip "
                "such steps."
            )
        self._on_zero_penalty(bool(zero.any()))

    def _on_zero_penalty(self, seen: bool) -> None:  # noqa: B027 (a no-op by default)
        """Told, at each deferred check, whether a penalty was exactly 0 (RAPT warns)."""


def _as_rng_state(state: Any) -> Any:
    """``random.Random.setstate`` wants tuples; a state that went through JSON has lists."""
    if isinstance(state, list):
        return tuple(_as_rng_state(s) for s in state)
    return state


class RandomPerturbationRegularizer(PerturbationRegularizer):
    """RAPT: perturb one randomly chosen layer with scaled Gaussian noise and penalise the change.

    Each call draws one layer ``r`` uniformly from ``{min_layer, ..., max_layer}`` (layer 0 is
    the embedding output entering the first block, layer ``r >= 1`` the output of the r-th
    block call), adds ``delta = eta * d / ||d||_inf`` with ``d ~ N(0, sigma^2 I)`` per example
    to the hidden states there during one noisy pass, and returns
    ``alpha * divergence(f(x + delta_r), f(x))`` (Eq. 2 of the paper).

    The blocks are found by :func:`rapt_reg.find_transformer_blocks`; hooks are installed once
    (after every argument is checked) and stay idle outside a call. Nothing is added to the
    model; :meth:`remove` (or leaving a ``with`` block) takes the hooks away.

    Args:
        model: The model (DDP, FSDP, ``torch.compile`` and PEFT wrappers are seen through;
            ``nn.DataParallel`` is refused). Build the regularizer *before* ``torch.compile``
            runs the model.
        eta: Noise size: every example's noise has this inf-norm (the paper's eta).
        max_layer: Highest layer that can be perturbed (the paper's max_layer; 3 in the paper).
        min_layer: Lowest layer (1 in the paper; 0 adds the embedding output).
            ``min_layer=max_layer=0`` is the paper's "RAPT (Embedding)".
        alpha: Weight of the penalty (the paper's alpha).
        sigma: Standard deviation of the raw Gaussian; it cancels when ``norm`` is set.
        norm: ``"inf"`` (the paper), ``"l2"``, or ``None`` for raw ``N(0, sigma^2)`` noise.
        divergence: ``"sym_kl"`` (MT-DNN's symmetric KL, default), ``"kl"``, ``"js"``,
            ``"mse"``, or a callable ``(noisy_logits, clean_logits) -> per-position values``.
        blocks: Override discovery: a dotted path or a list of modules/paths.
        generator: A CPU ``torch.Generator`` that seeds this regularizer's own RNG once, at
            construction; None takes that one seed from the global RNG. Either way no step
            draws from the global RNG afterwards.
        per_token: Scale each position's noise to ``eta`` instead of each example's.
        eta_scale: ``"absolute"`` (the paper): each example's noise has inf-norm ``eta``;
            ``"hidden_rms"``: inf-norm ``eta * RMS(h)``, the RMS of that example's hidden
            states at the perturbed layer (over its real tokens and features; per segment,
            per token as the noise is), for pre-norm models whose hidden-state scale varies
            with depth and architecture (see docs/noise-scale.md).
        prefer: Part of a dotted path that wins when the model has several stacks of blocks.
        nonfinite: What a NaN/inf penalty does. Either way that step's penalty becomes 0 and
            reaches no weight, decided on the device; ``"raise"`` (default) then raises at the
            next check (:meth:`stats`, or within ``CHECK_EVERY`` calls), ``"skip"`` only
            counts it in :meth:`stats`.
        batch_dim: The dimension of the blocks' hidden states that indexes examples. None
            detects it: a ``batch_first`` attribute in the block, else from the first forward
            (a ``[batch, seq]`` mask argument of a block given ``[seq, batch, C]`` states
            marks a sequence-first layout), else 0.

    Raises:
        ValueError: (a :class:`RaptRegError`) for bad arguments or when no blocks are found;
            the model is then left exactly as it was.

    Example:
        >>> layer = nn.TransformerEncoderLayer(16, 2, dropout=0.0, batch_first=True)
        >>> model = nn.Sequential(nn.TransformerEncoder(layer, 4, enable_nested_tensor=False),
        ...                       nn.Linear(16, 3))
        >>> x = torch.randn(2, 5, 16)
        >>> with RandomPerturbationRegularizer(model, max_layer=3) as reg:
        ...     logits, penalty = reg.pair(lambda: model(x))
        ...     (logits.logsumexp(-1).mean() + penalty).backward()
        >>> bool(penalty > 0)
        True
    """

    _noise_knob = "eta"

    def __init__(
        self,
        model: nn.Module,
        *,
        eta: float = 2.0,
        max_layer: int = 3,
        min_layer: int = 1,
        alpha: float = 1.0,
        sigma: float = 1.0,
        norm: Optional[str] = "inf",
        divergence: Union[str, Callable[..., torch.Tensor]] = "sym_kl",
        blocks: BlocksSpec = None,
        generator: Optional[torch.Generator] = None,
        per_token: bool = False,
        prefer: Optional[str] = "encoder",
        nonfinite: str = "raise",
        batch_dim: Optional[int] = None,
        eta_scale: str = "absolute",
    ) -> None:
        super().__init__(
            model, alpha=alpha, divergence=divergence, generator=generator, nonfinite=nonfinite
        )
        self.eta, self.sigma = check_number("eta", eta), check_number("sigma", sigma)
        for name, value in (("max_layer", max_layer), ("min_layer", min_layer)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RaptRegError(f"{name} must be an int >= 0, got {value!r}")
        if min_layer > max_layer:
            raise RaptRegError(f"min_layer={min_layer} is greater than max_layer={max_layer}")
        if norm not in NORMS:
            raise RaptRegError(f"unknown norm {norm!r}: use one of {NORMS}")
        if batch_dim is not None and (
            isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0
        ):
            raise RaptRegError(f"batch_dim must be None or an int >= 0, got {batch_dim!r}")
        if eta_scale not in ETA_SCALES:
            raise RaptRegError(f"unknown eta_scale {eta_scale!r}: use one of {ETA_SCALES}")
        self.eta_scale = eta_scale
        self.max_layer, self.min_layer = max_layer, min_layer
        self.norm, self.per_token = norm, per_token
        self.stacks = self._find_stacks(blocks, prefer, batch_dim)
        self._check_max_layer()
        self._warned_zero = False
        self.last_layer: Optional[int] = None
        self._seed_rng()
        self._hooks = self._install()

    # -- public API ---------------------------------------------------------------------------

    def __call__(
        self,
        noisy_forward: Callable[[], Output],
        clean_output: Output,
        *,
        mask: Optional[torch.Tensor] = None,
        noise_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Run ``noisy_forward`` once with noise at a random layer; return the penalty.

        Args:
            noisy_forward: Zero-argument callable that runs the model on the same batch that
                produced ``clean_output`` (e.g. ``lambda: model(**batch)``).
            clean_output: The output of the clean forward (a tensor or has ``.logits``).
            mask: Optional ``[...]`` mask over the leading dims of the logits (e.g. the
                attention mask of token-level outputs); masked positions do not count.
            noise_mask: Optional bool ``[batch, seq]``, True on real tokens (e.g.
                ``attention_mask.bool()``): padding gets no noise, and each example's norm is
                taken over its real tokens only, so the noise does not depend on the padding.
                An example without real tokens gets no noise.
            segment_ids: Optional integer ``[batch, seq]`` for packed rows: each (row,
                segment) pair is scaled as one example.

        Returns:
            ``alpha * divergence(noisy, clean)``, a scalar to add to the task loss. Zero (and
            ``noisy_forward`` not run) when the model is in eval mode.

        Raises:
            RaptRegError: if the noise did not reach the model or the outputs do not match.
        """
        self._check_callable(noisy_forward)
        clean_logits = logits_of(clean_output)
        check_token_masks(noise_mask, segment_ids)
        if not self._training():
            return self._eval_penalty(clean_logits)
        # Algorithm 1: choose r, draw the noise (in the hook, at layer r), compare the outputs.
        layer = self._rng.randint(self.min_layer, self.max_layer)
        seed = self._draw_seed()
        perturb = self._perturbation(seed, noise_mask, segment_ids)
        p = NoisyPass(layer=layer, perturb=perturb)
        self._run_noisy(self._hooks, noisy_forward, p)
        self.last_layer = layer
        noisy_logits = carry(logits_of(p.output), p.replay)
        return self._penalty(noisy_logits, clean_logits, mask)

    def stats(self) -> dict[str, float]:
        """Telemetry for logging: last layer, noise-to-hidden norm ratio, skipped steps."""
        layer = math.nan if self.last_layer is None else float(self.last_layer)
        return {"rapt/layer": layer, **super().stats()}

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before. Safe to call twice."""
        self._hooks.remove()
        self._last_noise_ratio = None

    def __repr__(self) -> str:
        where = ", ".join(repr(s.path or s.names[0]) for s in self.stacks)
        return (
            f"{type(self).__name__}(blocks={where}, eta={self.eta}, layers={self.min_layer}.."
            f"{self.max_layer}, alpha={self.alpha}, norm={self.norm!r})"
        )

    # -- internals ------------------------------------------------------------------------------

    def _perturbation(
        self,
        seed: int,
        noise_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> Perturb:
        """``delta = eta * d / ||d||_inf``, ``d ~ N(0, sigma^2 I)``; the same for one ``seed``.

        With ``noise_mask``/``segment_ids`` the norm is per real-token example (or segment) and
        padding gets none; with ``eta_scale="hidden_rms"``, ``eta`` is relative to the RMS of
        the hidden states it is added to.
        """

        @torch.compiler.disable
        def perturb(hidden: torch.Tensor, batch_dim: int) -> torch.Tensor:
            scale = None
            if self.eta_scale == "hidden_rms":
                scale = hidden_rms(
                    hidden,
                    batch_dim=batch_dim,
                    per_token=self.per_token,
                    noise_mask=noise_mask,
                    segment_ids=segment_ids,
                )
            return sample_noise(
                hidden.shape,
                eta=self.eta,
                sigma=self.sigma,
                norm=self.norm,
                batch_dim=batch_dim,
                per_token=self.per_token,
                dtype=hidden.dtype,
                device=hidden.device,
                generator=self._noise_source(hidden.device, seed),
                noise_mask=noise_mask,
                segment_ids=segment_ids,
                scale=scale,
            )

        return perturb

    def _settle_stack(self, hooks: StackHooks, p: NoisyPass) -> None:
        super()._settle_stack(hooks, p)
        if len(self.stacks) == 1:
            self._check_max_layer()

    def _check_max_layer(self) -> None:
        """Refuse a max_layer beyond the deepest candidate (again once one stack is known)."""
        depth = max(s.calls_per_forward for s in self.stacks)
        if self.max_layer > depth:
            raise RaptRegError(
                f"max_layer={self.max_layer} but the model has {depth} blocks "
                f"({', '.join(repr(s.path or s.names[0]) for s in self.stacks)}): use "
                f"max_layer <= {depth}"
            )

    def _on_zero_penalty(self, seen: bool) -> None:
        if not seen or self._warned_zero or self.eta == 0 or self.alpha == 0:
            return
        self._warned_zero = True
        where = self.stacks[0].path or ",".join(self.stacks[0].names)
        warnings.warn(
            f"the RAPT penalty was exactly 0 although noise of size eta={self.eta} was added "
            f"to {where!r}: either the output does not depend on that stack (pass blocks= "
            "naming the blocks whose output the model uses), or the noise is below the "
            "resolution of the hidden states' dtype, e.g. bfloat16 (raise eta, or train in "
            "float32 with autocast). This is said once.",
            stacklevel=4,
        )
