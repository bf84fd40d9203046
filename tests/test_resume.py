"""A run stopped and resumed from a checkpoint draws what the uninterrupted run draws.

The checkpoint holds what a training script saves: the model's and the optimizer's state
dicts, the global RNG (dropout), and ``reg.state_dict()``. After 2k steps the resumed run's
parameters must be bitwise equal to the uninterrupted run's (CPU), and so must the layers.
"""

from __future__ import annotations

import functools
import io

import pytest
import torch
import torch.nn.functional as F
from models import TinyTransformer, penalty_step

from rapt_reg import RandomPerturbationRegularizer, RaptRegError

K = 3


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, 50, (4, 6), generator=gen), torch.randint(0, 3, (4,), generator=gen))
        for _ in range(2 * K)
    ]


def _fresh(generator: bool):
    torch.manual_seed(0)
    model = TinyTransformer(depth=3, dropout=0.1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(7) if generator else None
    reg = RandomPerturbationRegularizer(model, min_layer=0, max_layer=3, generator=gen)
    return model, optimizer, reg


def _train(model, optimizer, reg, batches, form: str) -> list[int]:
    layers = []
    for ids, labels in batches:
        optimizer.zero_grad()
        clean, penalty = penalty_step(reg, functools.partial(model, ids), form)
        (F.cross_entropy(clean, labels) + penalty).backward()
        optimizer.step()
        layers.append(reg.last_layer)
    return layers


@pytest.mark.promise("resume-bitwise")
@pytest.mark.parametrize("generator", [True, False], ids=["generator", "global_rng"])
@pytest.mark.parametrize("form", ["pair", "call"])
def test_resumed_run_is_bitwise_the_uninterrupted_run(form: str, generator: bool) -> None:
    batches = _batches()
    model, optimizer, reg = _fresh(generator)
    straight_layers = _train(model, optimizer, reg, batches, form)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer, reg = _fresh(generator)
    first_layers = _train(model, optimizer, reg, batches[:K], form)
    buffer = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rapt": reg.state_dict(),
            "rng": torch.get_rng_state(),
        },
        buffer,
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # a plain checkpoint: no pickled objects

    torch.manual_seed(123)  # a new process: unrelated RNG state, fresh objects
    model, optimizer, reg = _fresh(not generator)  # even built differently: the state decides
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    reg.load_state_dict(saved["rapt"])
    torch.set_rng_state(saved["rng"])
    second_layers = _train(model, optimizer, reg, batches[K:], form)

    assert first_layers + second_layers == straight_layers
    assert len(set(straight_layers)) > 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, straight[key]), key


@pytest.mark.promise("resume-bitwise")
def test_a_foreign_state_is_refused() -> None:
    _, _, reg = _fresh(True)
    with pytest.raises(RaptRegError, match="reg.state_dict"):
        reg.load_state_dict({"step": 3})
