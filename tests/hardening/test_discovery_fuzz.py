"""Discovery under generated models: perturb a stack the forward runs, or refuse clearly.

Every generated model holds one real stack of blocks (a ModuleList, Sequential or ModuleDict
under random names) next to distractors (see ``_generated.py``). The regularizer must either
put its noise in a stack the forward runs and whose output the model returns (penalty > 0 with
dropout off), or refuse with the documented error naming ``blocks=``: never another exception,
never a silent zero. What must happen is predicted from the documented rules alone
(:func:`expected`), so a refusal where the rules say "perturbs" fails the test too.
"""

import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from rapt_reg import BlockDiscoveryError, RandomPerturbationRegularizer, RaptRegError

from ._generated import (
    ATTENTION_DISTRACTORS,
    build,
    candidate_lengths,
    expected,
    hook_count,
    hooked_modules,
    ids_for,
    specs,
    stack_members,
)
from ._profile import FUZZ, examples


def _step(reg, model, ids, form):
    if form == "pair":
        _, penalty = reg.pair(lambda: model(ids))
    else:
        penalty = reg(lambda: model(ids), model(ids))
    return penalty


def _zero_warnings(caught) -> int:
    return sum("exactly 0" in str(w.message) for w in caught)


@pytest.mark.promise("discovery", "noise-reaches-output")
@FUZZ
@given(spec=specs(), form=st.sampled_from(["pair", "call"]), data=st.data())
def test_generated_model_is_perturbed_where_it_runs_or_refused(spec, form, data):
    model, want = build(spec), expected(spec)
    max_layer = data.draw(st.integers(0, min(candidate_lengths(spec))), label="max_layer")
    min_layer = data.draw(st.integers(0, max_layer), label="min_layer")
    ids = ids_for(spec)
    reg = RandomPerturbationRegularizer(
        model, max_layer=max_layer, min_layer=min_layer, generator=torch.Generator()
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            penalties = [_step(reg, model, ids, form).item() for _ in range(3)]
            reg.stats()  # the exactly-zero check is read here (deferred: no host sync per step)
    except BlockDiscoveryError as exc:
        assert want.outcome == "ambiguous", f"refused, but the rules say {want}: {exc}"
        assert all(f"'{p}'" in str(exc) for p in want.conflict) and "blocks=" in str(exc)
    except RaptRegError as exc:
        assert want.outcome == "unused", f"refused, but the rules say {want}: {exc}"
        assert "no block of" in str(exc) and "blocks=" in str(exc)
    else:
        assert want.outcome in ("perturbs", "discarded"), f"ran, but the rules say {want}"
        assert reg.stack.path == want.path
        # The lazy resolution kept the stack that fired: only its blocks hold hooks now.
        assert hooked_modules(model) == set(stack_members(model, want.path))
        if want.outcome == "discarded":  # the noise cannot reach the output: said, once
            assert penalties == [0.0] * 3 and _zero_warnings(caught) == 1
            return
        assert all(p > 0 for p in penalties), f"silent zero: {penalties}"
        assert _zero_warnings(caught) == 0
    finally:
        reg.remove()
        assert hook_count(model) == 0


@pytest.mark.promise("discovery-refusal")
@examples(60)
@given(
    spec=specs(require=("unused_stack",)),
    target=st.sampled_from(["real", "real_modules", *ATTENTION_DISTRACTORS]),
    form=st.sampled_from(["pair", "call"]),
)
def test_blocks_override_perturbs_the_named_stack_or_says_it_never_ran(spec, target, form):
    paths = {"real": spec.path, "real_modules": spec.path}
    paths.update({k: ".".join(p) for k, p, _ in spec.distractors})
    assume(target in paths)
    model = build(spec)
    path = paths[target]
    blocks = list(model.get_submodule(path).children()) if target == "real_modules" else path
    reg = RandomPerturbationRegularizer(model, max_layer=1, blocks=blocks)
    try:
        if target == "unused_stack":
            with pytest.raises(RaptRegError, match=f"no block of '{path}'.*blocks="):
                _step(reg, model, ids_for(spec), form)
        elif target == "aux_stack":  # runs, but the model throws its output away
            with pytest.warns(UserWarning, match="exactly 0"):
                assert _step(reg, model, ids_for(spec), form).item() == 0
                reg.stats()  # where the deferred check is read
        else:
            assert _step(reg, model, ids_for(spec), form).item() > 0
            assert hooked_modules(model) == set(stack_members(model, path))
    finally:
        reg.remove()


class SequenceFirst(torch.nn.Module):
    """Two stacks of ``nn.TransformerEncoderLayer`` (batch_first=False); only one runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)

        def stack():
            return torch.nn.ModuleList(
                torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0) for _ in range(2)
            )

        self.layers, self.spare_layers, self.head = stack(), stack(), torch.nn.Linear(8, 3)

    def forward(self, x):  # [seq, batch, dim]
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(0))


@pytest.mark.parametrize("form", ["call", "pair"])
def test_the_first_noise_is_scaled_per_example_while_the_stack_is_unsettled(form):
    # Before a forward shows which candidate runs, the noise must still be scaled per example
    # along the batch dimension of the stack that fires (dim 1 here), not per position.
    model = SequenceFirst()
    seen = {}

    def record(key):
        return lambda module, args, output: seen.__setitem__(key, output.detach().clone())

    model.layers[0].register_forward_hook(record("clean"))  # before RAPT's hook: no noise
    reg = RandomPerturbationRegularizer(model, min_layer=1, max_layer=1, eta=2.0)
    model.layers[0].register_forward_hook(record("noisy"))  # after it: with the noise
    x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(0))
    if form == "pair":
        reg.pair(lambda: model(x))
    else:
        reg(lambda: model(x), model(x))
    per_example = (seen["noisy"] - seen["clean"]).abs().amax(dim=(0, 2))
    torch.testing.assert_close(per_example, torch.full((3,), 2.0), rtol=1e-5, atol=1e-5)
