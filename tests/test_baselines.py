"""SMART and R3F against hand-written references (MT-DNN's and fairseq's steps, plain autograd)."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import TinyTransformer
from torch import nn

from rapt_reg import RaptRegError
from rapt_reg.baselines import R3FRegularizer, SmartRegularizer

BATCH, SEQ = 3, 7


def _tiny(dtype: torch.dtype = torch.float64, depth: int = 2) -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer(depth=depth, dim=16, heads=2, classes=3).to(dtype).train()


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _from_tokens(model: TinyTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """TinyTransformer's forward from its token embeddings (positions added here)."""
    return _from_layer0(model, model.drop(tokens + model.pos[:, : tokens.shape[1]]))


def _from_layer0(model: TinyTransformer, hidden: torch.Tensor) -> torch.Tensor:
    """TinyTransformer's forward from the input of its first block."""
    for layer in model.layers:
        hidden = layer(hidden)
    return model.head(model.norm(hidden).mean(1))


def _seeded_source(seed: int) -> torch.Generator:
    """The first step's noise generator of a regularizer built with ``manual_seed(seed)``.

    As documented: one draw from the generator at construction seeds a Python RNG, which gives
    each step's noise seed.
    """
    first = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(seed)))
    return torch.Generator().manual_seed(random.Random(first).getrandbits(62))


def _grads(model: nn.Module) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_grads(model: nn.Module, expected: list[torch.Tensor]) -> None:
    got = _grads(model)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10)


# -- SMART ------------------------------------------------------------------------------------


