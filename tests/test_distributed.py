"""DistributedDataParallel over gloo: two processes on 127.0.0.1, spawned by the test.

The regularizer is handed the DDP wrapper. Each rank sees its own batch and draws its own
layers; after each backward the gradients must be equal on both ranks and equal to the
average of what each rank computes without DDP (so every gradient of the penalty went through
DDP's all-reduce), with ``find_unused_parameters`` False and True and both call forms.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from hf_models import task_loss
from models import TinyTransformer
from ranks import run_on_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import rapt_reg

WORLD = 2
STEPS = 2
COMBINATIONS = [(False, "call"), (False, "pair"), (True, "call"), (True, "pair")]

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


def _flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _loss(model: nn.Module, reg, ids: torch.Tensor, form: str) -> tuple[torch.Tensor, float]:
    if form == "pair":
        clean, penalty = reg.pair(lambda: model(ids))
    else:
        clean = model(ids)
        penalty = reg(lambda: model(ids), clean)
    return task_loss(clean) + penalty, penalty.item()


def _check(rank: int, find_unused: bool, form: str) -> dict[str, object]:
    torch.manual_seed(0)  # the same weights on every rank
    model = TinyTransformer(depth=3, dim=32, heads=2).train()
    local = copy.deepcopy(model)
    ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
    regs = [
        rapt_reg.RandomPerturbationRegularizer(
            m,
            min_layer=2 * rank,  # rank 0 perturbs layers 0-1, rank 1 layers 2-3
            max_layer=2 * rank + 1,
            generator=torch.Generator().manual_seed(rank),
        )
        for m in (ddp, local)
    ]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ddp, local)]
    result: dict[str, object] = {"penalties": [], "layers": [], "rank_diff": [], "avg_diff": []}
    for step in range(STEPS):
        ids = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(step * 7 + rank))
        grads = []
        for m, reg, optimizer in zip((ddp, local), regs, optimizers):
            optimizer.zero_grad()
            loss, penalty = _loss(m, reg, ids, form)
            loss.backward()
            grads.append(_flat_grads(m))
            if m is ddp:
                result["penalties"].append(penalty)
                result["layers"].append(reg.last_layer)
        ddp_grads, local_grads = grads
        gathered = [torch.empty_like(ddp_grads) for _ in range(WORLD)]
        dist.all_gather(gathered, ddp_grads)
        result["rank_diff"].append(max((g - ddp_grads).abs().max().item() for g in gathered))
        averaged = local_grads.clone()
        dist.all_reduce(averaged)
        averaged /= WORLD
        result["avg_diff"].append((averaged - ddp_grads).abs().max().item())
        result["scale"] = averaged.abs().max().item()
        optimizers[0].step()
        # The local copy follows DDP's update, so the next step starts from the same weights.
        local.load_state_dict(model.state_dict())
    for reg in regs:
        reg.remove()
    return result


def _all(rank: int) -> dict:
    return {combo: _check(rank, *combo) for combo in COMBINATIONS}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every combination, run once in one pair of processes (starting them is the cost)."""
    out_dir = tmp_path_factory.mktemp("ddp")
    return run_on_ranks(_all, WORLD, out_dir)


@pytest.mark.promise("ddp-fsdp2-exact", "wrappers-seen-through")
@pytest.mark.parametrize(
    ("find_unused", "form"),
    COMBINATIONS,
    ids=[f"find_unused_{u}-{f}" for u, f in COMBINATIONS],
)
def test_gradients_are_reduced_and_equal_across_ranks(
    ddp_results: list[dict], find_unused: bool, form: str
) -> None:
    per_rank = [r[(find_unused, form)] for r in ddp_results]
    for result in per_rank:
        assert len(result["penalties"]) == STEPS
        assert all(p > 0 for p in result["penalties"])
        assert all(diff == 0.0 for diff in result["rank_diff"]), result["rank_diff"]
        tolerance = 1e-5 * max(result["scale"], 1.0)
        assert all(diff <= tolerance for diff in result["avg_diff"]), result["avg_diff"]
    # Each rank perturbed its own layers: the reduction mixed different perturbations.
    assert set(per_rank[0]["layers"]) <= {0, 1}
    assert set(per_rank[1]["layers"]) <= {2, 3}
