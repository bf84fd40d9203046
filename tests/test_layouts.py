"""Which dimension is the batch: detected, or given as ``batch_dim=``; norms then per example.

A fairseq-style block runs on ``[T, B, C]`` with an attention of its own (not
``nn.MultiheadAttention``, no ``batch_first`` attribute) and a ``[B, T]`` padding mask: the
first forward shows the layout. The noise each example gets is read back from the block's
output (a hook registered after the regularizer's sees the perturbed output) and its inf-norm
over that example's positions and features must be eta, for every example.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rapt_reg import RandomPerturbationRegularizer
from rapt_reg.hooks import infer_batch_dim

DIM = 8


class SelfAttention(nn.Module):
    """Attention on [T, B, C], as fairseq's MultiheadAttention takes it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).transpose(0, 1).chunk(3, dim=-1)  # [B, T, C]
        scores = q @ k.transpose(1, 2) / DIM**0.5
        if padding.numel():
            scores = scores.masked_fill(padding[:, None, :], float("-inf"))
        return (scores.softmax(-1) @ v).transpose(0, 1)


class SeqFirstBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = SelfAttention()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor, encoder_padding_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(x, encoder_padding_mask)
        return x + torch.tanh(self.fc(x))


class SeqFirstEncoder(nn.Module):
    def __init__(self, depth: int = 3, mask_given: bool = True) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(20, DIM)
        self.layers = nn.ModuleList(SeqFirstBlock() for _ in range(depth))
        self.head = nn.Linear(DIM, 2)
        self.mask_given = mask_given

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens [B, T]
        padding = tokens.eq(0)
        x = self.embed_tokens(tokens).transpose(0, 1)  # [T, B, C]
        for layer in self.layers:
            x = layer(x, padding if self.mask_given else torch.zeros(0))
        return self.head(x.mean(0))


def _noise_at(model: nn.Module, reg, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    seen = []
    block = model.layers[layer - 1]
    handle = block.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    try:
        clean = model(tokens)
        reg(lambda: model(tokens), clean)
    finally:
        handle.remove()
    return seen[1] - seen[0]  # [T, B, C]


@pytest.mark.promise("inf-norm-per-example", "layout-detection")
@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 5),
    seq=st.integers(2, 7),
    layer=st.integers(1, 3),
    eta=st.sampled_from([0.5, 2.0]),
)
def test_sequence_first_blocks_get_per_example_norms(batch, seq, layer, eta):
    if batch == seq:
        return  # both readings fit: detection cannot tell (batch_dim= is the way; see below)
    torch.manual_seed(0)
    model = SeqFirstEncoder().train()
    tokens = torch.randint(1, 20, (batch, seq))
    with RandomPerturbationRegularizer(model, eta=eta, min_layer=layer, max_layer=layer) as reg:
        delta = _noise_at(model, reg, layer, tokens)
        per_example = delta.abs().amax(dim=(0, 2))
        torch.testing.assert_close(per_example, torch.full((batch,), eta), rtol=1e-5, atol=0)


@pytest.mark.promise("layout-detection")
@pytest.mark.parametrize("size", [3, 4])
def test_batch_dim_given_by_hand_when_nothing_tells(size):
    """No mask argument, and T == B: only ``batch_dim=1`` gives per-example norms."""
    torch.manual_seed(0)
    model = SeqFirstEncoder(mask_given=False).train()
    tokens = torch.randint(1, 20, (size, size))
    with RandomPerturbationRegularizer(model, eta=2.0, min_layer=2, max_layer=2, batch_dim=1) as r:
        delta = _noise_at(model, r, 2, tokens)
    torch.testing.assert_close(delta.abs().amax(dim=(0, 2)), torch.full((size,), 2.0))


@pytest.mark.promise("layout-detection")
def test_batch_first_attribute_wins_over_shapes():
    layer = nn.TransformerEncoderLayer(DIM, 2, 16, dropout=0.0, batch_first=False)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    with RandomPerturbationRegularizer(model, min_layer=1, max_layer=1) as reg:
        assert reg.stack.batch_dim == 1
        x = torch.randn(5, 3, DIM)  # [T, B, C]
        seen = []
        handle = model.layers[0].register_forward_hook(lambda m, a, out: seen.append(out))
        clean = model(x)
        reg(lambda: model(x), clean)
        handle.remove()
    delta = (seen[1] - seen[0]).detach()
    torch.testing.assert_close(delta.abs().amax(dim=(0, 2)), torch.full((3,), 2.0))


def _t(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


# (hidden shape, the other positional arguments, keyword arguments, the batch dim they show)
INFERENCE = {
    "mask [B, T] with [T, B, C] states": ((5, 3, 8), (_t(3, 5),), {}, 1),
    "mask [B, T] with [B, T, C] states": ((3, 5, 8), (_t(3, 5),), {}, 0),
    "mask as a keyword": ((5, 3, 8), (), {"padding": _t(3, 5)}, 1),
    "first telling argument wins": ((5, 3, 8), (_t(5, 3), _t(3, 5)), {}, 0),
    "non-tensors and other ranks skipped": (
        (5, 3, 8),
        (None, 2, True, _t(5), _t(5, 3, 1), _t(2, 2)),
        {"flag": False, "scale": 1.5, "mask": _t(3, 5)},
        1,
    ),
    "no 2-D argument": ((5, 3, 8), (_t(5, 3, 8),), {}, None),
    "B == T: both readings fit": ((4, 4, 8), (_t(4, 4),), {}, None),
    "2-D states": ((4, 6), (_t(6, 4), _t(4, 6)), {}, None),
    "4-D states": ((5, 3, 2, 8), (_t(3, 5),), {}, 1),
}


@pytest.mark.parametrize(
    ("shape", "args", "kwargs", "expected"), INFERENCE.values(), ids=list(INFERENCE)
)
def test_the_batch_dim_a_block_call_shows(shape, args, kwargs, expected):
    hidden = _t(*shape)
    assert infer_batch_dim(hidden, (hidden, *args), kwargs) == expected


@pytest.mark.promise("layout-detection")
def test_the_first_forward_decides_the_layout_for_the_later_ones():
    """T == B on the first forward: nothing tells, so batch dim 0 is kept (reg.stack says so)
    and later forwards, whose mask would tell, get their noise per index of dim 0 still."""
    torch.manual_seed(0)
    model = SeqFirstEncoder().train()
    with RandomPerturbationRegularizer(model, eta=2.0, min_layer=1, max_layer=1) as reg:
        _noise_at(model, reg, 1, torch.randint(1, 20, (4, 4)))
        assert reg.stack.batch_dim == 0
        delta = _noise_at(model, reg, 1, torch.randint(1, 20, (3, 5)))  # [T=5, B=3, C]
        assert reg.stack.batch_dim == 0
    torch.testing.assert_close(delta.abs().amax(dim=(1, 2)), torch.full((5,), 2.0))
