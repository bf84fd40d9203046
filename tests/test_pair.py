"""``pair`` is the two-call form: buffers, auxiliary outputs, penalty and gradients all equal.

``reg.pair(forward)`` runs ``clean = forward(); penalty = reg(forward, clean)``; nothing of the
clean pass is reused in the noisy one. So BatchNorm statistics, MoE router logits and their
auxiliary loss (Mixtral, Qwen2-MoE), the penalty and the gradients are those of the two-call
form, on the first step and every later one (0.1.0's prefix reuse broke each of these).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from models import Attention, penalty_step
from torch import nn

from rapt_reg import RandomPerturbationRegularizer


class NormBlock(nn.Module):
    """An attention block with a BatchNorm over features (running statistics in training)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = Attention(dim, 2)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class NormModel(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, dim)
        self.layers = nn.ModuleList(NormBlock(dim) for _ in range(3))
        self.head = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1))


def _both_forms(model: nn.Module, forward_of, loss_of, steps: int = 3):
    """Run ``steps`` steps in each form from the same state; return what each form saw."""
    results = []
    for form in ("pair", "call"):
        m = copy.deepcopy(model)
        reg = RandomPerturbationRegularizer(
            m, min_layer=0, max_layer=2, generator=torch.Generator()
        )
        reg.load_state_dict(first_state)
        forward = forward_of(m)
        seen = []
        for _ in range(steps):
            m.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no fallback, no warning of any kind
                clean, penalty = penalty_step(reg, forward, form)
            (loss_of(clean) + penalty).backward()
            seen.append(
                (
                    clean,
                    penalty.detach(),
                    {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None},
                )
            )
        buffers = {n: b.clone() for n, b in m.named_buffers()}
        results.append((seen, buffers))
        reg.remove()
    return results


first_state = RandomPerturbationRegularizer(
    NormModel(), generator=torch.Generator().manual_seed(3)
).state_dict()


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)


@pytest.mark.promise("pair-equals-two-calls")
def test_batchnorm_statistics_equal_the_two_call_form():
    torch.manual_seed(0)
    model = NormModel().train()
    ids = torch.randint(0, 30, (4, 6))
    (pair_seen, pair_buffers), (call_seen, call_buffers) = _both_forms(
        model, lambda m: lambda: m(ids), lambda out: out.logsumexp(-1).mean()
    )
    _assert_same(pair_buffers, call_buffers)
    _assert_same(pair_seen, call_seen)
    assert any(b.abs().sum() > 0 for n, b in pair_buffers.items() if "running_mean" in n)


def _moe(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        output_router_logits=True,
        router_aux_loss_coef=0.1,
    )
    if kind == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
        return transformers.MixtralForCausalLM(config)
    config = transformers.Qwen2MoeConfig(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        **common,
    )
    return transformers.Qwen2MoeForCausalLM(config)


@pytest.mark.promise("pair-equals-two-calls")
@pytest.mark.slow_for_mutation
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_router_logits_and_aux_loss_equal_the_two_call_form(kind):
    torch.manual_seed(0)
    model = _moe(kind).train()
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0

    def forward_of(m):
        return lambda: m(input_ids=ids, attention_mask=mask, labels=ids)

    (pair_seen, _), (call_seen, _) = _both_forms(model, forward_of, lambda out: out.loss, steps=2)
    for (p_out, p_pen, p_grads), (c_out, c_pen, c_grads) in zip(pair_seen, call_seen):
        assert p_out.aux_loss is not None and p_out.aux_loss > 0
        _assert_same(p_out.aux_loss, c_out.aux_loss)
        _assert_same(p_out.router_logits, c_out.router_logits)
        _assert_same(p_out.logits, c_out.logits)
        _assert_same(p_pen, c_pen)
        _assert_same(p_grads, c_grads)
        assert p_pen > 0
