"""The ClientApp's work: one federation per process (model, store, loader), built once, training each client sent.

A simulation runs many SuperNodes in a few worker processes; each process keeps the Federation of the run's
config (sent by the server with every instruction) and serves every client it is handed with it, as
`dali-fl train` does within one process.
"""
from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from dali_fl.config import TrainConfig
from dali_fl.data.store import MANIFEST
from dali_fl.engine.federation import Federation, train_one
from dali_fl.engine.local import ClientResult
from dali_fl.engine.run import build_federation
from dali_fl.errors import DaliFlError
from dali_fl.flower.wire import ARRAYS, BASE, CONFIG, at_rank, config_of, from_record, pad_like, reply_content
from dali_fl.model.build import load_state_, trainable_state
from dali_fl.safe_fs import sha256

log = logging.getLogger("flwr.dali_fl")  # Flower's handler: the line lands in the SuperNode's log
PARTITION_KEY = "partition-id"  # set per SuperNode by the simulation engine, or by --node-config in deployment
CLIENTS_KEY = "clients"  # --node-config in deployment: several clients on one node (a site), "0-9" or "0,3,7"
MAX_NODE_CLIENTS = 1_000_000  # clients in one range: bounds what a node config can make this process hold
STORE_KEY = "store"  # --node-config in deployment: this node's copy of the store (default: the run's path)
REFUSED = 3900  # the error code of a reply refused in dali-fl's words (Flower's own are 0 to 8)
_FEDERATIONS: dict[str, Federation] = {}  # this process's federation per run config (normally one)
# Federations this process built per config: the evidence that it builds one and reuses it for every client.
_BUILT: Counter[str] = Counter()


def federation_for(cfg: TrainConfig, run_dir: Path) -> Federation:
    """This process's Federation for `cfg`, built on first use and kept for every later client."""
    key = cfg.to_json()
    if key not in _FEDERATIONS:
        for old in _FEDERATIONS.values():  # another run's loaders: this process serves one run at a time
            old.close()
        _FEDERATIONS.clear()
        _FEDERATIONS[key] = build_federation(cfg, run_dir)
        _BUILT[key] += 1
    return _FEDERATIONS[key]


def train_client(fx: Federation, start: dict[str, torch.Tensor], base: Mapping[str, torch.Tensor], round_: int,
                 client: int) -> tuple[dict[str, torch.Tensor], ClientResult, dict[str, float]]:
    """Train `client` from the round-start state with dali-fl's own client step (federation.train_one).

    Returns its trainable state, its result, and what the server adds besides: its LoRA scale over the
    model's (weighing B @ A), its drift, and the values it uploads.
    """
    load_state_(fx.model, base)  # base weights the aggregation changed, sent by the server
    update = train_one(fx, round_, client, start, fx.train_loader)
    state = {k: v.clone() for k, v in update.state.items()}
    fx.end_clients()
    extra = {"product-scale": update.product_scale, "drift": update.drift, "upload-values": update.upload_values}
    return state, update.result, extra


def client_rank(fx: Federation, client: int) -> Optional[int]:
    """The LoRA rank `client` trains at, or None when every client trains the model's own."""
    return None if fx.ranks is None else int(fx.ranks[client])


def node_clients(context: Context) -> list[int]:
    """The dali-fl clients this SuperNode holds: its `clients` ("0-9", "0,3,7"), else its one `partition-id`."""
    spec = context.node_config.get(CLIENTS_KEY)
    if spec is not None:
        return parse_clients(str(spec))
    value = context.node_config.get(PARTITION_KEY)
    if value is None:
        raise DaliFlError(f"this SuperNode holds no client; start it with --node-config '{PARTITION_KEY}=N' (one "
                          f"client) or '{CLIENTS_KEY}=\"A-B\"' (several)")
    # Flower parses the node config as TOML: 1.5 or true were read as client 1, "two" was a ValueError traceback.
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdecimal())):
        raise DaliFlError(f"--node-config {PARTITION_KEY}={value!r} is not a client id; give a whole number from 0 "
                          f"(e.g. '{PARTITION_KEY}=0')")
    return [int(value)]


