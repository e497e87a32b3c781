"""Several processes (one per GPU, or per CPU slot with gloo) sharing one federation."""
from __future__ import annotations

import datetime
import heapq
import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from dali_fl.engine.aggregate import RunningSum
from dali_fl.engine.federation import TOTAL_KEYS, Federation, RoundHooks
from dali_fl.engine.local import evaluate
from dali_fl.errors import DaliFlError

log = logging.getLogger(__name__)


def assign_clients(clients: np.ndarray, sizes: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Largest client first onto the least-loaded process (ties: lower rank), so no process waits long."""
    order = sorted((int(c) for c in clients), key=lambda c: (-int(sizes[c]), c))
    heap = [(0, rank) for rank in range(world_size)]
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for c in order:
        load, rank = heapq.heappop(heap)
        shares[rank].append(c)
        heapq.heappush(heap, (load + int(sizes[c]), rank))
    return [np.asarray(s, dtype=np.int64) for s in shares]


def env_world() -> tuple[int, int, int]:
    """(rank, local rank, world size) as torchrun sets them; (0, 0, 1) when not under torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def init_process_group(cpu: bool = False) -> torch.device:
    """Join the torchrun job: NCCL on cuda:LOCAL_RANK when there are GPUs, gloo on CPU otherwise."""
    rank, local_rank, world = env_world()
    if torch.cuda.is_available() and not cpu:
        if local_rank >= torch.cuda.device_count():
            raise DaliFlError(f"local rank {local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
                              "lower --nproc-per-node")
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # A dead peer must not leave the others waiting half an hour in a collective.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10),
                                device_id=device if backend == "nccl" else None)
    log.info("rank %d/%d on %s (%s)", rank, world, device, backend)
    return device


def leave_world() -> None:
    """Leave the process group before exit: a group left to the interpreter's teardown can abort in gloo's threads."""
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_str(value: Optional[str]) -> str:
    """Rank 0's value of a string, on every rank (e.g. a default run directory with a timestamp)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class DistributedHooks(RoundHooks):
    """Share clients by sample count, all_reduce once per round, shard evaluation, write on rank 0."""

    rank: int = 0
    world_size: int = 1

    def mine(self, clients: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        return assign_clients(clients, sizes, self.world_size)[self.rank]

    def reduce(self, running: RunningSum, totals: dict) -> None:
        flat, counts = running.flat()
        extra = torch.tensor([totals[k] for k in TOTAL_KEYS], dtype=torch.float64, device=counts.device)
        both = torch.cat([counts, extra])
        dist.all_reduce(flat)  # the round's tensors
        dist.all_reduce(both)  # and its counts, in float64 (a few values: one more small collective)
        running.load_flat(flat, both[:counts.numel()])
        for k, v in zip(TOTAL_KEYS, both[counts.numel():].tolist()):
            totals[k] = v  # summed over processes: the times are process-seconds

    def evaluate(self, fx: Federation) -> tuple[float, float]:
        shard = np.arange(self.rank, fx.num_test, self.world_size)
        correct, loss_sum = evaluate(fx.model, fx.eval_loader, shard, fx.amp, fx.device)
        sums = torch.tensor([correct, loss_sum], dtype=torch.float64, device=fx.device)
        dist.all_reduce(sums)
        return float(sums[0]) / fx.num_test, float(sums[1]) / fx.num_test


def hooks_for_world() -> Optional[DistributedHooks]:
    """Hooks for the torchrun job this process belongs to, or None when it runs alone."""
    rank, _, world = env_world()
    if world <= 1:
        return None
    return DistributedHooks(is_writer=rank == 0, rank=rank, world_size=world)
