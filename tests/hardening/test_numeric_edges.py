"""Numeric and shape edges: the penalty is finite and positive, or the error is clear.

Generated over dtype (float32, float64, bfloat16, float16), batch 1-3, sequence 1-6, eta from
0.1 to 1e6, block kinds, output layouts (pooled ``[B, C]``, token ``[B, T, C]``, an extra leading
dimension ``[2, B, T, C]``), per-token noise and both call forms. Policies from the docs:
non-finite penalties raise (or, with ``nonfinite="skip"``, give a zero that does not require
grad and count in ``skipped_steps``); outputs that cannot train refuse under grad mode.
"""

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rapt_reg import RandomPerturbationRegularizer, RaptRegError

from ._generated import BLOCKS, HEADS_KINDS, Spec, build, ids_for
from ._profile import examples

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# float16 holds at most 65504 = 256**2: from eta ~ 256 on, the noisy pass can overflow (norms and
# attention square the hidden states; seen from eta ~ 500). Such a step must be refused with a
# RaptRegError, never returned as NaN.
FLOAT16_OVERFLOW_ETA = 256.0
# Above this eta a half-precision model's own backward may overflow (seen: bfloat16, eta 1e5,
# one token, MultiheadAttention): the penalty is finite, the gradients are the model's business.
HALF_GRADIENTS_FINITE_UP_TO = 256.0


def _spec(block="pre_norm", head="pooled", depth=3, seed=0) -> Spec:
    return Spec(8, depth, "list", "loop", block, head, ("layers",), (), seed=seed)


def _step(reg, model, ids, form):
    if form == "pair":
        return reg.pair(lambda: model(ids))
    clean = model(ids)
    return clean, reg(lambda: model(ids), clean)


@pytest.mark.promise("numeric-edges")
@examples(150)
@given(
    dtype=st.sampled_from(DTYPES),
    block=st.sampled_from(BLOCKS),
    head=st.sampled_from(HEADS_KINDS),
    batch=st.integers(1, 3),
    seq=st.integers(1, 6),
    eta=st.one_of(st.just(1e6), st.floats(-1, 6).map(lambda e: 10.0**e)),
    per_token=st.booleans(),
    form=st.sampled_from(["pair", "call"]),
    seed=st.integers(0, 2**16),
)
def test_penalty_is_finite_and_positive_or_refused_clearly(
    dtype, block, head, batch, seq, eta, per_token, form, seed
):
    spec = _spec(block, head, seed=seed)
    model = build(spec).to(dtype)
    ids = ids_for(spec, batch, seq)
    reg = RandomPerturbationRegularizer(
        model,
        eta=eta,
        min_layer=0,
        per_token=per_token,
        generator=torch.Generator().manual_seed(seed),
    )
    clean, penalty = _step(reg, model, ids, form)
    try:
        reg.stats()  # a non-finite penalty is refused here (checked without a per-step sync)
    except RaptRegError as exc:
        assert dtype == torch.float16 and eta >= FLOAT16_OVERFLOW_ETA, f"refused: {exc}"
        assert "NaN/inf" in str(exc) and "lower eta" in str(exc)
        assert penalty.item() == 0  # and it reached no weight in the meantime
        return
    assert penalty.shape == () and penalty.dtype == torch.promote_types(dtype, torch.float32)
    assert math.isfinite(penalty.item()) and penalty.item() > 0, f"penalty {penalty.item()}"
    assert penalty.requires_grad
    (clean.float().logsumexp(-1).mean() + penalty).backward()
    if dtype in (torch.float32, torch.float64) or eta <= HALF_GRADIENTS_FINITE_UP_TO:
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _poisoned(model, ids, where, value, position):
    """A forward whose first (clean) or second (noisy) output holds ``value`` at one position."""
    calls = []

    def forward():
        calls.append(1)
        out = model(ids)
        if len(calls) == (2 if where == "noisy" else 1):
            flat = out.detach().clone().flatten()
            flat[position % flat.numel()] = value
            out = out + (flat.view_as(out) - out.detach())  # same graph, one value replaced
        return out

    return forward


@pytest.mark.promise("nonfinite-policy")
@pytest.mark.parametrize("form", ["pair", "call"])
@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["clean", "noisy"])
@pytest.mark.parametrize("position", [0, 7, 29], ids=["first", "middle", "last"])
def test_nonfinite_outputs_follow_the_documented_policy(where, value, position, policy, form):
    """The full grid: either output, each non-finite value, both policies and forms."""
    spec = _spec(head="token")
    model = build(spec)
    ids = ids_for(spec, 2, 5)
    reg = RandomPerturbationRegularizer(model, nonfinite=policy)
    forward = _poisoned(model, ids, where, value, position)

    def step():  # the clean output is always call 1, the noisy one call 2
        return reg.pair(forward)[1] if form == "pair" else reg(forward, forward())

    penalty = step()
    assert penalty.item() == 0
    if penalty.requires_grad:  # its gradient is stopped on the device: nothing non-finite
        penalty.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if policy == "raise":
        with pytest.raises(RaptRegError, match=r"NaN/inf.*nonfinite='skip'"):
            reg.stats()
    else:
        assert reg.skipped_steps == 1 and reg.stats()["rapt/skipped_steps"] == 1
    assert reg._hooks._pass is None
    _, penalty = reg.pair(lambda: model(ids))  # usable afterwards, nothing more skipped
    assert math.isfinite(penalty.item()) and penalty.item() > 0
    assert reg.skipped_steps == 1


