"""Generated model structures and usage patterns for tests/hardening/test_structures.py.

A :class:`Case` is one training step: a model (one or two stacks of :class:`models.Block`, each
block module called 1-3 times per forward, a ``config`` that may disagree with the stacks), how
it is checkpointed, and 1-3 regularizers on it (method, layer, seed, which stack) whose graphs
are alive at once or freed one by one. :func:`cases` is the hypothesis strategy, :func:`judge`
plays a case and judges it against the same step without checkpointing with each regularizer
alone, and :func:`summary` counts outcomes by every drawn dimension. The allow-list of
refusals lives in the test.
"""

from __future__ import annotations

import inspect
import types
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from hypothesis import strategies as st
from models import Block
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from rapt_reg import R3FRegularizer, RandomPerturbationRegularizer, RaptRegError, SmartRegularizer

from ._generated import CLASSES, HEADS, VOCAB, hook_count

DIM = 8
TOLERANCE = 1e-9
STEP_SEED = 5  # torch.manual_seed before the clean pass (its dropout)
R3F_EPS = 0.5  # large enough that a lost noisy-side gradient shows above TOLERANCE

# How a stack's block modules are called in one forward (``order`` gives the call sequence):
#   loop         each block once
#   looped       weight-tied: the whole stack run ``repeats`` (2 or 3) times
#   interleaved  block i runs again after block i+1: 0, 1, 0, 2, 1, ...
#   siamese      the first stack (the encoder, or the only one) applied to two inputs
STRUCTURES = ("loop", "looped", "interleaved", "siamese")
STACKS = ("encoder", "decoder", "encoder-decoder")
# Checkpointing, all combined with every structure and stack:
#   block       torch.utils.checkpoint around each block call (reentrant or not)
#   wrapper     torch.distributed's checkpoint_wrapper around each block; the hooks sit on the
#               wrapped blocks, as when apply_activation_checkpointing runs after the
#               regularizer was built
#   sequential  checkpoint_sequential over each stack run's calls (2-3 segments)
#   whole       one checkpoint around everything after the embedding (reentrant or not)
#   everything  one checkpoint around the whole forward, ids in; non-reentrant only (a
#               reentrant region whose inputs are token ids gives no parameter a gradient)
CHECKPOINTS = ("none", "block", "wrapper", "sequential", "whole", "everything")
REENTRANT_KINDS = ("block", "wrapper", "sequential", "whole")
METHODS = ("rapt", "smart", "r3f")
SELECTIONS = ("default", "prefer", "path", "list")  # how a regularizer names its stack
CONFIGS = ("absent", "calls", "modules", "double", "other")

# 0.2.0's R3F perturbs the token embeddings and takes no prefer=/blocks=; from 0.3.0 its noise
# goes through the block hooks like RAPT's, and it picks its stack like RAPT.
R3F_SELECTS = "prefer" in inspect.signature(R3FRegularizer.__init__).parameters


@dataclass(frozen=True)
class Reg:
    """One regularizer of a case."""

    method: str  # "rapt", "smart" or "r3f"
    layer: int  # RAPT's min_layer = max_layer (0: RAPT-embedding); 0 for SMART and R3F
    seed: int  # of its generator
    target: str  # the stack it names: "encoder" or "decoder"
    selection: str  # "default", "prefer", "path" (blocks="<path>") or "list" (blocks=[...])

    @property
    def label(self) -> str:
        if self.method != "rapt":
            return self.method
        return "rapt-embedding" if self.layer == 0 else "rapt-layer"


