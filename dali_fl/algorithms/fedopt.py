"""Server optimizers on the round's pseudo-gradient (Reddi et al., 2021, "Adaptive Federated Optimization").

With Δ = mean of the clients' states − global state at the round's start, the new global state is
x + lr · d, where d is Δ (sgd), m ← β·m + Δ (momentum, FedAvgM), or, for the adaptive ones,
m ← β1·m + (1−β1)·Δ and d = m / (√v + τ) with v ← v + Δ² (adagrad), v ← β2·v + (1−β2)·Δ² (adam),
v ← v − (1−β2)·Δ²·sign(v − Δ²) (yogi); m starts at 0 and v at τ², as in the paper's Algorithm 2,
without bias correction. `none` takes the mean as it is (FedAvg); `sgd` with lr 1 equals it up to
float rounding.
"""
from __future__ import annotations

from typing import Mapping

import torch

from dali_fl.config import ServerConfig
from dali_fl.engine.aggregate import State

PREFIX = "server::"  # the optimizer's moments travel in the checkpoint under this prefix


class ServerOptimizer:
    """The server's optimizer state (first and second moments per trainable tensor) and its step."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.m: State = {}
        self.v: State = {}

    @torch.no_grad()
    def step(self, current: Mapping[str, torch.Tensor], mean: State) -> State:
        """The new global state from the round-start state and the clients' (weighted) mean."""
        if self.cfg.server_opt == "none":
            return mean
        out = {}
        for name, x in current.items():
            x32 = x.float()
            out[name] = x32 + self.cfg.server_lr * self._direction(name, mean[name].float() - x32)
        return out

    def _direction(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        cfg, opt = self.cfg, self.cfg.server_opt
        if opt == "sgd":
            return delta
        if opt == "momentum":
            m = self.m[name] = cfg.server_momentum * self.m.get(name, torch.zeros_like(delta)) + delta
            return m
        beta1, beta2 = cfg.server_betas
        m = self.m[name] = beta1 * self.m.get(name, torch.zeros_like(delta)) + (1 - beta1) * delta
        v = self.v.get(name, torch.full_like(delta, cfg.server_tau ** 2))
        sq = delta * delta
        if opt == "adagrad":
            v = v + sq
        elif opt == "adam":
            v = beta2 * v + (1 - beta2) * sq
        else:  # yogi: v moves towards Δ² additively, so it grows more slowly than adam's
            v = v - (1 - beta2) * sq * torch.sign(v - sq)
        self.v[name] = v
        return m / (v.sqrt() + cfg.server_tau)

    def state_tensors(self) -> State:
        """The moments, named for the checkpoint."""
        return {f"{PREFIX}{kind}::{name}": t.detach().to("cpu").contiguous()
                for kind, table in (("m", self.m), ("v", self.v)) for name, t in table.items()}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], device: torch.device) -> None:
        """Restore the moments from checkpoint tensors (the keys state_tensors wrote)."""
        for key, t in tensors.items():
            kind, name = key[len(PREFIX):].split("::", 1)
            (self.m if kind == "m" else self.v)[name] = t.to(device)
