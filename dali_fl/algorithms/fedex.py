"""FedEx-LoRA (Singhal et al., 2024, "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning").

A and B are averaged, and the residual scale * (sum_i p_i B_i A_i - mean(B) mean(A)) is folded into the
frozen base weights, so the global effective weights are exactly the clients' weighted average. With
mixed ranks each client's product is weighed by its own scale (alpha / r_i), which keeps it exact.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from dali_fl.algorithms.base import Aggregation, ServerRound, State
from dali_fl.model.lora import LoraPair


def fedex_base_deltas(mean: Mapping, mean_products: Mapping, pairs: Sequence[LoraPair]) -> State:
    """FedEx-LoRA residual per layer: scale * (sum_i p_i B_i A_i - mean(B) mean(A))."""
    return {p.base: p.scale * (mean_products[p.base] - mean[p.b] @ mean[p.a]) for p in pairs}


class FedEx(Aggregation):
    """Average A and B, fold the exact residual into the base weights (`--lora-agg fedex`)."""

    name = "fedex"
    summary = "average + exact residual"  # its line in `--lora-agg`'s help
    flag = "--lora-agg fedex"
    mixed_ranks = True
    needs_products = True

    def aggregate(self, r: ServerRound, mean: State, deltas: State, products: State) -> tuple[State, State]:
        return mean, {**deltas, **fedex_base_deltas(mean, products, self.fx.pairs)}
