"""Sampling and scaling RAPT's noise for one batch of hidden states."""

import pytest
import torch
import workloads

from rapt_reg import sample_noise


@pytest.mark.parametrize("per_token", [False, True], ids=["per-example", "per-token"])
def test_sample_noise(bench, per_token):
    size = workloads.shape()
    shape = (size.batch, size.seq, size.hidden)
    gen = torch.Generator().manual_seed(0)
    delta = bench(lambda: sample_noise(shape, eta=2.0, per_token=per_token, generator=gen))
    dims = -1 if per_token else (1, 2)
    torch.testing.assert_close(delta.abs().amax(dims), torch.full(delta.amax(dims).shape, 2.0))
