"""The same noise again when a checkpointed region is recomputed: identity, not fingerprints.

The rule. Every noisy pass is a :class:`Frame` that runs on an RNG stream seeded from a seed no
other live frame holds, and each of its hook calls records the RNG state it finds and then
re-seeds the stream from (frame seed, call number), so no two hook calls of any live frames
ever find the same state. ``torch.utils.checkpoint`` restores the RNG state before it recomputes
a region, so an idle hook that finds a recorded state is the recomputation of exactly that call:
it re-seeds the same way and, at the call that added the noise, adds the same noise again. A
seed already live, a recorded state found by another module or hook, or a call replayed twice
in one backward is refused with a :class:`~rapt_reg.RaptRegError`.

A frame lives exactly as long as its pass's autograd graph (:func:`carry`), and so do its
records. The CPU generator carries the identity (checkpoints restore it on every device type).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from .errors import RaptRegError

Perturb = Callable[[torch.Tensor, int], torch.Tensor]
"""``(hidden, batch_dim) -> delta``; must return the same delta when called again."""

# The global RNG is the process's: streams of all threads take turns (a thread may nest them).
_LOCK = threading.RLock()
_FRAMES: weakref.WeakSet[Frame] = weakref.WeakSet()  # the live ones
_CALLS: weakref.WeakValueDictionary[tuple[int, int], Call] = weakref.WeakValueDictionary()
_MASK64 = 2**64 - 1


@dataclass(eq=False)
class Call:
    """One hook call of a noisy pass: which, the state it found, and if it was replayed."""

    seed: int  # the frame's
    number: int
    module: nn.Module
    where: str  # "pre" or "post"
    state: torch.Tensor
    noise: Optional[tuple[Perturb, int]] = None  # (perturb, batch_dim) where it added noise
    replayed: bool = False


@dataclass(eq=False)
class Frame:
    """One noisy pass: whose it is, its seed, the model it runs, and its hook calls."""

    owner: Any  # the hooks object whose calls these are (``installed`` while they are)
    seed: int
    model: nn.Module
    calls: list[Call] = field(default_factory=list)

    def filter(self, grad: torch.Tensor) -> torch.Tensor:
        """A backward through this pass starts here (see :func:`carry`): no call replayed yet."""
        for call in self.calls:
            call.replayed = False
        return grad


def _key(owner: object) -> tuple[int, int]:
    """Where a call of ``owner`` is filed: the owner (alive while its calls are) and the seed
    of the CPU stream, which every armed call sets anew (so one call per key; the full state
    confirms a match)."""
    return id(owner), torch.default_generator.initial_seed()


def _reseed(seed: int, number: int) -> None:
    """Seed the CPU generator from (seed, number): splitmix64, distinct for distinct pairs."""
    z = (seed + (number + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    torch.default_generator.manual_seed(z ^ (z >> 31))


@contextlib.contextmanager
def stream(frame: Frame, devices: Iterable[torch.device] = ()) -> Iterator[Frame]:
    """Run a pass on an RNG stream of its own, seeded with ``frame.seed``: the CPU's and
    ``devices``' generators are forked, seeded and restored on exit. Refused when a live frame
    of an installed regularizer on a model sharing modules holds the same seed (two
    regularizers built from one seed, both graphs alive), or on two accelerator types."""
    accelerators = sorted({d for d in devices if d.type != "cpu"}, key=str)
    kinds = {d.type for d in accelerators}
    if len(kinds) > 1:
        raise RaptRegError(
            f"the model's parameters are on several accelerator types ({sorted(kinds)}): "
            "RAPT supports the CPU plus one accelerator type"
        )
    device_type = kinds.pop() if kinds else "cuda"
    indices = [d.index if d.index is not None else 0 for d in accelerators]
    with _LOCK, torch.random.fork_rng(devices=indices, device_type=device_type):
        if any(_conflict(f, frame) for f in _FRAMES):
            raise RaptRegError(
                "two noisy passes drew the same noise-stream seed while both graphs are alive: "
                "the regularizers were built from the same seed. Give each its own generator "
                "(generator=torch.Generator().manual_seed(seed + i)), or backpropagate one "
                "penalty before the other regularizer's call"
            )
        _FRAMES.add(frame)  # until the frame (the pass's graph) is gone
        torch.default_generator.manual_seed(frame.seed)
        module = getattr(torch, device_type, None) if indices else None
        for index in indices:
            with module.device(index):  # type: ignore[union-attr]
                module.manual_seed(frame.seed)  # type: ignore[union-attr]
        yield frame


def _conflict(live: Frame, new: Frame) -> bool:
    """Whether ``live``'s hooks, still installed, could see ``new``'s states (same seed, and
    their models share a module)."""
    if live.seed != new.seed or not live.owner.installed:
        return False
    a, b = live.model, new.model
    return a is b or not {id(m) for m in a.modules()}.isdisjoint(id(m) for m in b.modules())


def pending() -> bool:
    """Whether some noisy pass's calls are alive (so an idle hook may be a recomputation)."""
    return bool(_CALLS)


def enter(frame: Frame, module: nn.Module, where: str) -> Call:
    """An armed hook call: record the RNG state it finds, then re-seed the stream."""
    key = _key(frame.owner)
    if key in _CALLS:  # only a forward that re-seeds the global RNG itself could do this
        raise RaptRegError(
            "a noisy pass found the RNG state of a recorded hook call: a forward that re-seeds "
            "the global RNG (torch.manual_seed inside the model) or runs a noisy pass inside "
            "another one cannot be told apart from a recomputation. Seed outside the forward"
        )
    call = Call(frame.seed, len(frame.calls), module, where, torch.get_rng_state())
    frame.calls.append(call)
    _CALLS[key] = call
    _reseed(frame.seed, call.number)
    return call


def find(owner: object, module: nn.Module, where: str) -> Optional[Call]:
    """An idle hook call: the recorded call it recomputes (re-seeded as then), else None."""
    call = _CALLS.get(_key(owner))
    if call is None or not torch.equal(call.state, torch.get_rng_state()):
        return None
    if call.module is not module or call.where != where:
        raise RaptRegError(
            f"a recomputed region ran {type(module).__name__}'s {where}-hook where the noisy "
            f"pass ran {type(call.module).__name__}'s {call.where}-hook: the forward is not "
            "deterministic, so the noise cannot be replayed. Turn gradient checkpointing off"
        )
    if call.replayed:
        raise RaptRegError(
            "a checkpointed region holding a noisy pass was recomputed twice in one backward "
            "(nested reentrant checkpoints): use use_reentrant=False, or checkpoint one level"
        )
    call.replayed = True
    _reseed(call.seed, call.number)
    return call


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
    """``x``, with ``holder`` alive exactly as long as ``x``'s autograd graph, the gradient
    through it passed through ``holder.filter``; a tensor without a graph is returned as is."""
    if holder is None or not x.requires_grad or not torch.is_grad_enabled():
        return x
    return _Carry.apply(x, holder)
