"""FedEx-LoRA (Singhal et al., 2024, "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning").

A and B are averaged, and the residual scale * (sum_i p_i B_i A_i - mean(B) mean(A)) is folded into the
frozen base weights, so the global effective weights are exactly the clients' weighted average. With
mixed ranks each client's product is weighed by its own scale (alpha / r_i), which keeps the average exact;
and since a rank-r client's truncated adapter at scale alpha / r is not the global one, the base weights it
is sent carry the difference D_r = s·B@A − (alpha / r)·B[:, :r]@A[:r], so that it starts from the global
effective weights too, and sum_r p_r D_r joins the residual.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from dali_fl.algorithms.base import Aggregation, Contribution, ServerRound, State
from dali_fl.model.lora import LoraPair

WEIGHT = "fedex_weight::"  # + a rank: the round's summed weight of the clients of that rank (a scalar)


def fedex_base_deltas(mean: Mapping, mean_products: Mapping, pairs: Sequence[LoraPair]) -> State:
    """FedEx-LoRA residual per layer: scale * (sum_i p_i B_i A_i - mean(B) mean(A))."""
    return {p.base: p.scale * (mean_products[p.base] - mean[p.b] @ mean[p.a]) for p in pairs}


@torch.no_grad()
def rank_gap(state: Mapping[str, torch.Tensor], pairs: Sequence[LoraPair], rank: int, alpha: float) -> State:
    """D_r per layer: the global effective weights less those of the rank-r truncation at scale alpha / r."""
    return {p.base: p.scale * state[p.b].float() @ state[p.a].float()
            - (alpha / rank) * state[p.b][:, :rank].float() @ state[p.a][:rank].float() for p in pairs}


class FedEx(Aggregation):
    """Average A and B, fold the exact residual into the base weights (`--lora-agg fedex`)."""

    name = "fedex"
    summary = "average + exact residual"  # its line in `--lora-agg`'s help
    flag = "--lora-agg fedex"
    mixed_ranks = True
    needs_products = True

    def __init__(self, fx):
        super().__init__(fx)
        fed = fx.cfg.fed
        self.ranks = sorted(set(fed.client_ranks().tolist())) if fed.mixed_ranks() else []
        self.scalars = tuple(f"{WEIGHT}{r}" for r in self.ranks)

    def _rank(self, product_scale: float) -> int:
        return round(self.fx.cfg.model.lora_r / product_scale)  # product_scale = (alpha / r) / (alpha / R)

    def client_base(self, rank: int, start: State) -> State:
        """D_r for a lower-rank client, from the round's full-rank factors."""
        if not self.ranks or rank == self.fx.cfg.model.lora_r:
            return {}
        return rank_gap(start, self.fx.pairs, rank, self.fx.cfg.model.lora_alpha)

    def contribute(self, c: Contribution, update, start: State, scalars: dict) -> Contribution:
        if self.ranks:
            scalars[f"{WEIGHT}{self._rank(update.product_scale)}"] += c.weight
        return c

    def aggregate(self, r: ServerRound, mean: State, deltas: State, products: State) -> tuple[State, State]:
        deltas = {**deltas, **fedex_base_deltas(mean, products, self.fx.pairs)}
        for rank in self.ranks:  # the D_r each rank's clients trained on, by their share of the weight
            share = r.scalars[f"{WEIGHT}{rank}"] / r.total if r.total > 0 else 0.0
            for name, d in (self.client_base(rank, r.start) if share else {}).items():
                deltas[name] = deltas[name] + share * d
        return mean, deltas
