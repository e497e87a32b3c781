"""The ServerApp's work: dali-fl's server loop with Flower messages in place of the in-process client loop.

Sampling (`sample_clients`), the weighted running sum, aggregation, the server optimizer, evaluation, the
metrics and the checkpoint are dali-fl's own, so a Flower run writes a dali-fl run directory.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from dali_fl import algorithms
from dali_fl.config import TrainConfig, load_config, option_fields
from dali_fl.data.store import MANIFEST
from dali_fl.engine.aggregate import RunningSum
from dali_fl.engine.federation import (
    ClientUpdate,
    Federation,
    RoundHooks,
    add_update,
    new_sums,
    round_row,
    sample_clients,
    server_update,
)
from dali_fl.engine.local import ClientResult
from dali_fl.engine.run import checkpoint_tensors, first_missing, prepare, remove_start, run_rounds
from dali_fl.engine.rundir import RunLock, check_fresh
from dali_fl.engine.trust import check_config_file
from dali_fl.errors import DaliFlError
from dali_fl.flower.client import client_rank
from dali_fl.flower.options import run_config_key
from dali_fl.flower.wire import (
    ARRAYS,
    CONFIG,
    METRICS,
    at_rank,
    from_record,
    num_bytes,
    pad_like,
    to_record,
    train_content,
)
from dali_fl.model.build import trainable_state
from dali_fl.safe_fs import sha256

log = logging.getLogger("flwr.dali_fl")
NODE_WAIT_S = 120.0  # how long to wait for every SuperNode to connect
NODE_SETTLE_S = 5.0  # ...or for their number to stop changing, when fewer than needed came


def wait_for_nodes(grid: Grid, want: int) -> list[int]:
    """The connected node ids, once `want` are there or their number has settled."""
    start = changed = time.monotonic()
    ids: list[int] = []
    while True:
        now_ids = sorted(grid.get_node_ids())
        now = time.monotonic()
        if len(now_ids) >= want:
            return now_ids
        if len(now_ids) != len(ids):
            ids, changed = now_ids, now
        if now - start > NODE_WAIT_S or (ids and now - changed > NODE_SETTLE_S):
            return ids
        time.sleep(0.1)


def reason_of(reply: Message) -> str:
    """A failed reply's reason in one line: a node's refusal is its own line, else the last line Flower gives."""
    reason = (reply.error.reason or "").strip()
    return (reason.splitlines()[-1] if reason else f"Flower error code {reply.error.code}")[:400]


def exchange(grid: Grid, messages: list[Message]) -> list[tuple[int, Message]]:
    """Send and wait: (index of the message each reply answers, reply), by message id, not by sender: a node
    may hold several clients, and the SuperLink answers for a node it lost as node 1."""
    replies = list(grid.send_and_receive(messages))  # gives every message its id
    index = {m.metadata.message_id: i for i, m in enumerate(messages)}
    return [(index[r.metadata.reply_to_message_id], r) for r in replies]


def client_nodes(grid: Grid, cfg: TrainConfig) -> dict[int, int]:
    """dali-fl client id -> the node holding it, asked of every node; each client needs one, on the run's store."""
    num_users = cfg.fed.num_users
    ids = wait_for_nodes(grid, num_users)
    store = {"store": cfg.data.store, "store-manifest-sha256": sha256(Path(cfg.data.store) / MANIFEST)}
    asks = [Message(RecordDict({CONFIG: ConfigRecord(store)}), dst_node_id=n, message_type="query") for n in ids]
    held = []
    for i, reply in exchange(grid, asks):
        if reply.has_error():
            raise DaliFlError(f"Flower node {ids[i]}: {reason_of(reply)}")
        held.append((ids[i], [int(c) for c in reply.content[CONFIG]["clients"]]))
    return assign(held, num_users)


def assign(held: Sequence[tuple[int, Sequence[int]]], num_users: int) -> dict[int, int]:
    """client -> node from what each node says it holds: every client of the run on exactly one node."""
    nodes: dict[int, int] = {}
    for node, clients in held:
        for client in clients:
            if not 0 <= client < num_users:  # simulating federations of several sizes: the larger's nodes
                log.warning("Flower node %d holds client %d, outside this run's %d clients: it gets no work",
                            node, client, num_users)
                continue
            if nodes.setdefault(client, node) != node:
                raise DaliFlError(f"client {client} is held by two Flower nodes, {nodes[client]} and {node}; give "
                                  "each client to one node (--node-config partition-id or clients)")
    missing = sorted(set(range(num_users)) - set(nodes))
    if missing:
        raise DaliFlError(f"no Flower SuperNode holds client {missing[0]} ({num_users - len(missing)} of "
                          f"{num_users} clients have one); simulated: num-supernodes={num_users}; deployed: give "
                          "every client to a node (--node-config 'partition-id=N' or 'clients=\"A-B\"')")
    return nodes


