"""Every refusal leaves the model exactly as it was, and every refusal in the core is walked.

Each case raises a :class:`RaptRegError` from a constructor or from a call. Around it the model's
hooks (which functions, by identity), attributes (by identity), buffers and ``state_dict``
(by value) are compared with a snapshot taken just before. A tracer records which ``raise``
statements of the core ran; the last test checks that every one of them was reached by some
case (so a new refusal needs a case here).
"""

from __future__ import annotations

import ast
import functools
import sys
import types
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from models import TinyTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

import rapt_reg
from rapt_reg import (
    R3FRegularizer,
    RandomPerturbationRegularizer,
    RaptRegError,
    SmartRegularizer,
)

CORE = [
    "regularizer.py",
    "hooks.py",
    "discovery.py",
    "head.py",
    "baselines/smart.py",
    "baselines/r3f.py",
    "divergence.py",
    "replay.py",
    "noise.py",
]
ERRORS = {"RaptRegError", "BlockDiscoveryError", "ambiguity_error"}
_PACKAGE = Path(rapt_reg.__file__).parent
HIT: set[tuple[str, int]] = set()

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def snapshot(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """Hooks and attributes by identity, per module; the state_dict by value."""
    modules = {}
    for name, module in model.named_modules():
        modules[name] = {
            "type": type(module),
            "attributes": {k: id(v) for k, v in vars(module).items()},
            "hooks": {
                k: [(key, id(fn)) for key, fn in getattr(module, k, {}).items()] for k in HOOK_DICTS
            },
            "parameters": {k: id(v) for k, v in module._parameters.items()},
            "buffers": {k: id(v) for k, v in module._buffers.items()},
        }
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    return modules, state


def assert_unchanged(model: nn.Module, before: tuple[dict, dict[str, torch.Tensor]]) -> None:
    modules, state = snapshot(model)
    assert modules == before[0]
    assert state.keys() == before[1].keys()
    for key, value in state.items():
        assert torch.equal(value, before[1][key]), key


def _tracer(frame: Any, event: str, arg: Any) -> Any:
    filename = frame.f_code.co_filename
    if not filename.startswith(str(_PACKAGE)):
        return None

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            HIT.add((str(Path(frame.f_code.co_filename).relative_to(_PACKAGE)), frame.f_lineno))
        return local

    return local


def _model(**kwargs: Any) -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer(depth=3, dim=8, heads=2, **kwargs).train()


IDS = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))


class TwoStacks(nn.Module):
    """Two same-shaped stacks that both run: only a forward shows the ambiguity."""

    def __init__(self) -> None:
        super().__init__()
        self.a = _model()
        self.b = _model()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.a(ids) + self.b(ids)


def _removed(reg: Any) -> Any:
    reg.remove()
    return reg


def _smart_batch_changes(reg: Any, model: nn.Module) -> Any:
    batches = iter([IDS, IDS[:1]])
    return reg(lambda: model(next(batches)), model(IDS))


