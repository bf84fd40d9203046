"""RandomPerturbationRegularizer against a hand-written Algorithm 1, and its contract."""

import copy
import inspect
import json
import math
import os
import random
import re
import warnings
from collections import Counter, namedtuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from models import TinyTransformer
from torch import nn

from rapt_reg import RandomPerturbationRegularizer, RaptRegError, replay
from rapt_reg.hooks import NoisyPass, StackHooks, output_hidden
from rapt_reg.replay import Frame

# scripts/mutation.py runs the tests on mutmut's copy of the package (RAPT_REG_MUTATION=1).
UNDER_MUTATION = os.environ.get("RAPT_REG_MUTATION") == "1"

DEPTH = 4


def make_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinyTransformer(depth=DEPTH, **kwargs).train()


def batch(seed=0, size=3, length=6):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (size, length), generator=gen), torch.randint(
        0, 3, (size,), generator=gen
    )


def reference_noise(generator_seed, shape, eta, min_layer, max_layer):
    """The layer and noise of Algorithm 1 (lines 3, 5, 6), drawn as the regularizer documents:
    one seed from the generator at construction seeds a Python RNG; per step it gives a layer
    and a noise seed, then delta ~ N(0, I) is scaled to eta * d / ||d||_inf.
    """
    gen = torch.Generator().manual_seed(generator_seed)
    rng = random.Random(int(torch.randint(0, 2**62, (), generator=gen)))
    layer = rng.randint(min_layer, max_layer)
    seed = rng.getrandbits(62)
    d = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return layer, eta * d / d.abs().amax(dim=(1, 2), keepdim=True)


def algorithm1_loss(model, ids, labels, layer, delta, alpha):
    """Lines 7-15 of Algorithm 1 written out: forward with h <- h + delta at `layer`, Eq. 2."""

    def forward(noise_at):
        h = model.drop(model.embed(ids) + model.pos[:, : ids.shape[1]])
        if noise_at == 0:
            h = h + delta
        for k, block in enumerate(model.layers, start=1):
            h = block(h)
            if k == noise_at:
                h = h + delta
        return model.head(model.norm(h).mean(1))

    clean, noisy = forward(None), forward(layer)
    sym_kl = F.kl_div(
        F.log_softmax(noisy, -1), F.softmax(clean.detach(), -1), reduction="batchmean"
    )
    sym_kl = sym_kl + F.kl_div(
        F.log_softmax(clean, -1), F.softmax(noisy.detach(), -1), reduction="batchmean"
    )
    return F.cross_entropy(clean, labels) + alpha * sym_kl, alpha * sym_kl


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.promise("algorithm-1", "layer-zero-is-embedding-output", "generator-seeds-once")
@pytest.mark.parametrize("form", ["pair", "two-pass"])
@pytest.mark.parametrize("layer", range(DEPTH + 1))
def test_gradients_equal_hand_written_algorithm_1(layer, form):
    ids, labels = batch()
    model = make_model()
    _, delta = reference_noise(5, (3, 6, 16), 2.0, layer, layer)
    loss, ref_penalty = algorithm1_loss(model, ids, labels, layer, delta, alpha=0.7)
    loss.backward()
    expected = grads(model)

    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(5)
    reg = RandomPerturbationRegularizer(
        model, min_layer=layer, max_layer=layer, alpha=0.7, generator=gen
    )
    if form == "pair":
        clean, penalty = reg.pair(lambda: model(ids))
    else:
        clean = model(ids)
        penalty = reg(lambda: model(ids), clean)
    (F.cross_entropy(clean, labels) + penalty).backward()
    reg.remove()

    assert reg.last_layer == layer
    torch.testing.assert_close(penalty, ref_penalty, rtol=1e-5, atol=1e-9)
    got = grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        # float32: the two computations round differently, by up to about 3e-8 here
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def record_block_inputs(model):
    """Hooks registered after the regularizer's: they see each block call's (perturbed) input."""
    seen, handles = [], []
    for block in model.layers:
        handles.append(
            block.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        )
    return seen, handles


@pytest.mark.promise("algorithm-1", "layer-choice")
@settings(max_examples=15, deadline=None)
@given(
    bounds=st.tuples(st.integers(0, DEPTH - 1), st.integers(0, DEPTH - 1)).map(sorted),
    seed=st.integers(0, 2**31),
    eta=st.floats(0.01, 10),
)
def test_exactly_one_layer_within_bounds_is_perturbed_by_eta(bounds, seed, eta):
    low, high = bounds
    model = make_model()
    ids, _ = batch(seed % 100)
    reg = RandomPerturbationRegularizer(
        model, min_layer=low, max_layer=high, eta=eta, generator=torch.Generator().manual_seed(seed)
    )
    seen, handles = record_block_inputs(model)
    clean = model(ids)
    clean_inputs = list(seen)
    seen.clear()
    reg(lambda: model(ids), clean)
    r = reg.last_layer
    assert low <= r <= high
    # Inputs to calls 1..r are untouched; the input to call r+1 (= layer r) differs by the noise;
    # every input after it differs (the noise propagates).
    for k in range(r):
        assert torch.equal(seen[k], clean_inputs[k])
    diff = (seen[r] - clean_inputs[r]).abs().flatten(1).amax(1)
    torch.testing.assert_close(diff, torch.full_like(diff, eta), rtol=1e-4, atol=1e-6)
    for h in handles:
        h.remove()
    reg.remove()


@pytest.mark.promise("layer-choice")
def test_layer_choice_is_about_uniform():
    model = make_model(dim=8)
    ids, _ = batch(size=1, length=2)
    reg = RandomPerturbationRegularizer(
        model, min_layer=0, max_layer=DEPTH, generator=torch.Generator().manual_seed(0)
    )
    clean = model(ids)
    draws = 300
    with torch.no_grad():
        counts = Counter(
            reg(lambda: model(ids), clean) is not None and reg.last_layer for _ in range(draws)
        )
    assert set(counts) == set(range(DEPTH + 1))
    expected = draws / (DEPTH + 1)
    chi2 = sum((counts[k] - expected) ** 2 / expected for k in counts)
    assert chi2 < 18.5  # chi-square, 4 degrees of freedom, p = 0.001


