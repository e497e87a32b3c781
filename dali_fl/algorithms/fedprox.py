"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks").

Every local step adds (mu/2)·‖w − w_round_start‖² over the trainable tensors to the loss, which keeps a
client near the round's global state. mu = 0 is FedAvg, bitwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dali_fl.algorithms.base import Algorithm, LocalTerm, option
from dali_fl.checks import check_numbers


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """(mu/2) * sum ||w - w_round_start||^2 over the trainable tensors."""
    return 0.5 * mu * sum((p.float() - a.float()).pow(2).sum() for p, a in zip(params, anchor))


class ProximalTerm(LocalTerm):
    """The proximal term around the state the client started from."""

    def __init__(self, params: list[torch.Tensor], mu: float):
        self.anchor = [p.detach().clone() for p in params]
        self.mu = mu

    def loss(self, params: list[torch.Tensor]) -> Optional[torch.Tensor]:
        return proximal_term(params, self.anchor, self.mu)


@dataclass(frozen=True)
class FedProxParams:
    prox_mu: float = option(0.0, "FedProx: (mu/2)||w - w_round_start||^2 in every local step; 0 is FedAvg.")

    def __post_init__(self) -> None:
        check_numbers(self, non_negative=("prox_mu",))


class FedProx(Algorithm):
    """A proximal term in every local step (`--prox-mu MU`)."""

    name = "fedprox"
    flag = "--prox-mu"
    Params = FedProxParams
    saved_in = ("local",)

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.algorithms["fedprox"].prox_mu > 0

    def local_term(self, client: int, params: list[torch.Tensor]) -> Optional[LocalTerm]:
        return ProximalTerm(params, self.params.prox_mu)
