"""The algorithms, one file each, and the registry the engine, the config and the CLI read them from.

Adding an algorithm: write its file (Params with `option` fields, `active`, `refuse`, the hooks it
needs; see `base.py`), add one line to REGISTRY below, and its test file under `tests/algorithms/`.
Its options then appear in `dali-fl train --help` and `dali-fl flower`, its Params in config.json,
and its hooks in every round, on one process, on several and on Flower.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from dali_fl.algorithms.base import Aggregation, Algorithm
from dali_fl.algorithms.dp import DP
from dali_fl.algorithms.fedavg import FedAvg
from dali_fl.algorithms.fedbuff import FedBuff
from dali_fl.algorithms.fedex import FedEx
from dali_fl.algorithms.fedit import FedIT
from dali_fl.algorithms.fednova import FedNova
from dali_fl.algorithms.fedopt import FedOpt
from dali_fl.algorithms.fedprox import FedProx
from dali_fl.algorithms.ffa import FFA
from dali_fl.algorithms.scaffold import Scaffold
from dali_fl.algorithms.shared_a import SharedA
from dali_fl.algorithms.stack import Stack
from dali_fl.algorithms.zero_pad import ZeroPad
from dali_fl.errors import DaliFlError

if TYPE_CHECKING:
    from dali_fl.config import TrainConfig
    from dali_fl.engine.federation import Federation

# Registry order is hook order: the aggregation first, then the client-side algorithms, then the server's.
REGISTRY: dict[str, type[Algorithm]] = {cls.name: cls for cls in (
    FedAvg, FedIT, FFA, FedEx, ZeroPad, Stack, SharedA,  # aggregations: exactly one per run
    FedProx, Scaffold, FedNova,  # local training and how updates are weighed
    FedBuff,  # asynchronous server steps in place of rounds
    FedOpt, DP,  # the server's step and privacy
)}


def aggregations(alg: str) -> list[type[Aggregation]]:
    """The aggregations that serve `--alg alg`, in registry order."""
    return [c for c in REGISTRY.values() if issubclass(c, Aggregation) and c.alg == alg]


def lora_agg_choices() -> tuple[str, ...]:
    """What --lora-agg accepts: every FedLoRA aggregation's name, then the paper names that alias them."""
    names = [c.name for c in aggregations("fedlora")]
    return (*names, *(a for c in aggregations("fedlora") for a in c.aliases))


def lora_agg_help() -> str:
    """`--lora-agg`'s help: each FedLoRA aggregation, its paper names, and what it does."""
    def entry(c: type[Aggregation]) -> str:
        return f"{c.name} ({', '.join(c.aliases)}): {c.summary}" if c.aliases else f"{c.name}: {c.summary}"

    return "; ".join(entry(c) for c in aggregations("fedlora")) + "."


def resolve_lora_agg(value: str) -> str:
    """The aggregation's own name for a name or an alias (flora -> stack); anything else as given."""
    return next((c.name for c in aggregations("fedlora") if value in c.aliases), value)


def mixed_rank_aggregations() -> list[str]:
    """The FedLoRA aggregations defined for clients of different ranks."""
    return [c.name for c in aggregations("fedlora") if c.mixed_ranks]


def aggregation_of(cfg: "TrainConfig") -> type[Aggregation]:
    """The run's aggregation."""
    return next(c for c in REGISTRY.values() if issubclass(c, Aggregation) and c.active(cfg))


def active_classes(cfg: "TrainConfig") -> list[type[Algorithm]]:
    """The algorithms this config turns on, in hook order."""
    return [c for c in REGISTRY.values() if c.active(cfg)]


def refuse(cfg: "TrainConfig") -> None:
    """Each active algorithm's refusals of this config, in registry order (one line, before any training)."""
    for cls in active_classes(cfg):
        cls.refuse(cfg)


def settle(cfg: "TrainConfig") -> "TrainConfig":
    """The config with what each active algorithm derives from the other options filled in, in registry order."""
    for cls in active_classes(cfg):
        cfg = cls.settle(cfg)
    return cfg


def summary_keys(cfg: "TrainConfig") -> tuple[str, ...]:
    """The metrics columns of the active algorithms that summary.json repeats from the last round."""
    return tuple(k for cls in active_classes(cfg) for k in cls.summary_keys)


def refuse_one_process(cfg: "TrainConfig", where: str, instead: str) -> None:
    """Refuse the algorithms that keep per-client state in one process's file where that cannot hold."""
    held = [c.flag for c in active_classes(cfg) if c.one_process]
    if held:
        raise DaliFlError(f"{' and '.join(held)} keep{'s' if len(held) == 1 else ''} per-client state in one "
                          f"process's file; {where}; {instead}")


def build(fx: "Federation") -> list[Algorithm]:
    """The run's algorithm objects, in hook order."""
    return [cls(fx) for cls in active_classes(fx.cfg)]


def run_label(cfg: "TrainConfig") -> str:
    """What ran, for a run directory's name: fedavg, fedavg-scaffold, fedlora-fedex-fedadam-dp, ..."""
    return "-".join(c.label(cfg) for c in active_classes(cfg))


def option_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat option name -> (algorithm, Params field) for every algorithm's options."""
    return {f.name: (name, f) for name, cls in REGISTRY.items() for f in dataclasses.fields(cls.Params)}


def saved_options(doc: dict) -> dict:
    """Every algorithm's flat options in a config.json of any dali-fl version: its own section, the sections that
    held its options before it had one, and for an option an older file lacks, what that run used."""
    flat: dict = {}
    for name, cls in REGISTRY.items():
        defaults = {f.name: f.default for f in dataclasses.fields(cls.Params)}
        found = {k: v for section in cls.saved_in for k, v in doc.get(section, {}).items() if k in defaults}
        found.update(doc.get("algorithms", {}).get(name, {}))
        # Older files wrote every algorithm's fields, used or not; what the algorithm did then is no setting of a
        # run that left them all at their defaults (JSON keeps no tuples: lists are compared as tuples).
        used = any((tuple(v) if isinstance(v, list) else v) != defaults.get(k) for k, v in found.items())
        flat.update({**(cls.saved_before if used else {}), **found})
    return flat


def params_from(opts: dict) -> dict:
    """Each algorithm's Params from flat options (missing ones at their defaults); validated on creation."""
    out = {}
    for name, cls in REGISTRY.items():
        fields = [f.name for f in dataclasses.fields(cls.Params)]
        if fields:
            out[name] = cls.Params(**{k: opts[k] for k in fields if k in opts})
    return out