@pytest.mark.promise("pair-equals-two-calls")
@pytest.mark.parametrize("layer", range(DEPTH + 1))
def test_pair_equals_two_pass_on_token_outputs_with_mask(layer):
    ids, _ = batch()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    results = []
    for form in ("pair", "two-pass"):
        model = make_model(token_level=True)
        reg = RandomPerturbationRegularizer(
            model, min_layer=layer, max_layer=layer, generator=torch.Generator().manual_seed(3)
        )
        if form == "pair":
            clean, penalty = reg.pair(lambda: model(ids), mask=mask)  # noqa: B023
        else:
            clean = model(ids)
            penalty = reg(lambda: model(ids), clean, mask=mask)  # noqa: B023
        (clean.sum() * 0.01 + penalty).backward()
        results.append((penalty.detach(), grads(model)))
    (p1, g1), (p2, g2) = results
    torch.testing.assert_close(p1, p2)
    for name in g2:
        torch.testing.assert_close(g1[name], g2[name], msg=name)


def test_zero_eta_gives_zero_penalty_with_dropout_off():
    model = make_model()
    ids, _ = batch()
    with RandomPerturbationRegularizer(model, eta=0.0) as reg:
        _, penalty = reg.pair(lambda: model(ids))
    assert penalty.item() == 0.0


@pytest.mark.promise("global-rng-untouched")
def test_generator_makes_runs_reproducible_and_leaves_global_rng_alone():
    ids, labels = batch()
    runs = []
    for _ in range(2):
        model = make_model(dropout=0.1)
        reg = RandomPerturbationRegularizer(
            model, min_layer=0, max_layer=DEPTH, generator=torch.Generator().manual_seed(9)
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        torch.manual_seed(123)
        layers = []
        for _ in range(4):
            logits, penalty = reg.pair(lambda: model(ids))  # noqa: B023
            state = torch.get_rng_state()
            (F.cross_entropy(logits, labels) + penalty).backward()
            optimizer.step()
            optimizer.zero_grad()
            layers.append(reg.last_layer)
        runs.append((layers, [p.detach().clone() for p in model.parameters()], state))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)
    # The global RNG moved only by dropout, identically in both runs.
    assert torch.equal(runs[0][2], runs[1][2])


@pytest.mark.promise("global-rng-untouched")
@pytest.mark.parametrize("generator", [None, "seeded"])
@pytest.mark.parametrize("form", ["pair", "call"])
def test_a_step_leaves_the_global_rng_as_a_step_without_rapt(form, generator):
    """The clean pass's dropout masks, and every later draw, are those of a run without RAPT.

    The noisy pass runs on an RNG stream of its own; the regularizer takes one number from the
    generator (or the global RNG) when it is built, and none per step.
    """
    model = make_model(dropout=0.5)
    ids, labels = batch()
    gen = torch.Generator().manual_seed(0) if generator else None
    reg = RandomPerturbationRegularizer(model, min_layer=0, max_layer=DEPTH, generator=gen)
    noisy_outputs = []

    def noisy_forward():
        noisy_outputs.append(model(ids))
        return noisy_outputs[-1]

    for _ in range(3):
        torch.manual_seed(1)
        plain = model(ids)
        F.cross_entropy(plain, labels).backward()
        after_plain = torch.get_rng_state()
        torch.manual_seed(1)
        if form == "pair":
            clean, penalty = reg.pair(noisy_forward)
        else:
            clean = model(ids)
            penalty = reg(noisy_forward, clean)
        (F.cross_entropy(clean, labels) + penalty).backward()
        assert torch.equal(clean, plain)
        assert torch.equal(torch.get_rng_state(), after_plain)
        assert penalty.item() > 0
    # each step's noisy pass draws dropout masks of its own
    assert not torch.equal(noisy_outputs[-1], noisy_outputs[-2])


@pytest.mark.promise("eval-mode")
def test_eval_mode_gives_zero_and_warns_once():
    model = make_model().eval()
    ids, _ = batch()
    reg = RandomPerturbationRegularizer(model)
    calls = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            penalty = reg(lambda: calls.append(1), model(ids))
            _, penalty_pair = reg.pair(lambda: model(ids))
    assert penalty.item() == 0.0 and penalty_pair.item() == 0.0
    assert calls == []  # the noisy forward is not run in eval mode
    assert len([w for w in caught if "eval mode" in str(w.message)]) == 1


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {
            name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), set(vars(m)))
            for name, m in model.named_modules()
        },
    )


def assert_same_snapshot(model, before):
    state, modules = snapshot(model)
    assert state.keys() == before[0].keys()
    for k in state:
        assert torch.equal(state[k], before[0][k])
    assert modules == before[1]


@pytest.mark.promise("remove-takes-hooks-away", "model-unaltered")
def test_model_is_unaltered_and_hooks_go_with_remove():
    model = make_model()
    ids, _ = batch()
    before = snapshot(model)
    expected = model(ids)
    reg = RandomPerturbationRegularizer(model)
    assert torch.equal(model(ids), expected)  # idle hooks change nothing
    reg.pair(lambda: model(ids))
    assert torch.equal(model(ids), expected)  # no noise outlives the call
    assert model.state_dict().keys() == before[0].keys()
    reg.remove()
    reg.remove()  # twice is fine
    assert_same_snapshot(model, before)
    with pytest.raises(RaptRegError, match="removed"):
        reg(lambda: model(ids), expected)


@pytest.mark.promise("two-call-form")
def test_the_two_call_form_runs_only_the_noisy_pass():
    model = make_model()
    ids, _ = batch()
    reg = RandomPerturbationRegularizer(model)
    calls = []
    counter = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    clean = model(ids)
    assert reg(lambda: model(ids), clean) > 0
    assert len(calls) == 2  # the caller's clean pass, then one noisy pass
    reg.pair(lambda: model(ids))
    assert len(calls) == 4  # pair: a clean pass and a noisy pass
    counter.remove()


@pytest.mark.promise("remove-takes-hooks-away")
def test_leaving_the_with_block_removes_the_hooks_even_if_it_raised():
    model = make_model()
    ids, _ = batch()
    before = snapshot(model)
    expected = model(ids)
    with pytest.raises(KeyError, match="boom"), RandomPerturbationRegularizer(model) as reg:
        assert reg.pair(lambda: model(ids))[1] > 0
        assert snapshot(model)[1] != before[1]  # the hooks are on while inside
        raise KeyError("boom")
    assert_same_snapshot(model, before)
    assert torch.equal(model(ids), expected)
    with pytest.raises(RaptRegError, match="removed"):
        reg(lambda: model(ids), expected)


