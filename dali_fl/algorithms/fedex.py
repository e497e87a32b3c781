"""FedEx-LoRA (Singhal et al., 2024, "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning").

A and B are averaged, and the residual scale * (sum_i p_i B_i A_i - mean(B) mean(A)) is folded into the
frozen base weights, so the global effective weights are exactly the clients' weighted average. With
mixed ranks each client's product is weighed by its own scale (alpha / r_i), which keeps the average exact;
and since a rank-r client's truncated adapter at scale alpha / r is not the global one, its base weights
carry the difference D_r = s·B@A − (alpha / r)·B[:, :r]@A[:r] while it trains, so that it starts from the
global effective weights too, and sum_r p_r D_r joins the residual.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

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
        self.base: Optional[State] = None  # a lower-rank client's base weights, while they carry D_r

    def _rank(self, product_scale: float) -> int:
        return round(self.fx.cfg.model.lora_r / product_scale)  # product_scale = (alpha / r) / (alpha / R)

    @torch.no_grad()
    def start_client(self, client: int) -> None:
        """A lower-rank client's base weights get D_r, from the global factors before they are truncated."""
        rank = int(self.fx.ranks[client]) if self.ranks else self.fx.cfg.model.lora_r
        if rank == self.fx.cfg.model.lora_r:
            return
        params = dict(self.fx.model.named_parameters())
        gap = rank_gap(params, self.fx.pairs, rank, self.fx.cfg.model.lora_alpha)
        self.base = {name: params[name].detach().clone() for name in gap}
        for name, d in gap.items():
            params[name].add_(d.to(params[name].dtype))

    @torch.no_grad()
    def client_done(self, client: int, start: State, state: State, result) -> None:
        """Give the base weights back as they were (a copy, so not even rounding stays behind)."""
        if self.base is not None:
            params = dict(self.fx.model.named_parameters())
            for name, value in self.base.items():
                params[name].copy_(value)
            self.base = None

    def contribute(self, c: Contribution, update, start: State, scalars: dict) -> Contribution:
        if self.ranks:
            scalars[f"{WEIGHT}{self._rank(update.product_scale)}"] += c.weight
        return c

    def aggregate(self, r: ServerRound, mean: State, deltas: State, products: State) -> tuple[State, State]:
        deltas = {**deltas, **fedex_base_deltas(mean, products, self.fx.pairs)}
        for rank in self.ranks:
            weight = r.scalars[f"{WEIGHT}{rank}"]
            if rank != self.fx.cfg.model.lora_r and weight > 0:  # the D_r its clients trained on, by their share
                gap = rank_gap(r.start, self.fx.pairs, rank, self.fx.cfg.model.lora_alpha)
                deltas = {k: v + (weight / r.total) * gap[k] if k in gap else v for k, v in deltas.items()}
        return mean, deltas
