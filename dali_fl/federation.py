"""The server loop: sample clients, train them in turn on one persistent model, aggregate, evaluate, log."""
from __future__ import annotations

import json
import logging
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
from dali_fl.device import amp_dtype, explain_oom, peak_memory_mb, resolve_device
from dali_fl.errors import DaliFlError
from dali_fl.model import build_model, load_state_, lora_pairs, trainable_state
from dali_fl.normalize import from_model
from dali_fl.partition import Partition, load_partition, make_partition, save_partition
from dali_fl.atomic import atomic_write_text
from dali_fl.rundir import MetricsLog, load_checkpoint, save_checkpoint, start_run_dir
from dali_fl.store import Store, open_store

log = logging.getLogger(__name__)


def sample_clients(fed: FederationConfig, round_: int) -> np.ndarray:
    """The round's clients: depends on (seed, round) only, never on how many processes run."""
    rng = np.random.default_rng([fed.seed, round_, 7])
    return np.sort(rng.choice(fed.num_users, size=fed.clients_per_round, replace=False))


def open_store_for(cfg: TrainConfig) -> Store:
    """Open the run's store; memmap-seed reads the float32 sibling that `prep --dtype float32` writes."""
    store = open_store(cfg.data.store)
    if cfg.data.loader == "memmap-seed" and store.dtype != "float32":
        sibling = Path(f"{store.path}-f32")
        if not sibling.exists():
            raise DaliFlError(f"--loader memmap-seed reads a float32 store; make it with `dali-fl prep --source "
                              f"{store.manifest['source']} --image-size {store.image_size} --dtype float32`")
        store = open_store(sibling)
    return store


@dataclass
class Federation:
    """The live objects of one run, built once and reused every round."""

    cfg: TrainConfig
    run_dir: Path
    store: Store
    device: torch.device
    model: nn.Module
    partition: Partition
    train_loader: object
    eval_loader: object
    num_test: int
    amp: Optional[torch.dtype]

    @property
    def fedex(self) -> bool:
        return self.cfg.fed.alg == "fedlora" and self.cfg.fed.lora_agg == "fedex"

    def close(self) -> None:
        for loader in (self.train_loader, self.eval_loader):
            loader.close()


def build_federation(cfg: TrainConfig, run_dir: Path, partition: Optional[Partition]) -> Federation:
    """Open the store, partition it (or reuse the saved partition), build model and loaders."""
    from dali_fl.loaders import LoaderWorkers, make_loader

    device = resolve_device(None, cfg.data.device)
    if cfg.data.data_on_gpu and device.type != "cuda":
        raise DaliFlError("--data-on-gpu needs a CUDA device (--gpu N)")
    store = open_store_for(cfg)
    model = build_model(cfg.model, store.num_classes, store.image_size, cfg.fed.seed).to(device)
    if partition is None:
        partition = make_partition(store.labels("train"), cfg.fed.num_users, cfg.fed.partition, seed=cfg.fed.seed,
                                   alpha=cfg.fed.alpha, min_size=cfg.fed.min_size, num_classes=store.num_classes)
    norm = from_model(model)
    out_dtype = torch.float16 if amp_dtype(cfg.data.amp, device) == torch.float16 else torch.float32
    # memmap-seed keeps the seed's own worker settings; that is what it exists to reproduce.
    workers = LoaderWorkers(num_workers=cfg.data.num_workers) if cfg.data.loader == "memmap" else None
    common = dict(device=device, norm=norm, out_dtype=out_dtype, data_on_gpu=cfg.data.data_on_gpu, workers=workers)
    train_loader = make_loader(cfg.data.loader, store, "train", batch_size=cfg.local.local_bs,
                               augment=cfg.data.augment, **common)
    eval_loader = make_loader(cfg.data.loader, store, "test", batch_size=cfg.data.eval_bs, augment=False, **common)
    return Federation(cfg, run_dir, store, device, model, partition, train_loader, eval_loader,
                      len(store.labels("test")), amp_dtype(cfg.data.amp, device))


