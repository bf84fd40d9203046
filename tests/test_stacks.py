"""The training stacks around the model: mixed precision, gradient accumulation, frozen
parameters, gradient checkpointing and ``torch.compile``.

Each test compares with the same step without the feature (same weights, same seeds), or
checks the property the feature could break (finite float32 penalty, recompile count, a loud
error instead of a silent no-op).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Callable, Optional

import pytest
import torch
from hf_models import CASES, HF_CASES, ModelCase, logits, task_loss
from models import TinyTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import rapt_reg

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("single_thread"),
]

Grads = dict[str, torch.Tensor]


def _grads(model: nn.Module) -> Grads:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_equal(actual: Grads, expected: Grads, rtol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=rtol, atol=1e-7, msg=name)


def _step(
    model: nn.Module,
    reg: rapt_reg.RandomPerturbationRegularizer,
    forward: Callable[[], object],
    form: str,
) -> torch.Tensor:
    """One loss (task stand-in + penalty) with the ``reg(...)`` or the ``reg.pair(...)`` form."""
    if form == "pair":
        clean, penalty = reg.pair(forward)
    else:
        clean = forward()
        penalty = reg(forward, clean)
    return task_loss(clean) + penalty


# -- mixed precision ------------------------------------------------------------------------


@pytest.mark.promise("bf16-autocast")
@pytest.mark.parametrize("name", ["index_loop", "bert", "llama", "t5"])
def test_bf16_autocast_gives_a_finite_float32_penalty(name: str) -> None:
    case = CASES[name]
    if case.library == "transformers":
        pytest.importorskip("transformers")
    model, batch = case.build(), case.batch()
    reg = rapt_reg.RandomPerturbationRegularizer(
        model, min_layer=0, max_layer=case.depth, generator=torch.Generator().manual_seed(0)
    )
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            clean, penalty = reg.pair(lambda: model(**batch))
        assert logits(clean).dtype == torch.bfloat16  # autocast really ran the model
        assert penalty.dtype == torch.float32
        assert bool(torch.isfinite(penalty)) and penalty > 0
        model.zero_grad()
        (task_loss(clean) + penalty).backward()
        assert all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 + GradScaler needs a GPU")
@pytest.mark.parametrize("name", ["index_loop", "bert"])
def test_fp16_autocast_with_grad_scaler_on_gpu(name: str) -> None:
    case = CASES[name]
    if case.library == "transformers":
        pytest.importorskip("transformers")
    model = case.build().cuda()
    batch = {k: v.cuda() for k, v in case.batch().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    reg = rapt_reg.RandomPerturbationRegularizer(
        model, min_layer=0, max_layer=case.depth, generator=torch.Generator().manual_seed(0)
    )
    for _ in range(4):
        with torch.autocast("cuda", dtype=torch.float16):
            clean, penalty = reg.pair(lambda: model(**batch))
            loss = task_loss(clean) + penalty
        assert logits(clean).dtype == torch.float16
        assert penalty.dtype == torch.float32
        assert bool(torch.isfinite(penalty)) and penalty > 0
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        assert all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)
        scaler.step(optimizer)
        scaler.update()


# -- gradient accumulation and frozen parameters ----------------------------------------------


def _tiny(dropout: float = 0.0, seed: int = 0) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(depth=3, dim=32, heads=2, dropout=dropout).train()


_IDS = torch.randint(1, 50, (6, 8), generator=torch.Generator().manual_seed(7))


@pytest.mark.promise("grad-accumulation")
@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeroed"])
@pytest.mark.parametrize("form", ["call", "pair"])
def test_gradient_accumulation_sums_micro_batch_gradients(form: str, set_to_none: bool) -> None:
    """Three micro-batches accumulated = the sum of each one's gradients computed alone."""
    micro_batches = _IDS.split(2)
    model = _tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def regularizer() -> rapt_reg.RandomPerturbationRegularizer:
        return rapt_reg.RandomPerturbationRegularizer(
            model, min_layer=0, max_layer=3, generator=torch.Generator().manual_seed(3)
        )

    with regularizer() as reg:
        expected: Grads = {}
        for ids in micro_batches:
            optimizer.zero_grad(set_to_none=set_to_none)
            _step(model, reg, lambda ids=ids: model(ids), form).backward()
            for name, grad in _grads(model).items():
                expected[name] = expected.get(name, 0) + grad
    with regularizer() as reg:
        # A stale gradient from an earlier step must be cleared by zero_grad, whatever the mode.
        draws = reg.state_dict()
        _step(model, reg, lambda: model(_IDS), form).backward()
        reg.load_state_dict(draws)
        optimizer.zero_grad(set_to_none=set_to_none)
        if set_to_none:
            assert all(p.grad is None for p in model.parameters())
        layers = []
        for ids in micro_batches:
            (_step(model, reg, lambda ids=ids: model(ids), form) / len(micro_batches)).backward()
            layers.append(reg.last_layer)
    accumulated = {n: g * len(micro_batches) for n, g in _grads(model).items()}
    _assert_grads_equal(accumulated, expected)
    assert len(set(layers)) > 1  # different micro-batches perturbed different layers


