"""RandomPerturbationRegularizer: RAPT (Algorithm 1, Eq. 2) as one extra loss term."""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Self, Union

import torch
from torch import nn

from . import divergence as div
from . import replay
from .discovery import BlocksSpec, BlockStack, ambiguity_error, find_block_stacks, resolve_blocks
from .errors import RaptRegError
from .head import HeadHook, HeadSpec, find_head
from .hooks import NoisyPass, Perturb, StackHooks
from .noise import ETA_SCALES, NORMS, check_token_masks, hidden_rms, sample_noise

Output = Any  # a model output: a logits tensor [..., C], or an object with a .logits one
Divergence = Union[str, Callable[..., torch.Tensor]]
Masks = Optional[torch.Tensor]
NONFINITE_POLICIES = ("raise", "skip")
CHECK_EVERY = 100  # deferred checks (non-finite, zero penalty) are read within this many calls

logger = logging.getLogger("rapt_reg")


def logits_of(output: Output) -> torch.Tensor:
    """The logits tensor of a model output (a tensor, or anything with ``.logits``)."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise RaptRegError(
            f"cannot find logits in a {type(output).__name__}: the forward must return a "
            "tensor [..., C] or an object with a .logits tensor (wrap it: lambda: model(x)[0]). "
            "A fused loss that makes no logits needs head='auto' and reg.pair(forward)"
        )
    return logits


def check_number(name: str, value: float, *, allow_zero: bool = True) -> float:
    """``value`` as a float, or a RaptRegError if it is not a finite number >= 0 (> 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RaptRegError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">=" if allow_zero else ">"
        raise RaptRegError(f"{name} must be finite and {bound} 0, got {value!r}")
    return float(value)


def check_int(name: str, value: int) -> int:
    """``value``, or a RaptRegError if it is not an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RaptRegError(f"{name} must be an int >= 0, got {value!r}")
    return value


class _Gate:
    """Stops the gradient of a non-finite penalty, decided on the device (no host sync)."""

    open: Optional[torch.Tensor] = None

    def filter(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.where(self.open, grad, 0.0)  # type: ignore[arg-type]


@dataclass
class Step:
    """What one call compares against: the clean logits (or the head's input), and the masks."""

    clean: torch.Tensor
    clean_is_hidden: bool = False
    mask: Masks = None
    noise_mask: Masks = None
    segment_ids: Masks = None


class PerturbationRegularizer(abc.ABC):
    """What RAPT, SMART and R3F share: all but the noise (:meth:`_step`); arguments as RAPT's."""

    _stats_prefix = "rapt"
    _noise_knob = "the noise"  # named in the non-finite error

    def __init__(
        self,
        model: nn.Module,
        *,
        alpha: float,
        divergence: Divergence,
        generator: Optional[torch.Generator],
        nonfinite: str,
        blocks: BlocksSpec = None,
        prefer: Optional[str] = "auto",
        batch_dim: Optional[int] = None,
        head: HeadSpec = None,
    ) -> None:
        if isinstance(model, type) or not isinstance(model, nn.Module):
            fix = ": instantiate it first" if isinstance(model, type) else ""
            raise RaptRegError(f"model must be an nn.Module instance, got {model!r}{fix}")
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
        self.model, self.nonfinite = model, nonfinite
        self.alpha, self.divergence = check_number("alpha", alpha), div.resolve(divergence)
        stacks = find_block_stacks(model, prefer=prefer) if blocks is None else None
        self.stacks = stacks or [resolve_blocks(model, blocks)]
        if batch_dim is not None:
            self.stacks = [s.with_batch_dim(check_int("batch_dim", batch_dim)) for s in self.stacks]
        found = find_head(model, head)
        # Every check passed: one draw seeds this regularizer's RNG (no step draws from torch's).
        self._rng = random.Random(int(torch.randint(0, 2**62, (), generator=generator)))
        self._noise_generators: dict[torch.device, torch.Generator] = {}
        self._warned_eval, self._skipped = False, 0
        self._last_noise_ratio: Optional[torch.Tensor] = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (finite, zero) per call
        self._hooks = StackHooks(
            [s.blocks for s in self.stacks], [s.batch_dim for s in self.stacks]
        )
        self._head = None if found is None else HeadHook(*found)
        self.head = None if found is None else found[0]

    @abc.abstractmethod
    def _step(self, noisy_forward: Callable[[], Output], step: Step) -> torch.Tensor:
        """The penalty of one training step."""

    def __call__(
        self,
        noisy_forward: Callable[[], Output],
        clean_output: Output,
        *,
        mask: Masks = None,
        noise_mask: Masks = None,
        segment_ids: Masks = None,
    ) -> torch.Tensor:
        """Run the noisy pass on the batch that gave ``clean_output``; return the penalty.

        Args:
            noisy_forward: Zero-argument callable running the model on that batch.
            clean_output: The clean forward's output (a tensor, or has ``.logits``).
            mask: Optional ``[...]`` over the logits' leading dims; false positions don't count.
            noise_mask: Optional bool ``[batch, seq]``, True on real tokens: padding gets no
                noise and is left out of each example's norm.
            segment_ids: Optional int ``[batch, seq]``: each (row, segment) is scaled as an example.

        Returns:
            ``alpha * divergence(noisy, clean)``, a scalar to add to the task loss; in eval mode
            0 (``noisy_forward`` not run), said once.

        Raises:
            RaptRegError: if the noise did not reach the model or the outputs do not match."""
        self._check_call(noisy_forward, noise_mask, segment_ids, "noisy_forward")
        step = Step(logits_of(clean_output), False, mask, noise_mask, segment_ids)
        return self._run(noisy_forward, step)

    def pair(
        self,
        forward: Callable[[], Output],
        *,
        mask: Masks = None,
        noise_mask: Masks = None,
        segment_ids: Masks = None,
    ) -> tuple[Output, torch.Tensor]:
        """``(clean_output, penalty)``: exactly ``clean = forward(); reg(forward, clean, ...)``.

        Same buffers (BatchNorm), auxiliary outputs (MoE router logits), collectives (DDP, FSDP)
        and gradients as those two calls. With ``head=`` the clean side is the head's input in
        this pass: no logits need exist (a fused loss), and none are kept for the penalty."""
        self._check_call(forward, noise_mask, segment_ids, "forward")
        with self._capture("clean") as captured:
            output = forward()
        clean = captured[0] if captured else logits_of(output)
        step = Step(clean, bool(captured), mask, noise_mask, segment_ids)
        return output, self._run(forward, step)

    @property
    def skipped_steps(self) -> int:
        """Steps whose penalty was not finite and was replaced by 0 (reads pending checks)."""
        self._read_checks()
        return self._skipped

    def stats(self) -> dict[str, float]:
        """Last noise-to-hidden norm ratio and skipped steps (syncs; deferred checks raise)."""
        ratio = self.last_noise_to_hidden_ratio
        return {
            f"{self._stats_prefix}/noise_to_hidden_ratio": math.nan if ratio is None else ratio,
            f"{self._stats_prefix}/skipped_steps": float(self.skipped_steps),
        }

    @property
    def last_noise_to_hidden_ratio(self) -> Optional[float]:
        """``||delta|| / ||h||`` where the last noise went (whole batch, Frobenius norms)."""
        return None if self._last_noise_ratio is None else float(self._last_noise_ratio)

    def state_dict(self) -> dict[str, Any]:
        """To resume the same layers and noise (also save ``torch.get_rng_state()`` for dropout)."""
        return {"format": 1, "rng": self._rng.getstate(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (through JSON too)."""
        if not isinstance(state, dict) or state.get("format") != 1:
            raise RaptRegError(
                "not a rapt_reg state dict (expected the dict returned by reg.state_dict())"
            )
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._skipped, self._pending = int(state["skipped_steps"]), []

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before. Safe to call twice."""
        self._hooks.remove()
        if self._head is not None:
            self._head.remove()
        self._last_noise_ratio = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def stack(self) -> BlockStack:
        """The stack being perturbed (refused while a forward has yet to choose among several)."""
        if len(self.stacks) > 1:
            raise ambiguity_error(self.stacks)
        return self.stacks[0]

    @property
    def stack_path(self) -> str:
        """The perturbed stack's dotted path (the candidates' while a forward has to choose)."""
        return ", ".join(s.path or ",".join(s.names) for s in self.stacks)

    def _noisy_pass(
        self, forward: Callable[[], Output], layer: int, perturb: Perturb, max_layer: int = 0
    ) -> torch.Tensor:
        """Run ``forward`` with ``perturb`` added at ``layer``, on an RNG stream of its own.

        Returns its logits (``head=``: the head's input), holding the pass's frame as long as
        its graph, so a checkpointed region recomputes the same noise. Refuses a pass the noise
        missed, that ran two stacks, or fewer block calls than ``max_layer``; keeps the stack
        that ran, with its calls and batch dim (logged once)."""
        frame = replay.Frame(self._hooks, self._rng.getrandbits(62), self.model)
        p = NoisyPass(layer=layer, perturb=perturb, frame=frame)
        stream = replay.stream(frame, {w.device for w in self.model.parameters()})
        with stream, self._hooks.armed(p), self._capture("noisy") as captured:
            p.output = forward()
        if p.calls == 0:
            where = ", ".join(repr(s.path or ",".join(s.names)) for s in self.stacks)
            raise RaptRegError(
                f"the noise did not reach the model: no block of {where} ran during the noisy "
                "pass. Likely causes: (1) the model was compiled with torch.compile and run "
                "before this regularizer was built, so its graph ignores the hooks - build the "
                "regularizer first, or call torch._dynamo.reset(); (2) the forward uses other "
                "modules than these - pass blocks='<dotted path>'; (3) noisy_forward did not "
                "run the model."
            )
        if p.others:
            raise ambiguity_error([self.stacks[i] for i in (p.stack or 0, *p.others)])
        if len(self.stacks) > 1:
            self._hooks.keep_only(p.stack or 0)
        stack = self.stacks[p.stack or 0]
        self.stacks = [stack.with_calls(p.calls, self._hooks.batch_dim(0))]
        if not p.applied or max_layer > p.calls:
            raise RaptRegError(
                f"the noise did not reach the model: max_layer={max(max_layer, p.layer)} but "
                f"the forward ran the blocks of {self.stack_path!r} {p.calls} times: use "
                f"max_layer <= {p.calls}, or pass blocks= naming the stack this forward runs"
            )
        if stack.calls_per_forward != p.calls:
            logger.info("rapt-reg perturbs %r: %d block calls a forward", self.stack_path, p.calls)
        if self._head is not None:
            self._head.check(logits_of(p.output))
        self._last_noise_ratio = p.noise_ratio
        return replay.carry(captured[0] if captured else logits_of(p.output), frame)

    def _capture(self, mode: str) -> contextlib.AbstractContextManager[list[torch.Tensor]]:
        """With ``head=``, the head's input during the block (noisy: no logits are made)."""
        return self._head.capture(mode) if self._head else contextlib.nullcontext([])

    def _check_call(self, fn: object, noise_mask: Masks, segment_ids: Masks, name: str) -> None:
        """Refuse a bad forward or bad masks before any forward runs."""
        if not callable(fn):
            raise RaptRegError(
                f"{name} must be a zero-argument callable, got {type(fn).__name__}: pass "
                "lambda: model(**batch)"
            )
        check_token_masks(noise_mask, segment_ids)

    def _run(self, noisy_forward: Callable[[], Output], step: Step) -> torch.Tensor:
        """The penalty in training mode; in eval mode 0, said once."""
        if any(b.training for s in self.stacks for b in s.blocks):
            return self._step(noisy_forward, step)
        if not self._warned_eval:
            self._warned_eval = True
            warnings.warn(
                f"the model is in eval mode: {type(self).__name__} adds noise only in training "
                "mode, so the penalty is 0 (call model.train() to regularize). This is said once.",
                stacklevel=3,
            )
        return self._zero(step.clean)

    @staticmethod
    def _zero(like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros((), dtype=torch.promote_types(like.dtype, torch.float32))

    def _noise_source(self, device: torch.device, seed: int) -> torch.Generator:
        """This regularizer's generator on ``device``, seeded with ``seed``."""
        if device not in self._noise_generators:
            self._noise_generators[device] = torch.Generator(device=device)
        return self._noise_generators[device].manual_seed(seed)

    def _divergence(
        self, fn: Callable[..., torch.Tensor], noisy: torch.Tensor, clean: torch.Tensor, step: Step
    ) -> torch.Tensor:
        """``fn`` between the outputs, averaged over the positions ``step.mask`` keeps."""
        head = self._head.weights() if self._head else None
        hidden = step.clean_is_hidden
        return div.reduce_divergence(fn, noisy, clean, step.mask, head=head, clean_is_hidden=hidden)

    def _penalty(self, noisy: torch.Tensor, step: Step) -> torch.Tensor:
        """``alpha * divergence``; if not finite: 0, its gradient stopped on the device, counted."""
        if len(self._pending) >= CHECK_EVERY:
            self._read_checks()
        gate = _Gate()
        noisy, clean = replay.carry(noisy, gate), replay.carry(step.clean, gate)
        value = self._divergence(self.divergence, noisy, clean, step)
        if torch.is_grad_enabled() and not value.requires_grad:
            raise RaptRegError(
                "neither output requires grad, so the penalty cannot train anything: are the "
                "parameters frozen, or was the clean pass run under torch.no_grad()? "
                "(To only log the penalty, call the regularizer under torch.no_grad().)"
            )
        gate.open = finite = torch.isfinite(value).detach()
        zero = (value == 0).detach() if noisy.numel() else torch.zeros_like(finite)
        self._pending.append((finite, zero if step.mask is None else zero & step.mask.any()))
        return self.alpha * torch.where(finite, value, torch.zeros_like(value))

    def _read_checks(self) -> None:
        """Read the deferred checks on the host (one sync) and act on them."""
        if not self._pending:
            return
        finite, zero = (torch.stack(column).cpu() for column in zip(*self._pending))
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


class RandomPerturbationRegularizer(PerturbationRegularizer):
    """RAPT: perturb one randomly chosen layer with scaled Gaussian noise and penalise the change.

    Each call draws a layer ``r`` from ``{min_layer, ..., max_layer}`` (0: the embedding output
    entering the first block call; ``r``: the r-th call's output), adds ``delta = eta * d /
    ||d||_inf``, ``d ~ N(0, sigma^2 I)`` per example, to the hidden states there in one noisy
    pass, and returns ``alpha * divergence(f(x + delta_r), f(x))`` (Eq. 2). Hooks go on the
    blocks (:func:`rapt_reg.find_transformer_blocks`) once, after every check.

    Args:
        model: The model; DDP, FSDP, ``torch.compile`` and PEFT wrappers are seen through,
            ``nn.DataParallel`` is refused. Build this before a compiled model first runs.
        eta: Every example's noise has this inf-norm (the paper's eta).
        max_layer: Highest layer (3 in the paper); more than the forward's block calls is refused.
        min_layer: Lowest layer (1 in the paper); ``min_layer=max_layer=0`` is "RAPT (Embedding)".
        alpha: Weight of the penalty (the paper's alpha).
        sigma: Standard deviation of the raw Gaussian; it cancels under ``norm``.
        norm: ``"inf"`` (the paper), ``"l2"``, or ``None`` for raw ``N(0, sigma^2 I)`` noise.
        divergence: ``"sym_kl"`` (MT-DNN's symmetric KL), ``"kl"``, ``"js"``, ``"mse"``, or a
            callable ``(noisy_logits, clean_logits) -> per-position values``.
        blocks: Override discovery: a dotted path or a list of modules/paths.
        generator: A CPU ``torch.Generator``, drawn once to seed this regularizer (None: torch's).
        per_token: Scale each position's noise to ``eta`` instead of each example's.
        prefer: Part of the path winning among stacks (default: the encoder, a VLM's text decoder).
        nonfinite: A NaN/inf penalty is 0 and reaches no weight (no host sync); ``"raise"``
            raises at :meth:`stats` or within ``CHECK_EVERY`` calls, ``"skip"`` counts it.
        batch_dim: The hidden states' example dim; None: a ``batch_first`` attribute's, else
            the first forward's ``[batch, seq]`` mask beside ``[seq, batch, C]`` states, else 0.
        eta_scale: ``"absolute"`` (the paper) or ``"hidden_rms"``: inf-norm ``eta * RMS(h)``
            of that example's hidden states (docs/noise-scale.md).
        head: The output layer, so the noisy pass never builds logits: ``"auto"``
            (``get_output_embeddings()``), a module or its path (:mod:`rapt_reg.head`); that
            pass's head gets no positions, so it must compute no loss.

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
        divergence: Divergence = "sym_kl",
        blocks: BlocksSpec = None,
        generator: Optional[torch.Generator] = None,
        per_token: bool = False,
        prefer: Optional[str] = "auto",
        nonfinite: str = "raise",
        batch_dim: Optional[int] = None,
        eta_scale: str = "absolute",
        head: HeadSpec = None,
    ) -> None:
        self.eta, self.sigma = check_number("eta", eta), check_number("sigma", sigma)
        self.max_layer = check_int("max_layer", max_layer)
        self.min_layer = check_int("min_layer", min_layer)
        if min_layer > max_layer:
            raise RaptRegError(f"min_layer={min_layer} is greater than max_layer={max_layer}")
        for name, value, known in (("norm", norm, NORMS), ("eta_scale", eta_scale, ETA_SCALES)):
            if value not in known:
                raise RaptRegError(f"unknown {name} {value!r}: use one of {known}")
        self.norm, self.eta_scale, self.per_token = norm, eta_scale, per_token
        self.last_layer: Optional[int] = None
        self._warned_zero = False
        super().__init__(
            model, alpha=alpha, divergence=divergence, generator=generator, nonfinite=nonfinite,
            blocks=blocks, prefer=prefer, batch_dim=batch_dim, head=head,
        )  # fmt: skip

    def _step(self, noisy_forward: Callable[[], Output], step: Step) -> torch.Tensor:
        """Algorithm 1 for one minibatch, top to bottom."""
        # Line 3: the layer r, uniformly from {min_layer, ..., max_layer} (0: embedding output).
        layer = self._rng.randint(self.min_layer, self.max_layer)
        seed = self._rng.getrandbits(62)
        masks = step.noise_mask, step.segment_ids  # the pass's frame keeps delta, never the logits

        @torch.compiler.disable
        def delta(hidden: torch.Tensor, batch_dim: int) -> torch.Tensor:
            # Lines 5-6, per example: d ~ N(0, sigma^2 I); delta = eta * d / ||d||_inf.
            check_token_masks(*masks, tuple(hidden.shape), batch_dim, self.stack_path)
            where: dict[str, Any] = dict(zip(("noise_mask", "segment_ids"), masks))
            where.update(batch_dim=batch_dim, per_token=self.per_token)
            # eta_scale="hidden_rms": eta relative to RMS(h) (not in the paper)
            scale = hidden_rms(hidden, **where) if self.eta_scale == "hidden_rms" else None
            gen = self._noise_source(hidden.device, seed)
            return sample_noise(
                hidden.shape, eta=self.eta, sigma=self.sigma, norm=self.norm, scale=scale,
                dtype=hidden.dtype, device=hidden.device, generator=gen, **where,
            )  # fmt: skip

        # Lines 7-13: the forward pass, with h <- h + delta at layer r (in the hooks).
        noisy = self._noisy_pass(noisy_forward, layer, delta, self.max_layer)
        self.last_layer = layer
        # Line 15: alpha * l(f(x + delta_r), f(x)) of Eq. 2; the caller adds the task loss.
        return self._penalty(noisy, step)

    def stats(self) -> dict[str, float]:
        """Telemetry for logging: last layer, noise-to-hidden norm ratio, skipped steps."""
        layer = math.nan if self.last_layer is None else float(self.last_layer)
        return {"rapt/layer": layer, **super().stats()}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(blocks={self.stack_path!r}, eta={self.eta}, layers="
            f"{self.min_layer}..{self.max_layer}, alpha={self.alpha}, norm={self.norm!r})"
        )

    def _on_zero_penalty(self, seen: bool) -> None:
        if not seen or self._warned_zero or self.eta == 0 or self.alpha == 0:
            return
        self._warned_zero = True
        warnings.warn(
            f"the RAPT penalty was exactly 0 although noise of size eta={self.eta} was added "
            f"to {self.stack_path!r}: either the output does not depend on that stack (pass "
            "blocks= naming the blocks whose output the model uses), or the noise is below the "
            "resolution of the hidden states' dtype, e.g. bfloat16 (raise eta, or train in "
            "float32 with autocast). This is said once.",
            stacklevel=4,
        )