def collect(replies: Iterable[tuple[int, Message]], clients: Sequence[int], nodes: Mapping[int, int], round_: int,
            device: torch.device) -> dict[int, tuple[dict, Mapping]]:
    """client -> (trained state, metrics) from the replies to the instructions for `clients`, in that order; a
    failed or missing client stops the run."""
    out = {}
    for i, reply in replies:
        client = clients[i]
        node = nodes[client]
        if reply.has_error():
            raise DaliFlError(f"client {client} (Flower node {node}) failed in round {round_} ({reason_of(reply)}); "
                              f"nothing of round {round_} was saved")
        metrics = {**reply.content[METRICS], "bytes": num_bytes(reply.content)}
        out[client] = (from_record(reply.content[ARRAYS], device), metrics)
    missing = sorted(set(clients) - set(out))
    if missing:
        raise DaliFlError(f"client {missing[0]} (Flower node {nodes[missing[0]]}) sent no reply in round {round_}; "
                          f"nothing of round {round_} was saved")
    return out


def add_replies(fx: Federation, replies: list[tuple[dict, Mapping]], start: dict) -> tuple[RunningSum, dict]:
    """The running sum and totals of the clients' states, added in client order as dali-fl's loop adds them."""
    running, totals = new_sums(fx, start)
    for received, m in replies:
        result = ClientResult(int(m["num-examples"]), float(m["train-loss"]), float(m["data-wait-s"]),
                              float(m["compute-s"]), int(m["steps"]), int(m["skipped-steps"]))  # steps: τ_i
        # A lower-rank client's factors go back to the model's rank; its drift it measured from its own start.
        update = ClientUpdate(pad_like(received, start), result, float(m["product-scale"]), float(m["drift"]),
                              int(m["upload-values"]))
        add_update(fx, running, totals, update, start)
    return running, totals


def train_contents(fx: Federation, clients: np.ndarray, round_: int) -> list[RecordDict]:
    """What each sampled client is sent: the global trainable state at its rank (and the base weights)."""
    state = trainable_state(fx.model)
    base = checkpoint_tensors(fx)[1] if fx.uses_products else None
    records: dict[Optional[int], tuple] = {}  # serialized once per rank, shared by the round's messages
    contents = []
    for c in (int(c) for c in clients):
        rank = client_rank(fx, c)
        if rank not in records:
            extra = fx.client_base(c, state)  # what a client of this rank starts from besides the global base
            sent = None if base is None else to_record({k: v + extra[k] if k in extra else v for k, v in base.items()})
            records[rank] = to_record(at_rank(state, fx.pairs, rank)), sent
        contents.append(train_content(*records[rank], round_, c, fx.cfg, fx.run_dir))
    return contents


def instructions(fx: Federation, nodes: Mapping[int, int], clients: np.ndarray, round_: int) -> list[Message]:
    """One train message per sampled client (train_contents), addressed to the node that holds it."""
    return [Message(content, dst_node_id=nodes[int(c)], message_type="train", group_id=str(round_))
            for c, content in zip(clients, train_contents(fx, clients, round_))]


def flower_round(grid: Grid, fx: Federation, nodes: Mapping[int, int], round_: int) -> dict:
    """One round: send the sampled clients the state, aggregate their replies as dali-fl does; the metrics row."""
    t0 = time.perf_counter()
    plan = fx.timeline.plan(round_, sample_clients)  # every sampled client: Flower refuses the straggler options
    clients = plan.clients
    start = {k: v.clone() for k, v in trainable_state(fx.model).items()}
    messages = instructions(fx, nodes, clients, round_)
    bytes_down = sum(num_bytes(m.content) for m in messages)
    # A round may sample no client (a Poisson draw): nothing to send; the server step still runs (noise, say).
    replies = collect(exchange(grid, messages), [int(c) for c in clients], nodes, round_, fx.device) if messages else {}
    t_agg = time.perf_counter()
    running, totals = add_replies(fx, [replies[int(c)] for c in clients], start)
    mean_norm = server_update(fx, round_, running, start, len(clients))
    end = time.perf_counter()
    metrics = [m for _, m in replies.values()]
    row = round_row(fx, round_, len(clients), running, totals, mean_norm, (t0, t_agg, end))
    # What crossed Flower's wire: tensor bytes (and their names) in the instructions and the replies.
    row.update(bytes_down=bytes_down, bytes_up=sum(int(m["bytes"]) for m in metrics),
               client_processes=len({int(m["pid"]) for m in metrics}),
               federations_built=max((int(m["federations-built"]) for m in metrics), default=0), **plan.metrics())
    return row