@pytest.mark.parametrize("name", ["index_loop", "bert"])
def test_frozen_parameters_stay_without_gradients(name: str) -> None:
    """Embeddings and the first block frozen (as in partial fine-tuning), every layer."""
    case = CASES[name]
    if case.library == "transformers":
        pytest.importorskip("transformers")
    model, batch = case.build(), case.batch()
    stack = rapt_reg.find_transformer_blocks(model)
    frozen = {
        n for n, p in model.named_parameters() if "embed" in n or n.startswith(f"{stack.names[0]}.")
    }
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    assert frozen and len(frozen) < len(list(model.parameters()))
    for layer in range(case.depth + 1):
        with rapt_reg.RandomPerturbationRegularizer(
            model, min_layer=layer, max_layer=layer, generator=torch.Generator().manual_seed(0)
        ) as reg:
            clean, penalty = reg.pair(lambda: model(**batch))
            model.zero_grad(set_to_none=True)
            (task_loss(clean) + penalty).backward()
        assert penalty > 0
        grads = _grads(model)
        assert not frozen & grads.keys()
        assert grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
        assert all(bool(g.isfinite().all()) for g in grads.values())


@pytest.mark.promise("outputs-without-grad")
def test_fully_frozen_model_is_refused_with_a_fix() -> None:
    model = _tiny().requires_grad_(False)
    with rapt_reg.RandomPerturbationRegularizer(model) as reg:
        with pytest.raises(rapt_reg.RaptRegError, match="frozen"):
            reg.pair(lambda: model(_IDS))
        with torch.no_grad():  # logging only: allowed
            assert reg.pair(lambda: model(_IDS))[1] > 0


# -- gradient checkpointing -----------------------------------------------------------------


class CheckpointedLoop(TinyTransformer):
    """Runs its blocks through ``torch.utils.checkpoint``.

    ``mode``: ``None`` (no checkpointing), ``"reentrant"`` / ``"non_reentrant"`` (one
    checkpoint around each block call) or ``"segments_*"`` (``checkpoint_sequential`` with two
    segments, so one checkpoint spans several blocks).
    """

    def __init__(self, mode: Optional[str], dropout: float) -> None:
        super().__init__(depth=4, dim=32, heads=2, dropout=dropout)
        self.mode = mode

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.embed(ids) + self.pos[:, : ids.shape[1]])
        reentrant = self.mode in ("reentrant", "segments_reentrant")
        if self.mode is None:
            for layer in self.layers:
                x = layer(x)
        elif self.mode.startswith("segments"):
            x = checkpoint_sequential(list(self.layers), 2, x, use_reentrant=reentrant)
        else:
            for layer in self.layers:
                x = checkpoint(layer, x, use_reentrant=reentrant, preserve_rng_state=True)
        return self.head(self.norm(x).mean(1))


def _checkpoint_run(mode: Optional[str], layer: int, form: str, passes: int = 1) -> Grads:
    torch.manual_seed(0)
    model = CheckpointedLoop(mode, dropout=0.1).train()
    reg = rapt_reg.RandomPerturbationRegularizer(
        model, min_layer=layer, max_layer=layer, generator=torch.Generator().manual_seed(1)
    )
    torch.manual_seed(2)  # dropout masks
    loss = sum(_step(model, reg, lambda: model(_IDS), form) for _ in range(passes))
    loss.backward()
    return _grads(model)


@pytest.mark.promise("checkpoint-exact")
@pytest.mark.parametrize("form", ["call", "pair"])
@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_checkpoint_around_each_block_gives_the_same_gradients(mode: str, form: str) -> None:
    """Dropout on, every layer 0..4: the recomputation sees the same noise (layer 0, added
    inside the first block's call, is replayed) or none where that is equivalent (r >= 1, added
    to the checkpoint's output).

    ``pair`` is the two-call form, so it is compared with ``reg(...)`` without checkpointing.
    """
    reference_form = "call"
    for layer in range(5):
        expected = _checkpoint_run(None, layer, reference_form)
        _assert_grads_equal(_checkpoint_run(mode, layer, form), expected)


@pytest.mark.promise("checkpoint-exact")
@pytest.mark.parametrize("form", ["call", "pair"])
@pytest.mark.parametrize("mode", ["segments_reentrant", "segments_non_reentrant"])
def test_checkpoint_spanning_several_blocks_gives_the_same_gradients(mode: str, form: str) -> None:
    """Noise added inside a region that spans later blocks is added again when it is recomputed.

    ``pair`` equals ``reg(...)`` unwrapped.
    """
    for layer in range(5):
        expected = _checkpoint_run(None, layer, "call")
        _assert_grads_equal(_checkpoint_run(mode, layer, form), expected)


