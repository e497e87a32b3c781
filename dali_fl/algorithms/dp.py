"""Client-level differential privacy: DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private
Recurrent Language Models").

Each sampled client's update Δ_i = y_i − x is clipped to L2 norm C over all trainable tensors, the
clipped updates are averaged with equal weights (a client's sample count would leak through
weighting), and Gaussian noise of standard deviation z·C/m is added to the mean of the m clients
(z·C on their sum). ε at δ after r rounds comes from Opacus's RDP accountant for the subsampled
Gaussian mechanism, with sampling rate m/N.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from dali_fl.algorithms.base import Algorithm, Contribution, ServerRound, option
from dali_fl.checks import check_numbers
from dali_fl.engine.aggregate import State, update_norm
from dali_fl.errors import DaliFlError
from dali_fl.seeds import NOISE, derive_seed


@torch.no_grad()
def clip_update(state: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
                clip: float) -> tuple[State, float]:
    """start + Δ·min(1, C/‖Δ‖) over all tensors together, and ‖Δ‖ before clipping."""
    norm = update_norm(state, start)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: start[k].float() + (state[k].float() - start[k].float()) * factor for k in state}, norm


@torch.no_grad()
def add_noise_(mean: State, clip: float, noise: float, num_clients: int, seed: int, round_: int) -> None:
    """Add N(0, (z·C/m)²) to every tensor of the clients' mean, in place, from a (seed, round) stream."""
    if noise <= 0:
        return
    gen = torch.Generator().manual_seed(derive_seed(seed, round_, NOISE))
    std = noise * clip / num_clients
    for name in sorted(mean):  # a fixed order: the same draws on every run, process and resume
        t = mean[name]
        mean[name] = t + std * torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.device)


def accountant_class() -> type:
    """Opacus's RDP accountant, or a DaliFlError when opacus is missing (checked before a run starts)."""
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:  # a declared dependency, but a hand-made environment may lack it
        raise DaliFlError("--dp-noise reports ε through Opacus's RDP accountant, and opacus is not installed; "
                          "pip install opacus (or drop --dp-noise)") from None
    return RDPAccountant


def epsilon(noise: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε after `rounds` rounds of the subsampled Gaussian mechanism (Opacus RDP accountant); inf without noise."""
    if noise <= 0:
        return math.inf
    accountant = accountant_class()()
    accountant.history = [(noise, sample_rate, rounds)]  # every round is the same mechanism
    return float(accountant.get_epsilon(delta))


@dataclass(frozen=True)
class DPParams:
    dp_clip: float = option(0.0, "DP-FedAvg: clip each client's update to this L2 norm (0: off); clients weigh "
                            "equally.")
    dp_noise: float = option(0.0, "DP-FedAvg: Gaussian noise multiplier z (std z*clip on the sum); epsilon is "
                             "reported.")
    dp_delta: float = option(1e-5, "DP-FedAvg: delta for epsilon.")

    def __post_init__(self) -> None:
        check_numbers(self, non_negative=("dp_clip", "dp_noise"))
        if not 0 < self.dp_delta < 1:
            raise DaliFlError(f"--dp-delta must be in (0, 1) (got {self.dp_delta})")
        default = DPParams.__dataclass_fields__["dp_delta"].default
        if self.dp_clip == 0 and (self.dp_noise > 0 or self.dp_delta != default):
            raise DaliFlError("--dp-noise and --dp-delta need --dp-clip C > 0 (the L2 bound of each client's update)")


class DP(Algorithm):
    """Clip every client's update, weigh clients equally, noise the mean (`--dp-clip C --dp-noise z`)."""

    name = "dp"
    flag = "--dp-clip"
    Params = DPParams
    uniform_sample = True  # ε's sampling rate m/N assumes every client is equally likely to count

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.algorithms["dp"].dp_clip > 0

    @classmethod
    def refuse(cls, cfg) -> None:
        from dali_fl.algorithms import aggregation_of

        agg = aggregation_of(cfg)
        if agg.needs_products:
            raise DaliFlError(f"--dp-clip does not combine with --lora-agg {agg.name} (what it folds into the base "
                              "weights is not clipped); use --lora-agg fedit, ffa or zero-pad")
        if cfg.fed.lora_ranks:
            raise DaliFlError("--dp-clip bounds updates from the global state, which a lower-rank client's truncated "
                              "adapter is not; drop --lora-ranks or --dp-clip")
        if cfg.algorithms["dp"].dp_noise > 0:
            accountant_class()  # ε is reported every round: refuse now rather than after the first one

    def contribute(self, c: Contribution, update, start: State, scalars: dict) -> Contribution:
        # Equal weights: a client's sample count must not scale its (bounded) influence.
        state, _ = clip_update(c.state, start, self.params.dp_clip)
        return dataclasses.replace(c, state=state, weight=1, drift=update_norm(state, start))

    def privatize(self, r: ServerRound, mean: State) -> State:
        p = self.params
        add_noise_(mean, p.dp_clip, p.dp_noise, r.num_clients, self.fx.cfg.fed.seed, r.round_)
        return mean

    def metrics(self, round_: int) -> dict:
        return {"dp_epsilon": privacy_spent(self.fx.cfg, round_)}


def privacy_spent(cfg, rounds: int) -> Optional[float]:
    """ε at --dp-delta after `rounds` rounds of DP-FedAvg with this run's sampling rate; None without noise."""
    fed, p = cfg.fed, cfg.algorithms["dp"]
    eps = epsilon(p.dp_noise, fed.clients_per_round / fed.num_users, rounds, p.dp_delta)
    return eps if math.isfinite(eps) else None