@pytest.mark.promise("generator-seeds-once")
def test_the_generator_is_read_once_when_the_regularizer_is_built():
    """Re-seeding the generator after construction changes nothing; seeding it differently
    before construction does (so the comparison can fail)."""

    def run(seed_at_build, reseed_after):
        model = make_model()
        ids, _ = batch()
        generator = torch.Generator().manual_seed(seed_at_build)
        reg = RandomPerturbationRegularizer(
            model, min_layer=0, max_layer=DEPTH, generator=generator
        )
        if reseed_after is not None:
            generator.manual_seed(reseed_after)
        steps = []
        for _ in range(4):
            _, penalty = reg.pair(lambda: model(ids))
            steps.append((reg.last_layer, penalty.item()))
        return steps

    assert run(5, None) == run(5, 6) == run(5, 5)
    assert run(5, None) != run(6, None)


@pytest.mark.promise("faults-leave-model")
def test_exception_inside_noisy_forward_leaves_model_clean():
    model = make_model()
    ids, _ = batch()
    expected = model(ids)
    reg = RandomPerturbationRegularizer(model)

    def failing():
        model(ids)
        raise KeyError("boom")

    with pytest.raises(KeyError):
        reg(failing, expected)
    assert torch.equal(model(ids), expected)
    assert reg(lambda: model(ids), expected) > 0  # still usable
    with RandomPerturbationRegularizer(model) as other:
        pass
    assert other._hooks.installed is False


def test_two_regularizers_on_one_model_do_not_interfere():
    model = make_model()
    ids, _ = batch()
    regs = {
        1: RandomPerturbationRegularizer(model, min_layer=1, max_layer=1, eta=1.0),
        3: RandomPerturbationRegularizer(model, min_layer=3, max_layer=3, eta=1.0),
    }
    seen, handles = record_block_inputs(model)
    clean = model(ids)
    clean_inputs = list(seen)
    for layer, reg in regs.items():
        seen.clear()
        reg(lambda: model(ids), clean)  # noqa: B023
        changed = [k for k in range(DEPTH) if not torch.equal(seen[k], clean_inputs[k])]
        assert changed[0] == layer  # each perturbs only its own layer, only in its own call
    seen.clear()
    model(ids)
    assert all(torch.equal(a, b) for a, b in zip(seen, clean_inputs))
    for h in handles:
        h.remove()


def _half(hidden: torch.Tensor, batch_dim: int) -> torch.Tensor:
    return torch.full_like(hidden, 0.5)


def test_a_block_in_two_stacks_is_hooked_once_for_the_first():
    a, b, c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    hooks = StackHooks([[a, b], [b, a, c]], [0, 0])
    assert [len(m._forward_hooks) for m in (a, b, c)] == [1, 1, 1]
    assert [len(m._forward_pre_hooks) for m in (a, b, c)] == [1, 1, 1]
    hooks.remove()


def test_keep_only_leaves_one_stack_renumbered_as_zero():
    """StackHooks after a forward showed which stack runs: the others' hooks are gone, and the
    kept one is stack 0 with its own batch dim; keeping it again changes nothing."""
    torch.manual_seed(0)
    a, b = [nn.Linear(4, 4) for _ in range(2)], [nn.Linear(4, 4) for _ in range(2)]
    x = torch.randn(3, 2, 4)
    clean = [b[0](x), b[1](b[0](x))]
    hooks = StackHooks([a, b], [0, 1])
    hooks.keep_only(1)
    for seed in range(2):
        assert hooks.batch_dim(0) == 1
        frame = Frame(hooks, seed, nn.ModuleList(b))
        p = NoisyPass(layer=2, perturb=_half, frame=frame)
        with replay.stream(frame), hooks.armed(p):
            a[1](a[0](x))  # unhooked now: not counted, not another stack
            out = b[1](b[0](x))
        assert (p.stack, p.calls, p.others, p.applied) == (0, 2, [], True)
        assert [(c.module, c.where) for c in frame.calls] == [
            (b[0], "pre"),
            (b[0], "post"),
            (b[1], "pre"),
            (b[1], "post"),
        ]
        torch.testing.assert_close(out, clean[1] + 0.5)
        hooks.keep_only(0)
    hooks.remove()
    assert not hooks.installed
    for block in (*a, *b):
        assert not block._forward_pre_hooks and not block._forward_hooks
    torch.testing.assert_close(b[1](b[0](x)), clean[1])


# -- how blocks are called and what they return ---------------------------------------------

Pair = namedtuple("Pair", "hidden aux")


class AttrDict(dict):
    """Built from keywords, items read as attributes (the shape of transformers' ModelOutput)."""

    __getattr__ = dict.__getitem__


def _pack(form: str, hidden: torch.Tensor, aux: torch.Tensor):
    packed = {
        "tensor": hidden,
        "tuple": (hidden, aux),
        "namedtuple": Pair(hidden, aux),
        "list": [hidden, aux],
        "dict": {"hidden": hidden, "aux": aux},
        "attrdict": AttrDict(hidden=hidden, aux=aux),
    }
    return packed[form]


def _unpack(form: str, out) -> tuple[torch.Tensor, torch.Tensor]:
    if form == "tensor":
        return out, torch.zeros(())
    if form in ("tuple", "list"):
        return out[0], out[1]
    if form == "dict":
        return out["hidden"], out["aux"]
    return out.hidden, out.aux  # namedtuple, attrdict: by attribute