@pytest.mark.promise("checkpoint-exact")
@pytest.mark.parametrize("layer", [0, 2])
def test_checkpoint_with_two_noisy_passes_before_backward(layer: int) -> None:
    _assert_grads_equal(
        _checkpoint_run("segments_non_reentrant", layer, "call", passes=2),
        _checkpoint_run(None, layer, "call", passes=2),
    )


def _enable_hf_checkpointing(model: nn.Module, reentrant: bool) -> None:
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _hf_run(case: ModelCase, reentrant: Optional[bool]) -> tuple[list[float], Grads]:
    model, batch = case.build(dropout=0.1), case.batch()
    if reentrant is not None:
        _enable_hf_checkpointing(model, reentrant)
    reg = rapt_reg.RandomPerturbationRegularizer(
        model, min_layer=0, max_layer=case.depth, generator=torch.Generator().manual_seed(1)
    )
    torch.manual_seed(2)
    penalties, loss = [], 0
    for form in ("call", "pair", "pair"):
        step = _step(model, reg, lambda: model(**batch), form)
        penalties.append(step.item())
        loss = loss + step
    loss.backward()
    return penalties, _grads(model)


@pytest.mark.promise("checkpoint-exact")
@pytest.mark.parametrize("name", HF_CASES)
def test_transformers_gradient_checkpointing_gives_the_same_gradients(name: str) -> None:
    """``model.gradient_checkpointing_enable()`` (non-reentrant, the default), dropout on."""
    pytest.importorskip("transformers")
    case = CASES[name]
    if not type(case.build()).supports_gradient_checkpointing:
        pytest.skip(f"{name}: transformers does not support gradient checkpointing for it")
    expected_penalties, expected = _hf_run(case, None)
    penalties, grads = _hf_run(case, False)
    assert penalties == pytest.approx(expected_penalties, rel=1e-5)
    _assert_grads_equal(grads, expected, rtol=1e-4)


@pytest.mark.promise("checkpoint-exact")
@pytest.mark.parametrize("name", ["bert", "t5"])
def test_transformers_reentrant_checkpointing_gives_the_same_gradients(name: str) -> None:
    pytest.importorskip("transformers")
    case = CASES[name]
    expected_penalties, expected = _hf_run(case, None)
    penalties, grads = _hf_run(case, True)
    assert penalties == pytest.approx(expected_penalties, rel=1e-5)
    _assert_grads_equal(grads, expected, rtol=1e-4)


# -- torch.compile ----------------------------------------------------------------------------


class _RecompileCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.functions: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Recompiling function"):
            self.functions.append(message.split("\n", 1)[0])


@pytest.fixture
def recompiles(monkeypatch: pytest.MonkeyPatch) -> Iterator[_RecompileCounter]:
    """Dynamo's "Recompiling function ..." records, from a clean compile cache.

    Only the recompiles log is switched on (``torch._logging.set_logs`` would switch on every
    torch logger and slow compilation down).
    """
    import torch._dynamo.guards as guards

    torch._dynamo.reset()
    counter = _RecompileCounter()
    logger = guards.recompiles_log
    monkeypatch.setattr(guards, "is_recompiles_enabled", lambda: True)
    monkeypatch.setattr(logger, "propagate", False)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(counter)
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)
        torch._dynamo.reset()


def _compiled_steps(
    form: str, min_layer: int, max_layer: int, steps: int, backend: str, compile: bool = True
) -> tuple[list[float], list[int]]:
    """Penalties and layers of ``steps`` SGD steps, the model compiled after the regularizer."""
    model = _tiny()
    reg = rapt_reg.RandomPerturbationRegularizer(
        model,
        min_layer=min_layer,
        max_layer=max_layer,
        generator=torch.Generator().manual_seed(0),
    )
    run = torch.compile(model, backend=backend) if compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    penalties, layers = [], []
    for _ in range(steps):
        if form == "pair":
            clean, penalty = reg.pair(lambda: run(_IDS))
        else:
            clean = run(_IDS)
            penalty = reg(lambda: run(_IDS), clean)
        optimizer.zero_grad()
        (task_loss(clean) + penalty).backward()
        optimizer.step()
        penalties.append(penalty.item())
        layers.append(reg.last_layer)
    return penalties, layers


