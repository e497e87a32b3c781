"""The server loop: sample clients, train them in turn on one persistent model, aggregate.

Building, resuming and summarizing a run live in `dali_fl.engine.run`; distribution plugs in through
`RoundHooks` (see `dali_fl.engine.distributed`).
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

from dali_fl.algorithms.dp import add_noise_, clip_update, epsilon
from dali_fl.algorithms.fedopt import ServerOptimizer
from dali_fl.algorithms.scaffold import Scaffold
from dali_fl.algorithms.shared_a import SharedA
from dali_fl.config import FederationConfig, TrainConfig, derive_seed
from dali_fl.data.partition import Partition
from dali_fl.data.store import Store
from dali_fl.engine.aggregate import PRODUCT_AGGREGATORS, RunningSum, aggregate, update_norm
from dali_fl.engine.device import peak_memory_mb
from dali_fl.engine.local import ClientResult, evaluate, local_train
from dali_fl.errors import DaliFlError
from dali_fl.loaders import Loader
from dali_fl.model.build import load_state_, lora_pairs, trainable_state
from dali_fl.model.ranks import reinit_adapters_, set_scale, truncate_, upload_values

# Summed over clients and over processes.
TOTAL_KEYS = ("loss_sum", "num_samples", "upload_values", "drift_sum", "drift_sq_sum", "data_wait_s", "compute_s")
STACK_STREAM = 13  # the seeded stream of FLoRA's re-initialised adapters

# --resume keeps a run's settings, so a run that diverged is restarted, not resumed.
RESTART_HINT = ("start a new run (--out NEW) with a lower --lr, other --momentum/--weight-decay, or --amp off/bf16; "
                "--resume would keep these settings")


def sample_clients(fed: FederationConfig, round_: int) -> np.ndarray:
    """The round's clients: depends on (seed, round) only, never on how many processes run."""
    rng = np.random.default_rng([fed.seed, round_, 7])
    return np.sort(rng.choice(fed.num_users, size=fed.clients_per_round, replace=False))


@dataclass
class Federation:
    """The live objects of one run, built once (by `dali_fl.engine.run.build_federation`) and reused every round."""

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
    server: Optional[ServerOptimizer] = None  # made from cfg.server when not given
    scaffold: Optional[Scaffold] = None  # made when cfg.local.scaffold
    holdout_loader: Optional[Loader] = None  # FedSA-LoRA: the train split, unaugmented, for personal accuracy

    def __post_init__(self) -> None:
        if self.server is None:
            self.server = ServerOptimizer(self.cfg.server)
        if self.scaffold is None and self.cfg.local.scaffold:
            self.scaffold = Scaffold(self.run_dir, self.cfg.fed.num_users, trainable_state(self.model),
                                     self.cfg.local.lr)
        self.ranks = self.cfg.fed.client_ranks()  # None: every client trains the model's own rank
        self.pairs = lora_pairs(self.model) if self.cfg.model.lora else []
        self.shared_a = (SharedA(self.run_dir, self.partition.clients, self.model, self.pairs, self.cfg.fed.seed)
                         if self.cfg.fed.aggregation == "shared-a" else None)

    def train_indices(self, client: int) -> np.ndarray:
        """The samples the client trains on (all of its share, but for FedSA-LoRA's held-out fifth)."""
        return self.shared_a.train[client] if self.shared_a else self.partition.clients[client]

    def client_tables(self) -> list:
        """The per-client state kept on disk (SCAFFOLD's variates, FedSA-LoRA's B)."""
        return [t for t in (self.scaffold, self.shared_a) if t is not None]

    def start_client(self, client: int, start: dict[str, torch.Tensor]) -> float:
        """Load the round-start state for `client` (at its rank); returns its LoRA scale over the model's."""
        load_state_(self.model, start)
        if self.shared_a:
            self.shared_a.load_b_(self.model, client)
        if self.ranks is None:
            return 1.0
        rank = int(self.ranks[client])
        truncate_(self.model, self.pairs, rank, self.cfg.model.lora_alpha)  # also sets its scale alpha / rank
        return self.cfg.model.lora_r / rank  # (alpha / rank) / (alpha / R)

    def end_clients(self) -> None:
        """Back to the model's own rank and scale, for aggregation and evaluation."""
        if self.ranks is not None:
            set_scale(self.model, self.cfg.model.lora_alpha / self.cfg.model.lora_r)

    def upload_values(self, client: int) -> int:
        """Values `client` sends the server each round: the trainable tensors, LoRA blocks at its rank."""
        state = trainable_state(self.model)
        if not self.pairs:
            return sum(t.numel() for t in state.values())
        lora = {n for p in self.pairs for n in (p.a, p.b)}
        rank = self.cfg.model.lora_r if self.ranks is None else int(self.ranks[client])
        return upload_values(self.pairs, {n: tuple(t.shape) for n, t in state.items()}, rank,
                             sum(t.numel() for n, t in state.items() if n not in lora))

    def server_state(self) -> dict[str, torch.Tensor]:
        """What the server keeps across rounds besides the model: optimizer moments, per-client rows."""
        tables = {k: v for t in self.client_tables() for k, v in t.state_tensors().items()}
        return {**self.server.state_tensors(), **tables}

    @property
    def uses_products(self) -> bool:
        """Whether the aggregation needs each client's B @ A (FedEx-LoRA's residual, FLoRA's stack)."""
        return self.cfg.fed.aggregation in PRODUCT_AGGREGATORS

    def close(self) -> None:
        for loader in (self.train_loader, self.eval_loader, self.holdout_loader):
            if loader is not None:
                loader.close()