class FormBlock(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.fc, self.form = nn.Linear(8, 8), form

    def forward(self, x=None, mask=None, hidden_states=None, states=None, flag=False):
        if x is None:
            x = hidden_states if states is None else states
        if isinstance(x, tuple):
            x, mask = x
        return _pack(self.form, x + torch.tanh(self.fc(x)), mask * 2)


class FormModel(nn.Module):
    """Blocks on ``[B, T, C]`` called in one way (``call``), returning one ``form``."""

    def __init__(self, call: str, form: str = "tensor") -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.layers = nn.ModuleList(FormBlock(form) for _ in range(2))
        self.head = nn.Linear(8, 3)
        self.call, self.form = call, form

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, mask, used = self.embed(ids), torch.ones(ids.shape), 0.0
        for layer in self.layers:
            out = {
                "positional": lambda: layer(h, mask),  # noqa: B023
                "hidden_states_after_mask": lambda: layer(mask=mask, hidden_states=h),  # noqa: B023
                "other_keyword": lambda: layer(flag=True, states=h, mask=mask),  # noqa: B023
                "tuple_argument": lambda: layer((h, mask)),  # noqa: B023
            }[self.call]()
            h, aux = _unpack(self.form, out)
            used = used + aux.sum()
        return self.head(h.mean(1)) + used


def _seen_at(model: FormModel, layer: int) -> list:
    """What block ``layer`` received (layer 0) or what block ``layer - 1`` returned, as seen
    after RAPT's hooks, in a clean and then a noisy pass."""
    seen: list = []
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    reg = RandomPerturbationRegularizer(model, blocks="layers", min_layer=layer, max_layer=layer)
    if layer == 0:
        hook = model.layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True
        )
    else:
        hook = model.layers[layer - 1].register_forward_hook(lambda m, a, out: seen.append(out))
    with reg:
        assert reg(lambda: model(ids), model(ids)) > 0
        assert reg.stack.batch_dim == 0
    hook.remove()
    return seen


def _assert_noise_of_eta_per_example(noisy: torch.Tensor, clean: torch.Tensor) -> None:
    delta = (noisy - clean).detach()
    torch.testing.assert_close(delta.abs().amax(dim=(1, 2)), torch.full((3,), 2.0))


@pytest.mark.parametrize("call", ["positional", "hidden_states_after_mask", "other_keyword"])
def test_layer_zero_noise_goes_to_the_hidden_states_however_the_block_is_called(call):
    """The hidden states are the first positional tensor, else ``hidden_states=``, else the
    first tensor keyword; the noise goes there and every other argument is passed on as it was.
    """
    torch.manual_seed(0)
    (clean_args, clean_kwargs), (args, kwargs) = _seen_at(FormModel(call), 0)
    assert len(args) == len(clean_args) and kwargs.keys() == clean_kwargs.keys()
    if call == "positional":
        hidden, clean_hidden = args[0], clean_args[0]
        assert torch.equal(args[1], clean_args[1])
    else:
        key = "hidden_states" if call == "hidden_states_after_mask" else "states"
        hidden, clean_hidden = kwargs[key], clean_kwargs[key]
        for name in kwargs.keys() - {key}:  # the mask as it was; flag=True a bool still
            other, clean_other = kwargs[name], clean_kwargs[name]
            assert type(other) is type(clean_other)
            assert torch.equal(other, clean_other) if name == "mask" else other == clean_other
    _assert_noise_of_eta_per_example(hidden, clean_hidden)


def test_a_block_called_without_a_tensor_is_perturbed_at_its_output_with_batch_dim_0():
    torch.manual_seed(0)
    clean, noisy = _seen_at(FormModel("tuple_argument"), 1)
    _assert_noise_of_eta_per_example(noisy, clean)


@pytest.mark.parametrize("form", ["tensor", "tuple", "namedtuple", "list", "dict", "attrdict"])
@pytest.mark.parametrize("layer", [1, 2])
def test_the_noise_replaces_the_hidden_states_in_any_output_form(form, layer):
    """The output keeps its type and every other item; only its hidden states get noise."""
    torch.manual_seed(0)
    clean, noisy = _seen_at(FormModel("positional", form), layer)
    assert type(noisy) is type(clean)
    hidden, aux = _unpack(form, noisy)
    clean_hidden, clean_aux = _unpack(form, clean)
    assert torch.equal(aux, clean_aux)
    if form != "tensor":
        assert len(noisy) == len(clean) == 2
    _assert_noise_of_eta_per_example(hidden, clean_hidden)


@pytest.mark.parametrize("output", [{}, (), [], (None, torch.ones(2)), {"h": None}, "h"])
def test_an_output_without_hidden_states_first_is_refused_by_its_type(output):
    with pytest.raises(RaptRegError) as info:
        output_hidden(output)
    assert str(info.value) == (
        f"a block returned {type(output).__name__}, in which no hidden-state tensor was found "
        "(expected a tensor, a tuple/list starting with one, or a mapping whose first value is "
        "one). Pass blocks= naming modules that return their hidden states."
    )


@pytest.mark.promise("penalty-alpha")
def test_penalty_is_alpha_times_divergence():
    model = make_model()
    ids, _ = batch()
    values = []
    for alpha in (1.0, 2.5):
        reg = RandomPerturbationRegularizer(
            model, alpha=alpha, generator=torch.Generator().manual_seed(0)
        )
        values.append(reg(lambda: model(ids), model(ids)).item())
        reg.remove()
    assert values[0] > 0
    assert math.isclose(values[1], 2.5 * values[0], rel_tol=1e-5)


@pytest.mark.promise("stats", "logits-attribute")
def test_outputs_with_logits_attribute_and_telemetry():
    model = make_model()
    ids, _ = batch()

    class Out:
        def __init__(self, logits):
            self.logits = logits

    reg = RandomPerturbationRegularizer(model, min_layer=2, max_layer=2)
    out, penalty = reg.pair(lambda: Out(model(ids)))
    assert isinstance(out, Out) and penalty > 0
    stats = reg.stats()
    assert stats["rapt/layer"] == 2.0
    assert 0 < reg.last_noise_to_hidden_ratio == stats["rapt/noise_to_hidden_ratio"]


BAD_ARGUMENTS = {
    "negative-eta": ({"eta": -1.0}, "eta must be finite and >= 0"),
    "nan-eta": ({"eta": float("nan")}, "eta must be finite"),
    "inf-alpha": ({"alpha": float("inf")}, "alpha must be finite"),
    "negative-sigma": ({"sigma": -0.1}, "sigma must be finite"),
    "string-alpha": ({"alpha": "1"}, "alpha must be a number"),
    "min-above-max": ({"min_layer": 3, "max_layer": 2}, "min_layer=3 is greater than max_layer=2"),
    "negative-layer": ({"min_layer": -1}, "min_layer must be an int >= 0"),
    "unknown-norm": ({"norm": "l1"}, "unknown norm 'l1'"),
    "unknown-divergence": ({"divergence": "kld"}, "unknown divergence 'kld'"),
    "unknown-nonfinite": ({"nonfinite": "zero"}, "unknown nonfinite"),
    "bad-blocks": ({"blocks": "encoder"}, "not a submodule"),
}


