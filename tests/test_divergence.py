"""Divergences: >= 0, zero on equal outputs, MT-DNN's symmetric KL, float32 under autocast."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rapt_reg import divergence as div

NAMES = sorted(div.DIVERGENCES)
logit_shapes = st.lists(st.integers(1, 5), min_size=2, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    shape=logit_shapes,
    seed=st.integers(0, 2**31),
    scale=st.floats(0.1, 30),
)
def test_non_negative_and_zero_on_equal_outputs(name, shape, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(shape, generator=gen) * scale for _ in range(2))
    fn = div.resolve(name)
    assert div.reduce_divergence(fn, a, b) >= -1e-6
    assert div.reduce_divergence(fn, a, a.clone()).abs() < 1e-6


def test_sym_kl_matches_mt_dnn_and_its_gradients():
    noisy = torch.randn(4, 3, requires_grad=True)
    clean = torch.randn(4, 3, requires_grad=True)
    # MT-DNN SymKlCriterion: kl_div(log_softmax(input), softmax(target.detach()), batchmean)
    # plus the same with the roles swapped.
    reference = F.kl_div(
        F.log_softmax(noisy, -1), F.softmax(clean.detach(), -1), reduction="batchmean"
    ) + F.kl_div(F.log_softmax(clean, -1), F.softmax(noisy.detach(), -1), reduction="batchmean")
    ours = div.reduce_divergence(div.sym_kl, noisy, clean)
    torch.testing.assert_close(ours, reference)
    g_ours = torch.autograd.grad(ours, (noisy, clean))
    g_ref = torch.autograd.grad(reference, (noisy, clean))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_kl_treats_clean_as_fixed_target():
    noisy = torch.randn(3, 5, requires_grad=True)
    clean = torch.randn(3, 5, requires_grad=True)
    value = div.reduce_divergence(div.kl, noisy, clean)
    reference = F.kl_div(F.log_softmax(noisy, -1), F.softmax(clean, -1), reduction="batchmean")
    torch.testing.assert_close(value, reference)
    value.backward()
    assert clean.grad is None and noisy.grad is not None


def test_js_matches_definition():
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    p, q = a.softmax(-1), b.softmax(-1)
    m = (p + q) / 2
    expected = 0.5 * ((p * (p / m).log()).sum(-1) + (q * (q / m).log()).sum(-1)).mean()
    torch.testing.assert_close(div.reduce_divergence(div.js, a, b), expected)


def test_batchmean_over_every_leading_dimension():
    noisy, clean = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    flat = div.reduce_divergence(div.sym_kl, noisy.reshape(6, 4), clean.reshape(6, 4))
    torch.testing.assert_close(div.reduce_divergence(div.sym_kl, noisy, clean), flat)


def test_mask_leaves_out_padded_positions():
    noisy, clean = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = div.reduce_divergence(div.mse, noisy[mask.bool()], clean[mask.bool()])
    torch.testing.assert_close(div.reduce_divergence(div.mse, noisy, clean, mask), expected)


def test_float32_under_bf16_autocast():
    noisy = torch.randn(4, 3, dtype=torch.bfloat16)
    clean = torch.randn(4, 3, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = div.reduce_divergence(div.sym_kl, noisy, clean)
    assert value.dtype == torch.float32
    torch.testing.assert_close(
        value, div.reduce_divergence(div.sym_kl, noisy.float(), clean.float())
    )


@pytest.mark.parametrize(
    ("noisy", "clean", "message"),
    [
        (torch.zeros(2, 3), torch.zeros(3, 3), r"shape \(2, 3\).*shape \(3, 3\)"),
        (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), "torch.int64"),
        (torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3), "torch.bool"),
    ],
    ids=["shape", "integer", "bool"],
)
def test_bad_outputs_are_refused(noisy, clean, message):
    with pytest.raises(ValueError, match=message):
        div.reduce_divergence(div.sym_kl, noisy, clean)


def test_bad_mask_and_unknown_name_are_refused():
    with pytest.raises(ValueError, match="mask has shape"):
        div.reduce_divergence(div.kl, torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="unknown divergence 'kld'"):
        div.resolve("kld")