class Reseeding(nn.Module):
    """A forward that re-seeds the global RNG before every block: its hook calls' states repeat."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _model()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.inner.embed(ids)
        for block in self.inner.layers:
            torch.manual_seed(0)
            h = block(h)
        return self.inner.head(h.mean(1))


class Checkpointed(nn.Module):
    """Blocks inside nested reentrant checkpoints (``nested``), or a region whose
    recomputation runs the blocks in another order than its forward (``shuffled``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.inner, self.kind, self.runs = _model(), kind, [0]  # a list: the same object

    def _blocks(self, h: torch.Tensor) -> torch.Tensor:
        layers = list(self.inner.layers)
        if self.kind == "nested":
            for block in layers:
                h = checkpoint(block, h, use_reentrant=True)
            return h
        self.runs[0] += 1
        for block in layers if self.runs[0] % 2 else layers[::-1]:
            h = block(h)
        return h

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.inner.embed(ids) + self.inner.pos[:, : ids.shape[1]]
        h = checkpoint(self._blocks, h, use_reentrant=self.kind == "nested")
        return self.inner.head(h.mean(1))


class Wrapped(nn.Module):
    """A block whose forward checkpoints (reentrant) its inner block, hooks left outside (as
    transformers' layers do)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, h, use_reentrant=True)


def _wrapped_blocks() -> nn.Module:
    model = _model()
    model.layers = nn.ModuleList(Wrapped(block) for block in model.layers)
    return model


def _backward_step(reg: Any, model: nn.Module) -> None:
    clean, penalty = reg.pair(lambda: model(IDS))
    (clean.sum() + penalty).backward()


def _same_seed_alive(reg: Any, model: nn.Module) -> None:
    twin = RandomPerturbationRegularizer(model, generator=torch.Generator().manual_seed(0))
    first = _pair(reg, model)
    try:
        twin.pair(lambda: model(IDS))
    finally:
        twin.remove()
        del first


class DoubledLogits(TinyTransformer):
    """Token logits the model doubles after its head: not what head= would make."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return 2 * super().forward(ids)


class ScaledBeforeHead(TinyTransformer):
    """A fused loss (no head in a pass with labels) whose head is given its body's output
    halved (as T5 scales it): the body's output is not what the head would see."""

    def get_decoder(self) -> nn.Module:
        return self.layers[-1]

    def forward(self, ids: torch.Tensor, labels: Any = None) -> Any:  # type: ignore[override]
        h = self.drop(self.embed(ids) + self.pos[:, : ids.shape[1]])
        for layer in self.layers:
            h = layer(h)
        if labels is not None:  # a fused loss: the head's weight, no head call
            return types.SimpleNamespace(loss=(h @ self.head.weight.T).logsumexp(-1).mean())
        return self.head(self.norm(h) * 0.5)


def _fused_pass(reg: Any, model: nn.Module) -> Any:
    calls = iter([{"labels": IDS}, {}])
    return reg.pair(lambda: model(IDS, **next(calls)))


def _zero3_head() -> nn.Module:
    model = _model(token_level=True)
    model.head.weight.ds_shape = model.head.weight.shape  # what DeepSpeed ZeRO-3 sets
    return model


def _doubled_logits() -> nn.Module:
    torch.manual_seed(0)
    return DoubledLogits(depth=3, dim=8, heads=2, token_level=True).train()


class OneDimensionalHead(nn.Module):
    """A model whose output layer is applied to one vector: no positions to take."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _model()
        self.out = nn.Linear(3, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.inner(ids)[0])


class NoTensorBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(4, 4)

    def forward(self, x: Any = None) -> Any:
        return object() if x is None else x


class FlatStack(nn.Module):
    """Blocks on 1-D hidden states: nothing there for a [batch, seq] noise mask to fit."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(NoTensorBlock() for _ in range(2))
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return (x * self.w)[None]


class ListStack(nn.Module):
    """Blocks called without tensors, or returning no tensor."""

    def __init__(self, call_without_tensor: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(NoTensorBlock() for _ in range(2))
        self.w = nn.Parameter(torch.ones(3))
        self.call_without_tensor = call_without_tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.call_without_tensor:
            self.layers[0]()
            return x * self.w
        for layer in self.layers[:1]:
            layer(object())
        return x * self.w


# -- the cases: (what a user did, the model it was done to, the failing action) ----------------


def _construct(cls: type, **kwargs: Any) -> Callable[[nn.Module], Any]:
    return lambda model: cls(model, **kwargs)


def _call(make: Callable[[nn.Module], Any], action: Callable[[Any, nn.Module], Any]):
    """A regularizer built first; only the failing call is inside the snapshot."""

    def setup(model: nn.Module) -> Callable[[], Any]:
        reg = make(model)
        return functools.partial(action, reg, model)

    return setup


def _pair(reg: Any, model: nn.Module) -> Any:
    return reg.pair(lambda: model(IDS))


RAPT = RandomPerturbationRegularizer

CONSTRUCTOR_CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], Any]]] = {
    "model is a class": (_model, lambda m: RAPT(TinyTransformer)),
    "model is not a module": (_model, lambda m: RAPT(object())),
    "DataParallel": (_model, lambda m: RAPT(nn.DataParallel(m))),
    "nonfinite unknown": (_model, _construct(RAPT, nonfinite="ignore")),
    "generator not a generator": (_model, _construct(RAPT, generator=3)),
    "alpha not a number": (_model, _construct(RAPT, alpha="1")),
    "alpha negative": (_model, _construct(RAPT, alpha=-1.0)),
    "divergence unknown": (_model, _construct(RAPT, divergence="hellinger")),
    "eta infinite": (_model, _construct(RAPT, eta=float("inf"))),
    "max_layer negative": (_model, _construct(RAPT, max_layer=-1)),
    "min_layer above max_layer": (_model, _construct(RAPT, min_layer=3, max_layer=2)),
    "norm unknown": (_model, _construct(RAPT, norm="l1")),
    "batch_dim negative": (_model, _construct(RAPT, batch_dim=-1)),
    "no blocks": (lambda: nn.Sequential(nn.Linear(2, 2)), _construct(RAPT)),
    "blocks path missing": (_model, _construct(RAPT, blocks="encoder.layer")),
    "blocks empty container": (
        lambda: nn.Sequential(nn.ModuleList(), nn.Linear(2, 2)),
        _construct(RAPT, blocks="0"),
    ),
    "blocks single module": (_model, lambda m: RAPT(m, blocks=m.layers[0])),
    "blocks foreign module": (_model, _construct(RAPT, blocks=[nn.Linear(2, 2)])),
    "blocks empty list": (_model, _construct(RAPT, blocks=[])),
    "smart k negative": (_model, _construct(SmartRegularizer, k=-1)),
    "smart norm unknown": (_model, _construct(SmartRegularizer, norm="l1")),
    "r3f noise unknown": (_model, _construct(R3FRegularizer, noise="laplace")),
    "head not a linear layer": (_model, _construct(RAPT, head="layers")),
    "head auto without output embeddings": (_model, _construct(RAPT, head="auto")),
    "head under ZeRO-3": (_zero3_head, _construct(RAPT, head="head")),
    "head path missing": (_model, _construct(RAPT, head="lm_head")),
    "find_transformer_blocks ambiguous": (
        TwoStacks,
        lambda m: rapt_reg.find_transformer_blocks(m),
    ),
    "r3f without blocks": (
        lambda: nn.Sequential(nn.Embedding(3, 2), nn.Embedding(3, 2)),
        _construct(R3FRegularizer),
    ),
}


