"""The server loop: sample clients, train them in turn on one persistent model, aggregate.

Building, resuming and summarizing a run live in `dali_fl.run`; distribution plugs in through
`RoundHooks` (see `dali_fl.distributed`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dali_fl.aggregate import RunningSum, aggregate
from dali_fl.client import evaluate, local_train
from dali_fl.config import FederationConfig, TrainConfig, derive_seed
from dali_fl.device import peak_memory_mb
from dali_fl.errors import DaliFlError
from dali_fl.loaders import Loader
from dali_fl.model import load_state_, lora_pairs, trainable_state
from dali_fl.partition import Partition
from dali_fl.store import Store

# --resume keeps a run's settings, so a run that diverged is restarted, not resumed.
RESTART_HINT = ("start a new run (--out NEW) with a lower --lr, other --momentum/--weight-decay, or --amp off/bf16; "
                "--resume would keep these settings")


def sample_clients(fed: FederationConfig, round_: int) -> np.ndarray:
    """The round's clients: depends on (seed, round) only, never on how many processes run."""
    rng = np.random.default_rng([fed.seed, round_, 7])
    return np.sort(rng.choice(fed.num_users, size=fed.clients_per_round, replace=False))


@dataclass
class Federation:
    """The live objects of one run, built once (by `dali_fl.run.build_federation`) and reused every round."""

    cfg: TrainConfig
    run_dir: Path
    store: Store
    device: torch.device
    model: nn.Module
    partition: Partition
    train_loader: Loader
    eval_loader: Loader
    num_test: int
    amp: Optional[torch.dtype]

    @property
    def uses_products(self) -> bool:
        """Whether the aggregation needs each client's B @ A (FedEx-LoRA's residual)."""
        return self.cfg.fed.aggregation == "fedex"

    def close(self) -> None:
        for loader in (self.train_loader, self.eval_loader):
            loader.close()


@torch.no_grad()
def add_to_params_(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Add FedEx-LoRA residuals into the frozen base weights, in place."""
    params = dict(model.named_parameters())
    for name, delta in deltas.items():
        params[name].add_(delta.to(params[name].dtype))


def train_clients(fx: Federation, round_: int, clients: np.ndarray, loader: Loader,
                  progress: bool) -> tuple[RunningSum, dict]:
    """Train the given clients in turn from the current global state; returns their running sum and totals."""
    cfg = fx.cfg
    global_state = {k: v.clone() for k, v in trainable_state(fx.model).items()}
    running = RunningSum(lora_pairs(fx.model) if fx.uses_products else (), like=global_state)
    totals = {"loss_sum": 0.0, "data_wait_s": 0.0, "compute_s": 0.0}
    for c in tqdm(clients, desc=f"round {round_} clients", leave=False, disable=not progress):
        load_state_(fx.model, global_state)
        res = local_train(fx.model, loader, fx.partition.clients[c], cfg.local,
                          derive_seed(cfg.fed.seed, round_, int(c)), fx.amp, fx.device)
        if not math.isfinite(res.loss):
            raise DaliFlError(f"training loss became {res.loss} in round {round_} at client {int(c)}; "
                              f"nothing of round {round_} was saved; {RESTART_HINT}")
        running.add(trainable_state(fx.model), res.num_samples)
        totals["loss_sum"] += res.loss * res.num_samples
        totals["data_wait_s"] += res.data_wait_s
        totals["compute_s"] += res.compute_s
    return running, totals


def run_round(fx: Federation, round_: int, progress: bool = False, hooks: Optional["RoundHooks"] = None,
              loader: Optional[Loader] = None) -> dict:
    """One round: local training of the sampled clients, one reduction, aggregation into the model.

    `loader` replaces the run's train loader for this round (the benchmarks pass a timed or a
    compute-only one); by default the clients read through `fx.train_loader`.
    """
    hooks = hooks or RoundHooks()
    start = time.perf_counter()
    if fx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(fx.device)
    clients = sample_clients(fx.cfg.fed, round_)
    running, totals = train_clients(fx, round_, hooks.mine(clients, fx.partition.sizes()),
                                    loader or fx.train_loader, progress)
    t_agg = time.perf_counter()
    hooks.reduce(running, totals)  # all_reduce across processes when distributed; nothing otherwise
    state, deltas = aggregate(running, fx.cfg.fed.aggregation)
    load_state_(fx.model, state)
    add_to_params_(fx.model, deltas)
    if fx.device.type == "cuda":
        torch.cuda.synchronize(fx.device)
    end = time.perf_counter()
    return {"round": round_, "test_acc": None, "test_loss": None,
            "train_loss": totals["loss_sum"] / running.total, "num_clients": len(clients),
            "num_samples": int(running.total), "round_time_s": end - start,
            "data_wait_s": totals["data_wait_s"], "compute_s": totals["compute_s"],
            "aggregate_s": end - t_agg, "images_per_s": running.total * fx.cfg.local.local_ep / (end - start),
            "peak_gpu_mem_mb": peak_memory_mb(fx.device)}


@dataclass
class RoundHooks:
    """What differs when several processes share a run; the defaults are the single-process case."""

    is_writer: bool = True

    def mine(self, clients: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """The share of the round's clients this process trains."""
        return clients

    def reduce(self, running: RunningSum, totals: dict) -> None:
        """Combine the running sums and totals of all processes, in place."""
        return None

    def evaluate(self, fx: Federation) -> tuple[float, float]:
        """(accuracy, mean loss) of the global model on the whole test split."""
        correct, loss_sum = evaluate(fx.model, fx.eval_loader, np.arange(fx.num_test), fx.amp, fx.device)
        return correct / fx.num_test, loss_sum / fx.num_test
