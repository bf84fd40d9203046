"""The divergences between noisy and clean logits, forward and backward."""

import pytest
import torch
import workloads

from rapt_reg.divergence import DIVERGENCES, reduce_divergence


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_divergence(bench, name):
    size = workloads.shape()
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(size.batch, size.seq, 8, generator=gen, requires_grad=True)
    clean = torch.randn(size.batch, size.seq, 8, generator=gen, requires_grad=True)

    def forward_backward():
        value = reduce_divergence(DIVERGENCES[name], noisy, clean)
        value.backward()
        return value

    value = bench(forward_backward)
    assert torch.isfinite(value) and float(value.detach()) > 0
