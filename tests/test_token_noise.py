"""noise_mask / segment_ids / eta_scale through the regularizers: the noise each block sees.

The noise itself is tested in test_noise.py; here, that the regularizers hand the masks to it
at the perturbed layer, in both call forms and both layouts, and that SMART and R3F leave
padding alone too.
"""

from __future__ import annotations

import pytest
import torch
from models import TinyTransformer
from torch import nn

import rapt_reg
from rapt_reg import R3FRegularizer, RandomPerturbationRegularizer, SmartRegularizer

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH, SEQ, DIM = 3, 6, 16
MASK = torch.tensor(
    [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool
)  # one padded example, one full, one empty
SEGMENTS = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5]])


class SeqFirst(nn.Module):
    """``nn.TransformerEncoder`` with ``batch_first=False``: hidden states [seq, batch, dim]."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(DIM, 2, 2 * DIM, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, seq, dim]
        return self.head(self.encoder(x.transpose(0, 1))).transpose(0, 1)


def _setup(layout: str) -> tuple[nn.Module, torch.Tensor, int]:
    torch.manual_seed(0)
    if layout == "batch_first":
        return (
            TinyTransformer(depth=3, dim=DIM, token_level=True),
            torch.randint(0, 50, (BATCH, SEQ)),
            0,
        )
    return SeqFirst(), torch.randn(BATCH, SEQ, DIM), 1


def _noise_at(reg, model, x, layer: int, form: str, **masks) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta, clean hidden) at the output of block ``layer``, batch first [batch, seq, dim]."""
    seen: list[torch.Tensor] = []
    block = reg.stack.blocks[layer - 1]
    handle = block.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        if form == "pair":
            reg.pair(lambda: model(x), **masks)
        else:
            reg(lambda: model(x), model(x), **masks)
    finally:
        handle.remove()
    clean, noisy = seen[0], seen[-1]
    batch_dim = reg.stack.batch_dim
    return (noisy - clean).movedim(batch_dim, 0), clean.movedim(batch_dim, 0)


@pytest.mark.promise("noise-mask")
@pytest.mark.parametrize("form", ["call", "pair"])
@pytest.mark.parametrize("layout", ["batch_first", "seq_first"])
def test_rapt_noise_follows_the_mask(layout: str, form: str) -> None:
    model, x, batch_dim = _setup(layout)
    reg = RandomPerturbationRegularizer(model, eta=2.0, min_layer=2, max_layer=2)
    delta, _ = _noise_at(reg, model, x, 2, form, noise_mask=MASK)
    assert reg.stack.batch_dim == batch_dim
    assert bool((delta[~MASK] == 0).all())
    sizes = torch.where(MASK[..., None], delta.abs(), 0.0).amax(dim=(1, 2))
    torch.testing.assert_close(sizes, torch.tensor([2.0, 2.0, 0.0]), rtol=1e-5, atol=1e-6)


