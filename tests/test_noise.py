"""Noise: per-example inf-norm is exactly eta, sigma cancels (Algorithm 1, lines 5-6)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from syncs import count_host_syncs

from rapt_reg import RaptRegError
from rapt_reg.noise import hidden_rms, sample_noise, scale_noise

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
etas = st.floats(1e-3, 1e3)
# Casting eta to a half type rounds it once: allow that relative error and no more.
REL_TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def per_example_inf_norm(x: torch.Tensor) -> torch.Tensor:
    return x.double().abs().reshape(x.shape[0], -1).amax(1)


@pytest.mark.promise("inf-norm-per-example")
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


@pytest.mark.promise("sigma-cancels")
@settings(max_examples=30, deadline=None)
@given(shape=shapes, eta=etas, sigma=st.floats(1e-4, 1e4), seed=st.integers(0, 2**31))
def test_sigma_cancels_under_a_norm(shape, eta, sigma, seed):
    def draw(s):
        return sample_noise(shape, eta=eta, sigma=s, generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(draw(sigma), draw(1.0), rtol=1e-5, atol=0)


@pytest.mark.promise("per-token")
@settings(max_examples=30, deadline=None)
@given(shape=shapes, eta=etas, seed=st.integers(0, 2**31))
def test_per_token_scales_each_position(shape, eta, seed):
    """A position is an index of the dimension after the batch's: its features (every further
    dimension) have inf-norm eta; hidden states with no such dimension have one per example."""
    noise = sample_noise(
        shape, eta=eta, per_token=True, generator=torch.Generator().manual_seed(seed)
    )
    positions = shape[1] if len(shape) > 1 else 1
    sizes = noise.double().abs().reshape(shape[0], positions, -1).amax(-1)
    expected = torch.full((shape[0], positions), eta, dtype=torch.float64)
    torch.testing.assert_close(sizes, expected, rtol=1e-6, atol=0)


@pytest.mark.promise("noise-norms")
def test_l2_norm_per_example():
    noise = sample_noise((4, 3, 5), eta=0.5, norm="l2", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noise.flatten(1).norm(dim=1), torch.full((4,), 0.5))


@pytest.mark.promise("noise-norms")
def test_raw_noise_has_standard_deviation_sigma():
    noise = sample_noise((200, 500), eta=2.0, sigma=0.3, norm=None, generator=torch.Generator())
    assert abs(noise.std().item() - 0.3) < 0.01
    assert abs(noise.mean().item()) < 0.01


@pytest.mark.promise("layout-detection")
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


@pytest.mark.promise("noise-norms")
def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm must be one of"):
        scale_noise(torch.ones(2, 2), eta=1.0, norm="l1")


# -- padding and packing ----------------------------------------------------------------------


@st.composite
def token_batches(draw, segments: bool = False):
    """(shape [batch, seq, hidden], noise_mask [batch, seq], segment_ids or None, batch_dim)."""
    batch, seq, hidden = draw(st.integers(1, 4)), draw(st.integers(1, 7)), draw(st.integers(1, 5))
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=batch * seq, max_size=batch * seq)))
    ids = None
    if segments:  # any integers, not only runs from 0: -3..3
        values = st.lists(st.integers(-3, 3), min_size=batch * seq, max_size=batch * seq)
        ids = torch.tensor(draw(values)).reshape(batch, seq)
    return (batch, seq, hidden), mask.reshape(batch, seq), ids, draw(st.sampled_from([0, 1]))


def batch_first(x: torch.Tensor, batch_dim: int) -> torch.Tensor:
    return x.movedim(batch_dim, 0)


def layout(shape: tuple[int, ...], batch_dim: int) -> tuple[int, ...]:
    return (shape[1], shape[0], *shape[2:]) if batch_dim == 1 else shape


def group_norm(x: torch.Tensor, keep: torch.Tensor, norm: str) -> torch.Tensor:
    """The norm of x [n, hidden] over the rows where keep is True (float64)."""
    values = x.double()[keep]
    if norm == "inf":
        return values.abs().max() if values.numel() else torch.tensor(0.0, dtype=torch.float64)
    return values.norm()


@pytest.mark.promise("masks-any-layout", "noise-mask", "empty-row-no-noise")
@settings(max_examples=80, deadline=None)
@given(
    case=token_batches(),
    norm=st.sampled_from(["inf", "l2"]),
    eta=etas,
    seed=st.integers(0, 2**31),
)
def test_masked_noise_is_zero_off_the_mask_and_eta_on_it(case, norm, eta, seed):
    """Padding gets exactly zero; each example's norm over its real tokens is eta (0 if none)."""
    shape, mask, _, batch_dim = case
    gen = torch.Generator().manual_seed(seed)
    noise = sample_noise(
        layout(shape, batch_dim),
        eta=eta,
        norm=norm,
        batch_dim=batch_dim,
        noise_mask=mask,
        generator=gen,
    )
    noise = batch_first(noise, batch_dim)
    assert bool((noise[~mask] == 0).all())
    for b in range(shape[0]):
        expected = eta if bool(mask[b].any()) else 0.0
        torch.testing.assert_close(
            group_norm(noise[b], mask[b], norm),
            torch.tensor(expected, dtype=torch.float64),
            rtol=1e-5,
            atol=0,
        )