@pytest.mark.promise("compile")
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_after_the_regularizer_gets_the_noise(
    recompiles: _RecompileCounter, backend: str
) -> None:
    """The same penalties as the eager model, step after step.

    ``aot_eager`` traces forward and backward as inductor does, without generating code;
    the default (inductor) backend itself takes about a minute here, so it is marked slow.
    """
    del recompiles
    penalties, layers = _compiled_steps("call", 2, 3, steps=3, backend=backend)
    eager, eager_layers = _compiled_steps("call", 2, 3, steps=3, backend="", compile=False)
    assert layers == eager_layers
    assert min(penalties) > 1e-4
    assert penalties == pytest.approx(eager, rel=1e-4)


@pytest.mark.promise("compile-recompiles")
def test_fifty_compiled_steps_recompile_at_most_max_layer_plus_one(
    recompiles: _RecompileCounter, record_property: Callable[[str, object], None]
) -> None:
    """Guards are dynamo's, whatever the backend: the "eager" backend keeps this test short.

    Every step's penalty equals the uncompiled model's: the noise reached the output each time.
    """
    penalties, layers = _compiled_steps("call", 1, 3, steps=50, backend="eager")
    record_property("recompiles", len(recompiles.functions))
    assert len(recompiles.functions) <= 3 + 1, recompiles.functions
    eager, eager_layers = _compiled_steps("call", 1, 3, steps=50, backend="", compile=False)
    assert layers == eager_layers and set(layers) == {1, 2, 3}
    assert min(penalties) > 1e-4
    assert penalties == pytest.approx(eager, rel=1e-4)


@pytest.mark.promise("compile-recompiles")
@pytest.mark.parametrize(("form", "min_layer"), [("pair", 1), ("call", 0)])
def test_fifty_compiled_steps_recompile_bound_pair_and_layer_zero(
    recompiles: _RecompileCounter,
    record_property: Callable[[str, object], None],
    form: str,
    min_layer: int,
) -> None:
    _compiled_steps(form, min_layer, 3, steps=50, backend="eager")
    record_property("recompiles", len(recompiles.functions))
    assert len(recompiles.functions) <= 3 + 1, recompiles.functions


@pytest.mark.promise("compile-refused")
def test_compiled_and_run_before_is_refused_with_the_fix(recompiles: _RecompileCounter) -> None:
    """Hooks added after dynamo traced the model are ignored: never a silent no-op."""
    del recompiles
    model = _tiny()
    compiled = torch.compile(model, backend="eager")
    compiled(_IDS)
    reg = rapt_reg.RandomPerturbationRegularizer(model)
    for form in ("call", "pair"):
        with pytest.raises(rapt_reg.RaptRegError, match="build the regularizer first"):
            _step(model, reg, lambda: compiled(_IDS), form)
    torch._dynamo.reset()  # the other fix the message names
    assert _step(model, reg, lambda: compiled(_IDS), "pair") > 0
    assert reg.last_noise_to_hidden_ratio > 0


@pytest.mark.promise("wrappers-seen-through")
def test_regularizer_sees_through_the_compiled_wrapper(recompiles: _RecompileCounter) -> None:
    del recompiles
    model = _tiny()
    compiled = torch.compile(model, backend="eager")
    reg = rapt_reg.RandomPerturbationRegularizer(compiled, max_layer=2, min_layer=2)
    assert reg.stack.blocks == tuple(model.layers)
    clean, penalty = reg.pair(lambda: compiled(_IDS))
    assert penalty > 0
    reg.remove()
    assert torch.equal(compiled(_IDS), model(_IDS))


def test_deepcopy_of_a_model_with_hooks_is_independent() -> None:
    """A copy taken while the hooks are installed (EMA teachers, best-model snapshots) runs
    clean, and a regularizer of its own perturbs it. (The copy keeps idle copies of the
    hooks: ``remove()`` only removes the original's.)"""
    model = _tiny()
    with rapt_reg.RandomPerturbationRegularizer(model, min_layer=0, max_layer=0) as reg:
        twin = copy.deepcopy(model)
        clean = model(_IDS)
        assert reg(lambda: model(_IDS), clean) > 0
        assert torch.equal(twin(_IDS), clean)
    with rapt_reg.RandomPerturbationRegularizer(twin, min_layer=1, max_layer=1) as twin_reg:
        _, penalty = twin_reg.pair(lambda: twin(_IDS))
        assert penalty > 0 and twin_reg.last_layer == 1
    assert torch.equal(model(_IDS), twin(_IDS))


# -- nn.DataParallel ----------------------------------------------------------------------------


@pytest.mark.promise("data-parallel-refused")
def test_data_parallel_is_refused_naming_ddp() -> None:
    """Its replicas would run in threads sharing one regularizer's hooks: refused, with the fix."""
    model = _tiny()
    with pytest.raises(rapt_reg.RaptRegError, match="DistributedDataParallel"):
        rapt_reg.RandomPerturbationRegularizer(nn.DataParallel(model))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
