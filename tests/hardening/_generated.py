"""Generated models for the hardening tests: a real stack of blocks next to distractors.

A :class:`Spec` describes one model: where the stack that the forward really runs lives (a
ModuleList, Sequential or ModuleDict under random names at a random depth), how its blocks are
called and what they return, and which distractors sit next to it. :func:`specs` is the
hypothesis strategy; :func:`build` turns a spec into an ``nn.Module``; :func:`expected` says,
from the documented discovery rules alone, what the regularizer must do with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from hypothesis import strategies as st
from models import Block
from torch import nn

from ._profile import TALLY

HEADS = 2
VOCAB = 32
CLASSES = 3

# Wrapper names and stack names come from two pools, so a wrapper never shadows a stack.
WRAPPERS = ("model", "backbone", "encoder", "decoder", "text_encoder", "trunk", "body", "net")
LEAVES = ("layers", "blocks", "h", "layer", "stack", "cells")

CONTAINERS = ("list", "sequential", "dict")
CALLS = ("loop", "index", "whole")  # "whole": stack(x), Sequential only
BLOCKS = ("pre_norm", "hf_tuple", "torch_layer", "inner_list")
HEADS_KINDS = ("pooled", "token", "leading")

# Distractors. Only the attention stacks are candidates for discovery:
#   unused_stack     an attention stack the forward never calls
#   aux_stack        an attention stack the forward calls and whose output it discards
#   attn_adapters    per-block adapters that contain attention, interleaved with the blocks
#   adapters         per-block bottleneck adapters (no attention), interleaved
#   linear_list      a called chain of Linear layers, longer than the stack
#   wide_linears     an unused list of Linear layers larger than the blocks
#   hetero_seq       a called heterogeneous Sequential (an MLP before the head)
DISTRACTORS = (
    "unused_stack",
    "aux_stack",
    "attn_adapters",
    "adapters",
    "linear_list",
    "wide_linears",
    "hetero_seq",
)
ATTENTION_DISTRACTORS = ("unused_stack", "aux_stack", "attn_adapters")
# Distractors that are not candidates, or never run: discovery must still find the real stack.
QUIET = ("unused_stack", "adapters", "linear_list", "wide_linears", "hetero_seq")


@dataclass(frozen=True)
class Spec:
    """One generated model (see the module docstring)."""

    dim: int
    depth: int
    container: str
    call: str
    block: str
    head: str
    stack_path: tuple[str, ...]
    distractors: tuple[tuple[str, tuple[str, ...], int], ...]  # (kind, path, length)
    seed: int
    wrapped: bool = False  # the stack is item 0 of a heterogeneous Sequential(stack, LayerNorm)

    @property
    def path(self) -> str:
        return ".".join(self.stack_path) + (".0" if self.wrapped else "")

    def paths(self, kind: str) -> list[str]:
        return [".".join(p) for k, p, _ in self.distractors if k == kind]

    def has(self, kind: str) -> bool:
        return any(k == kind for k, _, _ in self.distractors)


# -- blocks -------------------------------------------------------------------------------------


class HFLayer(nn.Module):
    """Hugging Face shaped: called with ``hidden_states=``, returns a one-tuple."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, HEADS, batch_first=True)
        self.output = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))

    def forward(self, hidden_states, attention_mask=None):
        attended, _ = self.attention(hidden_states, hidden_states, hidden_states)
        return (self.output(hidden_states + attended),)


class InnerListBlock(Block):
    """A block holding its own list of attention sub-layers (a nested candidate)."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, HEADS)
        self.heads_attn = nn.ModuleList([nn.MultiheadAttention(dim, 1, batch_first=True)])

    def forward(self, x):
        x = super().forward(x)
        for attn in self.heads_attn:
            x = x + attn(x, x, x, need_weights=False)[0]
        return x


class Adapter(nn.Module):
    """Bottleneck adapter, no attention."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(dim, 4), nn.Linear(4, dim)

    def forward(self, x):
        return x + self.up(torch.relu(self.down(x)))