@pytest.mark.promise("masks-any-layout", "segment-ids")
@settings(max_examples=80, deadline=None)
@given(
    case=token_batches(segments=True),
    masked=st.booleans(),
    norm=st.sampled_from(["inf", "l2"]),
    eta=etas,
    seed=st.integers(0, 2**31),
)
def test_each_segment_is_scaled_as_one_example(case, masked, norm, eta, seed):
    """Every (row, segment id) pair: norm eta over its real tokens, as if it were alone."""
    shape, mask, ids, batch_dim = case
    mask = mask if masked else torch.ones_like(mask)
    raw = torch.randn(layout(shape, batch_dim), generator=torch.Generator().manual_seed(seed))
    noise = scale_noise(
        raw,
        eta=eta,
        norm=norm,
        batch_dim=batch_dim,
        noise_mask=mask if masked else None,
        segment_ids=ids,
    )
    noise, raw = batch_first(noise, batch_dim), batch_first(raw, batch_dim)
    for b in range(shape[0]):
        for segment in ids[b].unique():
            where = ids[b] == segment
            keep = where & mask[b]
            expected = eta if bool(keep.any()) else 0.0
            torch.testing.assert_close(
                group_norm(noise[b], keep, norm),
                torch.tensor(expected, dtype=torch.float64),
                rtol=1e-5,
                atol=0,
            )
            if not bool(keep.any()):
                continue
            # The segment alone, as an example of its own, gets the same noise.
            alone = scale_noise(raw[b][keep][None], eta=eta, norm=norm)[0]
            torch.testing.assert_close(noise[b][keep], alone, rtol=1e-6, atol=0)


@pytest.mark.promise("noise-mask")
@settings(max_examples=60, deadline=None)
@given(
    length=st.integers(1, 6),
    pads=st.lists(st.integers(0, 9), min_size=2, max_size=2),
    norm=st.sampled_from(["inf", "l2"]),
    per_token=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_noise_on_real_tokens_does_not_depend_on_padding(length, pads, norm, per_token, seed):
    """The same draws on the real tokens give the same noise, however much padding follows
    (whatever the padding's own draws); so the distribution of the noise on real tokens, and
    its norm, do not depend on the pad length."""
    gen = torch.Generator().manual_seed(seed)
    real = torch.randn(1, length, 4, generator=gen)
    outputs = []
    for pad in pads:
        raw = torch.cat([real, 100 * torch.randn(1, pad, 4, generator=gen)], dim=1)
        mask = torch.arange(length + pad)[None] < length
        noise = scale_noise(raw, eta=2.0, norm=norm, per_token=per_token, noise_mask=mask)
        outputs.append(noise[:, :length])
        assert bool((noise[:, length:] == 0).all())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-6, atol=0)
    unpadded = scale_noise(real, eta=2.0, norm=norm, per_token=per_token)
    torch.testing.assert_close(outputs[0], unpadded, rtol=1e-6, atol=0)


