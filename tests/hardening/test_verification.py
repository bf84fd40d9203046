"""Call-time verification: a noisy pass that did not perturb the model is an error, not a zero.

Each noisy pass checks that the noise was added at layer r of the stack the forward runs; if
not, a RaptRegError names the blocks and the likely causes. These tests make the noise miss in
every way the issue lists (a stack the forward never runs, a forward that stops early, a model
compiled before the hooks existed, a noisy_forward that runs another model) on generated
models, and check the cases where it must not miss (pair's reused prefix, eval mode).
"""

import copy
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rapt_reg import BlockDiscoveryError, RandomPerturbationRegularizer, RaptRegError

from ._generated import (
    QUIET,
    Spec,
    build,
    expected,
    hooked_modules,
    ids_for,
    specs,
    stack_members,
)
from ._profile import examples

FORMS = ("pair", "call")
PLAIN_DISTRACTORS = ("adapters", "linear_list", "wide_linears", "hetero_seq")


def _spec(stack_path=("layers",), distractors=(), **kwargs) -> Spec:
    fields = dict(dim=8, depth=2, container="list", call="loop", block="pre_norm", head="pooled")
    fields.update(kwargs)
    return Spec(stack_path=stack_path, distractors=distractors, seed=0, **fields)


def _real_stack_specs(**kwargs):
    """Specs whose real stack is the only candidate the forward runs, and is preferred."""
    return specs(distractors=QUIET, **kwargs).filter(lambda s: expected(s).outcome == "perturbs")


@pytest.mark.promise("fewer-calls-refused")
@examples(25)
@given(spec=specs(distractors=PLAIN_DISTRACTORS, require=("unused_stack",)), extra=st.data())
def test_a_layer_beyond_the_calls_the_forward_makes_is_refused(spec, extra):
    # blocks= lists the real blocks, then blocks the forward never calls: it stops early.
    model = build(spec)
    unused = [".".join(p) for k, p, _ in spec.distractors if k == "unused_stack"][0]
    blocks = [*model.get_submodule(spec.path).children(), *model.get_submodule(unused).children()]
    layer = extra.draw(st.integers(spec.depth + 1, len(blocks)), label="layer")
    reg = RandomPerturbationRegularizer(model, min_layer=layer, max_layer=layer, blocks=blocks)
    ids = ids_for(spec)
    with pytest.raises(RaptRegError, match=f"max_layer={layer} but .* {spec.depth} times"):
        reg.pair(lambda: model(ids))
    with pytest.raises(RaptRegError, match=f"max_layer <= {spec.depth}.*blocks="):
        reg(lambda: model(ids), model(ids))
    assert reg._hooks._pass is None
    reg.remove()


@pytest.mark.promise("noise-reaches-output")
@examples(25)
@given(spec=_real_stack_specs(), how=st.sampled_from(["cached_output", "copy_of_model"]))
def test_a_noisy_forward_that_does_not_run_the_model_is_refused(spec, how):
    model = build(spec)
    ids = ids_for(spec)
    other = copy.deepcopy(model)  # an EMA copy, a teacher: same output, other modules
    reg = RandomPerturbationRegularizer(model, max_layer=1)
    clean = model(ids)
    noisy = (lambda: clean) if how == "cached_output" else (lambda: other(ids))
    with pytest.raises(RaptRegError, match=r"no block of .* ran during the noisy pass") as caught:
        reg(noisy, clean)
    assert f"'{spec.path}'" in str(caught.value) and "blocks=" in str(caught.value)
    del caught
    assert reg(lambda: model(ids), clean).item() > 0  # still usable
    reg.remove()


@pytest.mark.promise("noise-reaches-output", "compile-refused")
@pytest.mark.slow_for_mutation
def test_a_model_compiled_before_the_regularizer_is_refused_naming_torch_compile():
    spec = _spec()
    model = build(spec)
    ids = ids_for(spec)
    compiled = torch.compile(model, backend="eager")
    try:
        compiled(ids)  # traced without hooks: the graph will ignore them
        reg = RandomPerturbationRegularizer(compiled, max_layer=2)
        with pytest.raises(RaptRegError, match="torch.compile.*build the regularizer first"):
            reg.pair(lambda: compiled(ids))
        reg.remove()
    finally:
        torch._dynamo.reset()