@pytest.mark.promise("segment-ids")
def test_rapt_scales_each_segment() -> None:
    model, x, _ = _setup("batch_first")
    reg = RandomPerturbationRegularizer(model, eta=0.5, min_layer=1, max_layer=1)
    delta, _ = _noise_at(reg, model, x, 1, "pair", segment_ids=SEGMENTS)
    for b in range(BATCH):
        for segment in SEGMENTS[b].unique():
            size = delta[b][SEGMENTS[b] == segment].abs().max()
            torch.testing.assert_close(size, torch.tensor(0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.promise("eta-scale-hidden-rms")
@pytest.mark.parametrize("layout", ["batch_first", "seq_first"])
def test_eta_scale_hidden_rms(layout: str) -> None:
    """Each example's noise has inf-norm eta * RMS of its hidden states over real tokens, so
    the noise-to-hidden ratio no longer depends on the model's scale."""
    model, x, _ = _setup(layout)
    reg = RandomPerturbationRegularizer(
        model, eta=0.1, min_layer=3, max_layer=3, eta_scale="hidden_rms"
    )
    delta, hidden = _noise_at(reg, model, x, 3, "call", noise_mask=MASK)
    for b in range(2):  # example 2 has no real token: no noise (checked below)
        rms = hidden[b][MASK[b]].square().mean().sqrt()
        torch.testing.assert_close(delta[b].abs().max(), 0.1 * rms, rtol=1e-5, atol=0)
    assert bool((delta[~MASK] == 0).all())


@pytest.mark.promise("bad-masks-refused")
def test_bad_masks_are_refused_before_any_forward() -> None:
    model, x, _ = _setup("batch_first")
    reg = RandomPerturbationRegularizer(model, max_layer=2)
    calls = []
    with pytest.raises(rapt_reg.RaptRegError, match="attention_mask.bool()"):
        reg.pair(lambda: calls.append(1) or model(x), noise_mask=MASK.long())
    assert not calls
    with pytest.raises(rapt_reg.RaptRegError, match=r"noise_mask has shape \(3, 5\)"):
        reg.pair(lambda: model(x), noise_mask=MASK[:, :5])
    with pytest.raises(rapt_reg.RaptRegError, match="eta_scale"):
        RandomPerturbationRegularizer(model, eta_scale="rms")


@pytest.mark.promise("noise-mask")
def test_smart_leaves_padding_alone() -> None:
    model, x, _ = _setup("batch_first")
    reg = SmartRegularizer(model, k=1, generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []
    first = reg.stack.blocks[0]
    handle = first.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    reg.pair(lambda: model(x), noise_mask=MASK)
    handle.remove()
    clean, ascent, final = seen
    for noisy in (ascent, final):
        delta = noisy - clean
        assert bool((delta[~MASK] == 0).all()) and bool((delta[MASK] != 0).any())
    with pytest.raises(rapt_reg.RaptRegError, match="per_sequence"):
        SmartRegularizer(model, per_sequence=True).pair(lambda: model(x), segment_ids=SEGMENTS)


@pytest.mark.promise("noise-mask")
def test_r3f_leaves_padding_alone() -> None:
    model, x, _ = _setup("batch_first")
    reg = R3FRegularizer(model, eps=0.1, generator=torch.Generator().manual_seed(0))
    seen: list[torch.Tensor] = []  # the first block's input: the embedding output, perturbed
    first = model.layers[0]
    handle = first.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    reg.pair(lambda: model(x), noise_mask=MASK, segment_ids=SEGMENTS)
    handle.remove()
    delta = seen[1] - seen[0]
    assert bool((delta[~MASK] == 0).all()) and bool((delta[MASK] != 0).all())


@pytest.mark.promise("eta-scale-hidden-rms")
def test_hidden_rms_evens_out_the_noise_to_hidden_ratio() -> None:
    """docs/noise-scale.md: at eta = 2 a fresh Llama's noise dwarfs its hidden states (BERT's
    does not); with eta_scale="hidden_rms" both get the ratio post-norm BERT gets."""
    pytest.importorskip("transformers")
    from hf_models import CASES

    found = {}
    for name in ("bert", "llama"):
        case = CASES[name]
        model, batch = case.build(), case.batch()
        for eta_scale in ("absolute", "hidden_rms"):
            with (
                RandomPerturbationRegularizer(
                    model, min_layer=1, max_layer=1, eta_scale=eta_scale
                ) as reg,
                torch.no_grad(),
            ):
                reg(lambda m=model, b=batch: m(**b), model(**batch))
                found[name, eta_scale] = reg.last_noise_to_hidden_ratio
    assert found["llama", "absolute"] > 10 * found["bert", "absolute"]
    assert 0.5 < found["bert", "absolute"] < 0.8
    for name in ("bert", "llama"):
        assert 0.5 < found[name, "hidden_rms"] < 0.8