@torch.no_grad()
def add_to_params_(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Add FedEx-LoRA residuals into the frozen base weights, in place."""
    params = dict(model.named_parameters())
    for name, delta in deltas.items():
        params[name].add_(delta.to(params[name].dtype))


@dataclass(frozen=True)
class ClientUpdate:
    """One client's round as the server adds it: its trained state and what it reports."""

    state: dict[str, torch.Tensor]
    result: ClientResult
    product_scale: float  # its LoRA scale over the model's, weighing its B @ A
    drift: float  # ‖y_i − x‖ from its own (possibly truncated) start
    upload_values: int


def train_one(fx: Federation, round_: int, client: int, start: dict[str, torch.Tensor],
              loader: Loader) -> ClientUpdate:
    """The client side of a round: train `client` from the round-start state (the Flower client calls it too)."""
    cfg = fx.cfg
    product_scale = fx.start_client(client, start)
    # A lower-rank client starts from the truncated state: its drift is measured from there.
    own_start = start if fx.ranks is None else {k: v.clone() for k, v in trainable_state(fx.model).items()}
    res = local_train(fx.model, loader, fx.train_indices(client), cfg.local, derive_seed(cfg.fed.seed, round_, client),
                      fx.amp, fx.device, fx.scaffold.correction(client) if fx.scaffold else None)
    if not math.isfinite(res.loss):
        raise DaliFlError(f"training loss became {res.loss} in round {round_} at client {client}; "
                          f"nothing of round {round_} was saved; {RESTART_HINT}")
    state = trainable_state(fx.model)
    if fx.scaffold:
        fx.scaffold.client_done(client, start, state, res.steps)
    if fx.shared_a:
        fx.shared_a.keep_b(client, state)
    return ClientUpdate(state, res, product_scale, update_norm(state, own_start), fx.upload_values(client))


def new_sums(fx: Federation, start: dict[str, torch.Tensor]) -> tuple[RunningSum, dict]:
    """An empty running sum (and totals) for a round starting from `start`."""
    return RunningSum(fx.pairs if fx.uses_products else (), like=start), {key: 0.0 for key in TOTAL_KEYS}


def add_update(fx: Federation, running: RunningSum, totals: dict, update: ClientUpdate,
               start: dict[str, torch.Tensor]) -> None:
    """The server side of a client: clip (DP), weigh and add its state; count its totals."""
    state, norm, res = update.state, update.drift, update.result
    if fx.cfg.server.dp:  # equal weights: a client's sample count must not scale its (bounded) influence
        state, _ = clip_update(state, start, fx.cfg.server.dp_clip)
        norm = update_norm(state, start)
    weight = 1 if fx.cfg.server.dp else res.num_samples
    running.add(state, weight, update.product_scale)
    totals["upload_values"] += update.upload_values
    totals["drift_sum"] += norm
    totals["drift_sq_sum"] += weight * norm * norm
    totals["loss_sum"] += res.loss * res.num_samples
    totals["num_samples"] += res.num_samples
    totals["data_wait_s"] += res.data_wait_s
    totals["compute_s"] += res.compute_s


def train_clients(fx: Federation, round_: int, clients: np.ndarray, loader: Loader, progress: bool,
                  start: dict[str, torch.Tensor]) -> tuple[RunningSum, dict]:
    """Train the given clients in turn from the round-start state; returns their running sum and totals."""
    running, totals = new_sums(fx, start)
    for c in tqdm(clients, desc=f"round {round_} clients", leave=False, disable=not progress):
        add_update(fx, running, totals, train_one(fx, round_, int(c), start, loader), start)
    fx.end_clients()
    return running, totals


def server_update(fx: Federation, round_: int, running: RunningSum, start: dict[str, torch.Tensor],
                  num_clients: int) -> float:
    """Aggregate, add DP noise, take the server optimizer's step, load the result; returns ‖mean update‖."""
    server = fx.cfg.server
    mean, deltas = aggregate(running, fx.cfg.fed.aggregation)
    mean_norm = update_norm(mean, start)
    if server.dp:
        add_noise_(mean, server.dp_clip, server.dp_noise, num_clients, fx.cfg.fed.seed, round_)
    load_state_(fx.model, fx.server.step(start, mean))
    add_to_params_(fx.model, deltas)  # FedEx-LoRA's residual goes into the base weights as it is
    if fx.cfg.fed.aggregation == "stack":  # FLoRA: the product is in the base; every client starts afresh
        reinit_adapters_(fx.model, fx.pairs, derive_seed(fx.cfg.fed.seed, round_, STACK_STREAM))
    if fx.scaffold:
        fx.scaffold.finish_round()
    return mean_norm


def run_round(fx: Federation, round_: int, progress: bool = False, hooks: Optional["RoundHooks"] = None,
              loader: Optional[Loader] = None) -> dict:
    """One round: local training of the sampled clients, one reduction, aggregation into the model.

    `loader` replaces the run's train loader for this round (the benchmarks pass a timed or a
    compute-only one); by default the clients read through `fx.train_loader`.
    """
    hooks = hooks or RoundHooks()
    t0 = time.perf_counter()
    if fx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(fx.device)
    clients = sample_clients(fx.cfg.fed, round_)
    start = {k: v.clone() for k, v in trainable_state(fx.model).items()}
    running, totals = train_clients(fx, round_, hooks.mine(clients, fx.partition.sizes()),
                                    loader or fx.train_loader, progress, start)
    t_agg = time.perf_counter()
    hooks.reduce(running, totals)  # all_reduce across processes when distributed; nothing otherwise
    mean_norm = server_update(fx, round_, running, start, len(clients))
    if fx.device.type == "cuda":
        torch.cuda.synchronize(fx.device)
    end = time.perf_counter()
    return round_row(fx, round_, len(clients), running, totals, mean_norm, (t0, t_agg, end))


def round_row(fx: Federation, round_: int, num_clients: int, running: RunningSum, totals: dict, mean_norm: float,
              times: tuple[float, float, float]) -> dict:
    """The round's metrics row from its totals; `times` are when it started, aggregated and ended."""
    t0, t_agg, end = times
    row = {"round": round_, "test_acc": None, "test_loss": None,
           "train_loss": totals["loss_sum"] / totals["num_samples"], "num_clients": num_clients,
           "num_samples": int(totals["num_samples"]), "round_time_s": end - t0,
           "data_wait_s": totals["data_wait_s"], "compute_s": totals["compute_s"], "aggregate_s": end - t_agg,
           "images_per_s": totals["num_samples"] * fx.cfg.local.local_ep / (end - t0),
           "upload_mb": totals["upload_values"] * 4 / 1e6,  # float32 values the clients sent
           "client_drift": totals["drift_sum"] / num_clients,
           # Weighted spread of the clients' updates around their mean: what SCAFFOLD sets out to shrink. Undefined
           # for mixed ranks, whose clients start from different (truncated) points.
           "update_spread": None if fx.ranks is not None else
           math.sqrt(max(totals["drift_sq_sum"] / running.total - mean_norm ** 2, 0.0)),
           "peak_gpu_mem_mb": peak_memory_mb(fx.device)}
    if fx.cfg.server.dp:
        row["dp_epsilon"] = privacy_spent(fx.cfg, round_)
    return row


def privacy_spent(cfg: TrainConfig, rounds: int) -> Optional[float]:
    """ε at --dp-delta after `rounds` rounds of DP-FedAvg with this run's sampling rate; None without noise."""
    fed = cfg.fed
    eps = epsilon(cfg.server.dp_noise, fed.clients_per_round / fed.num_users, rounds, cfg.server.dp_delta)
    return eps if math.isfinite(eps) else None


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