def _tokens_out(reg: Any, model: nn.Module) -> Any:
    return reg(lambda: model(IDS).argmax(-1), model(IDS))


CALL_CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], Callable[[], Any]]]] = {
    "forward not callable": (_model, _call(RAPT, lambda r, m: r.pair(m(IDS)))),
    "no logits in output": (_model, _call(RAPT, lambda r, m: r(lambda: m(IDS), object()))),
    "outputs of different shapes": (
        _model,
        _call(RAPT, lambda r, m: r(lambda: m(IDS)[:1], m(IDS))),
    ),
    "integer outputs": (_model, _call(RAPT, _tokens_out)),
    "mask of the wrong shape": (
        _model,
        _call(RAPT, lambda r, m: r.pair(lambda: m(IDS), mask=torch.ones(3, dtype=torch.bool))),
    ),
    "no block ran": (
        _model,
        _call(RAPT, lambda r, m: r(lambda: m.head(torch.ones(2, 8)), m(IDS))),
    ),
    "fewer calls than the layer": (
        _model,
        _call(
            functools.partial(RAPT, min_layer=3, max_layer=3),
            lambda r, m: r(lambda: m.layers[0](torch.ones(2, 5, 8)).mean(1), m(IDS)),
        ),
    ),
    "two stacks ran": (TwoStacks, _call(RAPT, _pair)),
    "stack asked while ambiguous": (TwoStacks, _call(RAPT, lambda r, m: r.stack)),
    "no output requires grad": (
        _model,
        _call(RAPT, lambda r, m: r(lambda: m(IDS).detach(), m(IDS).detach())),
    ),
    "call inside its own forward": (
        _model,
        _call(RAPT, lambda r, m: r(lambda: r(lambda: m(IDS), m(IDS)), m(IDS))),
    ),
    "removed": (_model, _call(lambda m: _removed(RAPT(m)), _pair)),
    "block called without a tensor": (
        lambda: ListStack(True),
        _call(
            functools.partial(RAPT, blocks="layers", min_layer=0, max_layer=0),
            lambda r, m: r(lambda: m(torch.ones(3)), m(torch.ones(3))),
        ),
    ),
    "block returned no tensor": (
        lambda: ListStack(False),
        _call(
            functools.partial(RAPT, blocks="layers", min_layer=1, max_layer=1),
            lambda r, m: r(lambda: m(torch.ones(3)), m(torch.ones(3))),
        ),
    ),
    "non-finite penalty": (
        _model,
        _call(
            RAPT,
            lambda r, m: (r(lambda: m(IDS) * float("nan"), m(IDS)), r.stats()),
        ),
    ),
    "noise_mask not 2-D": (
        _model,
        _call(RAPT, lambda r, m: r.pair(lambda: m(IDS), noise_mask=torch.ones(2, dtype=bool))),
    ),
    "noise_mask not bool": (
        _model,
        _call(RAPT, lambda r, m: r.pair(lambda: m(IDS), noise_mask=torch.ones(2, 5))),
    ),
    "segment_ids not integer": (
        _model,
        _call(RAPT, lambda r, m: r.pair(lambda: m(IDS), segment_ids=torch.ones(2, 5))),
    ),
    "noise_mask of another shape": (
        _model,
        _call(
            RAPT,
            lambda r, m: r.pair(lambda: m(IDS), noise_mask=torch.ones(2, 4, dtype=torch.bool)),
        ),
    ),
    "noise_mask on 1-D hidden states": (
        FlatStack,
        _call(
            functools.partial(RAPT, blocks="layers", min_layer=1, max_layer=1),
            lambda r, m: r.pair(
                lambda: m(torch.ones(3)), noise_mask=torch.ones(1, 3, dtype=torch.bool)
            ),
        ),
    ),
    "scale_noise norm unknown": (
        _model,
        _call(RAPT, lambda r, m: rapt_reg.scale_noise(torch.ones(2, 3), eta=1.0, norm="l1")),
    ),
    "eta_scale unknown": (_model, _call(RAPT, lambda r, m: RAPT(m, eta_scale="max"))),
    "not a state dict": (_model, _call(RAPT, lambda r, m: r.load_state_dict({"rng": 1}))),
    "max_layer beyond the calls that ran": (
        _model,
        _call(functools.partial(RAPT, max_layer=8), _pair),
    ),
    "same seed, both graphs alive": (
        _model,
        _call(lambda m: RAPT(m, generator=torch.Generator().manual_seed(0)), _same_seed_alive),
    ),
    "forward re-seeds the global RNG": (
        Reseeding,
        _call(functools.partial(RAPT, min_layer=1, max_layer=1), _pair),
    ),
    "nested reentrant checkpoints": (
        lambda: Checkpointed("nested"),
        _call(functools.partial(RAPT, min_layer=1, max_layer=1), _backward_step),
    ),
    "recomputation runs another order": (
        lambda: Checkpointed("shuffled"),
        _call(functools.partial(RAPT, min_layer=1, max_layer=1), _backward_step),
    ),
    "head given no positions": (
        OneDimensionalHead,
        _call(functools.partial(RAPT, head="out", blocks="inner.layers"), _pair),
    ),
    "smart inside a reentrant region": (
        lambda: Checkpointed("nested"),
        _call(functools.partial(SmartRegularizer, k=1), _pair),
    ),
    "smart with reentrant checkpoints inside its blocks": (
        _wrapped_blocks,
        _call(functools.partial(SmartRegularizer, k=1), _pair),
    ),
    "head of another width": (
        _model,
        _call(
            RAPT,
            lambda r, m: rapt_reg.divergence.reduce_divergence(
                rapt_reg.divergence.sym_kl,
                torch.zeros(2, 3),
                torch.zeros(2, 3),
                head=rapt_reg.head.Head(torch.zeros(5, 4)),
                clean_is_hidden=True,
            ),
        ),
    ),
    "head whose logits the model doubles": (
        _doubled_logits,
        _call(functools.partial(RAPT, head="head"), _pair),
    ),
    "fused loss, head given another tensor than the body's output": (
        lambda: ScaledBeforeHead(depth=3, dim=8, heads=2, token_level=True).train(),
        _call(functools.partial(RAPT, head="head"), _fused_pass),
    ),
    "head outputs of other shapes": (
        _model,
        _call(
            functools.partial(RAPT, head="head"),
            lambda r, m: r(lambda: m(IDS), torch.zeros(2, 7, requires_grad=True)),
        ),
    ),
    "head penalty backpropagated twice": (
        _model,
        _call(
            functools.partial(RAPT, head="head"),
            lambda r, m: _backward_twice(r.pair(lambda: m(IDS))),
        ),
    ),
    "smart ascent without grad": (
        _model,
        _call(
            SmartRegularizer,
            lambda r, m: r(lambda: m(IDS).detach(), m(IDS)),
        ),
    ),
    "smart per_sequence with segments": (
        _model,
        _call(
            functools.partial(SmartRegularizer, per_sequence=True),
            lambda r, m: r.pair(lambda: m(IDS), segment_ids=torch.zeros(2, 5, dtype=torch.long)),
        ),
    ),
    "smart batch changed shape": (
        _model,
        _call(
            functools.partial(SmartRegularizer, k=1),
            _smart_batch_changes,
        ),
    ),
    "r3f removed": (_model, _call(lambda m: _removed(R3FRegularizer(m)), _pair)),
    "r3f inside its own forward": (
        _model,
        _call(R3FRegularizer, lambda r, m: r(lambda: r(lambda: m(IDS), m(IDS)), m(IDS))),
    ),
    "r3f embeddings never ran": (
        _model,
        _call(R3FRegularizer, lambda r, m: r(lambda: m.head(torch.ones(2, 8)), m(IDS))),
    ),
}