@pytest.mark.promise("noise-mask", "per-token")
@settings(max_examples=40, deadline=None)
@given(case=token_batches(), eta=etas, seed=st.integers(0, 2**31))
def test_per_token_with_a_mask_zeroes_padding(case, eta, seed):
    shape, mask, _, batch_dim = case
    noise = sample_noise(
        layout(shape, batch_dim),
        eta=eta,
        batch_dim=batch_dim,
        per_token=True,
        noise_mask=mask,
        generator=torch.Generator().manual_seed(seed),
    )
    size = batch_first(noise, batch_dim).double().abs().amax(-1)
    expected = torch.where(mask, eta, 0.0).double()
    torch.testing.assert_close(size, expected, rtol=1e-6, atol=0)


@pytest.mark.promise("eta-scale-hidden-rms")
@settings(max_examples=60, deadline=None)
@given(
    case=token_batches(segments=True),
    use_segments=st.booleans(),
    eta=etas,
    hidden_scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31),
)
def test_eta_relative_to_the_hidden_rms(case, use_segments, eta, hidden_scale, seed):
    """scale=hidden_rms(h): each example's (segment's) noise has inf-norm eta * RMS(h), the
    RMS taken over its real tokens and features."""
    shape, mask, ids, batch_dim = case
    ids = ids if use_segments else torch.zeros_like(ids)
    gen = torch.Generator().manual_seed(seed)
    hidden = hidden_scale * torch.randn(layout(shape, batch_dim), generator=gen)
    masks = dict(batch_dim=batch_dim, noise_mask=mask, segment_ids=ids if use_segments else None)
    noise = sample_noise(
        hidden.shape, eta=eta, generator=gen, scale=hidden_rms(hidden, **masks), **masks
    )
    noise, hidden = batch_first(noise, batch_dim), batch_first(hidden, batch_dim)
    for b in range(shape[0]):
        for segment in ids[b].unique():
            keep = (ids[b] == segment) & mask[b]
            rms = hidden[b][keep].double().square().mean().sqrt() if bool(keep.any()) else 0.0
            expected = torch.as_tensor(eta * rms, dtype=torch.float64)
            torch.testing.assert_close(
                group_norm(noise[b], keep, "inf"), expected, rtol=1e-5, atol=0
            )


@pytest.mark.promise("eta-scale-hidden-rms")
def test_hidden_rms_without_masks():
    hidden = torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]])
    torch.testing.assert_close(hidden_rms(hidden).flatten(), torch.tensor([12.5, 0.5]).sqrt())
    torch.testing.assert_close(
        hidden_rms(hidden, batch_dim=1).flatten(), torch.tensor([6.5]).sqrt()
    )


@pytest.mark.promise("bad-masks-refused")
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"noise_mask": torch.ones(2, 5, dtype=torch.bool)},
            r"noise_mask has shape \(2, 5\).*\(2, 3\)",
        ),
        ({"noise_mask": torch.ones(2, 3, dtype=torch.long)}, "attention_mask.bool()"),
        ({"noise_mask": torch.ones(6, dtype=torch.bool)}, r"\[batch, seq\], got \(6,\)"),
        ({"segment_ids": torch.zeros(2, 3)}, "integer tensor"),
        ({"segment_ids": torch.zeros(3, 2, dtype=torch.long)}, r"segment_ids has shape \(3, 2\)"),
    ],
    ids=["mask-shape", "mask-dtype", "mask-ndim", "ids-dtype", "ids-shape"],
)
def test_bad_masks_are_refused(kwargs, match):
    with pytest.raises(RaptRegError, match=match):
        scale_noise(torch.randn(2, 3, 4), eta=1.0, **kwargs)


