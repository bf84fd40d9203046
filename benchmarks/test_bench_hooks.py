"""A forward with RAPT's hooks installed but idle, against the bare model (goal: under 1%)."""

import pytest
import torch
import workloads

import rapt_reg


@pytest.mark.parametrize("hooks", [False, True], ids=["bare", "idle-hooks"])
def test_forward(bench, hooks):
    size = workloads.shape()
    model = workloads.bert(size, dropout=0.0)
    inputs = workloads.batch(model, size)
    inputs.pop("labels")
    expected = model(**inputs).logits
    reg = rapt_reg.RandomPerturbationRegularizer(model) if hooks else None
    try:
        logits = bench(lambda: model(**inputs).logits)
    finally:
        if reg is not None:
            reg.remove()
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