@dataclass(frozen=True)
class Case:
    """One generated training step (see the module docstring)."""

    stacks: str
    depths: tuple[int, ...]  # block modules per stack (encoder first)
    structure: str
    repeats: int  # looped only
    dropout: float
    checkpoint: str
    reentrant: bool
    segments: int  # checkpoint_sequential only
    config: str
    config_layers: Optional[int]  # config.num_hidden_layers (None: no config)
    regs: tuple[Reg, ...]
    alive: bool  # all penalties summed, one backward (else each backpropagated in turn)
    batch: int
    seq: int
    seed: int

    @property
    def names(self) -> tuple[str, ...]:
        return ("encoder", "decoder") if self.stacks == "encoder-decoder" else (self.stacks,)

    def order(self, stack: str) -> list[int]:
        """The block indices one run of ``stack`` calls, in order."""
        depth = self.depths[self.names.index(stack)]
        if self.structure == "looped":
            return list(range(depth)) * self.repeats
        if self.structure == "interleaved":
            return [j for i in range(depth) for j in ((i, i - 1) if i else (0,))]
        return list(range(depth))

    def runs(self, stack: str) -> int:
        """How often ``stack`` runs in one forward (the siamese first stack: twice)."""
        return 2 if self.structure == "siamese" and stack == self.names[0] else 1

    def calls(self, stack: str) -> int:
        """Block calls of ``stack`` in one forward: the layers RAPT can reach there."""
        return len(self.order(stack)) * self.runs(stack)

    def calls_per_module(self) -> int:
        return max(Counter(self.order(self.names[0])).values()) * self.runs(self.names[0])

    def first_call_reentrant(self, stack: str) -> bool:
        """Whether the first block call of ``stack`` runs inside a reentrant checkpoint."""
        if not self.reentrant:
            return False
        if self.checkpoint == "sequential":  # its last segment runs plainly
            return min(self.segments, len(self.order(stack))) > 1
        return self.checkpoint in ("block", "wrapper", "whole")


# -- the strategy -------------------------------------------------------------------------------


def _config_layers(kind: str, case_modules: int, case_calls: int, other: int) -> Optional[int]:
    return {
        "absent": None,
        "calls": case_calls,
        "modules": case_modules,
        "double": 2 * case_modules,
        "other": other,
    }[kind]


@st.composite
def _reg(draw: st.DrawFn, partial: Case) -> Reg:
    method = draw(st.sampled_from(METHODS), label="method")
    target = draw(st.sampled_from(partial.names), label="target")
    choices = SELECTIONS[1:] if target == "decoder" and len(partial.names) == 2 else SELECTIONS
    selection = draw(st.sampled_from(choices), label="selection")
    layer = 0
    if method == "rapt":
        calls = partial.calls(target)
        highest = max(calls + 1, partial.config_layers or 0)
        beyond = draw(st.integers(0, 4), label="beyond") == 0  # one in five: refused
        low, high = (calls + 1, highest) if beyond else (0, calls)
        layer = draw(st.integers(low, high), label="layer")
    seed = draw(st.sampled_from((11, 12, 13)), label="seed")
    return Reg(method, layer, seed, target, selection)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    stacks = draw(st.sampled_from(STACKS), label="stacks")
    n = 2 if stacks == "encoder-decoder" else 1
    depths = tuple(draw(st.integers(1, 3), label="depth") for _ in range(n))
    structure = draw(st.sampled_from(STRUCTURES), label="structure")
    kind = draw(st.sampled_from(CHECKPOINTS), label="checkpoint")
    config = draw(st.sampled_from(CONFIGS), label="config")
    partial = Case(
        stacks=stacks,
        depths=depths,
        structure=structure,
        repeats=draw(st.integers(2, 3), label="repeats") if structure == "looped" else 1,
        dropout=draw(st.sampled_from((0.0, 0.1)), label="dropout"),
        checkpoint=kind,
        reentrant=kind in REENTRANT_KINDS and draw(st.booleans(), label="reentrant"),
        segments=draw(st.integers(2, 3), label="segments") if kind == "sequential" else 0,
        config=config,
        config_layers=None,
        regs=(),
        alive=draw(st.booleans(), label="alive"),
        batch=draw(st.integers(2, 3), label="batch"),
        seq=draw(st.integers(3, 5), label="seq"),
        seed=draw(st.integers(0, 2**16), label="seed"),
    )
    first = partial.names[0]
    layers = _config_layers(
        config, depths[0], partial.calls(first), draw(st.integers(1, 6), label="other")
    )
    partial = replace(partial, config_layers=layers)
    count = draw(st.integers(1, 3), label="regularizers")
    regs = tuple(draw(_reg(partial), label=f"reg{i}") for i in range(count))
    return replace(partial, regs=regs)


