"""Adding the noise again when a checkpointed region is recomputed in backward.

``torch.utils.checkpoint`` (reentrant or not, ``checkpoint_sequential``, transformers'
``gradient_checkpointing_enable``) stashes the global RNG state when a region runs forward and
restores it before recomputing the region, so that dropout needs to know nothing. The noise
rides on the same mechanism:

1. every noisy pass runs on an RNG stream of its own (:meth:`Replays.stream`: the global RNG is
   forked and seeded from the pass's seed, and restored afterwards), so the RNG state inside it
   belongs to that pass alone;
2. where the noise is added, the pass records which hook of which module added it and the RNG
   state at that moment (:meth:`Replays.record`);
3. an idle hook that fires while passes are pending compares the RNG state with theirs
   (:meth:`Replays.find`): it is equal only inside a recomputation of that pass's region, at that
   hook, and the hook then adds the same, deterministically regenerated, noise.

Nothing is matched by tensor identity, so a caller-made ``inputs_embeds`` given to both passes
or a frozen embedding made to require grad are no different from any other input. A record
lives as long as the noisy pass's autograd graph (:func:`carry`), not longer.

Limit: a checkpoint called with ``preserve_rng_state=False`` does not restore the RNG state, so
neither dropout nor the noise is replayed in its recomputation; do not combine it with RAPT.
Nor may the forward itself re-seed the global RNG (``torch.manual_seed`` inside it): both
passes would then share RNG states, and their recomputations could not be told apart.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .errors import RaptRegError

# The global RNG is the process's: two threads forking and restoring it at once would leave one
# thread's stream state behind as the global state (and a record could then match a plain
# forward). Noisy passes therefore take turns, process-wide; a thread may nest them.
_STREAM_LOCK = threading.RLock()


@dataclass(eq=False)
class Replay:
    """Where one noisy pass added its noise, and how to make the same noise again."""

    module: weakref.ref
    where: str  # "pre": added to the module's input; "post": to its output
    perturb: Callable[[torch.Tensor, int], torch.Tensor]
    batch_dim: int
    rng_state: torch.Tensor

    def filter(self, grad: torch.Tensor) -> torch.Tensor:
        return grad


class Replays:
    """The noisy passes whose graph may still be recomputed; see the module docstring."""

    def __init__(self) -> None:
        self._pending: weakref.WeakSet[Replay] = weakref.WeakSet()
        self._in_stream = False

    @contextlib.contextmanager
    def stream(self, seed: int, devices: Iterable[torch.device] = ()) -> Iterator[None]:
        """Run a noisy pass on an RNG stream of its own, seeded with ``seed``.

        The global RNG (CPU, and ``devices``' default generators) is restored on exit, so the
        pass consumes nothing from it: its dropout masks come from ``seed``. Streams of all
        threads take turns (the global RNG is the process's).
        """
        accelerators = sorted({d for d in devices if d.type != "cpu"}, key=str)
        kinds = {d.type for d in accelerators}
        if len(kinds) > 1:
            raise RaptRegError(
                f"the model's parameters are on several accelerator types ({sorted(kinds)}): "
                "RAPT supports the CPU plus one accelerator type"
            )
        device_type = kinds.pop() if kinds else "cuda"
        indices = [d.index if d.index is not None else 0 for d in accelerators]
        with _STREAM_LOCK, torch.random.fork_rng(devices=indices, device_type=device_type):
            torch.default_generator.manual_seed(seed)
            if indices:
                module = getattr(torch, device_type)
                for index in indices:
                    with module.device(index):
                        module.manual_seed(seed)
            self._in_stream = True
            try:
                yield
            finally:
                self._in_stream = False

    def record(
        self,
        module: nn.Module,
        where: str,
        perturb: Callable[[torch.Tensor, int], torch.Tensor],
        batch_dim: int,
    ) -> Replay:
        """Note that ``module``'s ``where`` hook added noise now (inside :meth:`stream`)."""
        if not self._in_stream:
            raise RuntimeError("Replays.record must be called inside Replays.stream")
        replay = Replay(weakref.ref(module), where, perturb, batch_dim, torch.get_rng_state())
        self._pending.add(replay)
        return replay

    def find(self, module: nn.Module, where: str) -> Replay | None:
        """The pending pass whose noise point this hook call recomputes, if any."""
        if torch.compiler.is_compiling() or not self._pending:
            return None
        candidates = [r for r in self._pending if r.where == where and r.module() is module]
        if not candidates:
            return None
        state = torch.get_rng_state()
        return next((r for r in candidates if torch.equal(r.rng_state, state)), None)

    def clear(self) -> None:
        self._pending = weakref.WeakSet()


class _Carry(torch.autograd.Function):
    """Identity whose graph node holds ``holder``; its gradient passes ``holder.filter``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, holder: Any) -> torch.Tensor:
        ctx.holder = holder
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.holder.filter(grad), None


def carry(x: torch.Tensor, holder: Any) -> torch.Tensor:
    """``x``, with ``holder`` alive exactly as long as ``x``'s autograd graph.

    ``holder.filter(grad)`` is applied to the gradient that flows back through this use of
    ``x``. A tensor without a graph is returned as it is.
    """
    if holder is None or not x.requires_grad or not torch.is_grad_enabled():
        return x
    return _Carry.apply(x, holder)