@pytest.mark.promise("bad-masks-refused")
def test_masks_need_token_level_hidden_states():
    with pytest.raises(RaptRegError, match="leave them out"):
        scale_noise(torch.randn(4), eta=1.0, noise_mask=torch.ones(4, 1, dtype=torch.bool))


@pytest.mark.promise("eta-scale-hidden-rms")
def test_hidden_rms_per_token_and_without_gradient():
    hidden = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]], requires_grad=True)
    rms = hidden_rms(hidden, per_token=True)
    assert not rms.requires_grad and rms.dtype == torch.float32
    torch.testing.assert_close(rms.flatten(), torch.tensor([12.5, 1.0]).sqrt())
    mask = torch.tensor([[True, False]])
    torch.testing.assert_close(
        hidden_rms(hidden, noise_mask=mask).flatten(), torch.tensor([12.5]).sqrt()
    )


@pytest.mark.promise("no-host-sync")
def test_masked_scaling_makes_no_host_syncs(monkeypatch):
    """Masks are applied with where/scatter on the device: no tensor is read by the host (no
    conversion, no boolean indexing: :func:`syncs.count_host_syncs`, and no ``nonzero``)."""

    def refuse(*_, **__):
        raise AssertionError("a tensor was read by the host")

    monkeypatch.setattr(torch.Tensor, "nonzero", refuse)
    mask = torch.rand(3, 7) > 0.3
    ids = torch.randint(-2, 3, (3, 7))
    hidden = torch.randn(7, 3, 5)
    with count_host_syncs() as counts:
        for norm in ("inf", "l2"):
            masks = dict(batch_dim=1, noise_mask=mask, segment_ids=ids)
            scale = hidden_rms(hidden, **masks)
            sample_noise(hidden.shape, eta=2.0, norm=norm, scale=scale, **masks)
    assert counts.total == 0, counts.calls


# -- the helpers on their own (each case below failed a mutant of scripts/mutation.py) ---------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_hidden_rms_of_half_precision_is_float32(dtype, masked):
    hidden = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    rms = hidden_rms(hidden, noise_mask=mask if masked else None)
    assert rms.dtype == torch.float32
    exact = hidden.double()
    keep = mask if masked else torch.ones(2, 3, dtype=torch.bool)
    expected = torch.stack([exact[b][keep[b]].square().mean().sqrt() for b in range(2)])
    torch.testing.assert_close(rms.flatten().double(), expected, rtol=1e-6, atol=0)


