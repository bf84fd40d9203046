"""Finding the blocks of a deep model (goal: under 5 ms for 48 blocks)."""

import workloads

import rapt_reg


def test_find_transformer_blocks(bench):
    blocks = workloads.DISCOVERY_BLOCKS if workloads.full_mode() else 4
    model = workloads.bert(workloads.SMOKE, blocks=blocks)
    stack = bench(rapt_reg.find_transformer_blocks, model)
    assert stack.path == "bert.encoder.layer" and len(stack) == blocks
