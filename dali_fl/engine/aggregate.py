"""The server's running weighted sum on the device, and the reference mean the aggregations are checked against."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from dali_fl.model.lora import LoraPair

State = dict[str, torch.Tensor]


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """Reference FedAvg: sum_i w_i x_i / sum_i w_i, per tensor (Flower's `aggregate`)."""
    total = float(sum(weights))
    return {k: sum(w * s[k].double() for s, w in zip(states, weights)) / total for k in states[0]}


class RunningSum:
    """n-weighted sum of client states, kept on the device; plus sum of n * B @ A when an aggregation needs it."""

    def __init__(self, pairs: Sequence[LoraPair] = (), like: Mapping[str, torch.Tensor] | None = None,
                 scalars: Sequence[str] = ()):
        self.pairs = tuple(pairs)
        self.sums: State = {}
        self.products: State = {}
        self.scalars = {name: 0.0 for name in scalars}  # per-round sums an algorithm adds to
        self.total = 0.0
        if like is not None:  # zeros of every shape, so a process with no clients still reduces alike
            self.sums = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in like.items()}
            self.products = {p.base: like[p.b].new_zeros((like[p.b].shape[0], like[p.a].shape[1]),
                                                         dtype=torch.float32) for p in self.pairs}

    @torch.no_grad()
    def add(self, state: Mapping[str, torch.Tensor], num_samples: int, product_scale: float = 1.0) -> None:
        """Add one client's trainable tensors, weighted by its sample count.

        `product_scale` (a client's LoRA scale over the model's) weighs its B @ A, so that mixed
        ranks, each at scale alpha / r, sum to their exact effective weights.
        """
        for name, value in state.items():
            if name in self.sums:
                self.sums[name].add_(value.float(), alpha=float(num_samples))
            else:
                self.sums[name] = value.float() * float(num_samples)
        for p in self.pairs:
            ba = state[p.b].float() @ state[p.a].float()
            if p.base in self.products:
                self.products[p.base].add_(ba, alpha=float(num_samples) * product_scale)
            else:
                self.products[p.base] = ba * (float(num_samples) * product_scale)
        self.total += float(num_samples)

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sums as one flat tensor, and the scalars and total as a float64 one: what processes all_reduce.

        Counts stay float64: in float32 a total of 16,777,217 samples sums to 16,777,216.
        """
        parts = [t.reshape(-1) for t in (*self.sums.values(), *self.products.values())]
        device = parts[0].device if parts else "cpu"
        flat = torch.cat(parts) if parts else torch.zeros(0, device=device)
        return flat, torch.tensor([*self.scalars.values(), self.total], dtype=torch.float64, device=device)

    def load_flat(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        """Inverse of flat(): overwrite the sums, scalars and total from reduced tensors."""
        offset = 0
        for table in (self.sums, self.products):
            for name, t in table.items():
                table[name] = flat[offset:offset + t.numel()].view_as(t).clone()
                offset += t.numel()
        *scalars, total = counts.tolist()
        self.scalars = dict(zip(self.scalars, scalars))
        self.total = total


@torch.no_grad()
def update_norm(state: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> float:
    """‖y − x‖ over all tensors together (one device sync): a client's drift, or the norm an update is clipped by."""
    squares = torch.stack([(state[k].float() - start[k].float()).pow(2).sum() for k in start])
    return float(squares.sum().sqrt())


def mean_of(running: RunningSum) -> State:
    """The weighted mean of every exchanged tensor (every aggregation without its own step ends here)."""
    if running.total <= 0:
        raise ValueError("no samples were aggregated this round")
    return {k: v / running.total for k, v in running.sums.items()}
