"""Client-level differential privacy: DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private
Recurrent Language Models").

Each sampled client's update Δ_i = y_i − x is clipped to L2 norm C over all trainable tensors, the
clipped updates are averaged with equal weights (a client's sample count would leak through
weighting), and Gaussian noise of standard deviation z·C/m is added to the mean of the m clients
(z·C on their sum). ε at δ after r rounds comes from Opacus's RDP accountant for the subsampled
Gaussian mechanism, with sampling rate m/N.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from dali_fl.config import derive_seed
from dali_fl.engine.aggregate import State, update_norm
from dali_fl.errors import DaliFlError

NOISE_STREAM = 11  # keeps the noise stream apart from sampling (7) and the clients' streams


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
    gen = torch.Generator().manual_seed(derive_seed(seed, round_, NOISE_STREAM))
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