@pytest.mark.promise("refusals-name-the-fix")
@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomPerturbationRegularizer(make_model(), **kwargs)


def test_class_instead_of_instance_is_refused():
    with pytest.raises(ValueError, match="instantiate it first"):
        RandomPerturbationRegularizer(TinyTransformer)


@pytest.mark.promise("refusals-name-the-fix")
def test_call_time_errors():
    model = make_model()
    ids, _ = batch()
    reg = RandomPerturbationRegularizer(model)
    clean = model(ids)
    with pytest.raises(ValueError, match="zero-argument callable"):
        reg(model(ids), clean)
    with pytest.raises(ValueError, match=r"shape \(2, 3\) but clean output has shape \(3, 3\)"):
        reg(lambda: model(ids[:2]), clean)
    with pytest.raises(ValueError, match="cannot find logits"):
        reg(lambda: model(ids), [clean])
    with pytest.raises(ValueError, match="no block of 'layers' ran"):
        reg(lambda: clean * 2, clean)
    with pytest.raises(ValueError, match="neither output requires grad"):
        reg(lambda: model(ids).detach(), clean.detach())
    with torch.no_grad():  # logging the penalty without training is allowed
        assert reg(lambda: model(ids), model(ids)) > 0


@pytest.mark.promise("stats", "nonfinite-policy")
def test_nonfinite_penalty_raises_or_skips():
    model = make_model()
    ids, _ = batch()
    clean = model(ids).detach().clone()
    clean[0, 0] = float("nan")
    reg = RandomPerturbationRegularizer(model)
    penalty = reg(lambda: model(ids), clean)
    assert penalty.item() == 0.0
    penalty.backward()  # the non-finite step reaches no weight: decided on the device
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="penalty was NaN/inf in 1 of the last 1 steps"):
        reg.stats()
    reg = RandomPerturbationRegularizer(model, nonfinite="skip")
    penalty = reg(lambda: model(ids), clean)
    assert penalty.item() == 0.0
    assert reg.skipped_steps == 1 and reg.stats()["rapt/skipped_steps"] == 1.0


@pytest.mark.promise("not-a-module")
def test_regularizer_does_not_copy_or_wrap_the_model():
    model = make_model()
    reference = copy.deepcopy(model)
    reg = RandomPerturbationRegularizer(model)
    assert reg.model is model
    assert type(model) is type(reference)
    # a plain attribute: not a module, no parameters or buffers of its own
    assert not isinstance(reg, torch.nn.Module)
    assert not [v for v in vars(reg).values() if isinstance(v, torch.Tensor)]
    assert "RandomPerturbationRegularizer(blocks='layers'" in repr(reg)


@pytest.mark.promise("noise-to-hidden-ratio")
@pytest.mark.parametrize("layer", range(DEPTH + 1))
def test_noise_to_hidden_ratio_is_the_norm_of_the_added_noise_over_the_hidden_states(layer):
    """``||delta|| / ||h||`` at layer r, read back from the hidden states themselves.

    A hook registered after the regularizer's sees the perturbed hidden states: the input of
    block 1 for layer 0, the output of block r otherwise; the clean pass gives ``h``.
    """
    model = make_model()
    ids, _ = batch()
    reg = RandomPerturbationRegularizer(model, min_layer=layer, max_layer=layer)
    seen = []
    if layer == 0:
        handle = model.layers[0].register_forward_pre_hook(
            lambda m, args: seen.append(args[0].detach())
        )
    else:
        handle = model.layers[layer - 1].register_forward_hook(
            lambda m, args, out: seen.append(out.detach())
        )
    reg(lambda: model(ids), model(ids))
    handle.remove()
    hidden, noisy = seen
    delta = noisy - hidden
    assert delta.abs().amax().item() == pytest.approx(reg.eta, rel=1e-5)
    expected = (delta.norm() / hidden.norm()).item()
    assert reg.last_noise_to_hidden_ratio == pytest.approx(expected, rel=1e-5)
    assert reg.stats()["rapt/noise_to_hidden_ratio"] == pytest.approx(expected, rel=1e-5)


# -- the whole text of every refusal and warning (they say what was wrong and how to fix it) ----


def refused(message):
    return pytest.raises(RaptRegError, match="^" + re.escape(message) + "$")


class TwoDepths(nn.Module):
    """Two stacks of different depths; ``use`` picks the ones the forward runs."""

    def __init__(self, use=("a", "b")):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = TinyTransformer(depth=3), TinyTransformer(depth=5)
        self.use = use

    def forward(self, ids):
        return sum(getattr(self, name)(ids) for name in self.use)


