"""Fault injection: whatever raises during a step, the model is left exactly clean.

Faults are raised in every block in turn (before RAPT's pre-hook, inside the block, after
RAPT's post-hook), in ``noisy_forward`` before the model runs, in the noise sampler and in the
divergence, as an ``Exception`` and as a ``BaseException`` (a KeyboardInterrupt). After each:
the fault propagates as itself, a clean forward is bitwise equal to one before, the hooks are
idle, none was added or lost, and the next step works. No activation outlives its step, and
two threads with their own model and regularizer do not see each other.
"""

import threading
import warnings
import weakref
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rapt_reg.regularizer
from rapt_reg import RandomPerturbationRegularizer
from rapt_reg.divergence import sym_kl
from rapt_reg.hooks import output_hidden

from ._generated import QUIET, Spec, build, expected, hook_count, ids_for, specs
from ._profile import TALLY, examples

BLOCK_SITES = ("block_pre", "block_inside", "block_post")
OTHER_SITES = ("forward_before_model", "noise_sampler", "divergence")


class InjectedFault(Exception):
    """The fault the tests raise."""


class InjectedInterrupt(BaseException):
    """A fault that is not an Exception, like KeyboardInterrupt."""


class Fault:
    """Raises ``kind`` at one site while armed, counting how often it fired."""

    def __init__(self, kind: type) -> None:
        self.kind, self.armed, self.fired, self._handles = kind, False, 0, []

    def __call__(self, *_, **__) -> None:
        if self.armed:
            self.fired += 1
            raise self.kind("injected")

    def at_block(self, block: torch.nn.Module, site: str) -> "Fault":
        if site == "block_pre":  # before RAPT's own pre-hook
            self._handles.append(block.register_forward_pre_hook(self, prepend=True))
        elif site == "block_inside":  # in the middle of the block's forward
            self._handles.append(next(block.children()).register_forward_pre_hook(self))
        else:  # after RAPT's post-hook added the noise (if this is layer r)
            self._handles.append(block.register_forward_hook(self))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _real_stack_specs():
    return specs(distractors=QUIET).filter(lambda s: expected(s).outcome == "perturbs")


def _step(reg, model, ids, form, fault=None, site=""):
    """One step; ``fault`` is armed from the noisy pass on (pair's fallback pass included)."""
    calls = []

    def forward():
        calls.append(1)
        if fault is not None:
            fault.armed = form == "call" or len(calls) >= 2
            if site == "forward_before_model":
                fault()
        return model(ids)

    try:
        if form == "pair":
            return reg.pair(forward)[1]
        return reg(forward, model(ids))
    finally:
        if fault is not None:
            fault.armed = False


@pytest.mark.promise("faults-leave-model")
@pytest.mark.parametrize("kind", [InjectedFault, InjectedInterrupt], ids=["exception", "interrupt"])
@pytest.mark.parametrize("form", ["pair", "call"])
@pytest.mark.parametrize("site", BLOCK_SITES + OTHER_SITES)
@examples(5)
@given(spec=_real_stack_specs(), seed=st.integers(0, 2**32 - 1))
def test_a_fault_anywhere_in_a_step_leaves_the_model_clean(spec, form, site, kind, seed):
    model = build(spec)
    ids = ids_for(spec)
    reference = model(ids).detach()
    reg = RandomPerturbationRegularizer(
        model,
        min_layer=0,
        max_layer=spec.depth,
        generator=torch.Generator().manual_seed(seed),
        divergence=lambda noisy, clean: (fault(), sym_kl(noisy, clean))[1],
    )
    fault = Fault(kind)
    assert _step(reg, model, ids, form).item() > 0  # settles the stack
    settled = hook_count(model)
    blocks = list(model.get_submodule(spec.path).children())
    for block in blocks if site in BLOCK_SITES else blocks[:1]:
        if site in BLOCK_SITES:
            fault.at_block(block, site)
        fault.fired = 0
        sampler = fault if site == "noise_sampler" else rapt_reg.regularizer.sample_noise
        with (
            mock.patch.object(rapt_reg.regularizer, "sample_noise", sampler),
            pytest.raises(kind, match="injected"),
        ):
            _step(reg, model, ids, form, fault, site)
        fault.remove()
        TALLY["faults"] += 1
        assert fault.fired == 1  # propagated at once: no retry, no fallback
        assert reg._hooks._pass is None and hook_count(model) == settled
        assert torch.equal(model(ids), reference), "the model is not clean after the fault"
        assert _step(reg, model, ids, form).item() > 0, "unusable after the fault"
    reg.remove()
    assert hook_count(model) == 0
    assert torch.equal(model(ids), reference)


@pytest.mark.promise("faults-leave-model")
def test_a_fault_in_the_noisy_pass_propagates_and_changes_nothing():
    # An error inside the noisy pass (a data error, an out-of-memory the caller skips) is
    # raised as it is, once; the step after it is a normal step, with nothing turned off.
    spec = Spec(8, 3, "list", "loop", "pre_norm", "pooled", ("layers",), (), seed=0)
    model = build(spec)
    ids = ids_for(spec)
    reference = model(ids).detach()
    reg = RandomPerturbationRegularizer(model, min_layer=2, max_layer=2)
    calls = []

    def forward():
        calls.append(1)
        if len(calls) == 2:
            raise InjectedFault("injected")
        return model(ids)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InjectedFault):
            reg.pair(forward)
        assert len(calls) == 2
        assert torch.equal(model(ids), reference)
        assert reg.pair(lambda: model(ids))[1].item() > 0