class AttnAdapter(nn.Module):
    """An adapter with attention inside: a candidate stack in its own right."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 1, batch_first=True)

    def forward(self, x):
        return x + 0.5 * self.attn(x, x, x, need_weights=False)[0]


def _block(kind: str, dim: int) -> nn.Module:
    if kind == "pre_norm":
        return Block(dim, HEADS)
    if kind == "hf_tuple":
        return HFLayer(dim)
    if kind == "torch_layer":
        return nn.TransformerEncoderLayer(dim, HEADS, 2 * dim, dropout=0.0, batch_first=True)
    return InnerListBlock(dim)


def _container(kind: str, modules: list[nn.Module]) -> nn.Module:
    if kind == "list":
        return nn.ModuleList(modules)
    if kind == "sequential":
        return nn.Sequential(*modules)
    return nn.ModuleDict({f"b{i}": m for i, m in enumerate(modules)})


def _members(container: nn.Module) -> list[nn.Module]:
    return list(container.values()) if isinstance(container, nn.ModuleDict) else list(container)


class Holder(nn.Module):
    """A named level of nesting; never called."""


def _place(root: nn.Module, path: tuple[str, ...], module: nn.Module) -> None:
    holder = root
    for name in path[:-1]:
        if not hasattr(holder, name):
            holder.add_module(name, Holder())
        holder = getattr(holder, name)
    holder.add_module(path[-1], module)


# -- the model ----------------------------------------------------------------------------------


class GeneratedModel(nn.Module):
    """Embedding, the real stack (plus distractors) and a head, as the spec says."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        torch.manual_seed(spec.seed)
        dim = spec.dim
        self.spec = spec
        self.embed = nn.Embedding(VOCAB, dim)
        stack = _container(spec.container, [_block(spec.block, dim) for _ in range(spec.depth)])
        _place(
            self,
            spec.stack_path,
            nn.Sequential(stack, nn.LayerNorm(dim)) if spec.wrapped else stack,
        )
        object.__setattr__(self, "_real_stack", stack)  # registered at its path only
        self.extras: dict[str, nn.Module] = {}
        for kind, path, length in spec.distractors:
            module = self._distractor(kind, dim, length)
            _place(self, path, module)
            self.extras[kind] = module
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, CLASSES * (2 if spec.head == "leading" else 1))

    @staticmethod
    def _distractor(kind: str, dim: int, length: int) -> nn.Module:
        if kind in ("unused_stack", "aux_stack"):
            return nn.ModuleList(Block(dim, HEADS) for _ in range(length))
        if kind == "attn_adapters":
            return nn.ModuleList(AttnAdapter(dim) for _ in range(length))
        if kind == "adapters":
            return nn.ModuleList(Adapter(dim) for _ in range(length))
        if kind == "linear_list":
            return nn.ModuleList(nn.Linear(dim, dim) for _ in range(length))
        if kind == "wide_linears":
            return nn.ModuleList(nn.Linear(4 * dim, 4 * dim) for _ in range(length))
        return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.spec.block == "hf_tuple":
            return block(hidden_states=x)[0]
        return block(x)

    def _adapt(self, x: torch.Tensor, start: int, stop: int = 8) -> torch.Tensor:
        """Run adapters ``start..stop-1`` of each adapter list (each one runs once a forward)."""
        for kind in ("adapters", "attn_adapters"):
            adapters = self.extras.get(kind)
            for i in range(start, min(stop, len(adapters) if adapters is not None else 0)):
                x = adapters[i](x)
        return x

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        x = self.embed(ids)
        if "aux_stack" in self.extras:  # run, then thrown away (a probe, a side loss...)
            probe = x
            for block in self.extras["aux_stack"]:
                probe = block(probe)
        stack = self._real_stack
        blocks = _members(stack)
        if spec.call == "whole":
            whole = self.get_submodule(".".join(spec.stack_path)) if spec.wrapped else stack
            x = self._adapt(whole(x), 0)
        elif spec.call == "index":
            keys = list(stack.keys()) if isinstance(stack, nn.ModuleDict) else None
            for i in range(len(blocks)):
                block = stack[keys[i]] if keys else stack[i]
                x = self._adapt(self._run_block(block, x), i, i + 1)
        else:
            for i, block in enumerate(blocks):
                x = self._adapt(self._run_block(block, x), i, i + 1)
        if spec.call != "whole":
            x = self._adapt(x, spec.depth)  # adapters left over when the stack is shorter
        if "linear_list" in self.extras:
            for linear in self.extras["linear_list"]:
                x = x + 0.1 * torch.tanh(linear(x))
        if "hetero_seq" in self.extras:
            x = x + self.extras["hetero_seq"](x)
        x = self.norm(x)
        if spec.head == "pooled":
            return self.head(x.mean(1))
        logits = self.head(x)
        if spec.head == "token":
            return logits
        return logits.view(*x.shape[:2], 2, CLASSES).movedim(2, 0)  # [2, batch, seq, classes]


def build(spec: Spec) -> GeneratedModel:
    TALLY["models"] += 1
    return GeneratedModel(spec)


# -- the strategy -------------------------------------------------------------------------------


@st.composite
def _path(draw, leaf: str) -> tuple[str, ...]:
    wrappers = draw(st.lists(st.sampled_from(WRAPPERS), min_size=0, max_size=3))
    return (*wrappers, leaf)


