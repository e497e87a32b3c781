"""A run's configuration: frozen dataclasses, one builder from flat options, presets.

Every caller (the CLI, the benchmarks, the tests) builds a `TrainConfig` through
`TrainConfig.from_options(flat, preset)`: defaults come from the dataclasses below, a preset
overrides them, and the options given explicitly override both. Aliases (`--model vit`, the
seed's `--model_variant`) and derived fields (LoRA on for FedLoRA, A frozen for FFA-LoRA) are
resolved there and nowhere else.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from dali_fl import algorithms
from dali_fl.checks import check_choice, check_ints, check_numbers, flag
from dali_fl.data.partition import METHODS as PARTITION_METHODS
from dali_fl.engine import clock
from dali_fl.engine.clock import ClockConfig
from dali_fl.errors import DaliFlError
from dali_fl.loaders import LOADER_KINDS, check_resize
from dali_fl.model.build import DEFAULT_LORA_TARGETS, MODEL_ALIASES, ModelSpec, parse_model_kwargs
from dali_fl.model.ranks import parse_ranks

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
    shards: int = 2
    seed: int = 0
    lora_agg: str = "fedit"
    lora_ranks: str = ""  # one rank per client: "2,4,8" cycled, or "uniform:2,4,8,16" drawn; "" = all --lora-r

    def __post_init__(self) -> None:
        check_choice(self.alg, ALGORITHMS, "--alg")
        check_choice(self.partition, PARTITION_METHODS, "--partition")
        check_choice(self.lora_agg, algorithms.lora_agg_choices(), "--lora-agg")
        check_ints(self, "rounds", "num_users", "min_size", "shards", "seed")
        check_numbers(self, positive=("rounds", "num_users", "alpha", "shards"),
                      non_negative=("min_size", "seed"))
        if not 0 < self.frac <= 1:
            raise DaliFlError(f"--frac {self.frac} must be in (0, 1]: the fraction of clients sampled per round")
        self._check_ranks()

    def _check_ranks(self) -> None:
        """--lora-ranks parses and applies (whether the aggregation takes mixed ranks is the aggregation's call)."""
        if self.client_ranks() is not None and self.alg != "fedlora":
            raise DaliFlError("--lora-ranks applies to --alg fedlora")

    def client_ranks(self) -> Optional[np.ndarray]:
        """Each client's LoRA rank, or None when all train at --lora-r."""
        return parse_ranks(self.lora_ranks, self.num_users, self.seed) if self.lora_ranks else None

    def mixed_ranks(self) -> bool:
        """Whether some client trains a lower rank than the model's (a truncated adapter)."""
        ranks = self.client_ranks()
        return ranks is not None and len(set(ranks.tolist())) > 1

    @property
    def clients_per_round(self) -> int:
        return max(1, int(round(self.frac * self.num_users)))

    @property
    def aggregation(self) -> str:
        """How a round's client states become the global state: fedavg, or the LoRA aggregation."""
        return self.lora_agg if self.alg == "fedlora" else "fedavg"

    @property
    def variant(self) -> str:
        """The algorithm as one name: fedavg, fedlora-fedit, fedlora-ffa or fedlora-fedex."""
        return "fedavg" if self.alg == "fedavg" else f"fedlora-{self.lora_agg}"


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
        check_ints(self, "local_ep", "local_bs")
        check_numbers(self, positive=("local_ep", "local_bs", "lr"),
                      non_negative=("momentum", "weight_decay"))
        if self.momentum >= 1:  # the velocity would grow without bound, as --server-momentum's would
            raise DaliFlError(f"--momentum must be in [0, 1) (got {self.momentum})")
        check_choice(self.optimizer, OPTIMIZERS, "--optimizer")


MAX_WORKERS = 256  # loader processes


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
    compile: bool = False  # torch.compile the model once per run (names and checkpoints are unchanged)
    resize_to: Optional[int] = None  # resize each batch to N x N on the device; None: the store's size

    def __post_init__(self) -> None:
        check_choice(self.loader, LOADER_KINDS, "--loader")
        check_choice(self.amp, AMP_MODES, "--amp")
        check_resize(self.loader, self.resize_to)
        check_ints(self, "eval_bs", "eval_every", "num_workers")
        check_numbers(self, positive=("eval_bs", "eval_every"), non_negative=("num_workers",))
        if self.num_workers > MAX_WORKERS:  # each is a process: 100,000 of them ran the machine out of memory
            raise DaliFlError(f"--num-workers {self.num_workers} is more than {MAX_WORKERS} loader processes; use "
                              "about one per free CPU core")


SECTIONS = {"fed": FederationConfig, "local": LocalConfig, "model": ModelSpec, "data": DataConfig,
            "clock": ClockConfig}  # the simulated clock's section lives in dali_fl/engine/clock.py
# Flat option names that differ from their field's name.
RENAMED = {"model": ("model", "name"), "model_kwargs": ("model", "kwargs")}
DERIVED = {("model", "lora"), ("model", "freeze_lora_a")}  # set from --alg / --lora-agg, never directly
SELECTORS = ("image_size",)  # preset keys that choose a store rather than configure the run


def option_fields() -> dict[str, tuple[str, str]]:
    """Flat option name -> (section, field) for every option a run can be configured with."""
    out = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if (section, f.name) not in DERIVED:
                out[f.name] = (section, f.name)
    for flat, where in RENAMED.items():
        del out[where[1]]
        out[flat] = where
    for flat, (alg, _) in algorithms.option_fields().items():
        out[flat] = ("algorithms", alg)  # each algorithm's own options, declared in its file
    return out


def option_defaults() -> dict[str, Any]:
    """Every option's default as the CLI spells it (kwargs and LoRA targets as text)."""
    out = {}
    for flat, (section, name) in option_fields().items():
        if section == "algorithms":
            f = algorithms.option_fields()[flat][1]
        else:
            f = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
        out[flat] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    out.update(model_kwargs="", lora_targets=",".join(DEFAULT_LORA_TARGETS))
    return out


# Options that one value of another option alone reads: set away from their default otherwise, they would be
# ignored while config.json records them, and the run would look as if they took effect. A Flower run config
# holds every option, so "set" means "not at its default" (--lora-ranks: FederationConfig refuses it). An
# algorithm's own options are its to refuse (Algorithm.refuse), as this module names no algorithm.
APPLIES_ONLY: dict[str, tuple[str, str]] = {
    **{lora: ("alg", "fedlora") for lora in ("lora_r", "lora_alpha", "lora_targets", "lora_agg")},
    "alpha": ("partition", "dirichlet"),
    "min_size": ("partition", "dirichlet"),
    "shards": ("partition", "shards"),
    "momentum": ("optimizer", "sgd"),
    "num_workers": ("loader", "memmap"),  # dali has no DataLoader; memmap-seed keeps the seed's own workers
}


def refuse_ignored_options(opts: Mapping[str, Any]) -> None:
    """Refuse an option set away from its default where the option it depends on makes the run ignore it."""
    defaults = option_defaults()
    for name, (gate, reads) in APPLIES_ONLY.items():
        value = opts.get(name)
        if isinstance(value, (tuple, list)):  # lora_targets from Python: the CLI's comma-separated text
            value = ",".join(map(str, value))
        if name in opts and gate in opts and value != defaults[name] and opts[gate] != reads:
            raise DaliFlError(f"{flag(name)} {value} applies to {flag(gate)} {reads}; {flag(gate)} {opts[gate]} "
                              f"ignores it, so drop it or use {flag(gate)} {reads}")


def merge_options(explicit: Mapping[str, Any], preset_name: Optional[str] = None) -> dict[str, Any]:
    """The preset's values, overridden by the explicit options: the one merge rule (defaults fill the rest)."""
    return {**preset(preset_name), **explicit}


def _model_spec(opts: Mapping[str, Any], fed: FederationConfig) -> ModelSpec:
    """The model section, with aliases resolved and LoRA derived from the algorithm."""
    pretrained = opts["pretrained"]
    if opts.get("model_variant") is not None:  # the seed's spelling of --pretrained/--no-pretrained
        if pretrained != option_defaults()["pretrained"] and pretrained != (opts["model_variant"] == "pretrained"):
            raise DaliFlError(f"model_variant {opts['model_variant']} and pretrained {pretrained} disagree (the "
                              "seed's spelling and dali-fl's of one choice); give one of them")
        pretrained = opts["model_variant"] == "pretrained"
    kwargs = opts["model_kwargs"]
    kwargs = parse_model_kwargs(kwargs) if isinstance(kwargs, str) else dict(kwargs)
    if "img_size" in kwargs:
        raise DaliFlError("--model-kwargs img_size is taken from the store (or --resize-to); prep the store at the "
                          "size you want or pass --resize-to N")
    if "num_classes" in kwargs:  # replaced by the store's, while config.json recorded it
        raise DaliFlError("--model-kwargs num_classes is taken from the store's classes; drop it")
    targets = opts["lora_targets"]
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    weights = opts["weights"]
    if weights not in (None, "") and not pretrained:  # random init would ignore them, and config.json name them
        raise DaliFlError(f"--weights {weights} is loaded only with --pretrained, and this run starts from random "
                          "weights (--no-pretrained, or its preset); add --pretrained, or drop --weights")
    return ModelSpec(name=MODEL_ALIASES.get(opts["model"], opts["model"]), kwargs=kwargs, pretrained=pretrained,
                     weights=None if weights is None else str(weights), lora=fed.alg == "fedlora",
                     lora_r=_model_rank(opts, fed), lora_alpha=opts["lora_alpha"], lora_targets=tuple(targets),
                     freeze_lora_a=algorithms.REGISTRY[fed.aggregation].freezes_lora_a)


def _model_rank(opts: Mapping[str, Any], fed: FederationConfig) -> int:
    """The persistent model's LoRA rank: --lora-r, or the largest of --lora-ranks (which overrides it)."""
    ranks = fed.client_ranks()
    if ranks is None:
        return opts["lora_r"]
    if opts["lora_r"] != option_defaults()["lora_r"]:  # config.json would name a rank no tensor has
        raise DaliFlError(f"--lora-r {opts['lora_r']} does nothing with --lora-ranks, whose largest rank "
                          f"({int(ranks.max())}) is the model's; drop --lora-r")
    return int(ranks.max())


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs, saved as the run directory's config.json."""

    fed: FederationConfig = field(default_factory=FederationConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    # Algorithm name -> its Params (dali_fl.algorithms), every algorithm at its defaults unless given.
    algorithms: dict = field(default_factory=lambda: algorithms.params_from({}))
    clock: ClockConfig = field(default_factory=ClockConfig)  # speeds, bandwidths, stragglers (engine/clock.py)

    @classmethod
    def from_options(cls, flat: Mapping[str, Any], preset: Optional[str] = None,
                     settle: bool = True) -> "TrainConfig":
        """Build and validate a config from flat option names (`rounds`, `lora_agg`, ...); `settle=False` leaves
        what the algorithms derive (a calibrated noise) as given, for a resume that keeps the saved values."""
        opts = {**option_defaults(), **merge_options(flat, preset)}
        fields = option_fields()
        unknown = sorted(set(opts) - set(fields) - set(SELECTORS) - {"model_variant"})
        if unknown:
            raise DaliFlError(f"unknown option {flag(unknown[0])}; known: {', '.join(sorted(fields))}")
        parts: dict[str, dict] = {s: {} for s in SECTIONS}
        for flat_name, (section, name) in fields.items():
            if section not in ("model", "algorithms"):
                parts[section][name] = opts[flat_name]
        parts["data"]["store"] = str(parts["data"]["store"])
        parts["fed"]["lora_agg"] = algorithms.resolve_lora_agg(parts["fed"]["lora_agg"])  # flora -> stack
        fed = FederationConfig(**parts["fed"])
        cfg = cls(fed, LocalConfig(**parts["local"]), _model_spec(opts, fed), DataConfig(**parts["data"]),
                  algorithms.params_from(opts), ClockConfig(**parts["clock"]))
        refuse_ignored_options(opts)  # after each value's own checks: a nan is named as such
        algorithms.refuse(cfg)  # each active algorithm's refusals of the combination, in one line
        clock.refuse(cfg)
        # derived options (a calibrated noise), saved in config.json as settled
        return algorithms.settle(cfg) if settle else cfg

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        doc = json.loads(text)
        model = dict(doc["model"], lora_targets=tuple(doc["model"]["lora_targets"]))
        # Older files kept some algorithms' options in "local": they are the algorithms' (saved_options).
        local = {k: v for k, v in doc["local"].items() if k not in algorithms.option_fields()}
        return cls(FederationConfig(**doc["fed"]), LocalConfig(**local), ModelSpec(**model),
                   DataConfig(**doc["data"]), algorithms.params_from(algorithms.saved_options(doc)),
                   ClockConfig(**doc.get("clock", {})))

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
    except DaliFlError as err:  # a value the options would refuse: say where it came from, not which flag
        raise DaliFlError(f"{path} holds a setting dali-fl refuses ({err}); restore the file or start a new "
                          "run") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DaliFlError(f"{path} is unreadable ({err!r}); it was not written by this dali-fl") from None


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
    """Option values of a preset; explicit options override them."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise DaliFlError(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
