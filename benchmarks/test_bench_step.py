"""One AdamW training step per method on a BERT-shaped model, dropout on."""

import math

import pytest
import workloads


@pytest.mark.parametrize("method", list(workloads.ENCODER_METHODS))
def test_training_step(bench, method):
    size = workloads.shape()
    base = workloads.bert(size)
    trainee = workloads.Trainee(method, base, workloads.batch(base, size))
    try:
        loss = bench(trainee.step)
        stats = trainee.regularizer.stats() if trainee.regularizer is not None else {}
    finally:
        trainee.remove()
    assert math.isfinite(loss)
    # Each regularizer's noise reached the model (a finite, positive noise-to-hidden ratio).
    assert all(v > 0 for k, v in stats.items() if k.endswith("noise_to_hidden_ratio"))
