"""The seam between the engine and an algorithm: the hooks a round calls, each a no-op until overridden.

Modelled on pfl-research's algorithm classes (a client hook, a server hook, a frozen Params dataclass)
and on Flower's strategies. An algorithm is one file under `dali_fl/algorithms/` holding:

- `Params`: a frozen dataclass whose fields are its command-line options (declared with `option`, so
  `dali-fl train` and `dali-fl flower` make their click options from them), checked in `__post_init__`;
- `active(cfg)`: whether a run's config turns it on, `refuse(cfg)`: the combinations it cannot serve, and
  `settle(cfg)`: the options it derives from the others (DP's noise multiplier from --dp-epsilon);
- hooks, called by the engine on every active algorithm in registry order:

  client side (in the process that trains the client)
      `train_indices` → `start_client` → `local_terms` (per-step loss or gradient terms) → local training
      → `client_done`
  server side (every process)
      `sample` (the round's clients, from (seed, round) alone; the first active algorithm that draws them
      decides, else a fixed-size draw without replacement), then, after the round's one reduction,
      `contribute` per client (how its update is weighed and added) → `aggregate` (mean, FedEx residual,
      FLoRA stack, ...) → `privatize` (noise) → `server_step` (FedOpt) → `end_round`
  state
      `state_tensors` / `load_state_tensors` (in the checkpoint, under the algorithm's own prefix),
      `commit` (per-client tables, after the checkpoint), `files` (its files in the run directory),
      `metrics` (its columns of the round's row; those named in `summary_keys` go into summary.json from the
      last row), `evaluate` (its columns on evaluation rounds).

The engine (`dali_fl.engine`, `dali_fl.flower`) names no algorithm.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional, Sequence

import numpy as np
import torch

from dali_fl.errors import DaliFlError

if TYPE_CHECKING:
    from dali_fl.config import TrainConfig
    from dali_fl.engine.federation import ClientUpdate, Federation
    from dali_fl.engine.local import ClientResult

State = dict[str, torch.Tensor]


def option(default: Any, help: str, choices: Sequence[str] = (), aliases: Sequence[str] = (),
           type: Optional[type] = None) -> Any:
    """A Params field that is also a command-line option: its default, its --help text, its choices, and its type
    where the default (None) does not tell it."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices),
                                                        "aliases": tuple(aliases), "type": type})


@dataclass(frozen=True)
class NoParams:
    """An algorithm without options of its own (it is chosen by another option, e.g. --lora-agg)."""


@dataclass(frozen=True)
class Contribution:
    """What the server adds for one client: the state, its weight, and its drift ‖y_i − x‖."""

    state: State
    weight: float
    drift: float


