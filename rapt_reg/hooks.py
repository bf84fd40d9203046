"""Forward hooks on a stack of blocks: installed once, idle until armed for one pass.

Layers are counted by block *call*: layer 0 is the hidden state entering the first call (the
embedding output), layer r the output of the r-th call. An armed pass either records the clean
outputs of calls 1..r (the clean pass of ``pair``) or perturbs layer r (a noisy pass), and in
the latter case may reuse recorded outputs instead of recomputing calls 1..r.

The hooks keep their state here, never on the user's modules; :meth:`StackHooks.remove`
removes every handle.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import RaptRegError

Perturb = Callable[[torch.Tensor, int], torch.Tensor]
"""``(hidden, batch_dim) -> delta``: the perturbation to add to hidden states."""


@dataclass
class _Replay:
    """What a recomputation in backward needs to add one noisy pass's noise again.

    ``inputs[k - 1]`` is a weak reference to the hidden states that entered call ``k`` of the
    noisy pass (calls ``1..max(layer, 1)``): a checkpointed region whose recomputation starts
    from one of them is that pass's, and the noise goes back in at ``layer``.
    """

    layer: int
    perturb: Perturb
    batch_dim: int = 0
    inputs: list[Optional[weakref.ref]] = field(default_factory=list)

    def live(self) -> bool:
        return any(ref is not None and ref() is not None for ref in self.inputs)

    def call_of(self, hidden: torch.Tensor) -> Optional[int]:
        for k, ref in enumerate(self.inputs, start=1):
            recorded = ref() if ref is not None else None
            if recorded is not None and _same_tensor_data(hidden, recorded):
                return k
        return None


@dataclass
class Pass:
    """One armed forward pass: what to do, and what the hooks saw.

    Attributes:
        layer: The layer r to perturb (or to record up to).
        perturb: ``(h, batch_dim) -> delta`` for a noisy pass (``batch_dim`` is that of the
            stack that fired); None for a recording (clean) pass. It must
            return the same delta when called again (recomputation under checkpointing
            replays it), e.g. by sampling from a fixed seed.
        saved: Outputs of calls ``1..layer``: filled by a recording pass, reused by a noisy one.
        calls: Block calls seen so far.
        stack: Index of the stack whose blocks ran (the first one that fired).
        others: Indices of further stacks that also ran, in the order they first ran.
        applied: Whether the perturbation was added.
        reused: How many block calls were short-circuited with a recorded output.
        noise_ratio: ``||delta|| / ||h||`` at layer r, detached.
        output: What the pass's forward returned (set by the caller).
    """

    layer: int
    perturb: Optional[Perturb] = None
    saved: Optional[dict[int, Any]] = None
    calls: int = 0
    stack: Optional[int] = None
    others: list[int] = field(default_factory=list)
    applied: bool = False
    reused: int = 0
    noise_ratio: Optional[torch.Tensor] = None
    output: Any = None
    grad_enabled: bool = field(default_factory=torch.is_grad_enabled)
    _reusing_call: bool = False
    _reuse: Optional[bool] = None
    _replay: Optional[_Replay] = None


def input_hidden(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The hidden states a block was called with: first positional tensor, else a kwarg."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    if isinstance(value, torch.Tensor):
        return value
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _replace_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
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


def _batch_size(args: tuple, kwargs: dict) -> Optional[int]:
    hidden = input_hidden(args, kwargs)
    return hidden.shape[0] if hidden is not None and hidden.ndim > 0 else None


def _one_example(value: Any, batch: int) -> Any:
    """``value`` with every tensor whose first dim is ``batch`` cut to its first example.

    One example, not zero: ``view(*shape, -1, head_dim)`` on an empty tensor is ambiguous, and
    attention code is full of it.
    """
    if isinstance(value, torch.Tensor):
        return value[:1] if value.ndim > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_one_example(v, batch) for v in value)
    if isinstance(value, list):
        return [_one_example(v, batch) for v in value]
    if isinstance(value, dict):
        return {k: _one_example(v, batch) for k, v in value.items()}
    return value


def _same_tensor_data(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.device == b.device
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


class StackHooks:
    """Pre- and post-forward hooks on every block of one or more candidate stacks.

    Idle (no pass armed) the hooks only read one attribute, so a clean forward is unchanged.
    """

    def __init__(self, stacks: Sequence[Sequence[nn.Module]], batch_dims: Sequence[int]):
        self._batch_dims = list(batch_dims)
        self._stack_of: dict[int, int] = {}
        self._handles: Optional[dict[int, list[RemovableHandle]]] = {}
        self._pass: Optional[Pass] = None
        # Noise is added inside block calls. If the user wraps calls in torch.utils.checkpoint,
        # the recomputation in backward runs these hooks again, idle: it must add the same
        # noise again. Kept per pending noisy pass: the inputs of its first calls (weakly) and
        # the deterministic perturbation (not the noise). _chain follows one recomputation
        # from call to call: (replay, call), and the recomputed output it handed on.
        self._replays: list[_Replay] = []
        self._chain: Optional[tuple[_Replay, int]] = None
        self._chain_output: Optional[weakref.ref] = None
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

    @contextlib.contextmanager
    def armed(self, p: Pass) -> Iterator[Pass]:
        """Arm the hooks for one pass; they are idle again when the block exits, however."""
        if self._handles is None:
            raise RaptRegError("this regularizer was removed: build a new one")
        if self._pass is not None:
            raise RaptRegError(
                "a regularizer call was made inside another one's forward pass of the same "
                "regularizer: call it once per step, outside the model's forward"
            )
        if p.perturb is not None:
            self._replays = [r for r in self._replays if r.live()]
            if not torch.compiler.is_compiling():
                p._replay = _Replay(p.layer, p.perturb)
                self._replays.append(p._replay)
        self._chain = self._chain_output = None
        self._pass = p
        try:
            yield p
        finally:
            self._pass = None

    def keep_only(self, index: int) -> None:
        """Keep only stack ``index`` (once a forward showed which runs), renumbered as 0."""
        assert self._handles is not None
        for other, handles in self._handles.items():
            if other != index:
                for handle in handles:
                    handle.remove()
        self._handles = {0: self._handles[index]}
        self._batch_dims = [self._batch_dims[index]]
        self._stack_of = {k: 0 for k, v in self._stack_of.items() if v == index}

    def remove(self) -> None:
        """Remove every hook and forget every tensor; safe to call twice."""
        for handles in (self._handles or {}).values():
            for handle in handles:
                handle.remove()
        self._handles = None
        self._replays = []
        self._chain = self._chain_output = None
        self._pass = None

    # -- the hooks ---------------------------------------------------------------------------

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        p = self._pass
        if p is None:
            return self._replay_pre(args, kwargs)
        index = self._stack_of[id(module)]
        if p.stack is None:
            p.stack = index
        elif index != p.stack:
            if index not in p.others:
                p.others.append(index)
            return None
        p.calls += 1
        p._reusing_call = False
        if p._replay is not None and p.calls <= max(p.layer, 1):
            hidden = input_hidden(args, kwargs)
            # Only hidden states computed in this forward identify it: a tensor the caller
            # passed in (no grad_fn) is the clean pass's input too.
            known = hidden is not None and hidden.grad_fn is not None
            p._replay.inputs.append(weakref.ref(hidden) if known else None)
            p._replay.batch_dim = self._batch_dims[index]
        if p.perturb is None or p.applied:
            return None
        if p.layer == 0 and p.calls == 1:
            hidden = input_hidden(args, kwargs)
            if hidden is None:
                raise RaptRegError(
                    f"the first block ({type(module).__name__}) was called without a tensor "
                    "argument, so there are no hidden states to perturb at layer 0"
                )
            return _replace_input(args, kwargs, hidden + self._apply(p, hidden))
        if p.saved is not None and p.calls in p.saved:
            if p._reuse is None:  # decided once per pass: a prefix is reused whole or not at all
                p._reuse = self._can_reuse(p)
            if not p._reuse:
                return None
            batch = _batch_size(args, kwargs)
            if batch is not None:
                # The recorded clean output replaces this call's output (see _post), so the
                # block runs on one example only: its cost nearly disappears, its calls stay.
                p._reusing_call = True
                p.reused += 1
                return _one_example(args, batch), _one_example(kwargs, batch)
        return None

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        p = self._pass
        if p is None:
            return self._replay_post(output)
        if p.stack != self._stack_of[id(module)] or p.others:
            return None
        k = p.calls
        if p.perturb is None:
            # Under dynamo the noisy pass recomputes the prefix anyway (see _can_reuse), and
            # recording would make the graph depend on r: one recompile per layer.
            if p.saved is not None and 1 <= k <= p.layer and not torch.compiler.is_compiling():
                p.saved[k] = output
            return None
        replaced = False
        if p._reusing_call:
            assert p.saved is not None
            output, replaced, p._reusing_call = p.saved[k], True, False
        if k == p.layer and not p.applied:
            hidden = output_hidden(output)
            return replace_output_hidden(output, hidden + self._apply(p, hidden))
        return output if replaced else None

    def _apply(self, p: Pass, hidden: torch.Tensor) -> torch.Tensor:
        assert p.perturb is not None and p.stack is not None
        delta = p.perturb(hidden, self._batch_dims[p.stack])
        p.applied = True
        with torch.no_grad():
            p.noise_ratio = delta.detach().float().norm() / hidden.detach().float().norm()
        return delta

    def _can_reuse(self, p: Pass) -> bool:
        # Not under a reentrant checkpoint (grad off inside it) nor while dynamo traces (the
        # compiled graph recomputes the prefix anyway), nor for sequence-first layouts.
        # Nor inside a non-reentrant checkpoint (saved-tensor hooks are active): its
        # recomputation would run the cut inputs without the recorded outputs.
        assert p.stack is not None
        return (
            self._batch_dims[p.stack] == 0
            and torch.is_grad_enabled() == p.grad_enabled
            and not torch.compiler.is_compiling()
            and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
        )

    def _in_recomputation(self) -> bool:
        # Hooks firing inside backward: a checkpointed region being recomputed.
        return (
            not torch.compiler.is_compiling()
            and bool(self._replays)
            and torch._C._current_graph_task_id() != -1
        )

    def _replay_pre(self, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        if not self._in_recomputation():
            return None
        hidden = input_hidden(args, kwargs)
        chain, self._chain = self._chain, None
        if hidden is None:
            return None
        handed_on = self._chain_output() if self._chain_output is not None else None
        if chain is not None and handed_on is not None and _same_tensor_data(hidden, handed_on):
            self._chain = (chain[0], chain[1] + 1)  # the next call of the same recomputation
        else:
            for replay in reversed(self._replays):
                k = replay.call_of(hidden)
                if k is not None:
                    self._chain = (replay, k)
                    break
        if self._chain is None:
            return None
        replay, k = self._chain
        if replay.layer == 0 and k == 1:
            return _replace_input(args, kwargs, hidden + replay.perturb(hidden, replay.batch_dim))
        return None

    def _replay_post(self, output: Any) -> Any:
        if self._chain is None or not self._in_recomputation():
            return None
        replay, k = self._chain
        result = None
        if k == replay.layer:
            hidden = output_hidden(output)
            result = replace_output_hidden(
                output, hidden + replay.perturb(hidden, replay.batch_dim)
            )
        self._chain_output = weakref.ref(output_hidden(output if result is None else result))
        return result