@torch.no_grad()
def add_to_params_(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Add FedEx-LoRA residuals into the frozen base weights, in place."""
    params = dict(model.named_parameters())
    for name, delta in deltas.items():
        params[name].add_(delta.to(params[name].dtype))


def train_clients(fx: Federation, round_: int, clients: np.ndarray, progress: bool) -> tuple[RunningSum, dict]:
    """Train the given clients in turn from the current global state; returns their running sum and totals."""
    cfg = fx.cfg
    global_state = {k: v.clone() for k, v in trainable_state(fx.model).items()}
    running = RunningSum(lora_pairs(fx.model) if fx.fedex else (), like=global_state)
    totals = {"loss_sum": 0.0, "data_wait_s": 0.0, "compute_s": 0.0}
    for c in tqdm(clients, desc=f"round {round_} clients", leave=False, disable=not progress):
        load_state_(fx.model, global_state)
        res = local_train(fx.model, fx.train_loader, fx.partition.clients[c], cfg.local,
                          derive_seed(cfg.fed.seed, round_, int(c)), fx.amp, fx.device)
        if not math.isfinite(res.loss):
            raise DaliFlError(f"training loss became {res.loss} in round {round_} at client {int(c)}; "
                              "lower --lr or use --amp off/bf16; the last good checkpoint is kept")
        running.add(trainable_state(fx.model), res.num_samples)
        totals["loss_sum"] += res.loss * res.num_samples
        totals["data_wait_s"] += res.data_wait_s
        totals["compute_s"] += res.compute_s
    return running, totals


def run_round(fx: Federation, round_: int, progress: bool = False, hooks: Optional["RoundHooks"] = None) -> dict:
    """One round: local training of the sampled clients, one reduction, aggregation into the model."""
    hooks = hooks or RoundHooks()
    start = time.perf_counter()
    if fx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(fx.device)
    clients = sample_clients(fx.cfg.fed, round_)
    running, totals = train_clients(fx, round_, hooks.mine(clients, fx.partition.sizes()), progress)
    t_agg = time.perf_counter()
    hooks.reduce(running, totals)  # all_reduce across processes when distributed; nothing otherwise
    state, deltas = aggregate(running, fx.cfg.fed.lora_agg if fx.cfg.fed.alg == "fedlora" else "fedavg")
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


def checkpoint_tensors(fx: Federation) -> tuple[dict, dict]:
    """(global trainable state, base weights FedEx-LoRA changed) as they are now."""
    params = dict(fx.model.named_parameters())
    base = {p.base: params[p.base] for p in lora_pairs(fx.model)} if fx.fedex else {}
    return trainable_state(fx.model), base


def resume_state(fx: Federation, run_dir: Path) -> int:
    """Load the last finished round's tensors into the model; returns the round to start at."""
    ckpt = load_checkpoint(run_dir)
    if ckpt is None:
        return 1
    round_, state, base = ckpt
    load_state_(fx.model, {**state, **base})
    return round_ + 1


def prepare(cfg: TrainConfig, run_dir: Path, resume: bool, write: bool = True) -> tuple[Federation, int]:
    """Build the run's objects; a new run writes config and partition, a resumed one reloads them."""
    if resume:
        partition = load_partition(run_dir / "partition.json")
    else:
        if write:
            start_run_dir(run_dir)
        partition = None  # made from the seed alone, so every process makes the same one
    fx = build_federation(cfg, run_dir, partition)
    if write:
        atomic_write_text(run_dir / "config.json", cfg.to_json())
        if not resume:
            save_partition(fx.partition, fx.store.labels("train"), run_dir / "partition.json")
    return fx, resume_state(fx, run_dir) if resume else 1


def train(cfg: TrainConfig, run_dir: Path, *, resume: bool = False, progress: bool = True,
          hooks: Optional["RoundHooks"] = None) -> dict:
    """Run (or continue) a federation to `cfg.fed.rounds` rounds; returns the summary."""
    hooks = hooks or RoundHooks()
    run_dir = Path(run_dir)
    fx, start = prepare(cfg, run_dir, resume, write=hooks.is_writer)
    metrics = MetricsLog(run_dir, start) if hooks.is_writer else None
    rounds = range(start, cfg.fed.rounds + 1)
    bar = tqdm(rounds, desc="rounds", unit="round", disable=not (progress and hooks.is_writer))
    try:
        with explain_oom(fx.device):
            for r in bar:
                row = run_round(fx, r, progress and hooks.is_writer, hooks)
                if r % cfg.data.eval_every == 0 or r == cfg.fed.rounds:
                    t0 = time.perf_counter()
                    row["test_acc"], row["test_loss"] = hooks.evaluate(fx)
                    row["eval_s"] = time.perf_counter() - t0
                    bar.set_postfix(acc=f"{row['test_acc']:.3f}")
                if metrics is not None:
                    metrics.log(row)
                    save_checkpoint(run_dir, r, *checkpoint_tensors(fx), seed=cfg.fed.seed)
                log.info("round %d: %s", r, row)
    finally:
        fx.close()
        if metrics is not None:
            metrics.close()
    return write_summary(run_dir, metrics.rows) if metrics is not None else {}


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


def write_summary(run_dir: Path, rows: list[dict]) -> dict:
    """summary.json: final and best accuracy, rounds done, total time."""
    accs = [r["test_acc"] for r in rows if r.get("test_acc") is not None]
    summary = {"final_test_acc": accs[-1] if accs else None, "best_test_acc": max(accs) if accs else None,
               "rounds": rows[-1]["round"] if rows else 0,
               "total_time_s": sum(r["round_time_s"] + r.get("eval_s", 0.0) for r in rows)}
    atomic_write_text(Path(run_dir) / "summary.json", json.dumps(summary, indent=2))
    return summary
