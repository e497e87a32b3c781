"""FLoRA (Wang et al., 2024, "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations").

Stacking the clients' factors gives B_stack @ A_stack = sum_i p_i s_i B_i A_i, the exact weighted sum of
their updates at their own scales, which is folded whole into the base weights. Every client then starts
the next round from a freshly initialised adapter, seeded per round.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from dali_fl.algorithms.base import Aggregation, ServerRound, State, refuse_together
from dali_fl.model.lora import LoraPair
from dali_fl.seeds import STACK, derive_seed


def stack_base_deltas(mean_products: Mapping, pairs: Sequence[LoraPair]) -> State:
    """FLoRA: B_stack @ A_stack = sum_i p_i s_i B_i A_i, folded whole into the base weights."""
    return {p.base: p.scale * mean_products[p.base] for p in pairs}


@torch.no_grad()
def reinit_adapters_(model: nn.Module, pairs: Sequence[LoraPair], seed: int) -> None:
    """A fresh adapter (FLoRA's next round): A as peft initialises it, from a seeded stream; B = 0."""
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    for p in pairs:
        a = torch.empty(params[p.a].shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)  # peft's default init of lora_A
        params[p.a].copy_(a)
        params[p.b].zero_()


class Stack(Aggregation):
    """Fold the exact stacked product into the base weights, restart the adapters (`--lora-agg stack`, `flora`)."""

    name = "stack"
    summary = "fold the exact product"  # its line in `--lora-agg`'s help
    flag = "--lora-agg stack"
    aliases = ("flora",)
    mixed_ranks = True
    needs_products = True

    @classmethod
    def refuse(cls, cfg) -> None:
        super().refuse(cfg)
        refuse_together(cfg, cls, "fedopt", why="it re-initialises the adapters every round, so a server "
                        "optimizer would only step the head; drop --server-opt")
        refuse_together(cfg, cls, "scaffold", why="it re-initialises the adapters every round, so the control "
                        "variates would correct adapters that no longer exist; drop --scaffold")

    def aggregate(self, r: ServerRound, mean: State, deltas: State, products: State) -> tuple[State, State]:
        return mean, {**deltas, **stack_base_deltas(products, self.fx.pairs)}

    def end_round(self, r: ServerRound) -> None:
        reinit_adapters_(self.fx.model, self.fx.pairs, derive_seed(self.fx.cfg.fed.seed, r.round_, STACK))
