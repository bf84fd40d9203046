"""The same noise again when a checkpointed region is recomputed: identity, not fingerprints.

The rule. Every noisy pass is a :class:`Frame` on an RNG stream seeded with a seed no other live
frame holds; each hook call records the RNG state it finds, then re-seeds the stream from
(frame seed, call number), so no two calls of live frames ever find the same state.
``torch.utils.checkpoint`` restores the RNG state before recomputing a region, so an idle hook that
finds a recorded state recomputes exactly that call: it re-seeds the same way and, at the noisy
call, adds the same noise again. A seed already live, a recorded state found by another module or
hook, or a call replayed twice in one backward is refused (:class:`~rapt_reg.RaptRegError`).

A frame and its records live exactly as long as its pass's autograd graph (:func:`carry`). The
CPU generator carries the identity (checkpoints restore it on every device type)."""

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

_LOCK = threading.RLock()  # one global RNG: all threads' streams take turns (a thread may nest)
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
    """Where ``owner``'s call is filed: the owner (alive while its calls are) and the CPU seed,
    which every armed call sets anew (one call per key; the full state confirms a match)."""
    return id(owner), torch.default_generator.initial_seed()


def _reseed(seed: int, number: int) -> None:
    """Seed the CPU generator from (seed, number): splitmix64, distinct for distinct pairs."""
    z = (seed + (number + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    torch.default_generator.manual_seed(z ^ (z >> 31))


@contextlib.contextmanager
def stream(frame: Frame, devices: Iterable[torch.device] = ()) -> Iterator[Frame]:
    """Run a pass on an RNG stream of its own: the CPU's and ``devices``' generators are forked,
    seeded with ``frame.seed`` and restored on exit. Refused on two accelerator types, or when a
    live frame whose hooks are installed, on a model sharing modules, holds the same seed."""
    accelerators = sorted({d for d in devices if d.type != "cpu"}, key=str)
    kinds = {d.type for d in accelerators}
    if len(kinds) > 1:
        raise RaptRegError(
            f"the model's parameters are on several accelerator types ({sorted(kinds)}): "
            "RAPT supports the CPU plus one accelerator type"
        )
    device_type = kinds.pop() if kinds else "cuda"
    indices = [d.index or 0 for d in accelerators]
    with _LOCK, torch.random.fork_rng(devices=indices, device_type=device_type):
        live = [f for f in _FRAMES if f.seed == frame.seed and f.owner.installed]
        ours = {id(m) for m in frame.model.modules()} if live else set()  # walked when needed
        if any(not ours.isdisjoint(map(id, f.model.modules())) for f in live):
            raise RaptRegError(
                "two noisy passes drew the same noise-stream seed while both graphs are alive: "
                "the regularizers were built from the same seed. Give each its own generator "
                "(generator=torch.Generator().manual_seed(seed + i)), or backpropagate one "
                "penalty before the other regularizer's call"
            )
        _FRAMES.add(frame)  # until the frame (the pass's graph) is gone
        torch.default_generator.manual_seed(frame.seed)
        module = torch.get_device_module(device_type)  # fork_rng found it
        for index in indices:
            with module.device(index):
                module.manual_seed(frame.seed)
        yield frame


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
    graph = holder is not None and x.requires_grad and torch.is_grad_enabled()
    return _Carry.apply(x, holder) if graph else x
