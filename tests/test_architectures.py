"""Every architecture, unmodified and without hints: the right blocks, noise that reaches the
output at every layer, finite gradients, and a model left exactly as it was.

The models are tiny and built from configs (``tests/hf_models.py``); dropout is off so that a
positive penalty can only come from the noise and outputs can be compared bit for bit.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest
import torch
from hf_models import CASES, ModelCase, logits, task_loss
from torch import nn

import rapt_reg

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
    pytest.mark.usefixtures("single_thread"),
]


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request: pytest.FixtureRequest) -> ModelCase:
    found = CASES[request.param]
    if found.library == "transformers":
        pytest.importorskip("transformers")
    return found


def _hook_snapshot(model: nn.Module) -> dict[str, Any]:
    """Every hook dict (and every attribute name) of every module, as comparable values."""
    snapshot: dict[str, Any] = {}
    for name, module in model.named_modules():
        attributes = vars(module)
        hooks = {
            key: [(k, id(v)) for k, v in value.items()]
            for key, value in attributes.items()
            if "hooks" in key and isinstance(value, dict)
        }
        snapshot[name] = (sorted(attributes), hooks)
    return snapshot


def _clean_outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Logits of a training-mode forward (dropout is off) and of an eval-mode no-grad one.

    The eval pass takes the fused fast path (and nested tensors) of ``nn.TransformerEncoder``
    when nothing is hooked.
    """
    outputs = [logits(model(**batch)).detach()]
    model.eval()
    with torch.no_grad():
        outputs.append(logits(model(**batch)))
    model.train()
    return outputs


def _assert_same(before: list[torch.Tensor], after: list[torch.Tensor], when: str) -> None:
    for kind, old, new in zip(("train", "eval"), before, after):
        assert torch.equal(old, new), f"{kind}-mode output changed {when}"


def test_finds_the_configured_blocks(
    case: ModelCase, record_property: Callable[[str, object], None]
) -> None:
    model = case.build()
    stack = rapt_reg.find_transformer_blocks(model)
    record_property("blocks", f"{stack.path} ({stack.calls_per_forward} calls)")
    assert stack.path in case.paths
    assert len(stack) == case.modules
    assert stack.calls_per_forward == case.depth
    assert all(name.startswith(f"{stack.path}.") for name in stack.names)
    assert stack.blocks == tuple(model.get_submodule(stack.path).children())


def _step_grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(
    model: nn.Module, batch: dict[str, torch.Tensor], layer: int, form: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor], rapt_reg.RandomPerturbationRegularizer]:
    reg = rapt_reg.RandomPerturbationRegularizer(
        model, min_layer=layer, max_layer=layer, generator=torch.Generator().manual_seed(layer)
    )
    if form == "pair":
        clean, penalty = reg.pair(lambda: model(**batch))
    else:
        clean = model(**batch)
        penalty = reg(lambda: model(**batch), clean)
    # The penalty's own gradients: the task loss's (identical in both forms) would hide them.
    grads = _step_grads(model, penalty)
    assert bool(torch.isfinite(task_loss(clean)))
    reg.remove()
    return penalty.detach(), grads, reg


def test_noise_reaches_the_output_at_every_layer(case: ModelCase) -> None:
    """Layers 0..depth, both call forms: penalty > 0 whose gradients are finite and (below the
    last layer) reach the blocks; ``pair`` gives the same penalty and gradients as ``reg``."""
    model, batch = case.build(), case.batch()
    block_params = {
        f"{name}.{p}"
        for name in rapt_reg.find_transformer_blocks(model).names
        for p, _ in model.get_submodule(name).named_parameters()
    }
    for layer in range(case.depth + 1):
        penalty, grads, reg = _run(model, batch, layer, "call")
        pair_penalty, pair_grads, pair_reg = _run(model, batch, layer, "pair")
        assert reg.last_layer == pair_reg.last_layer == layer
        assert penalty.dtype == torch.float32
        assert penalty > 0, f"layer {layer}: noise did not change the output"
        assert all(bool(g.isfinite().all()) for g in grads.values()), f"layer {layer}"
        if layer < case.depth:
            # After the last block (layer == depth) the noise follows every block: with a
            # linear head the two sides' gradients on the shared hidden states (p - q and
            # q - p) cancel, so the blocks' true gradient is exactly zero there.
            assert any(bool(grads[n].ne(0).any()) for n in block_params if n in grads)
        torch.testing.assert_close(pair_penalty, penalty, rtol=1e-4, atol=1e-9)
        assert pair_grads.keys() == grads.keys()
        scale = max(g.abs().max().item() for g in grads.values())
        for name, grad in grads.items():
            torch.testing.assert_close(
                pair_grads[name], grad, rtol=1e-3, atol=1e-5 * scale, msg=name
            )


def test_training_steps_update_the_model(case: ModelCase) -> None:
    model, batch = case.build(), case.batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with rapt_reg.RandomPerturbationRegularizer(
        model, min_layer=0, max_layer=case.depth, generator=torch.Generator().manual_seed(0)
    ) as reg:
        for _ in range(3):
            clean, penalty = reg.pair(lambda: model(**batch))
            loss = task_loss(clean) + penalty
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert bool(torch.isfinite(loss))
    after = dict(model.named_parameters())
    assert all(bool(p.isfinite().all()) for p in after.values())
    assert sum(not torch.equal(before[n], p) for n, p in after.items()) > len(after) // 2


def test_model_is_exactly_as_before(case: ModelCase) -> None:
    model, batch = case.build(), case.batch()
    hooks = _hook_snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    outputs = _clean_outputs(model, batch)

    reg = rapt_reg.RandomPerturbationRegularizer(model, min_layer=0, max_layer=case.depth)
    _assert_same(outputs, _clean_outputs(model, batch), "once the regularizer was built")
    for _ in range(2):
        clean, penalty = reg.pair(lambda: model(**batch))
        penalty = penalty + reg(lambda: model(**batch), clean)
        (task_loss(clean) + penalty).backward()
    assert penalty > 0
    _assert_same(outputs, _clean_outputs(model, batch), "after penalty calls")
    reg.remove()
    _assert_same(outputs, _clean_outputs(model, batch), "after remove()")

    assert _hook_snapshot(model) == hooks
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_eval_mode_gives_zero_and_leaves_outputs_alone(case: ModelCase) -> None:
    model, batch = case.build(), case.batch()
    with rapt_reg.RandomPerturbationRegularizer(model) as reg:
        model.eval()
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            expected = logits(model(**batch))
            clean, penalty = reg.pair(lambda: model(**batch))
        assert penalty.item() == 0.0
        assert torch.equal(logits(clean), expected)
        assert any("eval mode" in str(w.message) for w in caught)