GRAD_CASES = {
    # name: (detach clean, detach noisy, grad mode, outcome)
    "both_detached_under_grad": (True, True, True, "refused"),
    "both_detached_under_no_grad": (True, True, False, "logged"),
    "clean_detached": (True, False, True, "trains"),
    "noisy_detached": (False, True, True, "trains"),
}


@pytest.mark.promise("outputs-without-grad")
@pytest.mark.parametrize(
    ("detach_clean", "detach_noisy", "grad", "outcome"), GRAD_CASES.values(), ids=GRAD_CASES.keys()
)
def test_outputs_that_do_not_require_grad(detach_clean, detach_noisy, grad, outcome):
    spec = _spec()
    model = build(spec)
    ids = ids_for(spec)
    reg = RandomPerturbationRegularizer(model)

    def run(detach):
        out = model(ids)
        return out.detach() if detach else out

    with torch.set_grad_enabled(grad):
        if outcome == "refused":
            with pytest.raises(RaptRegError, match="neither output requires grad"):
                reg(lambda: run(detach_noisy), run(detach_clean))
            return
        penalty = reg(lambda: run(detach_noisy), run(detach_clean))
    assert math.isfinite(penalty.item()) and penalty.item() > 0
    assert penalty.requires_grad is (outcome == "trains")


@pytest.mark.promise("masked-positions-left-out")
def test_nan_at_a_masked_out_position_is_left_out():
    spec = _spec(head="token")
    model = build(spec)
    ids = ids_for(spec, 2, 5)
    reg = RandomPerturbationRegularizer(model)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)

    def forward():  # padded positions come out NaN (fully masked attention rows do this)
        return model(ids).masked_fill(~mask[..., None], math.nan)

    _, penalty = reg.pair(forward, mask=mask)
    penalty.backward()
    assert math.isfinite(penalty.item()) and penalty.item() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.promise("bad-outputs-refused")
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=["int64", "bool"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_integer_and_boolean_outputs_are_refused_naming_the_dtype(dtype, grad):
    spec = _spec()
    model = build(spec)
    ids = ids_for(spec)
    reg = RandomPerturbationRegularizer(model)

    def labels():
        return model(ids).argmax(-1).to(dtype)

    with torch.set_grad_enabled(grad), pytest.raises(RaptRegError, match=str(dtype)):
        reg(labels, labels())


@pytest.mark.promise("bad-outputs-refused")
def test_shape_mismatch_is_a_rapt_reg_error_naming_both_shapes():
    spec = _spec()
    model = build(spec)
    reg = RandomPerturbationRegularizer(model)
    with pytest.raises(RaptRegError, match=r"\(2, 3\).*\(1, 3\)"):
        reg(lambda: model(ids_for(spec)), model(ids_for(spec))[:1])


@pytest.mark.promise("zero-penalty-warning")
def test_noise_rounded_away_in_bfloat16_is_announced_once():
    # eta=1e-3 on hidden states of size ~4: most of the noise is below bf16's spacing there,
    # and on some steps all of it, or its effect on the logits, rounds away.
    spec = _spec(depth=3)
    model = build(spec).to(torch.bfloat16)
    ids = ids_for(spec, 2, 5)
    reg = RandomPerturbationRegularizer(model, eta=1e-3, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        penalties = [reg.pair(lambda: model(ids))[1].item() for _ in range(30)]
        reg.stats()  # where the deferred check is read
    said = [w for w in caught if "exactly 0" in str(w.message)]
    assert 0.0 in penalties, "this seed no longer produces a zero step: pick another"
    assert len(said) == 1 and "bfloat16" in str(said[0].message)


@pytest.mark.promise("zero-penalty-warning")
@pytest.mark.parametrize("nothing", ["all_masked", "empty_batch"])
def test_a_step_with_nothing_to_compare_does_not_use_up_the_zero_warning(nothing):
    # An all-padding batch (or an empty one) gives 0 by definition: no noise went missing. The
    # exactly-zero warning is said once per regularizer, so spending it here would silence it
    # for a later step where the noise really does not reach the output.
    spec = _spec(head="token")
    model = build(spec)
    ids = ids_for(spec, 2, 4)
    reg = RandomPerturbationRegularizer(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if nothing == "all_masked":
            _, penalty = reg.pair(lambda: model(ids), mask=torch.zeros(2, 4, dtype=torch.bool))
        else:
            _, penalty = reg.pair(lambda: model(ids[:0]))
        reg.stats()
    assert penalty.item() == 0
    assert not [w for w in caught if "exactly 0" in str(w.message)], "misleading warning"