def parse_clients(spec: str) -> list[int]:
    """"0-3,7" -> [0, 1, 2, 3, 7]: client ids and inclusive ranges, comma-separated."""
    out: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        lo, dash, hi = part.partition("-")
        ok = len(part) <= 20 and lo.isdecimal() and (hi.isdecimal() if dash else True)
        if not ok or (dash and not 0 <= int(hi) - int(lo) <= MAX_NODE_CLIENTS):
            raise DaliFlError(f"--node-config {CLIENTS_KEY}=\"{spec}\": {part!r} is not a client id or a range A-B "
                              "of them (e.g. \"0-9\" or \"0,3,7\")")
        out.update(range(int(lo), int(hi if dash else lo) + 1))
    return sorted(out)


def holding(clients: list[int]) -> str:
    """"the SuperNode holding client 1", "... holding clients 0,2", or a count for many, for a message."""
    if len(clients) == 1:
        return f"the SuperNode holding client {clients[0]}"
    shown = ",".join(map(str, clients)) if len(clients) <= 8 else f"{clients[0]} to {clients[-1]} ({len(clients)})"
    return f"the SuperNode holding clients {shown}"


def node_store(context: Context, run_store: str, manifest_sha256: str) -> str:
    """The store this node reads (its node-config `store`, else the run's), refused unless it is the run's."""
    store = str(context.node_config.get(STORE_KEY) or run_store)
    who = holding(node_clients(context))
    manifest = Path(store) / MANIFEST
    if not manifest.is_file():
        raise DaliFlError(f"{who} has no store at {store} (no {MANIFEST}); copy the run's store there or start the "
                          f"node with --node-config '{PARTITION_KEY}=N {STORE_KEY}=\"DIR\"'")
    if sha256(manifest) != manifest_sha256:
        raise DaliFlError(f"{who}: the store at {store} is not the run's (its {MANIFEST} differs from the server's); "
                          "give the node a copy of the store the run was started with")
    return store


def one_line(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """A refusal is the one `error:` line `dali-fl train` prints, in this node's log, and the reply's error reason.

    Replied rather than raised: Flower would log a traceback under the line and wrap the reason in its own text.
    """
    @functools.wraps(handler)
    def wrapped(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except DaliFlError as err:
            log.error("error: %s", err)
            return Message(error=Error(code=REFUSED, reason=str(err)), reply_to=message)
    return wrapped


def worker_config(cfg: TrainConfig) -> TrainConfig:
    """The config on this worker: Ray shows a worker only its own GPUs, so the server's cuda:N is its cuda:0."""
    device = torch.device(cfg.data.device)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count() > 0:
        return cfg.replace(data={"device": "cuda:0"})
    return cfg


@one_line
def handle_train(message: Message, context: Context) -> Message:
    """Train this node's client from the message's state; reply with its trainable tensors and metrics."""
    cfg, run_dir, round_, client = config_of(message.content)
    cfg = worker_config(cfg)
    if context.node_config.get(STORE_KEY):  # checked against the run's by the query every run starts with
        cfg = cfg.replace(data={"store": str(context.node_config[STORE_KEY])})
    if client not in node_clients(context):
        raise DaliFlError(f"round {round_}: {holding(node_clients(context))} was asked to train client {client}")
    fx = federation_for(cfg, run_dir)
    start = pad_like(from_record(message.content[ARRAYS], fx.device), trainable_state(fx.model))
    base = from_record(message.content[BASE], fx.device) if BASE in message.content else {}
    state, res, extra = train_client(fx, start, base, round_, client)
    extra.update({"pid": os.getpid(), "federations-built": _BUILT[cfg.to_json()]})
    sent = at_rank(state, fx.pairs, client_rank(fx, client))
    return Message(reply_content(sent, res, extra), reply_to=message)


@one_line
def handle_query(message: Message, context: Context) -> Message:
    """Tell the server which dali-fl clients this node holds, once its store is checked to be the run's."""
    asked = message.content[CONFIG]
    node_store(context, str(asked["store"]), str(asked["store-manifest-sha256"]))
    reply = RecordDict({CONFIG: ConfigRecord({"clients": node_clients(context), "pid": os.getpid()})})
    return Message(reply, reply_to=message)