def _backward_twice(pair: tuple[Any, torch.Tensor]) -> None:
    output, penalty = pair
    (output.sum() + penalty).backward(retain_graph=True)
    penalty.backward()


def _run_traced(fn: Callable[[], Any]) -> None:
    sys.settrace(_tracer)
    try:
        with pytest.raises(RaptRegError):
            fn()
    finally:
        sys.settrace(None)


@pytest.mark.promise("refusals-leave-model")
@pytest.mark.parametrize("case", CONSTRUCTOR_CASES, ids=list(CONSTRUCTOR_CASES))
def test_a_refused_constructor_leaves_the_model_as_it_was(case: str) -> None:
    make_model, construct = CONSTRUCTOR_CASES[case]
    model = make_model()
    before, rng = snapshot(model), torch.get_rng_state()
    _run_traced(lambda: construct(model))
    assert_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)  # a refused constructor draws nothing


@pytest.mark.promise("refusals-leave-model")
@pytest.mark.parametrize("case", CALL_CASES, ids=list(CALL_CASES))
def test_a_refused_call_leaves_the_model_as_it_was(case: str) -> None:
    make_model, setup = CALL_CASES[case]
    model = make_model()
    action = setup(model)
    before = snapshot(model)
    _run_traced(action)
    assert_unchanged(model, before)