def _mtdnn_stable_kl_sum(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MT-DNN's stable_kl(logit, target, reduce=False), written out from its definition."""
    p, y = F.softmax(logit, 1), F.softmax(target, 1)
    rp = -(1.0 / (p + 1e-6) - 1 + 1e-6).detach().log()
    ry = -(1.0 / (y + 1e-6) - 1 + 1e-6).detach().log()
    return (p * (rp - ry) * 2).sum()


def _mtdnn_sym_kl(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MT-DNN's SymKlCriterion(input, target) with batchmean reduction."""
    return F.kl_div(
        F.log_softmax(input, -1), F.softmax(target.detach(), -1), reduction="batchmean"
    ) + F.kl_div(F.log_softmax(target, -1), F.softmax(input.detach(), -1), reduction="batchmean")


def _smart_reference(model, ids, *, k, step_size, noise_var, epsilon, norm, per_sequence, seed):
    """SmartPerturbation.forward, step by step, on the embedding output computed once."""
    logits = model(ids)
    embed = model.drop(model.embed(ids) + model.pos[:, : ids.shape[1]])
    sample = torch.randn(embed.shape, generator=_seeded_source(seed), dtype=embed.dtype)
    noise = (sample * noise_var).requires_grad_()
    dims = (-2, -1) if per_sequence else (-1,)
    for _ in range(k):
        adv_logits = _from_layer0(model, embed + noise)
        adv_loss = _mtdnn_stable_kl_sum(adv_logits, logits.detach())
        (delta_grad,) = torch.autograd.grad(adv_loss, noise, retain_graph=True)
        delta_grad = noise + delta_grad * step_size
        if norm == "inf":
            size = delta_grad.abs().amax(dims, keepdim=True)
        else:
            size = torch.linalg.vector_norm(delta_grad, dim=dims, keepdim=True)
        noise = (delta_grad / (size + epsilon)).detach().requires_grad_()
    adv_logits = _from_layer0(model, embed + noise.detach())
    return _mtdnn_sym_kl(logits, adv_logits)


SMART_CASES = {
    "k1-inf-token": dict(k=1, norm="inf", per_sequence=False),
    "k2-inf-sequence": dict(k=2, norm="inf", per_sequence=True),
    "k1-l2-token": dict(k=1, norm="l2", per_sequence=False),
    "k0-raw-noise": dict(k=0, norm="inf", per_sequence=False),
}


@pytest.mark.promise("baselines")
@pytest.mark.parametrize("case", SMART_CASES.values(), ids=SMART_CASES.keys())
def test_smart_matches_mtdnn_reference(case):
    # A larger step than MT-DNN's default so that the gradient visibly moves the noise.
    params = dict(step_size=10.0, noise_var=1e-3, epsilon=1e-6, **case)
    model, ids = _tiny(), _ids()
    expected = _smart_reference(model, ids, seed=5, **params)
    expected.backward()
    expected_grads = _grads(model)

    gen = torch.Generator().manual_seed(5)
    with SmartRegularizer(model, alpha=1.0, generator=gen, **params) as reg:
        logits, penalty = reg.pair(lambda: model(ids))
        penalty.backward()
    torch.testing.assert_close(penalty, expected, rtol=1e-9, atol=1e-12)
    assert float(penalty.detach()) > 0
    _assert_same_grads(model, expected_grads)


def test_smart_noise_after_one_step_has_unit_inf_norm_per_token():
    model, ids = _tiny(), _ids()
    seen = []
    with torch.no_grad():
        clean_input = model.drop(model.embed(ids) + model.pos[:, :SEQ])
    with SmartRegularizer(model, k=1) as reg:
        # Registered after the regularizer's own hook, so it sees the perturbed input.
        model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
        reg(lambda: model(ids), model(ids))
    final_noise = seen[-1] - clean_input
    # MT-DNN normalises noise + step * grad itself: per token inf-norm ~ 1 - epsilon / max.
    expected = torch.ones(BATCH, SEQ, dtype=torch.float64)
    torch.testing.assert_close(final_noise.abs().amax(-1), expected, rtol=0.1, atol=0)


def test_smart_skips_a_step_whose_ascent_gradient_is_not_finite():
    model, ids = _tiny(), _ids()
    with SmartRegularizer(model) as reg:
        clean = model(ids)
        penalty = reg(lambda: model(ids) * float("nan"), clean)
        loss = F.cross_entropy(clean, torch.zeros(BATCH, dtype=torch.long)) + penalty
        loss.backward()
        assert float(penalty.detach()) == 0.0
        assert reg.stats()["smart/skipped_steps"] == 1.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_smart_nonfinite_penalty_raises_or_skips():
    model, ids = _tiny(), _ids()
    calls = iter(range(10))

    def forward():  # finite in the ascent pass, NaN in the penalty pass
        return model(ids) * (1.0 if next(calls) == 0 else float("nan"))

    with SmartRegularizer(model) as reg, pytest.raises(RaptRegError, match="nonfinite='skip'"):
        assert float(reg(forward, model(ids)).detach()) == 0.0
        reg.stats()
    calls = iter(range(10))
    with SmartRegularizer(model, nonfinite="skip") as reg:
        assert float(reg(forward, model(ids))) == 0.0
        assert reg.skipped_steps == 1


# -- R3F --------------------------------------------------------------------------------------


def _r3f_reference(model, ids, *, eps, noise, seed):
    """fairseq's sentence_prediction_r3f step, with the noise on the embedding output (the
    input of the first block, where every method's noise goes) and not detached."""
    input_logits = model(ids)
    embed = model.drop(model.embed(ids) + model.pos[:, : ids.shape[1]])
    shape, dtype = embed.shape, embed.dtype
    if noise == "uniform":
        sample = torch.rand(shape, generator=_seeded_source(seed), dtype=dtype) * 2 * eps - eps
    else:
        sample = torch.randn(shape, generator=_seeded_source(seed), dtype=dtype) * eps
    noised_logits = _from_layer0(model, embed + sample)
    symm_kl = (
        F.kl_div(F.log_softmax(noised_logits, -1), F.softmax(input_logits, -1), reduction="sum")
        + F.kl_div(F.log_softmax(input_logits, -1), F.softmax(noised_logits, -1), reduction="sum")
    ) / noised_logits.size(0)
    return input_logits, symm_kl


@pytest.mark.promise("baselines")
@pytest.mark.parametrize("noise", ["uniform", "normal"])
def test_r3f_matches_fairseq_reference(noise):
    model, ids = _tiny(), _ids()
    expected_logits, expected = _r3f_reference(model, ids, eps=0.1, noise=noise, seed=3)
    (2.0 * expected).backward()
    expected_grads = _grads(model)

    gen = torch.Generator().manual_seed(3)
    with R3FRegularizer(model, eps=0.1, noise=noise, alpha=2.0, generator=gen) as reg:
        logits, penalty = reg.pair(lambda: model(ids))
        penalty.backward()
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(penalty, 2.0 * expected, rtol=1e-9, atol=1e-12)
    assert float(penalty.detach()) > 0
    _assert_same_grads(model, expected_grads)


# -- transformers models: where the noise goes ------------------------------------------------


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).train()


def _t5():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=60, d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2, dropout_rate=0.0
    )
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).train()