def test_hidden_rms_of_one_number_per_example_is_its_size():
    torch.testing.assert_close(hidden_rms(torch.tensor([3.0, -4.0])), torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize("per_token", [False, True])
def test_hidden_rms_of_scalar_positions_with_a_mask(per_token):
    """Hidden states [batch, seq] (no feature dims): the RMS over each example's real tokens."""
    hidden = torch.tensor([[3.0, 4.0, 100.0], [1.0, -1.0, 7.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    rms = hidden_rms(hidden, noise_mask=mask, per_token=per_token)
    if per_token:
        expected = torch.where(mask, hidden.abs(), 0.0)
    else:
        expected = torch.tensor([[12.5**0.5], [17.0**0.5]])
    torch.testing.assert_close(rms, expected)


def test_hidden_rms_per_token_with_a_mask_and_segments():
    hidden = torch.tensor([[[3.0, 4.0], [1.0, 1.0], [6.0, 8.0]]])
    mask = torch.tensor([[True, True, False]])
    ids = torch.tensor([[0, 0, 1]])
    expected = torch.tensor([12.5, 1.0, 0.0]).sqrt().reshape(1, 3, 1)
    torch.testing.assert_close(hidden_rms(hidden, per_token=True, noise_mask=mask), expected)
    torch.testing.assert_close(
        hidden_rms(hidden, per_token=True, noise_mask=mask, segment_ids=ids), expected
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_mask": torch.ones(2, 5, dtype=torch.bool)}, r"noise_mask has shape \(2, 5\)"),
        ({"segment_ids": torch.zeros(3, 2, dtype=torch.long)}, r"segment_ids has shape \(3, 2\)"),
    ],
    ids=["mask", "ids"],
)
def test_hidden_rms_refuses_masks_of_another_shape(kwargs, match):
    with pytest.raises(RaptRegError, match=match):
        hidden_rms(torch.randn(2, 3, 4), **kwargs)


@pytest.mark.parametrize("norm", ["inf", "l2"])
def test_masked_scaling_of_scalar_positions(norm):
    """Noise [batch, seq] (no feature dims): each example's norm over its real tokens is eta."""
    delta = torch.tensor([[3.0, -4.0, 5.0], [1.0, 2.0, -2.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    scaled = scale_noise(delta, eta=2.0, norm=norm, noise_mask=mask)
    sizes = torch.tensor([[4.0], [2.0]]) if norm == "inf" else torch.tensor([[5.0], [3.0]])
    torch.testing.assert_close(scaled, torch.where(mask, delta * 2.0 / sizes, 0.0))


def test_masks_made_on_the_cpu_work_on_the_hidden_states_device():
    """torch's "meta" device stands in for a GPU (shapes only, no data): masks given on the CPU
    are moved to the hidden states' device, and every result lives there."""
    hidden = torch.empty(3, 2, 4, device="meta")  # [seq, batch, hidden]
    masks = dict(
        batch_dim=1,
        noise_mask=torch.tensor([[True, True, False], [True, False, True]]),
        segment_ids=torch.tensor([[0, 0, 1], [2, 2, 2]]),
    )
    assert hidden_rms(hidden, **masks).device == hidden.device
    assert hidden_rms(hidden, per_token=True, **masks).device == hidden.device
    for norm in ("inf", "l2", None):
        assert scale_noise(hidden, eta=1.0, norm=norm, **masks).device == hidden.device


def test_unscaled_noise_with_masks_zeroes_padding_only():
    """norm=None: padding zeroed, real tokens untouched; segments alone change nothing."""
    delta = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1))  # [seq, batch, C]
    mask = torch.tensor([[True, False, True], [True, True, False]])  # [batch, seq]
    out = scale_noise(delta, eta=5.0, norm=None, batch_dim=1, noise_mask=mask)
    assert torch.equal(out, torch.where(mask.t()[..., None], delta, 0.0))
    ids = torch.tensor([[0, 0, 1], [0, 1, 1]])
    assert torch.equal(scale_noise(delta, eta=5.0, norm=None, batch_dim=1, segment_ids=ids), delta)


def test_default_sigma_is_one():
    raw = sample_noise((2, 3, 4), eta=1.0, norm=None, generator=torch.Generator().manual_seed(5))
    assert torch.equal(raw, torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(5)))


def test_noise_is_drawn_where_its_generator_lives_and_returned_on_device(monkeypatch):
    """Drawn on ``device`` (no host-to-device copy), or on the generator's device when one is
    given; returned on ``device`` either way ("meta" stands in for a GPU)."""
    drawn = []
    randn = torch.randn

    def spy(*args, **kwargs):
        drawn.append(torch.device(kwargs.get("device") or "cpu"))
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", spy)
    meta = torch.device("meta")
    scale = torch.ones(2, 1, 1)
    assert sample_noise((2, 3, 4), eta=1.0, device=meta, scale=scale).device == meta
    generator = torch.Generator().manual_seed(0)
    assert sample_noise((2, 3, 4), eta=1.0, device=meta, generator=generator).device == meta
    assert drawn == [meta, generator.device]


def test_scale_multiplies_in_the_working_dtype_before_the_cast():
    shape, scale = (4, 8, 16), torch.full((4, 1, 1), 1 / 3, dtype=torch.float64)
    noise = sample_noise(shape, eta=0.7, scale=scale, generator=torch.Generator().manual_seed(2))
    raw = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    assert torch.equal(noise, scale_noise(raw, eta=0.7) * scale.float())