# The whole message of the refusals the hooks make: what was wrong, and how to fix it.
HOOK_MESSAGES = {
    "call inside its own forward": (
        "a regularizer call was made inside another one's forward pass of the same "
        "regularizer: call it once per step, outside the model's forward"
    ),
    "removed": "this regularizer was removed: build a new one",
    "block called without a tensor": (
        "the first block (NoTensorBlock) was called without a tensor argument, so there are no "
        "hidden states to perturb at layer 0"
    ),
    "block returned no tensor": (
        "a block returned object, in which no hidden-state tensor was found (expected a tensor, "
        "a tuple/list starting with one, or a mapping whose first value is one). Pass blocks= "
        "naming modules that return their hidden states."
    ),
    "nested reentrant checkpoints": (
        "a checkpointed region holding a noisy pass was recomputed twice in one backward "
        "(nested reentrant checkpoints): use use_reentrant=False, or checkpoint one level"
    ),
    "recomputation runs another order": (
        "a recomputed region ran Block's pre-hook where the noisy pass ran Block's pre-hook: "
        "the forward is not deterministic, so the noise cannot be replayed. Turn gradient "
        "checkpointing off"
    ),
}


@pytest.mark.promise("refusals-name-the-fix")
@pytest.mark.parametrize("case", HOOK_MESSAGES, ids=list(HOOK_MESSAGES))
def test_the_hooks_refusals_say_what_was_wrong_and_the_fix(case: str) -> None:
    make_model, setup = CALL_CASES[case]
    with pytest.raises(RaptRegError) as info:
        setup(make_model())()
    assert str(info.value) == HOOK_MESSAGES[case]


def _raise_lines(path: Path) -> set[tuple[str, int]]:
    lines = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in ERRORS:
                lines.add((str(path.relative_to(_PACKAGE)), node.lineno))
    return lines


# Raises no CPU-only test can reach, each with its reason.
def _raise_before(name: str, text: str) -> tuple[str, int]:
    """The raise whose message starts on the line after it and contains ``text``."""
    lines = (_PACKAGE / name).read_text().splitlines()
    return name, next(i for i, line in enumerate(lines, 1) if text in line) - 1


UNREACHABLE = {
    # parameters on two accelerator types (e.g. CUDA and XPU) at once: needs both devices
    _raise_before("replay.py", "the model's parameters are on several accelerator types"),
}


@pytest.mark.promise("refusals-name-the-fix", "refusals-leave-model")
def test_every_refusal_in_the_core_was_walked() -> None:
    """Run last in this module (pytest keeps file order): every core raise was reached."""
    expected = set().union(*(_raise_lines(_PACKAGE / name) for name in CORE))
    reached = {line for line in expected if line in HIT or (line[0], line[1] + 1) in HIT}
    missing = sorted(expected - reached - set(UNREACHABLE))
    assert not missing, f"raise statements no case reaches: {missing}"
