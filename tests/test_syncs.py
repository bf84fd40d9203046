"""Tensor-to-host conversions per training step (see ``tests/syncs.py``).

Run ``python -m pytest tests/test_syncs.py -s`` to see the counts of each kind of step.
"""

from __future__ import annotations

import pytest
import torch
from syncs import HostSyncs, count_host_syncs, host_syncs  # noqa: F401 (host_syncs: the fixture)

import rapt_reg
from rapt_reg import divergence as div
from rapt_reg.baselines import R3FRegularizer, SmartRegularizer
from rapt_reg.baselines.r3f import sym_kl_both_sides
from rapt_reg.baselines.smart import stable_kl

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_counter_sees_every_kind_of_conversion(host_syncs):  # noqa: F811
    t = torch.tensor([1.0, -2.0])
    with host_syncs() as counts:
        t[0].item(), float(t[0]), int(t[0]), bool(t[0]), t.tolist(), [0, 1][t[0].long()]
        t[t > 0], t.sum()
        t[t > 0] = 0.0
    assert counts == {
        "item": 1,
        "float": 1,
        "int": 1,
        "bool": 1,
        "tolist": 1,
        "index": 1,
        "boolean index": 2,
    }
    assert counts.total == 8
    assert float(t[0]) == 0.0  # and everything is put back afterwards
    assert "__float__" not in vars(torch.Tensor)


@pytest.mark.promise("no-host-sync")
@pytest.mark.parametrize(
    "fn", [*div.DIVERGENCES.values(), sym_kl_both_sides, stable_kl], ids=lambda fn: fn.__name__
)
def test_the_divergence_with_a_mask_makes_no_conversion(fn):
    noisy = torch.randn(3, 5, 11, requires_grad=True)
    clean = torch.randn(3, 5, 11, requires_grad=True)
    mask = torch.rand(3, 5) < 0.5
    with count_host_syncs() as counts:
        value = div.reduce_divergence(fn, noisy, clean, mask, chunk_positions=4)
        value.backward()
    assert counts.total == 0, counts


def _tiny_llama():
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).train()


MAKERS = {
    "standard": None,
    "rapt": lambda m: rapt_reg.RandomPerturbationRegularizer(m, generator=torch.Generator()),
    "smart": lambda m: SmartRegularizer(m, generator=torch.Generator()),
    "r3f": lambda m: R3FRegularizer(m, generator=torch.Generator()),
}


def step_syncs(method: str, *, masked: bool = True) -> HostSyncs:
    """Conversions in one step (forward(s), loss, backward) of a tiny Llama, after a warm-up.

    The batch is padded (the second row's last 3 positions), the mask passed to the penalty.
    """
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids, dtype=torch.bool)
    attention[1, -3:] = False
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1).masked_fill(~attention, -100)
    make = MAKERS[method]
    reg = make(model) if make else None

    def forward():
        return model(input_ids=ids, attention_mask=attention.long()).logits

    def step():
        model.zero_grad(set_to_none=True)
        if reg is None:
            logits, penalty = forward(), 0.0
        else:
            logits, penalty = reg.pair(forward, mask=attention if masked else None)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        (loss + penalty).backward()

    step()  # warm-up: lazy initialisation
    with count_host_syncs() as counts:
        step()
    if reg is not None:
        reg.remove()
    return counts


def test_counts_per_step_are_reported():
    """Prints the counts (``-s``); the standard step of a tiny Llama is the baseline."""
    counts = {m: step_syncs(m) for m in MAKERS}
    for method, c in counts.items():
        print(f"\n{method}: {c.total} conversions {dict(c)}")
        for call in c.calls:
            print("   ", *call)
    assert counts["standard"].made_by("rapt_reg") == []


@pytest.mark.promise("no-host-sync")
def test_a_rapt_step_adds_no_conversion_over_a_standard_step():
    """RAPT step minus standard step: only the model's own conversions in its second forward.

    None comes from rapt_reg's code (drawing the layer and the seeds, the noise, the
    divergence, the non-finite and exactly-zero checks are all done without one).
    """
    rapt, standard = step_syncs("rapt"), step_syncs("standard")
    assert rapt.made_by("rapt_reg") == []
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[1, -3:] = 0
    model(input_ids=ids, attention_mask=attention)  # warm-up, as in step_syncs
    with count_host_syncs() as one_forward:
        model(input_ids=ids, attention_mask=attention)
    assert rapt.total - standard.total == one_forward.total