class LocalTerm:
    """What an algorithm adds to every local step: a loss term, a gradient correction, or both."""

    corrects_grads: ClassVar[bool] = False  # the engine unscales gradients (AMP) only when one does

    def loss(self, params: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """A term added to the step's loss (FedProx's proximal term), or None."""
        return None

    def correct_(self, params: list[torch.Tensor]) -> None:
        """Change the gradients in place after backward (SCAFFOLD's correction)."""


@dataclass(frozen=True)
class ServerRound:
    """What the server hooks of one round see: its number, its clients' count, the round-start state."""

    round_: int
    num_clients: int
    start: Mapping[str, torch.Tensor]
    total: float  # the clients' summed weights
    scalars: Mapping[str, float]  # the round's summed scalars (see Algorithm.scalars), over all processes


@dataclass(frozen=True)
class AsyncPolicy:
    """Buffered asynchronous server steps: C clients in flight, K updates a step, weights by staleness."""

    concurrency: int
    buffer: int
    weight: Callable[[int], float]  # s(τ) for an update τ server steps stale


class Algorithm:
    """One algorithm: its options, refusals, hooks and state. Every hook defaults to plain FedAvg."""

    name: ClassVar[str]  # the registry's key, the checkpoint prefix, and the label of its runs
    flag: ClassVar[str]  # how users turn it on, for messages: "--scaffold", "--lora-agg shared-a"
    Params: ClassVar[type] = NoParams
    aggregation: ClassVar[bool] = False  # one of the mutually exclusive ways of turning the sum into a state
    one_process: ClassVar[bool] = False  # per-client state in one process's file: no --nproc, no Flower
    asynchronous: ClassVar[bool] = False  # replaces synchronous rounds by buffered asynchronous steps (async_policy)
    uniform_sample: ClassVar[bool] = False  # its guarantees rest on the round's clients being a uniform sample
    needs_products: ClassVar[bool] = False  # the running sum also adds each client's B @ A
    personal_start: ClassVar[bool] = False  # start_client loads the client's own tensors over the round's start
    scalars: ClassVar[tuple[str, ...]] = ()  # per-round sums it adds to (reduced across processes with the rest)
    files: ClassVar[tuple[str, ...]] = ()  # files it keeps in the run directory
    summary_keys: ClassVar[tuple[str, ...]] = ()  # its metrics columns that summary.json repeats from the last row
    # config.json written by an older dali-fl: the sections that then held its options, and what it ran with for
    # an option such a file lacks (read by `algorithms.saved_options`, so that old runs resume as they ran)
    saved_in: ClassVar[tuple[str, ...]] = ()
    saved_before: ClassVar[dict[str, Any]] = {}

    def __init__(self, fx: "Federation"):
        self.fx = fx
        self.params = params_of(fx.cfg, type(self))

    # ---- configuration -------------------------------------------------------------------------------------
    @classmethod
    def active(cls, cfg: "TrainConfig") -> bool:
        """Whether this run's config turns the algorithm on."""
        return False

    @classmethod
    def refuse(cls, cfg: "TrainConfig") -> None:
        """Raise DaliFlError, in one line, for a combination this algorithm cannot serve (called when active)."""

    @classmethod
    def settle(cls, cfg: "TrainConfig") -> "TrainConfig":
        """The config with the options this algorithm derives from the others filled in, before config.json is
        written (called once on a new run's options, after `refuse`; a resumed run keeps what was settled)."""
        return cfg

    @classmethod
    def label(cls, cfg: "TrainConfig") -> str:
        """The algorithm's part of a run directory's name."""
        return cls.name

    @classmethod
    def sample(cls, cfg: "TrainConfig", round_: int) -> Optional[np.ndarray]:
        """The round's clients (sorted ids, from (seed, round) alone: every process draws the same), or None to
        leave the draw to the next active algorithm or to the engine's fixed-size one."""
        return None

    def async_policy(self) -> Optional[AsyncPolicy]:
        """Buffered asynchronous server steps in place of synchronous rounds (FedBuff), or None."""
        return None

    # ---- client side ---------------------------------------------------------------------------------------
    def train_indices(self, client: int, indices: np.ndarray) -> np.ndarray:
        """The samples the client trains on (FedSA-LoRA holds a fifth out)."""
        return indices

    def start_client(self, client: int) -> None:
        """Load what the client keeps of its own into the model, after the round-start state."""

    def client_base(self, rank: int, start: State) -> State:
        """What the base weights sent to a client of `rank` carry besides the global ones (FedEx's D_r)."""
        return {}

    def kept_tensors(self) -> frozenset[str]:
        """Trainable tensors its clients keep and never send (FedSA-LoRA's B): not counted as uploaded."""
        return frozenset()

    def local_term(self, client: int, params: list[torch.Tensor]) -> Optional[LocalTerm]:
        """A term for every local step of `client`, made when its training starts, or None."""
        return None

    def client_done(self, client: int, start: State, state: State, result: "ClientResult") -> None:
        """After local training: keep what the client keeps (SCAFFOLD's variate, FedSA-LoRA's B)."""

    # ---- server side ---------------------------------------------------------------------------------------
    def contribute(self, c: Contribution, update: "ClientUpdate", start: State, scalars: dict[str, float]
                   ) -> Contribution:
        """How a client's update is weighed and added (DP clips it, FedNova normalises it)."""
        return c

    def aggregate(self, r: ServerRound, mean: State, deltas: State, products: State) -> tuple[State, State]:
        """(new exchanged state, deltas for the frozen base weights) from the clients' weighted mean."""
        return mean, deltas

    def privatize(self, r: ServerRound, mean: State) -> State:
        """Noise on the aggregate (DP)."""
        return mean

    def server_step(self, r: ServerRound, mean: State) -> State:
        """The server's step from the round-start state towards the aggregate (FedOpt)."""
        return mean

    def end_round(self, r: ServerRound) -> None:
        """After the new global state is in the model (FLoRA re-initialises adapters, SCAFFOLD updates c)."""

    def metrics(self, round_: int) -> dict:
        """This algorithm's columns of the round's metrics row."""
        return {}

    def evaluate(self) -> dict:
        """This algorithm's columns on evaluation rounds (FedSA-LoRA's personal accuracy)."""
        return {}

    # ---- state ---------------------------------------------------------------------------------------------
    def state_tensors(self) -> State:
        """What it keeps across rounds, for the checkpoint, each name prefixed with `name::`."""
        return {}

    def load_state_tensors(self, saved: Mapping[str, torch.Tensor], round_: int) -> None:
        """Restore its state from a checkpoint (all of the checkpoint's tensors are given)."""

    def commit(self) -> None:
        """Write the round's per-client rows into its files, once the checkpoint that holds them is on disk."""

    def close(self) -> None:
        """Release what it opened (loaders, files)."""


def params_of(cfg: "TrainConfig", cls: type[Algorithm]) -> Any:
    """The algorithm's Params in this config (its defaults when the config holds none)."""
    return cfg.algorithms.get(cls.name, cls.Params())


def refuse_together(cfg: "TrainConfig", cls: type[Algorithm], *others: str, why: str) -> None:
    """Refuse `cls` with any active algorithm named in `others`, in one line that says why."""
    from dali_fl.algorithms import REGISTRY

    for other in others:
        if REGISTRY[other].active(cfg):
            raise DaliFlError(f"{cls.flag} does not combine with {REGISTRY[other].flag}: {why}")


class Aggregation(Algorithm):
    """One way of turning the round's weighted sum into the new exchanged state; a run has exactly one.

    It is chosen by `--alg` (fedavg: the full model) and, for `--alg fedlora`, by `--lora-agg NAME`, where
    `aliases` are accepted too (paper names). The default aggregation is the weighted mean.
    """

    aggregation = True
    alg: ClassVar[str] = "fedlora"  # the --alg it serves
    aliases: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""  # what it does, in a few words, for `--lora-agg`'s help
    mixed_ranks: ClassVar[bool] = False  # defined for clients of different --lora-ranks
    rank_hint: ClassVar[str] = "it rests on one shared A and scale"  # why it needs one rank, when it does
    freezes_lora_a: ClassVar[bool] = False  # the model's LoRA A is frozen at its shared init

    @classmethod
    def active(cls, cfg: "TrainConfig") -> bool:
        return cfg.fed.aggregation == cls.name

    @classmethod
    def refuse(cls, cfg: "TrainConfig") -> None:
        if cfg.fed.mixed_ranks() and not cls.mixed_ranks:
            from dali_fl.algorithms import mixed_rank_aggregations

            raise DaliFlError(f"--lora-agg {cls.name} needs one rank for all clients ({cls.rank_hint}); for mixed "
                              f"ranks use {', '.join(mixed_rank_aggregations())}")

    @classmethod
    def label(cls, cfg: "TrainConfig") -> str:
        return cfg.fed.variant
