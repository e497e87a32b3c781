"""FedNova (Wang et al., 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization").

Clients that take more local steps move further, and FedAvg's mean then optimises a mixture of their
objectives weighted by step counts. FedNova normalises each client's update by its effective number of
local steps ‖a_i‖₁ and rescales the mean by the weighted τ_eff:

    d_i = (x − y_i) / ‖a_i‖₁,   τ_eff = Σ p_i ‖a_i‖₁,   x⁺ = x − τ_eff · Σ p_i d_i,   p_i = n_i / Σ n_j,

where for τ_i steps of SGD with momentum ρ, ‖a_i‖₁ = (τ_i − ρ(1 − ρ^τ_i)/(1 − ρ)) / (1 − ρ) (the paper's
momentum normaliser; τ_i for plain SGD). With equal τ_i and plain SGD this is FedAvg. The server adds
x − d_i weighted by n_i, and Σ n_i ‖a_i‖₁, to its running sums; both are reduced across processes and
the Flower server gets τ_i from each reply, so FedNova runs wherever FedAvg does.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dali_fl.algorithms.base import Algorithm, Contribution, ServerRound, State, option, refuse_together
from dali_fl.errors import DaliFlError

TAU = "fednova::tau"  # Σ n_i ‖a_i‖₁ over the round's clients


def effective_steps(steps: int, momentum: float) -> float:
    """‖a_i‖₁ for `steps` SGD steps with heavy-ball momentum ρ (Wang et al., 2020, section 4)."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho ** steps) / (1 - rho)) / (1 - rho)


@dataclass(frozen=True)
class FedNovaParams:
    fednova: bool = option(False, "FedNova: normalise each client's update by its effective local steps, "
                                  "rescale by their weighted mean (needs --optimizer sgd).")


class FedNova(Algorithm):
    """Normalised averaging (`--fednova`)."""

    name = "fednova"
    flag = "--fednova"
    Params = FedNovaParams
    scalars = (TAU,)

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.algorithms["fednova"].fednova

    @classmethod
    def refuse(cls, cfg) -> None:
        from dali_fl.algorithms import aggregation_of

        if cfg.local.optimizer != "sgd":
            raise DaliFlError("--fednova normalises by the effective steps of (momentum) SGD, which --optimizer "
                              f"{cfg.local.optimizer} does not take; add --optimizer sgd")
        agg = aggregation_of(cfg)
        if agg.needs_products or agg.one_process:
            raise DaliFlError(f"--fednova normalises the exchanged tensors only, not what --lora-agg {agg.name} "
                              "keeps or folds besides them; use --lora-agg fedit, ffa or zero-pad")
        if cfg.fed.mixed_ranks():
            raise DaliFlError("--fednova measures every update from the global state, which a lower-rank client's "
                              "truncated adapter is not; drop --lora-ranks or --fednova")
        refuse_together(cfg, cls, "fedprox", why="the normaliser here is the paper's for (momentum) SGD without a "
                        "proximal term; drop --prox-mu")
        refuse_together(cfg, cls, "dp", why="the clip bound would not hold after the normalisation; drop one")

    def __init__(self, fx):
        super().__init__(fx)
        self.tau_eff: dict[int, float] = {}  # round -> its τ_eff, for that round's metrics row alone

    @torch.no_grad()
    def contribute(self, c: Contribution, update, start: State, scalars: dict) -> Contribution:
        if update.result.num_samples == 0:  # no steps and weight 0: it adds nothing (p_i = 0 in the paper)
            return c
        if update.result.steps == 0:  # fp16's loss scaler skipped every step: τ_i = 0, so a_i = 0 and d_i = 0
            return dataclasses.replace(c, state={k: start[k].float() for k in c.state})
        a = effective_steps(update.result.steps, self.fx.cfg.local.momentum)  # the steps taken, not those skipped
        scalars[TAU] += c.weight * a
        state = {k: start[k].float() + (v.float() - start[k].float()) / a for k, v in c.state.items()}
        return dataclasses.replace(c, state=state)

    @torch.no_grad()
    def aggregate(self, r: ServerRound, mean: State, deltas: State, products: State) -> tuple[State, State]:
        if r.total == 0:  # no client with samples: the state stays where it started
            self.tau_eff = {}
            return mean, deltas
        tau = self.tau_eff = {r.round_: r.scalars[TAU] / r.total}
        return {k: r.start[k].float() + tau[r.round_] * (v - r.start[k].float()) for k, v in mean.items()}, deltas

    def metrics(self, round_: int) -> dict:
        return {"tau_eff": self.tau_eff.get(round_)}  # None in a round that aggregated nobody (the clock's, say)