def test_r3f_perturbs_the_t5_encoder_input_only():
    model = _t5()
    ids = _ids() % 60
    batch = dict(input_ids=ids, decoder_input_ids=ids[:, :4])
    seen: dict[str, list[torch.Tensor]] = {}
    with R3FRegularizer(model, eps=0.5) as reg:
        for name in ("encoder.block.0", "decoder.block.0"):
            model.get_submodule(name).register_forward_pre_hook(
                lambda m, a, k, name=name: seen.setdefault(name, []).append(
                    (a[0] if a else k["hidden_states"]).detach()
                ),
                with_kwargs=True,
            )
        clean, penalty = reg.pair(lambda: model(**batch))
    enc, dec = seen["encoder.block.0"], seen["decoder.block.0"]
    assert 0 < (enc[1] - enc[0]).abs().max() <= 0.5
    torch.testing.assert_close(dec[1], dec[0], rtol=0, atol=0)
    assert float(penalty.detach()) > 0


@pytest.mark.promise("baselines-checkpoint")
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_r3f_under_gradient_checkpointing_matches_plain(reentrant):
    """The noise goes through the hooks' replay: exact under transformers' checkpointing, the
    reentrant kind too (0.2.0 lost the noisy side's gradient there)."""
    ids = _ids() % 60

    def run(checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = _bert()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        with R3FRegularizer(model, eps=0.1, generator=torch.Generator().manual_seed(0)) as reg:
            clean, penalty = reg.pair(lambda: model(input_ids=ids))
            (clean.logits.logsumexp(-1).mean() + penalty).backward()
        return penalty.detach(), _grads(model)

    (plain, plain_grads), (checkpointed, checkpointed_grads) = run(False), run(True)
    torch.testing.assert_close(checkpointed, plain)
    assert len(checkpointed_grads) == len(plain_grads)
    for a, b in zip(checkpointed_grads, plain_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.promise("baselines-checkpoint")
def test_smart_under_reentrant_checkpointing_is_refused_naming_the_fix():
    model = _bert()
    model.gradient_checkpointing_enable({"use_reentrant": True})
    ids = _ids() % 60
    with SmartRegularizer(model, k=1) as reg, pytest.raises(RaptRegError) as info:
        reg.pair(lambda: model(input_ids=ids))
    assert "SMART's ascent step needs the gradient with respect to its noise" in str(info.value)
    assert "use_reentrant" in str(info.value.__cause__)  # torch's own error, chained
    assert "use_reentrant=False" in str(info.value)


@pytest.mark.parametrize("build", [_bert, _t5], ids=["bert", "t5"])
def test_smart_zero_noise_is_the_clean_forward(build):
    # Layer 0 is the input of the first block: positions (BERT) and T5's embedding are applied
    # once, so zero noise reproduces the clean output exactly.
    model = build()
    ids = _ids() % 60
    batch = (
        dict(input_ids=ids)
        if "Bert" in type(model).__name__
        else dict(input_ids=ids, decoder_input_ids=ids[:, :4])
    )
    with SmartRegularizer(model, k=0, noise_var=0.0) as reg:
        clean, penalty = reg.pair(lambda: model(**batch))
        assert float(penalty.detach()) == 0.0
    with SmartRegularizer(model, k=1) as reg:
        clean, penalty = reg.pair(lambda: model(**batch))
        penalty.backward()
    assert float(penalty.detach()) > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_smart_under_gradient_checkpointing_matches_plain():
    # The first block's recomputation in backward re-adds the same noise (the same leaf in
    # the ascent pass), so checkpointing changes nothing.
    ids = _ids() % 60

    def run(checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = _bert()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            (enable or model.gradient_checkpointing_enable)()
        gen = torch.Generator().manual_seed(0)
        with SmartRegularizer(model, k=1, step_size=10.0, noise_var=1e-3, generator=gen) as reg:
            clean, penalty = reg.pair(lambda: model(input_ids=ids))
            penalty.backward()
        return penalty.detach(), _grads(model)

    (plain, plain_grads), (checkpointed, checkpointed_grads) = run(False), run(True)
    torch.testing.assert_close(checkpointed, plain)
    for a, b in zip(checkpointed_grads, plain_grads):
        torch.testing.assert_close(a, b)


# -- shared behaviour -------------------------------------------------------------------------

REGULARIZERS = {
    "smart": lambda model, **kw: SmartRegularizer(model, **kw),
    "r3f": lambda model, **kw: R3FRegularizer(model, eps=0.1, **kw),
}


@pytest.mark.promise("eval-mode")
@pytest.mark.parametrize("make", REGULARIZERS.values(), ids=REGULARIZERS.keys())
def test_eval_mode_gives_zero_and_warns_once(make):
    model, ids = _tiny(), _ids()
    calls = []
    with make(model) as reg:
        model.eval()
        clean = model(ids)
        with pytest.warns(UserWarning, match="eval mode"):
            assert float(reg(lambda: calls.append(1), clean)) == 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert float(reg.pair(lambda: model(ids))[1]) == 0.0
    assert calls == []


@pytest.mark.parametrize("make", REGULARIZERS.values(), ids=REGULARIZERS.keys())
def test_remove_leaves_no_hook_and_the_global_rng_untouched(make):
    model, ids = _tiny(), _ids()
    reg = make(model, generator=torch.Generator().manual_seed(0))
    state, draws = torch.get_rng_state(), reg.state_dict()
    first = reg.pair(lambda: model(ids))[1].detach()  # freed: the rewound RNG redraws its seed
    assert torch.equal(torch.get_rng_state(), state)
    reg.load_state_dict(draws)
    torch.testing.assert_close(reg.pair(lambda: model(ids))[1], first)
    reg.remove()
    reg.remove()
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("make", REGULARIZERS.values(), ids=REGULARIZERS.keys())
def test_noise_that_never_reaches_the_model_is_an_error(make):
    model, ids = _tiny(), _ids()
    with make(model) as reg, pytest.raises(RaptRegError, match="did not reach the model"):
        reg(lambda: torch.zeros(BATCH, 3, dtype=torch.float64, requires_grad=True), model(ids))


@pytest.mark.promise("masked-positions-left-out")
@pytest.mark.parametrize("make", REGULARIZERS.values(), ids=REGULARIZERS.keys())
def test_masked_positions_never_reach_the_penalty(make):
    # Token-level logits that are NaN at padding: the mask keeps them out of SMART's ascent
    # loss and of both penalties, and out of every gradient.
    torch.manual_seed(0)
    model = TinyTransformer(depth=2, dim=16, heads=2, token_level=True).double().train()
    ids, keep = _ids(), torch.ones(BATCH, SEQ, dtype=torch.bool)
    keep[:, -2:] = False

    def forward():
        return torch.where(keep[..., None], model(ids), float("nan"))

    with make(model, nonfinite="raise") as reg:
        clean, penalty = reg.pair(forward, mask=keep)
        penalty.backward()
        assert reg.skipped_steps == 0
    assert torch.isfinite(penalty) and float(penalty.detach()) > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


BAD_ARGUMENTS = {
    "smart-k": (SmartRegularizer, dict(k=-1), "k"),
    "smart-norm": (SmartRegularizer, dict(norm="l3"), "norm"),
    "smart-step": (SmartRegularizer, dict(step_size=float("nan")), "step_size"),
    "smart-alpha": (SmartRegularizer, dict(alpha=-1.0), "alpha"),
    "r3f-noise": (R3FRegularizer, dict(noise="laplace"), "noise"),
    "r3f-eps": (R3FRegularizer, dict(eps="big"), "eps"),
    "r3f-nonfinite": (R3FRegularizer, dict(nonfinite="ignore"), "nonfinite"),
}


@pytest.mark.parametrize("cls, kwargs, word", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_are_value_errors_that_name_them(cls, kwargs, word):
    with pytest.raises(ValueError, match=word):
        cls(_tiny(), **kwargs)
