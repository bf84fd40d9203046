"""Run a function on spawned ranks over gloo on 127.0.0.1 and collect what each returns.

gloo's timeout is short, so a hang (ranks waiting for different collectives) fails the test
instead of stalling CI; a wall-clock limit on the whole run catches a hang outside collectives.
Each rank also gets torchrun's variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), which the
transformers Trainer (through accelerate) and DeepSpeed read to see the process group.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, fn: Callable[[int], Any], world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = fn(rank)
    finally:
        dist.destroy_process_group()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_on_ranks(
    fn: Callable[[int], Any], world: int, out_dir: Path, timeout: float = 300.0
) -> list[Any]:
    """``[fn(0), ..., fn(world - 1)]``, each computed in its own process of one gloo group.

    The ranks are killed, and TimeoutError raised, if they have not all finished after
    ``timeout`` seconds.
    """
    args = (fn, world, _free_port(), str(out_dir))
    context = mp.start_processes(_worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
                process.join()
            raise TimeoutError(f"the {world} ranks were still running after {timeout:.0f} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