class IgnoresBlocks(nn.Module):
    """Runs its blocks but returns logits that do not depend on them: the penalty is 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = x
        for layer in self.layers:
            h = layer(h)
        return self.head(x)


def first_two_blocks(model):
    return [model.layers[0], model.layers[1]]


MODEL_CLASS = f"<class '{TinyTransformer.__module__}.TinyTransformer'>"
CONSTRUCTOR_MESSAGES = {
    "class": (
        lambda m: RandomPerturbationRegularizer(TinyTransformer),
        f"model must be an nn.Module instance, got {MODEL_CLASS}: instantiate it first",
    ),
    "not-a-module": (
        lambda m: RandomPerturbationRegularizer(3),
        "model must be an nn.Module instance, got 3",
    ),
    "data-parallel": (
        lambda m: RandomPerturbationRegularizer(nn.DataParallel(m)),
        "nn.DataParallel is not supported: its replicas run in threads that would share this "
        "regularizer's hooks and noise. Use DistributedDataParallel (one process per device, "
        "torch.distributed) and build the regularizer on the DDP model.",
    ),
    "nonfinite": ({"nonfinite": "zero"}, "unknown nonfinite='zero': use one of ('raise', 'skip')"),
    "generator": (
        {"generator": 3},
        "generator must be a CPU torch.Generator (noise is seeded from it)",
    ),
    "alpha-string": ({"alpha": "1"}, "alpha must be a number, got '1'"),
    "alpha-bool": ({"alpha": True}, "alpha must be a number, got True"),
    "alpha-inf": ({"alpha": float("inf")}, "alpha must be finite and >= 0, got inf"),
    "eta-negative": ({"eta": -1.0}, "eta must be finite and >= 0, got -1.0"),
    "sigma-nan": ({"sigma": float("nan")}, "sigma must be finite and >= 0, got nan"),
    "max-negative": ({"max_layer": -1}, "max_layer must be an int >= 0, got -1"),
    "min-bool": ({"min_layer": True}, "min_layer must be an int >= 0, got True"),
    "min-float": ({"min_layer": 1.0}, "min_layer must be an int >= 0, got 1.0"),
    "min-above-max": ({"min_layer": 3, "max_layer": 2}, "min_layer=3 is greater than max_layer=2"),
    "norm": ({"norm": "l1"}, "unknown norm 'l1': use one of ('inf', 'l2', None)"),
    "batch-dim-negative": ({"batch_dim": -1}, "batch_dim must be an int >= 0, got -1"),
    "batch-dim-bool": ({"batch_dim": True}, "batch_dim must be an int >= 0, got True"),
    "batch-dim-float": ({"batch_dim": 0.0}, "batch_dim must be an int >= 0, got 0.0"),
    "eta-scale": (
        {"eta_scale": "max"},
        "unknown eta_scale 'max': use one of ('absolute', 'hidden_rms')",
    ),
}


@pytest.mark.promise("refusals-name-the-fix")
@pytest.mark.parametrize("case", CONSTRUCTOR_MESSAGES, ids=list(CONSTRUCTOR_MESSAGES))
def test_constructor_refusals_say_what_was_wrong_word_for_word(case):
    build, message = CONSTRUCTOR_MESSAGES[case]
    if isinstance(build, dict):
        kwargs = build
        build = lambda m: RandomPerturbationRegularizer(m, **kwargs)  # noqa: E731
    with refused(message):
        build(make_model())


BEYOND = (
    "the noise did not reach the model: max_layer={} but the forward ran the blocks of {!r} {} "
    "times: use max_layer <= {}, or pass blocks= naming the stack this forward runs"
)


@pytest.mark.promise("fewer-calls-refused", "calls-observed")
def test_a_max_layer_beyond_the_calls_that_ran_is_refused_at_the_first_call():
    """Whatever layer is drawn, at the first call, naming the stack that ran and its calls."""
    ids, _ = batch()
    cases = [
        (lambda m: RandomPerturbationRegularizer(m, max_layer=5), "layers", 4),
        (
            lambda m: RandomPerturbationRegularizer(m, blocks=first_two_blocks(m), max_layer=3),
            "layers.0,layers.1",
            2,
        ),
    ]
    for build, where, calls in cases:
        model = make_model()
        reg = build(model)
        with refused(BEYOND.format(reg.max_layer, where, calls, calls)):
            reg.pair(lambda m=model: m(ids))
        reg.remove()
    reg = RandomPerturbationRegularizer(TwoDepths(use=("a",)), prefer=None, max_layer=5)
    with refused(BEYOND.format(5, "a.layers", 3, 3)):
        reg.pair(lambda: reg.model(ids))
    ok = RandomPerturbationRegularizer(TwoDepths(use=("b",)), prefer=None, max_layer=5)
    ok.pair(lambda: ok.model(ids))
    assert ok.stack.path == "b.layers" and ok.last_layer <= 5


NO_BLOCK_RAN = (
    "the noise did not reach the model: no block of {} ran during the noisy pass. Likely "
    "causes: (1) the model was compiled with torch.compile and run before this regularizer "
    "was built, so its graph ignores the hooks - build the regularizer first, or call "
    "torch._dynamo.reset(); (2) the forward uses other modules than these - pass "
    "blocks='<dotted path>'; (3) noisy_forward did not run the model."
)


@pytest.mark.promise("refusals-name-the-fix")
def test_call_refusals_say_what_was_wrong_word_for_word():
    model = make_model()
    ids, _ = batch()
    reg = RandomPerturbationRegularizer(model)
    clean = model(ids)
    with refused(
        "noisy_forward must be a zero-argument callable, got Tensor: pass lambda: model(**batch)"
    ):
        reg(clean, clean)
    with refused(
        "forward must be a zero-argument callable, got Tensor: pass lambda: model(**batch)"
    ):
        reg.pair(clean)
    with refused(
        "cannot find logits in a list: the forward must return a tensor [..., C] or an object "
        "with a .logits tensor (wrap it: lambda: model(x)[0]). A fused loss that makes no "
        "logits needs head='auto' and reg.pair(forward)"
    ):
        reg(lambda: model(ids), [clean])
    with refused(NO_BLOCK_RAN.format("'layers'")):
        reg(lambda: clean * 2, clean)
    with refused(
        "neither output requires grad, so the penalty cannot train anything: are the "
        "parameters frozen, or was the clean pass run under torch.no_grad()? (To only log the "
        "penalty, call the regularizer under torch.no_grad().)"
    ):
        reg(lambda: model(ids).detach(), clean.detach())
    for state in ({"rng": 1}, {"format": 2, "rng": 1}, [("format", 1)]):
        with refused("not a rapt_reg state dict (expected the dict returned by reg.state_dict())"):
            reg.load_state_dict(state)

    listed = RandomPerturbationRegularizer(model, blocks=first_two_blocks(model), max_layer=2)
    with refused(NO_BLOCK_RAN.format("'layers.0,layers.1'")):
        listed(lambda: clean * 2, clean)
    two = RandomPerturbationRegularizer(TwoDepths(), prefer=None)
    with refused(NO_BLOCK_RAN.format("'a.layers', 'b.layers'")):
        two(lambda: clean * 2, clean)

    deep = RandomPerturbationRegularizer(model, min_layer=3, max_layer=3)
    with refused(BEYOND.format(3, "layers", 1, 1)):
        deep(lambda: model.head(model.layers[0](torch.ones(3, 6, 16)).mean(1)), clean)


@pytest.mark.promise("nonfinite-policy")
def test_the_nonfinite_error_counts_the_bad_steps_among_the_checked_ones():
    model = make_model()
    ids, _ = batch()
    reg = RandomPerturbationRegularizer(model)
    for scale in (float("nan"), 1.0, float("inf")):
        reg(lambda: model(ids) * scale, model(ids))  # noqa: B023
    with refused(
        "the RandomPerturbationRegularizer penalty was NaN/inf in 2 of the last 3 steps (those "
        "steps' penalty was replaced by 0 and reached no weight): the noisy or the clean output "
        "holds NaN/inf. Check the clean loss and the learning rate, lower eta, or pass "
        "nonfinite='skip' to skip such steps."
    ):
        reg.stats()
    assert reg.skipped_steps == 2  # counted, and read only once
    assert reg.stats()["rapt/skipped_steps"] == 2.0


def test_a_nonfinite_step_gives_every_weight_a_zero_gradient():
    model = make_model()
    ids, _ = batch()
    reg = RandomPerturbationRegularizer(model, nonfinite="skip")
    clean = model(ids).detach().clone()
    clean[1, 2] = float("nan")
    penalty = reg(lambda: model(ids), clean)
    assert penalty.item() == 0.0
    penalty.backward()
    touched = [p.grad for p in model.parameters() if p.grad is not None]
    assert touched and all(torch.equal(g, torch.zeros_like(g)) for g in touched)
    assert reg.skipped_steps == 1


def test_deferred_checks_are_read_every_check_every_calls():
    from rapt_reg.regularizer import CHECK_EVERY

    assert CHECK_EVERY == 100  # documented in the nonfinite argument
    model = TinyTransformer(depth=1, dim=4, heads=1).train()
    ids, _ = batch(size=1, length=2)
    reg = RandomPerturbationRegularizer(model, max_layer=1)
    clean = model(ids)
    with torch.no_grad():
        for _ in range(CHECK_EVERY):
            reg(lambda: model(ids) * float("nan"), clean)
        # the 101st call reads the 100 pending checks first
        with pytest.raises(RaptRegError, match="NaN/inf in 100 of the last 100 steps"):
            reg(lambda: model(ids), clean)


@pytest.mark.promise("eval-mode")
def test_the_eval_mode_warning_word_for_word_points_at_the_caller():
    model = make_model().eval()
    ids, _ = batch()
    reg = RandomPerturbationRegularizer(model)
    with pytest.warns(UserWarning) as caught:
        reg(lambda: model(ids), model(ids))
    (warning,) = caught
    assert str(warning.message) == (
        "the model is in eval mode: RandomPerturbationRegularizer adds noise only in training "
        "mode, so the penalty is 0 (call model.train() to regularize). This is said once."
    )
    if not UNDER_MUTATION:  # mutmut's trampolines add frames between caller and library
        assert warning.filename == __file__


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float64, None)],
)
def test_the_eval_mode_zero_has_the_logits_device_and_at_least_float32(dtype, expected):
    reg = RandomPerturbationRegularizer(make_model().eval())
    clean = torch.zeros(2, 3, dtype=dtype, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        penalty = reg(lambda: clean, clean)
    assert penalty.shape == () and penalty.device.type == "meta"
    assert penalty.dtype == (expected or dtype)
    real = reg(lambda: clean, torch.ones(2, 3, dtype=dtype))
    assert real.item() == 0.0


ZERO_PENALTY = (
    "the RAPT penalty was exactly 0 although noise of size eta={} was added to {}: either "
    "the output does not depend on that stack (pass blocks= naming the blocks whose output the "
    "model uses), or the noise is below the resolution of the hidden states' dtype, e.g. "
    "bfloat16 (raise eta, or train in float32 with autocast). This is said once."
)


def zero_penalty_warnings(reg, steps=2, mask=None):
    """The warnings of ``steps`` steps, each followed by a read of the deferred checks."""
    x = torch.ones(2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            reg.pair(lambda: reg.model(x), mask=mask)
            READ_LINE[:] = [inspect.currentframe().f_lineno + 1]
            reg.skipped_steps  # noqa: B018 (reads the deferred checks)
    return caught


READ_LINE = []


@pytest.mark.promise("zero-penalty-warning")
@pytest.mark.parametrize(
    ("blocks", "where"), [("layers", "'layers'"), (first_two_blocks, "'layers.0,layers.1'")]
)
def test_an_exactly_zero_penalty_is_said_once_word_for_word(blocks, where):
    model = IgnoresBlocks().train()
    blocks = blocks(model) if callable(blocks) else blocks
    reg = RandomPerturbationRegularizer(model, blocks=blocks, eta=1.0, max_layer=2)
    caught = zero_penalty_warnings(reg, steps=3)
    assert [str(w.message) for w in caught] == [ZERO_PENALTY.format(1.0, where)]
    if not UNDER_MUTATION:  # mutmut's trampolines add frames between caller and library
        assert (caught[0].filename, caught[0].lineno) == (__file__, READ_LINE[0])


@pytest.mark.parametrize("kwargs", [{"eta": 0.0}, {"alpha": 0.0}])
def test_a_zero_penalty_asked_for_is_not_warned_about(kwargs):
    model = IgnoresBlocks().train()
    reg = RandomPerturbationRegularizer(model, blocks="layers", max_layer=2, **kwargs)
    assert zero_penalty_warnings(reg) == []


def test_no_zero_penalty_warning_for_a_real_penalty_or_a_fully_masked_batch():
    model = make_model(token_level=True)
    ids, _ = batch()
    reg = RandomPerturbationRegularizer(model)
    for mask in (None, torch.ones(3, 6, dtype=torch.bool)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert reg.pair(lambda: model(ids), mask=mask)[1] > 0  # noqa: B023
            reg.stats()
        assert caught == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, penalty = reg.pair(lambda: model(ids), mask=torch.zeros(3, 6, dtype=torch.bool))
        reg.stats()
    assert penalty.item() == 0.0 and caught == []


def test_stats_before_any_step_and_after_remove():
    model = make_model()
    ids, _ = batch()
    reg = RandomPerturbationRegularizer(model, min_layer=2, max_layer=2)
    stats = reg.stats()
    assert list(stats) == ["rapt/layer", "rapt/noise_to_hidden_ratio", "rapt/skipped_steps"]
    assert math.isnan(stats["rapt/layer"]) and math.isnan(stats["rapt/noise_to_hidden_ratio"])
    assert stats["rapt/skipped_steps"] == 0.0
    assert reg.last_layer is None and reg.last_noise_to_hidden_ratio is None
    reg.pair(lambda: model(ids))
    assert reg.last_noise_to_hidden_ratio > 0
    reg.remove()
    assert reg.last_noise_to_hidden_ratio is None
    stats = reg.stats()
    assert stats["rapt/layer"] == 2.0 and math.isnan(stats["rapt/noise_to_hidden_ratio"])


def test_a_state_dict_that_went_through_json_resumes_the_same_draws():
    model = make_model()
    ids, _ = batch()
    reg = RandomPerturbationRegularizer(model, min_layer=0, max_layer=DEPTH)
    reg.pair(lambda: model(ids))
    state = json.loads(json.dumps(reg.state_dict()))
    expected = []
    for _ in range(3):
        _, penalty = reg.pair(lambda: model(ids))
        expected.append((reg.last_layer, penalty.item()))
    resumed = RandomPerturbationRegularizer(model, min_layer=0, max_layer=DEPTH)
    resumed.load_state_dict(state)
    got = []
    for _ in range(3):
        _, penalty = resumed.pair(lambda: model(ids))
        got.append((resumed.last_layer, penalty.item()))
    assert got == expected


def test_repr_names_the_stacks_and_the_settings():
    model = make_model()
    reg = RandomPerturbationRegularizer(model, eta=0.5, min_layer=0, max_layer=2, alpha=3.0)
    assert repr(reg) == (
        "RandomPerturbationRegularizer(blocks='layers', eta=0.5, layers=0..2, alpha=3.0, "
        "norm='inf')"
    )
    listed = RandomPerturbationRegularizer(
        model, blocks=first_two_blocks(model), norm=None, max_layer=2
    )
    assert repr(listed) == (
        "RandomPerturbationRegularizer(blocks='layers.0,layers.1', eta=2.0, layers=1..2, "
        "alpha=1.0, norm=None)"
    )
    two = RandomPerturbationRegularizer(TwoDepths(), prefer=None)
    assert repr(two).startswith("RandomPerturbationRegularizer(blocks='a.layers, b.layers',")


def test_check_number_and_logits_of():
    from rapt_reg.regularizer import check_number, logits_of

    assert check_number("x", 0) == 0.0 and type(check_number("x", 2)) is float
    assert check_number("x", 0.25, allow_zero=False) == 0.25
    with refused("x must be finite and > 0, got 0"):
        check_number("x", 0, allow_zero=False)
    with refused("x must be finite and > 0, got -0.5"):
        check_number("x", -0.5, allow_zero=False)
    logits = torch.ones(2, 3)

    class Out:
        def __init__(self, logits):
            self.logits = logits

    assert logits_of(logits) is logits and logits_of(Out(logits)) is logits
    assert logits_of({"logits": logits, "loss": 1.0}) is logits
    for bad, name in (({"scores": logits}, "dict"), (Out(None), "Out"), (Out([1.0]), "Out")):
        with refused(
            f"cannot find logits in a {name}: the forward must return a tensor [..., C] or an "
            "object with a .logits tensor (wrap it: lambda: model(x)[0]). A fused loss that "
            "makes no logits needs head='auto' and reg.pair(forward)"
        ):
            logits_of(bad)


def test_pair_refuses_bad_token_masks_before_running_the_forward():
    model = make_model()
    reg = RandomPerturbationRegularizer(model)
    calls = []
    for masks in ({"noise_mask": torch.ones(3, 6)}, {"segment_ids": torch.ones(3, 6)}):
        with pytest.raises(RaptRegError):
            reg.pair(lambda: calls.append(1), **masks)  # noqa: B023
    assert calls == []


def test_load_state_dict_restores_the_skipped_count_and_drops_pending_checks():
    model = make_model()
    ids, _ = batch()
    clean = model(ids).detach().clone()
    clean[0, 0] = float("nan")
    reg = RandomPerturbationRegularizer(model, nonfinite="skip")
    for _ in range(3):
        reg(lambda: model(ids), clean)
    state = reg.state_dict()
    assert state["format"] == 1 and state["skipped_steps"] == 3
    other = RandomPerturbationRegularizer(model, nonfinite="skip")
    other(lambda: model(ids), clean)  # pending, not yet read
    other.load_state_dict(state)
    assert other.skipped_steps == 3


def test_a_regularizer_without_blocks_follows_the_model_training_flag():
    from rapt_reg import R3FRegularizer

    model = make_model()
    ids, _ = batch()
    reg = R3FRegularizer(model)
    assert reg.pair(lambda: model(ids))[1] > 0
    assert list(reg.stats()) == ["r3f/noise_to_hidden_ratio", "r3f/skipped_steps"]
    model.eval()
    with pytest.warns(UserWarning, match="R3FRegularizer adds noise only in training mode"):
        assert reg.pair(lambda: model(ids))[1].item() == 0.0


def _reachable(roots: list, target: torch.Tensor) -> bool:
    """Whether ``target`` can be reached from ``roots`` by references (modules not entered)."""
    import gc

    seen, todo = set(), list(roots)
    while todo:
        obj = todo.pop()
        if obj is target:
            return True
        if id(obj) in seen or isinstance(obj, (nn.Module, type)):
            continue
        seen.add(id(obj))
        todo.extend(gc.get_referents(obj))
    return False


@pytest.mark.promise("no-lingering-output")
@pytest.mark.parametrize("method", ["rapt", "r3f", "smart"])
def test_a_noisy_pass_keeps_nothing_of_the_clean_output_alive(method):
    """A noisy pass's frame lives as long as its graph (for checkpoint replay); it must not hold
    the clean output (a [batch, seq, vocab] tensor at an LLM's scale) through its noise: at 128k
    words that kept the clean logits alive through the noisy pass's backward."""
    from rapt_reg import R3FRegularizer, SmartRegularizer

    torch.manual_seed(0)
    model = TinyTransformer(token_level=True).train()
    make = {"rapt": RandomPerturbationRegularizer, "r3f": R3FRegularizer,
            "smart": SmartRegularizer}[method]  # fmt: skip
    reg = make(model)
    x = torch.randint(0, 50, (2, 5))
    clean = model(x)
    penalty = reg(lambda: model(x), clean, noise_mask=torch.ones(2, 5, dtype=torch.bool))
    frames = list(replay._FRAMES)
    assert frames and penalty.requires_grad  # the graph (and so the frame) is alive
    assert not _reachable(frames, clean)
    reg.remove()