class ActivationWatch:
    """Weak references to every block's hidden-state output (and the embedding output)."""

    def __init__(self, model, spec) -> None:
        self.refs: list[weakref.ref] = []
        modules = [model.embed, *model.get_submodule(spec.path).children()]
        self._handles = [m.register_forward_hook(self._record) for m in modules]

    def _record(self, module, args, output) -> None:
        self.refs.append(weakref.ref(output_hidden(output)))

    def alive(self) -> int:
        # No gc.collect(): freed by reference counting alone, so no cycle holds them either.
        return sum(ref() is not None for ref in self.refs)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@pytest.mark.promise("no-activation-outlives-step")
@examples(20)
@given(
    spec=_real_stack_specs(),
    layer=st.integers(0, 4),
    form=st.sampled_from(["pair", "call"]),
    fault=st.booleans(),
)
def test_no_activation_outlives_its_step(spec, layer, form, fault):
    model = build(spec)
    ids = ids_for(spec)
    layer = min(layer, spec.depth)
    reg = RandomPerturbationRegularizer(model, min_layer=layer, max_layer=layer)
    watch = ActivationWatch(model, spec)  # after RAPT's hooks: sees the perturbed outputs
    for backward in (True, False):  # the last step keeps its graph, as a step under way does
        if form == "pair":
            clean, penalty = reg.pair(lambda: model(ids))
        else:
            clean = model(ids)
            penalty = reg(lambda: model(ids), clean)
        loss = clean.float().logsumexp(-1).mean() + penalty
        if backward:
            loss.backward()
    if fault:  # then a failed step: its traceback goes with the exception
        first = next(iter(model.get_submodule(spec.path).children()))
        injected = Fault(InjectedFault).at_block(first, "block_post")
        with pytest.raises(InjectedFault):
            _step(reg, model, ids, form, injected)
        injected.remove()
    assert watch.alive() > 0  # the graph of the last step holds them...
    del clean, penalty, loss
    assert watch.alive() == 0, "a live regularizer keeps activations of a past step"
    reg_ref = weakref.ref(reg)
    reg.remove()
    del reg  # no gc.collect(): reference counting alone frees it, so no cycle holds it
    assert reg_ref() is None, "something still holds the removed regularizer"
    watch.remove()
    assert hook_count(model) == 0


def _train(model, steps: int, barrier=None) -> list[tuple[int, float]]:
    seed = model.spec.seed
    ids = ids_for(model.spec, batch=3, seq=6)
    labels = torch.arange(3) % 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = RandomPerturbationRegularizer(model, generator=torch.Generator().manual_seed(seed))
    if barrier is not None:
        barrier.wait()
    trace = []
    for _ in range(steps):
        logits, penalty = reg.pair(lambda: model(ids))
        loss = torch.nn.functional.cross_entropy(logits, labels) + penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trace.append((reg.last_layer, penalty.item()))
    reg.remove()
    return trace


@pytest.mark.promise("threads-do-not-cross-talk")
@pytest.mark.slow_for_mutation
def test_two_threads_with_their_own_model_and_regularizer_do_not_cross_talk():
    steps, seeds = 100, (1, 2)

    def model(seed):  # built here: model initialisation draws from the global RNG
        return build(Spec(8, 3, "list", "loop", "pre_norm", "pooled", ("layers",), (), seed))

    alone = {seed: _train(model(seed), steps) for seed in seeds}
    models = {seed: model(seed) for seed in seeds}
    together, errors = {}, []
    barrier = threading.Barrier(len(seeds))

    def run(seed: int) -> None:
        try:
            together[seed] = _train(models[seed], steps, barrier)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert together == alone  # same layers and bitwise the same penalties, step by step


def _tensors_held(obj, skip=("model", "stacks"), seen=None) -> list[torch.Tensor]:
    """Tensors reachable from ``obj``'s own state (not through the model it regularizes)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (torch.nn.Module, type, weakref.ref)):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = [v for k, v in vars(obj).items() if k not in skip]
    else:
        return []
    return [t for item in items for t in _tensors_held(item, skip, seen)]


@pytest.mark.promise("no-activation-outlives-step")
@pytest.mark.parametrize("layer", [0, 2])
def test_between_steps_the_regularizer_holds_nothing_the_size_of_the_hidden_states(layer):
    spec = Spec(8, 3, "list", "loop", "pre_norm", "pooled", ("layers",), (), seed=0)
    model = build(spec)
    ids = ids_for(spec, batch=3, seq=6)
    reg = RandomPerturbationRegularizer(model, min_layer=layer, max_layer=layer)
    clean, penalty = reg.pair(lambda: model(ids))
    (clean.logsumexp(-1).mean() + penalty).backward()
    del clean, penalty
    held = [tuple(t.shape) for t in _tensors_held(reg) if t.numel() >= 3 * 6 * 8]
    assert not held, f"the regularizer holds {held} between steps"
