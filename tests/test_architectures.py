"""Every architecture, unmodified and without hints: the right blocks, noise that reaches the
output at every layer, finite gradients, and a model left exactly as it was.

The models are tiny and built from configs (``tests/hf_models.py``); dropout is off so that a
positive penalty can only come from the noise and outputs can be compared bit for bit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
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


def _contents(value: Any) -> Any:
    """A container's entries as they are now (the objects themselves), or None."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (set, list)):
        return list(value)
    return None


@dataclass
class _Snapshot:
    """What :meth:`remove` must give back, objects kept (not names, ids or counts).

    Per module: the module object, every attribute's value (the object itself) and, for the
    containers among them (``_forward_hooks``, ``_forward_pre_hooks`` and every other hook
    dict, ``_parameters``, ``_buffers``, ``_modules``...), their entries; its training flag.
    Per parameter: the object and ``requires_grad``. Every buffer's and state_dict entry's
    value (non-persistent buffers are not in the state_dict), and torch's global module hooks.
    """

    modules: dict[str, tuple[nn.Module, dict[str, Any], dict[str, Any], bool]]
    parameters: dict[str, tuple[nn.Parameter, bool]]
    values: dict[str, torch.Tensor]
    global_hooks: dict[str, dict[Any, Any]]

    @classmethod
    def of(cls, model: nn.Module) -> _Snapshot:
        modules = {}
        for name, module in model.named_modules(remove_duplicate=False):
            attributes = dict(vars(module))
            contents = {k: c for k, v in attributes.items() if (c := _contents(v)) is not None}
            modules[name] = (module, attributes, contents, module.training)
        parameters = {
            n: (p, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)
        }
        values = {f"state:{k}": v.detach().clone() for k, v in model.state_dict().items()}
        values.update(
            (f"buffer:{n}", b.detach().clone())
            for n, b in model.named_buffers(remove_duplicate=False)
        )
        global_hooks = {
            name: dict(value)
            for name, value in vars(torch.nn.modules.module).items()
            if name.startswith("_global_") and isinstance(value, dict)
        }
        return cls(modules, parameters, values, global_hooks)

    def assert_same(self, model: nn.Module, when: str) -> None:
        now = _Snapshot.of(model)
        assert now.modules.keys() == self.modules.keys(), f"modules renamed {when}"
        for name, (module, attributes, contents, training) in self.modules.items():
            found, found_attributes, found_contents, found_training = now.modules[name]
            where = f"module {name!r} {when}"
            assert found is module, f"{where}: replaced"
            assert found_training == training, f"{where}: training flag changed"
            assert found_attributes.keys() == attributes.keys(), f"{where}: attributes changed"
            for key, value in attributes.items():
                assert found_attributes[key] is value, f"{where}: {key} replaced"
            assert found_contents.keys() == contents.keys()
            for key, entries in contents.items():
                _assert_same_entries(found_contents[key], entries, f"{where}: {key}")
        assert now.parameters.keys() == self.parameters.keys(), f"parameters changed {when}"
        for name, (parameter, requires_grad) in self.parameters.items():
            assert now.parameters[name][0] is parameter, f"parameter {name} replaced {when}"
            assert now.parameters[name][1] == requires_grad, f"{name}.requires_grad {when}"
        assert now.values.keys() == self.values.keys(), f"state_dict or buffers changed {when}"
        for key, value in self.values.items():
            assert torch.equal(now.values[key], value), f"{key} changed {when}"
        for key, entries in self.global_hooks.items():
            _assert_same_entries(now.global_hooks[key], entries, f"torch's {key} {when}")


def _assert_same_entries(found: Any, expected: Any, where: str) -> None:
    if isinstance(expected, dict):
        assert found.keys() == expected.keys(), f"{where}: keys {found.keys()} != {expected.keys()}"
        expected, found = list(expected.values()), list(found.values())
    assert len(found) == len(expected), f"{where}: {len(found)} entries, was {len(expected)}"
    assert all(a is b for a, b in zip(found, expected)), f"{where}: an entry was replaced"


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
    """The stack's modules are found statically; its block calls are counted on a forward
    (ALBERT: one module, called once per layer), never read from the config."""
    model = case.build().train()
    stack = rapt_reg.find_transformer_blocks(model)
    assert stack.path in case.paths
    assert len(stack) == case.modules and stack.calls_per_forward is None
    assert all(name.startswith(f"{stack.path}.") for name in stack.names)
    assert stack.blocks == tuple(model.get_submodule(stack.path).children())
    batch = case.batch()
    with rapt_reg.RandomPerturbationRegularizer(model, min_layer=1, max_layer=1) as reg:
        reg.pair(lambda: model(**batch))
        counted = reg.stack.calls_per_forward
    record_property("blocks", f"{stack.path} ({counted} calls)")
    assert counted == case.depth


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


@pytest.mark.promise("model-unaltered")
def test_model_is_exactly_as_before(case: ModelCase) -> None:
    """Outputs bitwise equal before, during and after; after ``remove()`` every module,
    attribute, hook, parameter (``requires_grad``), training flag, buffer and state_dict value
    is what it was, compared by identity and value (:class:`_Snapshot`)."""
    model, batch = case.build(), case.batch()
    outputs = _clean_outputs(model, batch)  # a plain forward first: what it sets up is not ours
    before = _Snapshot.of(model)

    reg = rapt_reg.RandomPerturbationRegularizer(model, min_layer=0, max_layer=case.depth)
    _assert_same(outputs, _clean_outputs(model, batch), "once the regularizer was built")
    for _ in range(2):
        clean, penalty = reg.pair(lambda: model(**batch))
        penalty = penalty + reg(lambda: model(**batch), clean)
        (task_loss(clean) + penalty).backward()
    assert penalty > 0
    _assert_same(outputs, _clean_outputs(model, batch), "after penalty calls")
    reg.remove()
    before.assert_same(model, "after construct, steps and remove()")  # before any other call
    _assert_same(outputs, _clean_outputs(model, batch), "after remove()")


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
