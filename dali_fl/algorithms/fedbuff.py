"""FedBuff (Nguyen et al., 2022, "Federated Learning with Buffered Asynchronous Aggregation").

The server keeps C clients training at once, each from the model version it was sent. Whenever one
finishes (in simulated time, `dali_fl/engine/clock.py`), its update Δ_i = y_i − x_{v_i} joins a buffer
and a new client is sent the current model. Once K updates are in the buffer, the server applies

    x ← x + Σ p_i s(τ_i) Δ_i,   p_i = n_i / Σ n_j,   τ_i = (server steps so far) − v_i,

through the same server step as synchronous rounds (so `--server-opt` steps along it), and empties the
buffer. The staleness weights s(τ) are the paper's (section 3): constant 1, polynomial (1 + τ)^−a, and
hinge: 1 for τ ≤ b, else 1 / (a(τ − b) + 1). The event loop is the engine's (`engine/asynchronous.py`);
this file holds the options, the weights and the combinations FedBuff refuses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from dali_fl.algorithms.base import Algorithm, AsyncPolicy, option
from dali_fl.checks import check_ints, check_numbers
from dali_fl.errors import DaliFlError

STALENESS_HELP = "constant | poly:a | hinge:a,b"


def staleness_weight(spec: str) -> Callable[[int], float]:
    """s(τ) of a staleness spec: constant, poly:a ((1 + τ)^-a) or hinge:a,b (1 up to b, then 1/(a(τ-b)+1))."""
    kind, _, args = spec.strip().partition(":")
    try:
        values = [float(x) for x in args.split(",")] if args else []
    except ValueError:
        values = None
    ok = values is not None and all(math.isfinite(v) and v >= 0 for v in values)
    if kind == "constant" and ok and not values:
        return lambda tau: 1.0
    if kind == "poly" and ok and len(values) == 1 and values[0] > 0:
        a = values[0]
        return lambda tau: (1.0 + tau) ** -a
    if kind == "hinge" and ok and len(values) == 2 and values[0] > 0:
        a, b = values
        return lambda tau: 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise DaliFlError(f"--staleness {spec!r} does not parse; use {STALENESS_HELP} (a > 0, b >= 0), e.g. poly:0.5")


@dataclass(frozen=True)
class FedBuffParams:
    async_: bool = option(False, "FedBuff: buffered asynchronous server steps on the simulated clock (a metrics "
                                 "row per server step).")
    concurrency: int = option(0, "--async: clients training at once (0: --frac x --num-users).")
    buffer: int = option(0, "--async: updates per server step (0: half the concurrency, at least 1).")
    staleness: str = option("poly:0.5", f"--async: staleness weight s(tau): {STALENESS_HELP}.")

    def __post_init__(self) -> None:
        check_ints(self, "concurrency", "buffer")
        check_numbers(self, non_negative=("concurrency", "buffer"))
        staleness_weight(self.staleness)
        default = FedBuffParams.__dataclass_fields__
        changed = [n for n in ("concurrency", "buffer", "staleness") if getattr(self, n) != default[n].default]
        if changed and not self.async_:
            raise DaliFlError(f"--{changed[0]} applies to asynchronous rounds; add --async")

    def resolved(self, clients_per_round: int) -> tuple[int, int]:
        """(C, K) with the defaults filled in."""
        c = self.concurrency or clients_per_round
        return c, self.buffer or max(1, c // 2)


class FedBuff(Algorithm):
    """Buffered asynchronous aggregation (`--async --concurrency C --buffer K --staleness ...`)."""

    name = "fedbuff"
    flag = "--async"
    Params = FedBuffParams
    asynchronous = True

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.algorithms["fedbuff"].async_

    @classmethod
    def refuse(cls, cfg) -> None:
        from dali_fl.algorithms import active_classes, aggregation_of

        c, k = cfg.algorithms["fedbuff"].resolved(cfg.fed.clients_per_round)
        if k > c:
            raise DaliFlError(f"--buffer {k} is larger than --concurrency {c}: a server step would wait for more "
                              "updates than clients in flight")
        if c > cfg.fed.num_users:
            raise DaliFlError(f"--concurrency {c} is larger than the federation's {cfg.fed.num_users} clients")
        clock = cfg.clock
        if clock.deadline > 0 or clock.over_select > 1:
            raise DaliFlError("--deadline and --over-select shape synchronous rounds; --async has no rounds to cut")
        agg = aggregation_of(cfg)
        if agg.needs_products:
            raise DaliFlError(f"--async does not combine with --lora-agg {agg.name}: what it folds into the base "
                              "weights changes the model that clients in flight started from; use fedit or ffa")
        for other in active_classes(cfg):
            if other.uniform_sample:
                raise DaliFlError(f"--async does not combine with {other.flag}: its accountant assumes a uniform "
                                  "sample of m clients per step, which asynchronous dispatch is not")
            if other.one_process and other is not cls:
                raise DaliFlError(f"--async does not combine with {other.flag}: its per-client state is written per "
                                  "synchronous round")

    def async_policy(self) -> Optional[AsyncPolicy]:
        c, k = self.params.resolved(self.fx.cfg.fed.clients_per_round)
        return AsyncPolicy(c, k, staleness_weight(self.params.staleness))
