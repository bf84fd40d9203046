"""FSDP2 and DDP give the same gradients with RAPT, both call forms, without a hang.

Two processes on gloo (CPU), spawned by the test. Each rank has its own generator and draws
its own layers: rank 0 from layers 0-1, rank 1 from 2-3, so the ranks differ in every step (the
set-up in which 0.1.0's ``pair`` deadlocked under FSDP2). The same model, seeds and batches run
through ``DistributedDataParallel`` and through ``fully_shard`` on every block and the root;
after each of several SGD steps the full gradients must agree to 1e-5. gloo's timeout is short,
so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.distributed as dist
from hf_models import task_loss
from models import TinyTransformer, penalty_step
from ranks import run_on_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import rapt_reg

WORLD = 2
STEPS = 3
FORMS = ("call", "pair")

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="needs torch.distributed gloo",
    ),
    pytest.mark.skipif(not hasattr(fsdp, "fully_shard"), reason="needs FSDP2 (torch >= 2.6)"),
]


def _full_grads(model: nn.Module) -> torch.Tensor:
    grads = []
    for p in model.parameters():
        grad = p.grad
        grads.append((grad.full_tensor() if hasattr(grad, "full_tensor") else grad).flatten())
    return torch.cat(grads)


def _run(rank: int, form: str) -> dict[str, list]:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)  # the same weights on every rank and in both wrappings
    model = TinyTransformer(depth=4, dim=16, heads=2, dropout=0.0).double().train()
    sharded = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in sharded.layers:
        fsdp.fully_shard(block, mesh=mesh)
    fsdp.fully_shard(sharded, mesh=mesh)
    ddp = DistributedDataParallel(model)
    out: dict[str, list] = {"diff": [], "layers": [], "penalties": []}
    regs = [
        rapt_reg.RandomPerturbationRegularizer(
            m,
            min_layer=2 * rank,
            max_layer=2 * rank + 1,
            generator=torch.Generator().manual_seed(100 + rank),
        )
        for m in (ddp, sharded)
    ]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ddp, sharded)]
    for step in range(STEPS):
        ids = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(step + rank))
        grads, layers = [], []
        for m, reg, optimizer in zip((ddp, sharded), regs, optimizers):
            optimizer.zero_grad()
            clean, penalty = penalty_step(reg, functools.partial(m, ids), form)
            (task_loss(clean) + penalty).backward()
            grads.append(_full_grads(m))
            layers.append(reg.last_layer)
            out["penalties"].append(float(penalty))
        out["diff"].append(float((grads[0] - grads[1]).abs().max()))
        out["layers"].append(layers)
        for optimizer in optimizers:
            optimizer.step()
    for reg in regs:
        reg.remove()
    return out


def _all(rank: int) -> dict:
    return {form: _run(rank, form) for form in FORMS}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("fsdp")
    return run_on_ranks(_all, WORLD, out_dir)


@pytest.mark.promise("ddp-fsdp2-exact")
@pytest.mark.parametrize("form", FORMS)
def test_fsdp2_gives_ddp_gradients_with_ranks_on_different_layers(results, form):
    largest = max(d for per_rank in results for d in per_rank[form]["diff"])
    print(f"rapt-reg FSDP2 vs DDP, {form}: largest gradient difference {largest:.1e}")
    for rank, per_rank in enumerate(results):
        result = per_rank[form]
        assert len(result["diff"]) == STEPS
        assert all(d <= 1e-5 for d in result["diff"]), result["diff"]
        assert all(p > 0 for p in result["penalties"])
        for ddp_layer, fsdp_layer in result["layers"]:
            assert ddp_layer == fsdp_layer  # same seeds, same draws
            assert ddp_layer in (2 * rank, 2 * rank + 1)
