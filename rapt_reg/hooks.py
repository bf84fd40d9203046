"""Forward hooks on a stack of blocks, idle until a noisy pass is armed; no state on the user's
modules. Layer 0 is the input of the forward's first block call, layer r the r-th call's output:
an armed :class:`NoisyPass` adds noise at one; its recomputation (:mod:`~rapt_reg.replay`) too."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from . import replay
from .errors import RaptRegError
from .replay import Frame, Perturb


@dataclass
class NoisyPass:
    """One armed forward pass: where its noise goes, and what the hooks saw of it."""

    layer: int
    perturb: Perturb
    frame: Frame
    calls: int = 0
    stack: Optional[int] = None
    others: list[int] = field(default_factory=list)
    applied: bool = False
    noise_ratio: Optional[torch.Tensor] = None  # detached: no host sync
    output: Any = None


def input_key(args: tuple, kwargs: dict) -> Any:
    """Where a block's hidden states are: 0 (first positional), a keyword, or None."""
    if args and isinstance(args[0], torch.Tensor):
        return 0
    keys = ("hidden_states", *kwargs)  # that keyword first, else the first with a tensor
    return next((k for k in keys if isinstance(kwargs.get(k), torch.Tensor)), None)


def with_input(args: tuple, kwargs: dict, key: Any, new: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the input at ``key`` (see :func:`input_key`) replaced."""
    return ((new, *args[1:]), kwargs) if key == 0 else (args, {**kwargs, key: new})


def output_hidden(output: Any) -> torch.Tensor:
    """The hidden states in a block's output: a tensor, a tuple's first item, a mapping's first."""
    first = output[0] if isinstance(output, (tuple, list)) and output else output
    if isinstance(output, Mapping):
        first = next(iter(output.values()), None)
    if isinstance(first, torch.Tensor):
        return first
    raise RaptRegError(
        f"a block returned {type(output).__name__}, in which no hidden-state tensor was found "
        "(expected a tensor, a tuple/list starting with one, or a mapping whose first value is "
        "one). Pass blocks= naming modules that return their hidden states."
    )


def _with_output(output: Any, new: torch.Tensor) -> Any:
    """``output`` with its hidden states (see :func:`output_hidden`) replaced by ``new``."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, list):
        return [new, *output[1:]]
    if isinstance(output, tuple):
        return type(output)(new, *output[1:]) if hasattr(output, "_fields") else (new, *output[1:])
    replaced = {**output, next(iter(output)): new}
    with contextlib.suppress(TypeError):
        return type(output)(**replaced)
    return replaced


def infer_batch_dim(hidden: torch.Tensor, args: tuple, kwargs: dict) -> Optional[int]:
    """0 or 1: the batch dim a ``[batch, seq]`` argument shows (fairseq's mask), if one does."""
    if hidden.ndim < 3 or hidden.shape[0] == hidden.shape[1]:
        return None
    layouts = {tuple(hidden.shape[:2]): 0, tuple(hidden.shape[1::-1]): 1}  # hidden's is >= 3-D
    shapes = (tuple(v.shape) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
    return next((layouts[s] for s in shapes if s in layouts), None)


class StackHooks:
    """Pre- and post-forward hooks on every block of the candidate ``stacks`` (each in call order),
    ``batch_dims`` per stack (None: the first armed pass decides); an idle hook does two reads."""

    def __init__(
        self, stacks: Sequence[Sequence[nn.Module]], batch_dims: Sequence[Optional[int]]
    ) -> None:
        self._batch_dims = list(batch_dims)
        self._stack_of: dict[int, int] = {}  # id(block) -> stack (ids: cheap under dynamo)
        self._handles: Optional[list[tuple[int, Any]]] = []
        self._pass: Optional[NoisyPass] = None
        for index, blocks in enumerate(stacks):
            for block in (b for b in blocks if id(b) not in self._stack_of):  # each hooked once
                self._stack_of[id(block)] = index
                pre = block.register_forward_pre_hook(self._pre, with_kwargs=True)
                self._handles += [(index, pre), (index, block.register_forward_hook(self._post))]

    @property
    def installed(self) -> bool:
        return self._handles is not None

    def batch_dim(self, stack: int) -> int:
        """The batch dim of ``stack``'s hidden states (0 while no forward has told)."""
        return self._batch_dims[stack] or 0

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
        """Keep only stack ``index`` (a forward showed it is the one that runs), as stack 0."""
        assert self._handles is not None  # a pass just ran
        for handle in (h for i, h in self._handles if i != index):
            handle.remove()
        self._handles = [(0, h) for i, h in self._handles if i == index]
        self._batch_dims = [self._batch_dims[index]]
        self._stack_of = {b: 0 for b, i in self._stack_of.items() if i == index}

    def remove(self) -> None:
        """Remove every hook; safe to call twice."""
        for _, handle in self._handles or ():
            handle.remove()
        self._handles, self._pass = None, None

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        idle = self._pass is None and (torch.compiler.is_compiling() or not replay.pending())
        return None if idle else self._eager_pre(module, args, kwargs)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        idle = self._pass is None and (torch.compiler.is_compiling() or not replay.pending())
        return None if idle else self._eager_post(module, output)

    @torch.compiler.disable
    def _eager_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        p, key = self._pass, input_key(args, kwargs)
        hidden = None if key is None else args[0] if key == 0 else kwargs[key]
        if p is None:
            call = replay.find(self, module, "pre")
            if call is None or call.noise is None or hidden is None:
                return None
            return with_input(args, kwargs, key, hidden + call.noise[0](hidden, call.noise[1]))
        call = replay.enter(p.frame, module, "pre")
        index = self._stack_of[id(module)]
        p.stack = index if p.stack is None else p.stack
        if index != p.stack:
            p.others += [] if index in p.others else [index]
            return None
        p.calls += 1
        if p.calls == 1 and hidden is not None and self._batch_dims[index] is None:
            self._batch_dims[index] = infer_batch_dim(hidden, args, kwargs) or 0  # first decides
        if p.calls != 1 or p.layer != 0:
            return None
        if hidden is None:
            raise RaptRegError(
                f"the first block ({type(module).__name__}) was called without a tensor "
                "argument, so there are no hidden states to perturb at layer 0"
            )
        return with_input(args, kwargs, key, self._add(p, call, hidden))

    @torch.compiler.disable
    def _eager_post(self, module: nn.Module, output: Any) -> Any:
        if (p := self._pass) is None:
            call = replay.find(self, module, "post")
            if call is None or call.noise is None:
                return None
            hidden = output_hidden(output)
            return _with_output(output, hidden + call.noise[0](hidden, call.noise[1]))
        call = replay.enter(p.frame, module, "post")
        if p.applied or self._stack_of[id(module)] != p.stack or p.calls != p.layer:
            return None
        return _with_output(output, self._add(p, call, output_hidden(output)))

    def _add(self, p: NoisyPass, call: replay.Call, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden + delta``, noted in ``p`` and in ``call`` (for a recomputation)."""
        call.noise = (p.perturb, self.batch_dim(p.stack or 0))
        delta = p.perturb(hidden, call.noise[1])
        p.applied = True
        p.noise_ratio = delta.detach().float().norm() / hidden.detach().float().norm()
        return hidden + delta
