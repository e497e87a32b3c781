"""What crosses the wire, as Flower records: trainable tensors as ArrayRecords, round and client as a ConfigRecord.

Down (server to client): the global trainable state ("arrays"); the round, the client and the run's resolved
TrainConfig as JSON, about 2 kB, so that every client uses the config the server validated ("config"); and for
FedEx-LoRA the adapted layers' base weights ("base"), which its residual changes every round and a stateless
client cannot rebuild. Up: the client's trainable state ("arrays": LoRA A and B are B @ A's factors, all the
FedEx residual needs) and its sample count, loss and timings ("metrics"). With --lora-ranks a client of rank r
gets and sends only the first r components of each factor; the rest are zero on both sides.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from dali_fl.config import TrainConfig
from dali_fl.engine.local import ClientResult
from dali_fl.model.lora import LoraPair

ARRAYS, BASE, CONFIG, METRICS = "arrays", "base", "config", "metrics"


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors (on any device) as an ArrayRecord, exact in their dtype."""
    return ArrayRecord({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def at_rank(state: Mapping[str, torch.Tensor], pairs: Sequence[LoraPair], rank: Optional[int]) -> dict:
    """What a rank-`rank` client exchanges: the first `rank` components of each LoRA factor (None: everything)."""
    out = dict(state)
    if rank is None:
        return out
    for p in pairs:
        if p.a in out:  # FFA-LoRA's frozen A is not exchanged at all
            out[p.a] = out[p.a][:rank]
        if p.b in out:
            out[p.b] = out[p.b][:, :rank]
    return out


def pad_like(state: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero-pad factors cut by `at_rank` back to `like`'s shapes: a client's components beyond its rank are zero."""
    out = {}
    for name, value in state.items():
        ref = like[name]
        if value.shape != ref.shape:
            full = torch.zeros_like(ref)
            full[tuple(slice(0, n) for n in value.shape)] = value
            value = full
        out[name] = value
    return out


def config_of(content: RecordDict) -> tuple[TrainConfig, Path, int, int]:
    """(config, run directory, round, client) of a train instruction."""
    config = content[CONFIG]
    return (TrainConfig.from_json(str(config["train-config"])), Path(str(config["run-dir"])), int(config["round"]),
            int(config["client"]))


def from_record(record: ArrayRecord, device: torch.device) -> dict[str, torch.Tensor]:
    """An ArrayRecord's tensors on `device`."""
    return {k: v.to(device) for k, v in record.to_torch_state_dict().items()}


def train_content(state: ArrayRecord, base: ArrayRecord | None, round_: int, client: int, cfg: TrainConfig,
                  run_dir: Path) -> RecordDict:
    """The server's instruction: train `client` in `round_` of this run from this state (and these base weights)."""
    config = ConfigRecord({"round": round_, "client": client, "train-config": cfg.to_json(), "run-dir": str(run_dir)})
    records: dict = {ARRAYS: state, CONFIG: config}
    if base is not None:
        records[BASE] = base
    return RecordDict(records)


def reply_content(state: Mapping[str, torch.Tensor], res: ClientResult, extra: Mapping[str, float]) -> RecordDict:
    """The client's answer: its trained tensors, and its count (the aggregation weight), loss, timings and more."""
    metrics = {"num-examples": res.num_samples, "train-loss": res.loss, "data-wait-s": res.data_wait_s,
               "compute-s": res.compute_s, "steps": res.steps, "skipped-steps": res.skipped_steps, **extra}
    return RecordDict({ARRAYS: to_record(state), METRICS: MetricRecord(metrics)})


def num_bytes(content: RecordDict) -> int:
    """Bytes of the tensors in a message (Flower's own count: array data plus keys)."""
    return sum(r.count_bytes() for r in content.values() if isinstance(r, ArrayRecord))