@pytest.mark.promise("pair-equals-two-calls")
@examples(60)
@given(spec=_real_stack_specs(), seed=st.integers(0, 2**32 - 1))
def test_pair_equals_two_passes(spec, seed):
    model = build(spec)
    ids = ids_for(spec)
    gen = torch.Generator().manual_seed(seed)
    reg = RandomPerturbationRegularizer(model, min_layer=0, max_layer=spec.depth, generator=gen)
    state = reg.state_dict()
    _, paired = reg.pair(lambda: model(ids))
    paired = paired.detach()  # the graph is freed: the rewound RNG may draw its seed again
    layer = reg.last_layer
    reg.load_state_dict(state)
    two_pass = reg(lambda: model(ids), model(ids))
    assert reg.last_layer == layer
    assert paired.item() > 0 and reg.stats()["rapt/noise_to_hidden_ratio"] > 0
    torch.testing.assert_close(paired, two_pass, rtol=1e-6, atol=0)
    reg.remove()


@pytest.mark.promise("eval-mode")
@examples(30)
@given(
    spec=_real_stack_specs(),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["train", "eval", "blocks_eval"]), st.sampled_from(["pair", "call"])
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_eval_mode_gives_zero_without_a_noisy_pass_and_says_so_once(spec, steps):
    model = build(spec)
    ids = ids_for(spec)
    reference = model.eval()(ids)
    reg = RandomPerturbationRegularizer(model, max_layer=1)
    runs = []

    def forward():
        runs.append(1)
        return model(ids)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for mode, form in steps:
            model.train(mode == "train")
            if mode == "blocks_eval":  # the model trains, its blocks do not: no noise either
                model.train()
                for path in (spec.path, *spec.paths("unused_stack")):
                    model.get_submodule(path).eval()
            runs.clear()
            if form == "pair":
                clean, penalty = reg.pair(forward)
            else:
                penalty = reg(forward, forward())
            if mode == "train":
                assert penalty.item() > 0 and len(runs) == 2
                continue
            assert len(runs) == 1, "the noisy forward ran in eval mode"
            assert penalty.item() == 0 and not penalty.requires_grad
            assert penalty.dtype == torch.float32 and penalty.shape == ()
            if form == "pair" and mode == "eval":
                assert torch.equal(clean, reference)  # the hooks did nothing
    said = [w for w in caught if "eval mode" in str(w.message)]
    assert len(said) == (0 if all(mode == "train" for mode, _ in steps) else 1)
    reg.remove()


@pytest.mark.promise("discovery")
def test_the_ambiguity_error_lists_every_stack_that_ran():
    # A probe stack runs first, then the real blocks, then attention adapters.
    spec = _spec(distractors=(("aux_stack", ("probe",), 1), ("attn_adapters", ("adapters",), 2)))
    model = build(spec)
    reg = RandomPerturbationRegularizer(model, max_layer=1)
    with pytest.raises(BlockDiscoveryError) as caught:
        reg.pair(lambda: model(ids_for(spec)))
    assert all(f"'{path}'" in str(caught.value) for path in ("probe", "layers", "adapters"))


@pytest.mark.promise("zero-penalty-warning")
@pytest.mark.parametrize("how", ["prefer", "blocks"])
def test_noise_in_a_stack_whose_output_is_thrown_away_is_announced_once(how):
    # `prefer="encoder"` keeps encoder.probe, which runs but whose output the model discards
    # (a probe, a teacher, a side loss); or blocks= names it. Dropout off: the penalty is 0.
    spec = _spec(distractors=(("aux_stack", ("encoder", "probe"), 2),))
    model = build(spec)
    assert expected(spec).outcome == "discarded"
    reg = RandomPerturbationRegularizer(
        model, max_layer=1, blocks="encoder.probe" if how == "blocks" else None
    )
    ids = ids_for(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        penalties = [reg.pair(lambda: model(ids))[1].item() for _ in range(3)]
        reg.stats()  # where the deferred check is read
    assert hooked_modules(model) == set(stack_members(model, "encoder.probe"))
    assert penalties == [0.0] * 3
    said = [str(w.message) for w in caught if "exactly 0" in str(w.message)]
    assert len(said) == 1 and "'encoder.probe'" in said[0] and "blocks=" in said[0]