def resumed_config(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """RUN_DIR's saved config with the run config's rounds and device, as `dali-fl train --resume` keeps it; `cfg`
    is the run config's, unsettled (config_from_run_config(settle=False)): any other difference is refused."""
    check_config_file(run_dir)  # kind, nesting and field types, before the config is built from it
    saved = load_config(run_dir)
    asked = _leaves(cfg.replace(fed={"rounds": saved.fed.rounds}, data={"device": saved.data.device}))
    derived = {k for k, v in _leaves(_settled_quietly(cfg)).items() if asked.get(k) != v}
    for path, value in _leaves(saved).items():
        if path not in derived and asked.get(path) != value:
            raise DaliFlError(f"resume keeps the run's settings: the run config's {_option_name(path)} is "
                              f"{asked.get(path)!r}, {run_dir}/config.json has {value!r} (only rounds and device "
                              "may change)")
    return saved.replace(fed={"rounds": cfg.fed.rounds}, data={"device": cfg.data.device})


def _leaves(cfg: TrainConfig) -> dict[tuple[str, ...], object]:
    """Every field of the config as saved in config.json, by its path: (section, field), an algorithm's
    (algorithms, name, field)."""
    doc = json.loads(cfg.to_json())
    algs = {("algorithms", alg, k): v for alg, params in doc.pop("algorithms").items() for k, v in params.items()}
    return {**{(section, k): v for section, fields in doc.items() for k, v in fields.items()}, **algs}


def _settled_quietly(cfg: TrainConfig) -> TrainConfig:
    """algorithms.settle(cfg) without its log: it is asked only which fields settle derives, and a resume keeps the
    saved values (DP would log a noise calibrated for the new --rounds that the run never uses)."""
    logger = logging.getLogger("dali_fl.algorithms")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return algorithms.settle(cfg)
    finally:
        logger.setLevel(level)


def _option_name(path: tuple[str, ...]) -> str:
    """A config.json field's option name without `--` (model.kwargs: model-kwargs, algorithms.NAME.field_x: field-x)."""
    names = {where: flat for flat, where in option_fields().items() if where[0] != "algorithms"}
    return run_config_key(names.get(path, path[-1]))  # an algorithm's fields are its options; a derived one too


def serve(grid: Grid, cfg: TrainConfig, run_dir: Path, resume: bool = False) -> dict:
    """Run (or, with `resume`, continue) a federation over `grid`, writing RUN_DIR as `dali-fl train` does."""
    run_dir = Path(run_dir)
    created = None if resume else first_missing(run_dir)
    if resume:  # before the lock, which makes the directory: a refused resume leaves nothing, as train's
        cfg = resumed_config(cfg, run_dir)
    with RunLock(run_dir):
        wrote = False  # whether RUN_DIR/config.json is this run's
        try:
            if not resume:  # before prepare's own check, in the words of `flwr run`, which has no --resume or --out
                check_fresh(run_dir, "--run-config resume=true", "choose another out (--run-config 'out=\"DIR\"')")
            fx, start = prepare(cfg, run_dir, resume=resume)  # the same checks, partition.json and config.json
            wrote = not resume
            try:
                nodes = client_nodes(grid, cfg)
            except BaseException:
                fx.close()
                raise
            # dali-fl's own loop (evaluation, metrics, checkpoint, summary) with Flower playing each round.
            return run_rounds(cfg, fx, run_dir, start, False, RoundHooks(),
                              play=lambda fx, r: flower_round(grid, fx, nodes, r))
        except BaseException:
            if not resume:
                remove_unfinished(run_dir, created, wrote)
            raise


def remove_unfinished(run_dir: Path, created: Optional[Path], wrote: bool) -> None:
    """Leave nothing of a new run that finished no round, as train does (`wrote`: its config.json is written, so
    it and the first round's empty log go too); a retry then starts where this one did."""
    if (run_dir / "checkpoint").exists():
        return  # a round finished: the run is there to resume
    if wrote:  # unlike train's, a Flower run meets its clients (and may be refused) after config.json
        for name in ("config.json", "metrics.jsonl"):
            with contextlib.suppress(OSError):
                (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    elif (run_dir / "config.json").exists():
        return  # another run's, which prepare refused to start over
    remove_start(run_dir, created)  # train's: the start-up files, or the directories this run made
