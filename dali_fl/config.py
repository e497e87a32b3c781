"""A training run's resolved configuration: small frozen dataclasses, JSON in and out, presets."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from dali_fl.errors import DaliFlError
from dali_fl.model import ModelSpec

ALGORITHMS = ("fedavg", "fedlora")
OPTIMIZERS = ("adamw", "adam", "sgd")
AMP_MODES = ("bf16", "fp16", "off", "auto")


@dataclass(frozen=True)
class FederationConfig:
    """Who trains when: rounds, clients, sampling, partition, aggregation."""

    alg: str = "fedavg"
    rounds: int = 10
    num_users: int = 100
    frac: float = 0.1
    partition: str = "dirichlet"
    alpha: float = 0.5
    min_size: int = 10
    seed: int = 0
    lora_agg: str = "fedit"

    def __post_init__(self) -> None:
        if self.alg not in ALGORITHMS:
            raise DaliFlError(f"--alg {self.alg!r}: choose one of {', '.join(ALGORITHMS)}")
        if self.rounds < 1 or self.num_users < 1:
            raise DaliFlError(f"--rounds and --num-users must be >= 1 (got {self.rounds}, {self.num_users})")
        if not 0 < self.frac <= 1 or not math.isfinite(self.frac):
            raise DaliFlError(f"--frac {self.frac} must be in (0, 1]: the fraction of clients sampled per round")

    @property
    def clients_per_round(self) -> int:
        return max(1, int(round(self.frac * self.num_users)))


@dataclass(frozen=True)
class LocalConfig:
    """What each client does: local epochs, batch size, optimizer."""

    local_ep: int = 1
    local_bs: int = 32
    lr: float = 3e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.local_ep < 1 or self.local_bs < 1:
            raise DaliFlError(f"--local-ep and --local-bs must be >= 1 (got {self.local_ep}, {self.local_bs})")
        if not self.lr > 0:
            raise DaliFlError(f"--lr must be > 0 (got {self.lr})")
        if self.optimizer not in OPTIMIZERS:
            raise DaliFlError(f"--optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")


@dataclass(frozen=True)
class DataConfig:
    """Where data comes from and where it goes: store, loader kind, device, precision, evaluation."""

    store: str = ""
    loader: str = "dali"
    data_on_gpu: bool = False
    augment: bool = True
    device: str = "cpu"
    amp: str = "auto"
    eval_bs: int = 256
    eval_every: int = 1
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise DaliFlError(f"--amp {self.amp!r}: choose one of {', '.join(AMP_MODES)}")
        if self.eval_bs < 1 or self.eval_every < 1:
            raise DaliFlError("--eval-bs and --eval-every must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs, saved as the run directory's config.json."""

    fed: FederationConfig = field(default_factory=FederationConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        doc = json.loads(text)
        model = dict(doc["model"], lora_targets=tuple(doc["model"]["lora_targets"]))
        return cls(FederationConfig(**doc["fed"]), LocalConfig(**doc["local"]), ModelSpec(**model),
                   DataConfig(**doc["data"]))

    def replace(self, **parts) -> "TrainConfig":
        """Copy with some fields of the sub-configs replaced, e.g. replace(fed={'rounds': 4})."""
        return dataclasses.replace(self, **{k: dataclasses.replace(getattr(self, k), **v) for k, v in parts.items()})


def load_config(run_dir: Path) -> TrainConfig:
    """Read a run directory's config.json, or say that it is not a run."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DaliFlError(f"{run_dir} is not a dali-fl run (no config.json); start one with `dali-fl train --out DIR`")
    try:
        return TrainConfig.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as err:
        raise DaliFlError(f"{path} is unreadable ({err!r}); it was not written by this dali-fl") from None


def derive_seed(*parts: int) -> int:
    """An independent 32-bit seed for each (run seed, round, client, epoch) tuple."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# Presets: the seed's run scripts, and the small configuration of `make demo` and the tests.
_SEED = dict(rounds=150, num_users=100, frac=0.1, local_ep=5, local_bs=32, lr=3e-4, image_size=224,
             model="vit_base_patch16_224", pretrained=True, partition="dirichlet", alpha=0.5)
PRESETS: dict[str, dict] = {
    "fedavg-vit-b16": dict(_SEED, alg="fedavg"),
    "fedlora-vit-b16": dict(_SEED, alg="fedlora"),
    # Patch 8 at 32 px: 16 tokens, so a round of the demo takes seconds on a 2-core CPU.
    "tiny-32": dict(model="vit_tiny_patch16_224", model_kwargs="patch_size=8,depth=4,embed_dim=96,num_heads=3",
                    pretrained=False, rounds=6, num_users=10, frac=0.5, local_ep=2, local_bs=32, lr=1e-3,
                    partition="iid", eval_bs=500),
}


def preset(name: Optional[str]) -> dict:
    """Option values of a preset; explicit command-line flags override them."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise DaliFlError(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