# -- the model ----------------------------------------------------------------------------------


class Stack(nn.Module):
    """A named stack: its blocks live at ``<name>.layers``."""

    def __init__(self, depth: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(DIM, HEADS, dropout) for _ in range(depth))


class StructureModel(nn.Module):
    """One shared token embedding, the case's stacks run its way, a pooled head; float64.

    Encoder-decoder: the decoder runs on the target's embeddings plus the pooled encoder
    output (the siamese encoder's two outputs summed). Siamese with one stack: the two pooled
    outputs are concatenated before the head. ``checkpointed`` switches the case's
    checkpointing on or off (off: the reference).
    """

    def __init__(self, case: Case) -> None:
        super().__init__()
        torch.manual_seed(case.seed)
        self.case = case
        self.embed = nn.Embedding(VOCAB, DIM)
        for name, depth in zip(case.names, case.depths):
            self.add_module(name, Stack(depth, case.dropout))
        single_siamese = case.structure == "siamese" and len(case.names) == 1
        self.head = nn.Linear(DIM * (2 if single_siamese else 1), CLASSES)
        if case.config_layers is not None:
            self.config = types.SimpleNamespace(
                num_hidden_layers=case.config_layers,
                is_encoder_decoder=len(case.names) == 2,
            )
        impl = CheckpointImpl.REENTRANT if case.reentrant else CheckpointImpl.NO_REENTRANT
        # A plain list: the wrappers are not submodules, so discovery sees the Blocks.
        self.wrappers = {
            name: [checkpoint_wrapper(b, checkpoint_impl=impl) for b in self.blocks(name)]
            for name in case.names
        }
        self.checkpointed = True
        self.double()

    def blocks(self, name: str) -> nn.ModuleList:
        return self.get_submodule(f"{name}.layers")

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """Token ids: one sequence per siamese branch, plus the decoder's target."""
        case = self.case
        count = (2 if case.structure == "siamese" else 1) + (len(case.names) == 2)
        gen = torch.Generator().manual_seed(case.seed)
        return tuple(
            torch.randint(0, VOCAB, (case.batch, case.seq), generator=gen) for _ in range(count)
        )

    def _kind(self) -> str:
        return self.case.checkpoint if self.checkpointed else "none"

    def forward(self, *ids: torch.Tensor) -> torch.Tensor:
        if self._kind() == "everything":
            return checkpoint(self._embed_and_run, *ids, use_reentrant=False)
        return self._embed_and_run(*ids)

    def _embed_and_run(self, *ids: torch.Tensor) -> torch.Tensor:
        embeds = [self.embed(i) for i in ids]
        if self._kind() == "whole":
            return checkpoint(self._body, *embeds, use_reentrant=self.case.reentrant)
        return self._body(*embeds)

    def _body(self, *embeds: torch.Tensor) -> torch.Tensor:
        first = self.case.names[0]
        sources = embeds[:2] if self.case.structure == "siamese" else embeds[:1]
        pooled = [self._run(first, h).mean(1) for h in sources]
        if len(self.case.names) == 1:
            return self.head(torch.cat(pooled, -1))
        memory = sum(pooled).unsqueeze(1)
        return self.head(self._run("decoder", embeds[-1] + memory).mean(1))

    def _run(self, name: str, h: torch.Tensor) -> torch.Tensor:
        kind, reentrant = self._kind(), self.case.reentrant
        order = self.case.order(name)
        blocks = self.blocks(name)
        if kind == "sequential":
            calls = [blocks[i] for i in order]
            segments = min(self.case.segments, len(calls))
            return checkpoint_sequential(calls, segments, h, use_reentrant=reentrant)
        for i in order:
            if kind == "block":
                h = checkpoint(blocks[i], h, use_reentrant=reentrant)
            elif kind == "wrapper":
                h = self.wrappers[name][i](h)
            else:
                h = blocks[i](h)
        return h