@st.composite
def specs(
    draw,
    *,
    distractors: Optional[tuple[str, ...]] = DISTRACTORS,
    require: tuple[str, ...] = (),
    blocks: tuple[str, ...] = BLOCKS,
) -> Spec:
    """Generated model specs.

    Args:
        distractors: The kinds drawn from (None: no distractors).
        require: Kinds every spec has.
        blocks: The block kinds drawn from.
    """
    container = draw(st.sampled_from(CONTAINERS))
    call = draw(st.sampled_from(CALLS if container == "sequential" else CALLS[:2]))
    if call == "whole":  # a Sequential hands each block's output to the next as is
        blocks = tuple(b for b in blocks if b != "hf_tuple") or ("pre_norm",)
    depth = draw(st.integers(1, 4))
    stack_path = draw(_path(draw(st.sampled_from(LEAVES))))
    kinds = draw(st.lists(st.sampled_from(distractors or ("none",)), max_size=3, unique=True))
    kinds = [*require, *(k for k in kinds if k not in require)]
    chosen = []
    for n, kind in enumerate(k for k in kinds if k != "none"):
        # Stacks of adapters follow the blocks (some left over); the rest have any length.
        low = depth if kind in ("adapters", "attn_adapters") else 1
        length = draw(st.integers(low, max(low, depth + 2)))
        if kind == "linear_list":
            length = depth + draw(st.integers(1, 3))  # longer than the stack
        chosen.append((kind, draw(_path(f"{draw(st.sampled_from(LEAVES))}_{n}")), length))
    return Spec(
        dim=draw(st.sampled_from((8, 12, 16))),
        depth=depth,
        container=container,
        call=call,
        block=draw(st.sampled_from(blocks)),
        head=draw(st.sampled_from(HEADS_KINDS)),
        stack_path=stack_path,
        wrapped=call == "whole" and draw(st.booleans()),
        distractors=tuple(chosen),
        seed=draw(st.integers(0, 2**16)),
    )


# -- what the documented rules say must happen --------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """The outcome the documented discovery rules predict for a spec.

    Attributes:
        outcome: ``"perturbs"`` (a penalty > 0 at ``path``), ``"ambiguous"`` (a
            BlockDiscoveryError listing ``conflict`` and naming ``blocks=``), or ``"unused"``
            (a RaptRegError: no block of the kept candidates ran, naming ``blocks=``), or
            ``"discarded"``: ``prefer`` kept only a stack that runs but whose output the model
            throws away (the noise cannot change the output: the exactly-zero penalty must be
            announced, once).
        path: The stack the noise must land in, for ``"perturbs"``.
        depth: Block calls per forward of that stack.
        conflict: The stacks that run, in the order they first run (the error must list them).
    """

    outcome: str
    path: str = ""
    depth: int = 0
    conflict: tuple[str, ...] = ()


def _preferred(paths: list[str], prefer: str) -> list[str]:
    kept = [p for p in paths if any(prefer in part for part in p.split("."))]
    return kept or paths


def expected(spec: Spec, prefer: str = "encoder") -> Expected:
    """Apply the documented rules: candidates, ``prefer`` filter, the ones that fire win."""
    lengths = {".".join(p): n for k, p, n in spec.distractors}
    kinds = {".".join(p): k for k, p, _ in spec.distractors}
    candidates = [spec.path] + [p for p, k in kinds.items() if k in ATTENTION_DISTRACTORS]
    kept = _preferred(candidates, prefer)
    # Stacks that fire, in order of their first call: the aux probe runs before the blocks.
    firing = [p for p in kept if kinds.get(p) == "aux_stack"]
    firing += [p for p in kept if p == spec.path or kinds.get(p) == "attn_adapters"]
    if not firing:
        return Expected("unused")
    if len(firing) > 1:
        return Expected("ambiguous", conflict=tuple(firing))
    path = firing[0]
    outcome = "discarded" if kinds.get(path) == "aux_stack" else "perturbs"
    return Expected(outcome, path=path, depth=lengths.get(path, spec.depth))


# -- shared test helpers ------------------------------------------------------------------------


def hook_count(model: nn.Module) -> int:
    """Forward and pre-forward hooks on every module of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def hooked_modules(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks}


def stack_members(model: nn.Module, path: str) -> list[str]:
    """Dotted names of the members of the container at ``path``."""
    return [f"{path}.{n}" for n, _ in model.get_submodule(path).named_children()]


def candidate_lengths(spec: Spec) -> list[int]:
    return [spec.depth] + [n for k, _, n in spec.distractors if k in ATTENTION_DISTRACTORS]


def ids_for(spec: Spec, batch: int = 2, seq: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(spec.seed))
