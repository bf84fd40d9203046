"""Forward hooks on a stack of blocks: installed once, idle until a noisy pass is armed.

Layers are counted by block *call*: layer 0 is the hidden state entering the first call (the
embedding output), layer r the output of the r-th call. An armed :class:`NoisyPass` adds its
perturbation at exactly one of those points; every other call passes through untouched.

Idle hooks do one more thing: when a ``torch.utils.checkpoint`` region that held the noise is
recomputed in backward, they add the same noise again (:mod:`rapt_reg.replay` says which
recomputation is whose). The hooks keep their state here, never on the user's modules;
:meth:`StackHooks.remove` removes every handle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import RaptRegError
from .replay import Replay, Replays

Perturb = Callable[[torch.Tensor, int], torch.Tensor]
"""``(hidden, batch_dim) -> delta``; must return the same delta when called again."""


@dataclass
class NoisyPass:
    """One armed forward pass: where the noise goes, and what the hooks saw.

    Attributes:
        layer: The layer r to perturb (0: the input of the first block call).
        perturb: Makes the noise for the hidden states at layer r. It is called again, with
            equal hidden states, when a checkpointed region is recomputed: it must be
            deterministic (e.g. sample from a fixed seed).
        calls: Block calls seen so far.
        stack: Index of the stack whose blocks ran (the first one that fired).
        others: Indices of further stacks that also ran, in the order they first ran.
        applied: Whether the perturbation was added.
        noise_ratio: ``||delta|| / ||h||`` at layer r, detached (a tensor: no host sync).
        replay: What a recomputation of the noise point needs (None under dynamo).
        output: What the pass's forward returned (set by the caller).
    """

    layer: int
    perturb: Perturb
    calls: int = 0
    stack: Optional[int] = None
    others: list[int] = field(default_factory=list)
    applied: bool = False
    noise_ratio: Optional[torch.Tensor] = None
    replay: Optional[Replay] = None
    output: Any = None


def input_hidden(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The hidden states a block was called with: first positional tensor, else a kwarg."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    if isinstance(value, torch.Tensor):
        return value
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def replace_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the hidden states (see :func:`input_hidden`) replaced."""
    if args and isinstance(args[0], torch.Tensor):
        return (new, *args[1:]), kwargs
    key = "hidden_states" if isinstance(kwargs.get("hidden_states"), torch.Tensor) else None
    key = key or next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return args, {**kwargs, key: new}


def output_hidden(output: Any) -> torch.Tensor:
    """The hidden states in a block's output: a tensor, a tuple's first item, a mapping's first."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping):
        first = next(iter(output.values()), None)
        if isinstance(first, torch.Tensor):
            return first
    raise RaptRegError(
        f"a block returned {type(output).__name__}, in which no hidden-state tensor was found "
        "(expected a tensor, a tuple/list starting with one, or a mapping whose first value is "
        "one). Pass blocks= naming modules that return their hidden states."
    )


def replace_output_hidden(output: Any, new: torch.Tensor) -> Any:
    """``output`` with its hidden states (see :func:`output_hidden`) replaced by ``new``."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return type(output)(new, *output[1:]) if hasattr(output, "_fields") else (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    key = next(iter(output))
    replaced = {**output, key: new}
    try:
        return type(output)(**replaced)
    except TypeError:
        return replaced


def infer_batch_dim(hidden: torch.Tensor, args: tuple, kwargs: dict) -> Optional[int]:
    """0 or 1 from a block call: where a ``[batch, seq]`` mask argument puts the batch.

    A block given ``[seq, batch, C]`` hidden states with a ``[batch, seq]`` padding mask (as
    fairseq-style blocks are) is sequence-first. None when no 2-D argument tells, or when the
    first two dims are equal (then both readings fit).
    """
    if hidden.ndim < 3 or hidden.shape[0] == hidden.shape[1]:
        return None
    first_two = tuple(hidden.shape[:2])
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value is not hidden and value.ndim == 2:
            if tuple(value.shape) == first_two:
                return 0
            if tuple(value.shape) == first_two[::-1]:
                return 1
    return None