# -- one step -----------------------------------------------------------------------------------


def build_regularizer(model: StructureModel, reg: Reg) -> Any:
    generator = torch.Generator().manual_seed(reg.seed)
    selection: dict[str, Any] = {}
    if reg.selection == "prefer":
        selection["prefer"] = reg.target
    elif reg.selection == "path":
        selection["blocks"] = f"{reg.target}.layers"
    elif reg.selection == "list":
        selection["blocks"] = list(model.blocks(reg.target))
    if reg.method == "rapt":
        return RandomPerturbationRegularizer(
            model, min_layer=reg.layer, max_layer=reg.layer, generator=generator, **selection
        )
    if reg.method == "smart":
        return SmartRegularizer(model, k=1, generator=generator, **selection)
    return R3FRegularizer(
        model, eps=R3F_EPS, generator=generator, **(selection if R3F_SELECTS else {})
    )


def _loss(clean: torch.Tensor) -> torch.Tensor:
    return clean.logsumexp(-1).mean()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient (zeros where none arrived)."""
    return {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in model.named_parameters()
    }


def step(model: StructureModel, regs: tuple[Reg, ...], alive: bool, clean_loss: bool = True):
    """One step with ``regs`` installed: ``(penalties, gradients)``; regularizers removed after.

    ``clean_loss=False`` backpropagates the penalties only (a reference's part).
    """
    ids = model.inputs()
    model.zero_grad(set_to_none=True)
    built: list[Any] = []
    try:
        for reg in regs:
            built.append(build_regularizer(model, reg))

        def forward() -> torch.Tensor:
            return model(*ids)

        torch.manual_seed(STEP_SEED)
        clean = forward()
        loss = _loss(clean) if clean_loss else clean.new_zeros(())
        if alive:
            penalties = [reg(forward, clean) for reg in built]
            (loss + sum(penalties)).backward()
            values = [p.detach() for p in penalties]
        else:
            values = []
            for reg in built:
                penalty = reg(forward, clean)
                penalty.backward(retain_graph=True)  # the clean graph serves the next one
                values.append(penalty.detach())
                del penalty  # its noisy graph is freed before the next pass
            if clean_loss:
                loss.backward()
    finally:
        for reg in built:
            reg.remove()
    return values, _grads(model)


@dataclass(frozen=True)
class Outcome:
    """``kind``: "exact", "refused" (a RaptRegError), "torch-error" (any other exception) or
    "wrong" (the numbers differ, or the step did what the unchecked step alone refuses)."""

    kind: str
    detail: str = ""


def _raised(exc: Exception) -> Outcome:
    if isinstance(exc, RaptRegError):
        return Outcome("refused", str(exc))
    return Outcome("torch-error", f"{type(exc).__name__}: {exc}")


def judge(case: Case) -> Outcome:
    """Play ``case``; compare it with the same step unchecked, each regularizer alone."""
    model = StructureModel(case).train()
    try:
        values, grads = step(model, case.regs, case.alive)
    except Exception as exc:  # noqa: BLE001 - every exception is an outcome to count
        outcome = _raised(exc)
    else:
        outcome = None
    if hook_count(model):
        return Outcome("wrong", f"{hook_count(model)} hooks left on the model after remove()")
    if outcome is not None:
        return outcome
    model.checkpointed = False
    try:
        alone = [step(model, (reg,), alive=True, clean_loss=False) for reg in case.regs]
        expected = step(model, (), alive=True)[1]  # the clean loss's part, once
    except RaptRegError as exc:
        return Outcome("wrong", f"accepted what the unchecked step alone refuses: {exc}")
    except Exception as exc:  # noqa: BLE001
        return Outcome("torch-error", f"reference: {type(exc).__name__}: {exc}")
    for _, reg_grads in alone:
        for name in expected:
            expected[name] += reg_grads[name]
    for reg, ((value,), _) in zip(case.regs, alone):
        if reg.method == "rapt" and not value > 0:
            return Outcome("wrong", f"RAPT at layer {reg.layer} alone gave the penalty {value}")
    penalty_diff = max(abs(float(v - a)) for v, ((a,), _) in zip(values, alone))
    grad_diff = {n: float((grads[n] - expected[n]).abs().max()) for n in expected}
    worst = max(grad_diff, key=grad_diff.__getitem__)
    if not max(penalty_diff, grad_diff[worst]) <= TOLERANCE:  # NaN included
        return Outcome(
            "wrong", f"|d penalty| {penalty_diff:.3g}, |d grad| {grad_diff[worst]:.3g} at {worst}"
        )
    return Outcome("exact")


# -- counting -----------------------------------------------------------------------------------


def dimensions(case: Case) -> dict[str, str]:
    """The values of ``case`` that the report breaks the outcomes down by."""
    seeds = [r.seed for r in case.regs]
    if len(seeds) == 1:
        same = "one regularizer"
    else:
        same = "all different" if len(set(seeds)) == len(seeds) else "some equal"
    kind = case.checkpoint
    if kind in REENTRANT_KINDS:
        kind += " reentrant" if case.reentrant else " non-reentrant"
    if case.config_layers is None:
        config = "absent"
    elif all(case.config_layers == case.calls(r.target) for r in case.regs):
        config = "agrees with the calls"
    else:
        config = "disagrees"
    looped = case.structure == "looped"
    return {
        "structure": case.structure + (f" x{case.repeats}" if looped else ""),
        "calls per block module": str(case.calls_per_module()),
        "stacks": case.stacks,
        "regularizers": str(len(case.regs)),
        "seeds": same,
        "graphs": "alive" if case.alive else "freed",
        "methods": "+".join(sorted({r.label for r in case.regs})),
        "checkpoint": kind,
        "config": config,
        "dropout": str(case.dropout),
    }


COLUMNS = ("cases", "exact", "refused allowed", "refused other", "torch-error", "wrong")


def _column(category: str) -> str:
    """The summary column of a category ("refused (beyond-calls)", "torch-error (X)", ...)."""
    if category.startswith("refused"):
        return "refused other" if category == REFUSED_OTHER else "refused allowed"
    return category.split(" ")[0]


REFUSED_OTHER = "refused (not on the allow-list)"


def summary(records: list[tuple[Case, str]]) -> str:
    """Counts of ``(case, category)`` records, overall and by every dimension of a case."""
    total = Counter(_column(c) for _, c in records)
    lines = [f"{len(records)} cases: " + ", ".join(f"{total[k]} {k}" for k in COLUMNS[1:])]
    for name, n in Counter(c for _, c in records).most_common():
        lines.append(f"  {n:5d}  {name}")
    header = "".join(f"{k:>17s}" for k in COLUMNS)
    for dim in dimensions(records[0][0]) if records else ():
        rows: dict[str, Counter] = {}
        for case, category in records:
            row = rows.setdefault(dimensions(case)[dim], Counter())
            row.update(("cases", _column(category)))
        lines.append(f"by {dim}:".ljust(32) + header)
        for value, row in sorted(rows.items()):
            lines.append(f"  {value:30s}" + "".join(f"{row[k]:17d}" for k in COLUMNS))
    return "\n".join(lines)
