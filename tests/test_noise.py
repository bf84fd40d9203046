"""Noise: per-example inf-norm is exactly eta, sigma cancels (Algorithm 1, lines 5-6)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rapt_reg.noise import sample_noise, scale_noise

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
etas = st.floats(1e-3, 1e3)
# Casting eta to a half type rounds it once: allow that relative error and no more.
REL_TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def per_example_inf_norm(x: torch.Tensor) -> torch.Tensor:
    return x.double().abs().reshape(x.shape[0], -1).amax(1)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, dtype=dtypes, eta=etas, seed=st.integers(0, 2**31))
def test_each_example_has_inf_norm_eta(shape, dtype, eta, seed):
    gen = torch.Generator().manual_seed(seed)
    noise = sample_noise(shape, eta=eta, dtype=dtype, generator=gen)
    assert noise.shape == shape and noise.dtype == dtype
    torch.testing.assert_close(
        per_example_inf_norm(noise),
        torch.full((shape[0],), eta, dtype=torch.float64),
        rtol=REL_TOL[dtype],
        atol=0,
    )


@settings(max_examples=30, deadline=None)
@given(shape=shapes, eta=etas, sigma=st.floats(1e-4, 1e4), seed=st.integers(0, 2**31))
def test_sigma_cancels_under_a_norm(shape, eta, sigma, seed):
    def draw(s):
        return sample_noise(shape, eta=eta, sigma=s, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(draw(sigma), draw(1.0), rtol=1e-5, atol=0)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, eta=etas, seed=st.integers(0, 2**31))
def test_per_token_scales_each_position(shape, eta, seed):
    noise = sample_noise(
        shape, eta=eta, per_token=True, generator=torch.Generator().manual_seed(seed)
    )
    expected = torch.full(shape[:-1], eta, dtype=torch.float64)
    torch.testing.assert_close(noise.double().abs().amax(-1), expected, rtol=1e-6, atol=0)


def test_l2_norm_per_example():
    noise = sample_noise((4, 3, 5), eta=0.5, norm="l2", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noise.flatten(1).norm(dim=1), torch.full((4,), 0.5))


def test_raw_noise_has_standard_deviation_sigma():
    noise = sample_noise((200, 500), eta=2.0, sigma=0.3, norm=None, generator=torch.Generator())
    assert abs(noise.std().item() - 0.3) < 0.01
    assert abs(noise.mean().item()) < 0.01


def test_batch_dim_selects_examples():
    noise = sample_noise(
        (5, 3, 4), eta=1.5, batch_dim=1, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(noise.abs().amax(dim=(0, 2)), torch.full((3,), 1.5))


def test_generator_alone_decides_the_noise():
    state = torch.get_rng_state()
    a = sample_noise((2, 3), eta=1.0, generator=torch.Generator().manual_seed(7))
    b = sample_noise((2, 3), eta=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


def test_zero_noise_does_not_divide_by_zero():
    assert torch.equal(scale_noise(torch.zeros(2, 3), eta=1.0), torch.zeros(2, 3))


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm must be one of"):
        scale_noise(torch.ones(2, 2), eta=1.0, norm="l1")