class StackHooks:
    """A pre- and a post-forward hook on every block of one or more candidate stacks.

    Idle (no pass armed, no recomputation pending) a hook reads two attributes and returns, so
    a forward without RAPT is unchanged.

    Args:
        stacks: The candidate stacks' blocks, each in call order.
        batch_dims: Per stack, the dimension of the hidden states that indexes examples.
        shared: Per stack, whether one module runs several calls (ALBERT): the call a
            recomputation replays cannot be told from the module, so replay is refused.
    """

    def __init__(
        self,
        stacks: Sequence[Sequence[nn.Module]],
        batch_dims: Sequence[Optional[int]],
        shared: Sequence[bool],
    ) -> None:
        self._batch_dims = list(batch_dims)
        self._shared = list(shared)
        self._stack_of: dict[int, int] = {}
        self._handles: Optional[dict[int, list[RemovableHandle]]] = {}
        self._pass: Optional[NoisyPass] = None
        self.replays = Replays()
        for index, blocks in enumerate(stacks):
            handles = self._handles.setdefault(index, [])
            for block in blocks:
                if id(block) in self._stack_of:
                    continue
                self._stack_of[id(block)] = index
                handles.append(block.register_forward_pre_hook(self._pre, with_kwargs=True))
                handles.append(block.register_forward_hook(self._post))

    @property
    def installed(self) -> bool:
        return self._handles is not None

    def batch_dim(self, stack: int) -> int:
        """The batch dim of ``stack``'s hidden states (0 while no forward has told)."""
        known = self._batch_dims[stack]
        return 0 if known is None else known

    @contextlib.contextmanager
    def armed(self, p: NoisyPass) -> Iterator[NoisyPass]:
        """Arm the hooks for one pass; they are idle again when the block exits, however."""
        if self._handles is None:
            raise RaptRegError("this regularizer was removed: build a new one")
        if self._pass is not None:
            raise RaptRegError(
                "a regularizer call was made inside another one's forward pass of the same "
                "regularizer: call it once per step, outside the model's forward"
            )
        self._pass = p
        try:
            yield p
        finally:
            self._pass = None

    def keep_only(self, index: int) -> None:
        """Keep only stack ``index`` (once a forward showed which runs), renumbered as 0."""
        if self._handles is None:
            return
        for other, handles in self._handles.items():
            if other != index:
                for handle in handles:
                    handle.remove()
        self._handles = {0: self._handles[index]}
        self._batch_dims = [self._batch_dims[index]]
        self._shared = [self._shared[index]]
        self._stack_of = {k: 0 for k, v in self._stack_of.items() if v == index}

    def remove(self) -> None:
        """Remove every hook and forget every pending replay; safe to call twice."""
        for handles in (self._handles or {}).values():
            for handle in handles:
                handle.remove()
        self._handles = None
        self._pass = None
        self.replays.clear()

    # -- the hooks: count the call, then add the noise if this is its point ------------------

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        p = self._pass
        if p is None:
            return self._replay(module, "pre", args, kwargs)
        index = self._stack_of[id(module)]
        if p.stack is None:
            p.stack = index
        elif index != p.stack:
            if index not in p.others:
                p.others.append(index)
            return None
        p.calls += 1
        if p.calls != 1:
            return None
        hidden = input_hidden(args, kwargs)
        if hidden is not None and self._batch_dims[index] is None:  # the first forward decides
            inferred = infer_batch_dim(hidden, args, kwargs)
            self._batch_dims[index] = 0 if inferred is None else inferred
        if p.layer != 0:
            return None
        if hidden is None:
            raise RaptRegError(
                f"the first block ({type(module).__name__}) was called without a tensor "
                "argument, so there are no hidden states to perturb at layer 0"
            )
        return replace_input(args, kwargs, self._add(p, module, "pre", hidden))

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        p = self._pass
        if p is None:
            return self._replay(module, "post", output)
        index = self._stack_of[id(module)]
        if p.layer == 0 or p.applied or p.others or index != p.stack or p.calls != p.layer:
            return None
        return replace_output_hidden(output, self._add(p, module, "post", output_hidden(output)))

    def _add(self, p: NoisyPass, module: nn.Module, where: str, hidden: torch.Tensor) -> Any:
        assert p.stack is not None
        batch_dim = self.batch_dim(p.stack)
        delta = p.perturb(hidden, batch_dim)
        p.applied = True
        if not torch.compiler.is_compiling():
            p.replay = self.replays.record(module, where, p.perturb, batch_dim)
        with torch.no_grad():
            p.noise_ratio = delta.detach().float().norm() / hidden.detach().float().norm()
        return hidden + delta

    def _replay(self, module: nn.Module, where: str, *call: Any) -> Any:
        """Idle: add a pending pass's noise again if this call recomputes its noise point."""
        replay = self.replays.find(module, where)
        if replay is None:
            return None
        if self._shared[self._stack_of[id(module)]]:
            raise RaptRegError(
                "a checkpointed region holding RAPT's noise is being recomputed, but this "
                "stack runs one module for several layers (ALBERT-style shared blocks), so the "
                "layer cannot be told apart: turn gradient checkpointing off for this model"
            )
        if where == "pre":
            args, kwargs = call
            hidden = input_hidden(args, kwargs)
            assert hidden is not None  # it was there when the pass ran
            return replace_input(args, kwargs, hidden + replay.perturb(hidden, replay.batch_dim))
        (output,) = call
        hidden = output_hidden(output)
        return replace_output_hidden(output, hidden + replay.perturb(hidden, replay.batch_dim))
