"""The server loop: sample clients, train them in turn on one persistent model, aggregate.

Building, resuming and summarizing a run live in `dali_fl.engine.run`; distribution plugs in through
`RoundHooks` (see `dali_fl.engine.distributed`). What an algorithm does, it does through the hooks of
`dali_fl.algorithms.base.Algorithm`, called here on every active algorithm in registry order: this module
names none.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dali_fl import algorithms
from dali_fl.algorithms.base import Algorithm, Contribution, ServerRound
from dali_fl.config import TrainConfig
from dali_fl.data.partition import Partition
from dali_fl.data.store import Store
from dali_fl.engine import clock
from dali_fl.engine.aggregate import RunningSum, mean_of, update_norm
from dali_fl.engine.device import peak_memory_mb
from dali_fl.engine.local import ClientResult, evaluate, local_train, trainable_params
from dali_fl.errors import DaliFlError
from dali_fl.loaders import Loader, make_loader
from dali_fl.model.build import load_state_, trainable_state
from dali_fl.model.lora import lora_pairs
from dali_fl.model.ranks import set_scale, truncate_, upload_values
from dali_fl.seeds import SAMPLE, derive_seed, stream

# Summed over clients and over processes.
TOTAL_KEYS = ("loss_sum", "num_samples", "upload_values", "drift_sum", "drift_sq_sum", "data_wait_s", "compute_s",
              "trained", "skipped_steps")

# --resume keeps a run's settings, so a run that diverged is restarted, not resumed.
RESTART_HINT = ("start a new run (--out NEW) with a lower --lr, other --momentum/--weight-decay, or --amp off/bf16; "
                "--resume would keep these settings")


def sample_clients(cfg: TrainConfig, round_: int) -> np.ndarray:
    """The round's clients: depends on (seed, round) only, never on how many processes run.

    The first active algorithm that draws its own sample decides (one whose guarantee assumes another kind of
    draw, say); otherwise --frac of the clients, drawn without replacement. Only an algorithm's draw may be empty.
    """
    for cls in algorithms.active_classes(cfg):
        clients = cls.sample(cfg, round_)
        if clients is not None:
            return clients
    fed = cfg.fed
    rng = stream(fed.seed, round_, SAMPLE)
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
    loader_args: dict = field(default_factory=dict)  # what every loader of the run shares (make_loader)

    def __post_init__(self) -> None:
        self.ranks = self.cfg.fed.client_ranks()  # None: every client trains the model's own rank
        self.pairs = lora_pairs(self.model) if self.cfg.model.lora else []
        self.algs: list[Algorithm] = []
        try:
            for cls in algorithms.active_classes(self.cfg):
                self.algs.append(cls(self))  # an algorithm may open files and loaders: close them if one fails
        except BaseException:
            self.close()
            raise
        self.scalars = tuple(name for a in self.algs for name in a.scalars)
        try:
            self.timeline = clock.timeline_for(self)  # the simulated clock: synchronous rounds or buffered async
        except BaseException:
            self.close()
            raise

    def make_loader(self, split: str, batch_size: int, augment: bool) -> Loader:
        """Another loader over the run's store, like the run's own (an algorithm's evaluation uses one)."""
        return make_loader(self.cfg.data.loader, self.store, split, batch_size=batch_size, augment=augment,
                           **self.loader_args)

    def train_indices(self, client: int) -> np.ndarray:
        """The samples the client trains on (all of its share, unless an algorithm holds some out)."""
        indices = self.partition.clients[client]
        for a in self.algs:
            indices = a.train_indices(client, indices)
        return indices

    def start_client(self, client: int, start: dict[str, torch.Tensor]) -> float:
        """Load the round-start state for `client` (at its rank); returns its LoRA scale over the model's."""
        load_state_(self.model, start)
        for a in self.algs:
            a.start_client(client)
        if self.ranks is None:
            return 1.0
        rank = int(self.ranks[client])
        truncate_(self.model, self.pairs, rank, self.cfg.model.lora_alpha)  # also sets its scale alpha / rank
        return self.cfg.model.lora_r / rank  # (alpha / rank) / (alpha / R)

    def client_base(self, client: int, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the base weights sent to `client` carry besides the global ones (FedEx's D_r at a lower rank)."""
        rank = self.cfg.model.lora_r if self.ranks is None else int(self.ranks[client])
        deltas: dict[str, torch.Tensor] = {}
        for a in self.algs:
            deltas.update(a.client_base(rank, start))
        return deltas

    @contextlib.contextmanager
    def sent_base(self, client: int, start: dict[str, torch.Tensor]) -> Iterator[None]:
        """The model's base weights as the server sends them to `client` (as Flower's server does), then back."""
        deltas = self.client_base(client, start)
        params = dict(self.model.named_parameters())
        kept = {name: params[name].detach().clone() for name in deltas}  # a copy: not even rounding stays behind
        add_to_params_(self.model, deltas)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in kept.items():
                    params[name].copy_(value)

    def end_clients(self) -> None:
        """Back to the model's own rank and scale, for aggregation and evaluation."""
        if self.ranks is not None:
            set_scale(self.model, self.cfg.model.lora_alpha / self.cfg.model.lora_r)

    def upload_values(self, client: int) -> int:
        """Values `client` sends the server each round: the trainable tensors, LoRA blocks at its rank."""
        kept = {name for a in self.algs for name in a.kept_tensors()}  # trained, but never sent
        state = {k: v for k, v in trainable_state(self.model).items() if k not in kept}
        if not self.pairs:
            return sum(t.numel() for t in state.values())
        lora = {n for p in self.pairs for n in (p.a, p.b)}
        rank = self.cfg.model.lora_r if self.ranks is None else int(self.ranks[client])
        return upload_values(self.pairs, {n: tuple(t.shape) for n, t in state.items()}, rank,
                             sum(t.numel() for n, t in state.items() if n not in lora))

    def server_state(self) -> dict[str, torch.Tensor]:
        """What the algorithms keep across rounds besides the model: optimizer moments, per-client rows."""
        return {**{k: v for a in self.algs for k, v in a.state_tensors().items()}, **self.timeline.state_tensors()}

    @property
    def uses_products(self) -> bool:
        """Whether the aggregation needs each client's B @ A (and changes the base weights)."""
        return any(a.needs_products for a in self.algs)

    def close(self) -> None:
        for a in self.algs:
            a.close()
        for loader in (self.train_loader, self.eval_loader):
            if loader is not None:
                loader.close()


@torch.no_grad()
def add_to_params_(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Add the aggregation's deltas (an exact residual, a stacked product) into the frozen base weights."""
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
    # A lower-rank client starts from the truncated state, a client with state of its own (personal_start) from
    # that: its drift, and what the algorithms' client_done measure, are taken from there.
    moved = fx.ranks is not None or any(a.personal_start for a in fx.algs)
    own_start = {k: v.clone() for k, v in trainable_state(fx.model).items()} if moved else start
    params = trainable_params(fx.model)
    terms = [t for t in (a.local_term(client, params) for a in fx.algs) if t is not None]
    try:
        res = local_train(fx.model, loader, fx.train_indices(client), cfg.local,
                          derive_seed(cfg.fed.seed, round_, client), fx.amp, fx.device, terms)
    except RuntimeError as err:  # torch's optimizers turn lr/(1 - beta1) and the like into float32 scalars
        if "without overflow" not in str(err):
            raise
        raise DaliFlError(f"an optimizer step overflowed float32 in round {round_} at client {client}; nothing of "
                          f"round {round_} was saved; {RESTART_HINT}") from None
    if not math.isfinite(res.loss):
        raise DaliFlError(f"training loss became {res.loss} in round {round_} at client {client}; "
                          f"nothing of round {round_} was saved; {RESTART_HINT}")
    state = trainable_state(fx.model)
    for a in fx.algs:
        a.client_done(client, own_start, state, res)
    return ClientUpdate(state, res, product_scale, update_norm(state, own_start), fx.upload_values(client))


def new_sums(fx: Federation, start: dict[str, torch.Tensor]) -> tuple[RunningSum, dict]:
    """An empty running sum (and totals) for a round starting from `start`."""
    running = RunningSum(fx.pairs if fx.uses_products else (), like=start, scalars=fx.scalars)
    return running, {key: 0.0 for key in TOTAL_KEYS}


def add_update(fx: Federation, running: RunningSum, totals: dict, update: ClientUpdate,
               start: dict[str, torch.Tensor]) -> None:
    """The server side of a client: the algorithms weigh its state; add it."""
    res = update.result
    c = Contribution(update.state, res.num_samples, update.drift)
    for a in fx.algs:
        c = a.contribute(c, update, start, running.scalars)
    running.add(c.state, c.weight, update.product_scale)
    totals["upload_values"] += update.upload_values
    totals["drift_sum"] += c.drift
    totals["trained"] += res.num_samples > 0  # a client without samples has no update to drift
    totals["drift_sq_sum"] += c.weight * c.drift * c.drift
    totals["loss_sum"] += res.loss * res.num_samples
    totals["num_samples"] += res.num_samples
    totals["data_wait_s"] += res.data_wait_s
    totals["compute_s"] += res.compute_s
    totals["skipped_steps"] += res.skipped_steps


def train_clients(fx: Federation, round_: int, clients: np.ndarray, loader: Loader, progress: bool,
                  start: dict[str, torch.Tensor]) -> tuple[RunningSum, dict]:
    """Train the given clients in turn from the round-start state; returns their running sum and totals."""
    running, totals = new_sums(fx, start)
    for c in tqdm(clients, desc=f"round {round_} clients", leave=False, disable=not progress):
        with fx.sent_base(int(c), start):
            update = train_one(fx, round_, int(c), start, loader)
        add_update(fx, running, totals, update, start)
    fx.end_clients()
    return running, totals


def server_update(fx: Federation, round_: int, running: RunningSum, start: dict[str, torch.Tensor],
                  num_clients: int) -> float:
    """Aggregate, privatize, take the server's step, load the result; returns ‖mean update‖."""
    r = ServerRound(round_, num_clients, start, running.total, dict(running.scalars))
    if running.total > 0:
        mean, products = mean_of(running), {k: v / running.total for k, v in running.products.items()}
    else:  # no client, or none with samples: the aggregate stays where it started, products included
        mean = {k: v.float().clone() for k, v in start.items()}
        products = {p.base: mean[p.b] @ mean[p.a] for p in running.pairs}  # so that FedEx's residual is zero
    deltas: dict[str, torch.Tensor] = {}
    for a in fx.algs:
        mean, deltas = a.aggregate(r, mean, deltas, products)
    mean_norm = update_norm(mean, start)
    for a in fx.algs:
        mean = a.privatize(r, mean)
    for a in fx.algs:
        mean = a.server_step(r, mean)
    load_state_(fx.model, mean)
    add_to_params_(fx.model, deltas)  # into the frozen base weights as they are (no server step, no noise)
    for a in fx.algs:
        a.end_round(r)
    return mean_norm


def run_round(fx: Federation, round_: int, progress: bool = False, hooks: Optional["RoundHooks"] = None,
              loader: Optional[Loader] = None) -> dict:
    """One round: local training of the sampled clients, one reduction, aggregation into the model.

    `loader` replaces the run's train loader for this round (the benchmarks pass a timed or a
    compute-only one); by default the clients read through `fx.train_loader`.
    """
    hooks = hooks or RoundHooks()
    if fx.timeline.asynchronous:  # buffered asynchronous server steps (engine/asynchronous.py)
        return fx.timeline.run_step(fx, round_, progress, hooks, loader or fx.train_loader)
    t0 = time.perf_counter()
    if fx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(fx.device)
    plan = fx.timeline.plan(round_, sample_clients)  # the sample, less stragglers and offline clients
    clients = plan.clients
    if plan.sampled and not len(clients):  # the clock dropped every sampled client: the model stays as it was
        return clock.empty_row(fx, plan)
    start = {k: v.clone() for k, v in trainable_state(fx.model).items()}
    running, totals = train_clients(fx, round_, hooks.mine(clients, fx.partition.sizes()),
                                    loader or fx.train_loader, progress, start)
    t_agg = time.perf_counter()
    hooks.reduce(running, totals)  # all_reduce across processes when distributed; nothing otherwise
    mean_norm = server_update(fx, round_, running, start, len(clients))
    if fx.device.type == "cuda":
        torch.cuda.synchronize(fx.device)
    end = time.perf_counter()
    return {**round_row(fx, round_, len(clients), running, totals, mean_norm, (t0, t_agg, end)), **plan.metrics()}


def round_row(fx: Federation, round_: int, num_clients: int, running: RunningSum, totals: dict, mean_norm: float,
              times: tuple[float, float, float]) -> dict:
    """The round's metrics row from its totals; `times` are when it started, aggregated and ended."""
    t0, t_agg, end = times
    some = num_clients > 0 and running.total > 0  # a round may sample no client (a Poisson draw)
    row = {"round": round_, "test_acc": None, "test_loss": None,
           # DP weighs a client without samples 1: a round of only such clients has weight but no loss
           "train_loss": totals["loss_sum"] / totals["num_samples"] if some and totals["num_samples"] else None,
           "num_clients": num_clients,
           "num_samples": int(totals["num_samples"]), "round_time_s": end - t0,
           "data_wait_s": totals["data_wait_s"], "compute_s": totals["compute_s"], "aggregate_s": end - t_agg,
           "images_per_s": totals["num_samples"] * fx.cfg.local.local_ep / (end - t0),
           "upload_mb": totals["upload_values"] * 4 / 1e6,  # float32 values the clients sent
           "client_drift": totals["drift_sum"] / totals["trained"] if some and totals["trained"] else None,
           # Weighted spread of the clients' updates around their mean: what drift correction shrinks. Undefined
           # for mixed ranks, whose clients start from different (truncated) points.
           "update_spread": None if fx.ranks is not None or not some else
           math.sqrt(max(totals["drift_sq_sum"] / running.total - mean_norm ** 2, 0.0)),
           "peak_gpu_mem_mb": peak_memory_mb(fx.device)}
    if fx.cfg.data.amp == "fp16":  # each client's loss scaler starts afresh: the steps it skipped were not trained
        row["amp_skipped_steps"] = int(totals["skipped_steps"])
    for a in fx.algs:
        row.update(a.metrics(round_))
    return row


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
