"""Server optimizers on the round's pseudo-gradient (Reddi et al., 2021, "Adaptive Federated Optimization";
FedAvgM: Hsu et al., 2019).

With Δ = mean of the clients' states − global state at the round's start, the new global state is
x + lr · d, where d is Δ (sgd), m ← β·m + Δ (momentum, FedAvgM), or, for the adaptive ones,
m ← β1·m + (1−β1)·Δ and d = m / (√v + τ) with v ← v + Δ² (adagrad), v ← β2·v + (1−β2)·Δ² (adam),
v ← v − (1−β2)·Δ²·sign(v − Δ²) (yogi); m starts at 0 and v at τ², as in the paper's Algorithm 2,
without bias correction. `none` takes the mean as it is (FedAvg); `sgd` with lr 1 equals it up to
float rounding. With FedEx-LoRA the optimizer steps the exchanged tensors; the residual goes into the
base weights unchanged.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Mapping

import torch

from dali_fl.algorithms.base import Algorithm, ServerRound, State, option
from dali_fl.checks import check_choice, check_numbers, flag
from dali_fl.errors import DaliFlError

PREFIX = "server::"  # the optimizer's moments travel in the checkpoint under this prefix
SERVER_OPTS = ("none", "sgd", "momentum", "adagrad", "adam", "yogi")
LABELS = {"sgd": "fedopt-sgd", "momentum": "fedavgm", "adagrad": "fedadagrad", "adam": "fedadam", "yogi": "fedyogi"}
USES = {"server_momentum": ("momentum",), "server_betas": ("adam", "yogi", "adagrad"),
        "server_tau": ("adam", "yogi", "adagrad")}


@dataclass(frozen=True)
class FedOptParams:
    server_opt: str = option("none", "Server step on the round's mean update (Reddi et al.); none: the mean is the "
                             "new model.", choices=SERVER_OPTS)
    server_lr: float = option(1.0, "Server learning rate.")
    server_momentum: float = option(0.9, "--server-opt momentum (FedAvgM): beta.")
    server_betas: tuple[float, float] = option((0.9, 0.99), "--server-opt adam/yogi: beta1 beta2; adagrad reads "
                                               "beta1 only.")
    server_tau: float = option(1e-3, "--server-opt adam/yogi/adagrad: adaptivity tau.")

    def __post_init__(self) -> None:
        check_choice(self.server_opt, SERVER_OPTS, "--server-opt")
        check_numbers(self, positive=("server_lr", "server_tau"))
        betas = tuple(self.server_betas)
        if len(betas) != 2 or not all(isinstance(b, numbers.Real) and 0 <= b < 1 for b in betas):
            raise DaliFlError(f"--server-betas needs two numbers in [0, 1) (got {self.server_betas!r})")
        object.__setattr__(self, "server_betas", tuple(float(b) for b in betas))  # JSON gives a list
        if not 0 <= self.server_momentum < 1:
            raise DaliFlError(f"--server-momentum must be in [0, 1) (got {self.server_momentum})")
        self._check_unused()

    def _check_unused(self) -> None:
        """An option set away from its default for an optimizer that ignores it is a mistake."""
        default = FedOptParams.__dataclass_fields__
        for name, opts in USES.items():
            if getattr(self, name) != default[name].default and self.server_opt not in opts:
                raise DaliFlError(f"{flag(name)} applies to --server-opt {'/'.join(opts)}, "
                                  f"not {self.server_opt}; add --server-opt {opts[0]} or drop it")
        beta2 = default["server_betas"].default[1]
        if self.server_opt == "adagrad" and self.server_betas[1] != beta2:  # v sums squares: no decay to set
            raise DaliFlError(f"--server-betas {' '.join(map(str, self.server_betas))}: --server-opt adagrad reads "
                              f"beta1 only; keep beta2 at {beta2} or use --server-opt adam/yogi")
        if self.server_lr != 1.0 and self.server_opt == "none":
            raise DaliFlError("--server-lr needs a server optimizer; add --server-opt sgd (or momentum, adam, ...)")


class FedOpt(Algorithm):
    """The server's optimizer state (first and second moments per exchanged tensor) and its step."""

    name = "fedopt"
    flag = "--server-opt"
    Params = FedOptParams
    saved_in = ("server",)

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.algorithms["fedopt"].server_opt != "none"

    @classmethod
    def label(cls, cfg) -> str:
        return LABELS[cfg.algorithms["fedopt"].server_opt]

    def __init__(self, fx):
        super().__init__(fx)
        self.m: State = {}
        self.v: State = {}

    @torch.no_grad()
    def server_step(self, r: ServerRound, mean: State) -> State:
        """The new global state from the round-start state and the clients' (weighted) mean."""
        if r.total <= 0 and all(torch.equal(mean[k].float(), x.float()) for k, x in r.start.items()):
            # No sample and no noise: no pseudo-gradient. Momentum would still move the model, which a round the
            # clock empties (and Flower's strategies, given no results) leave as it was; DP's noise is a step.
            return {k: x.float().clone() for k, x in r.start.items()}
        lr = self.params.server_lr
        out = {}
        for name, x in r.start.items():
            x32 = x.float()
            out[name] = x32 + lr * self._direction(name, mean[name].float() - x32)
        return out

    def _direction(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.server_opt == "sgd":
            return delta
        if p.server_opt == "momentum":
            m = self.m[name] = p.server_momentum * self.m.get(name, torch.zeros_like(delta)) + delta
            return m
        beta1, beta2 = p.server_betas
        m = self.m[name] = beta1 * self.m.get(name, torch.zeros_like(delta)) + (1 - beta1) * delta
        v = self.v.get(name, torch.full_like(delta, p.server_tau ** 2))
        sq = delta * delta
        if p.server_opt == "adagrad":
            v = v + sq
        elif p.server_opt == "adam":
            v = beta2 * v + (1 - beta2) * sq
        else:  # yogi: v moves towards Δ² additively, so it grows more slowly than adam's
            v = v - (1 - beta2) * sq * torch.sign(v - sq)
        self.v[name] = v
        return m / (v.sqrt() + p.server_tau)

    def state_tensors(self) -> State:
        """The moments, named for the checkpoint."""
        return {f"{PREFIX}{kind}::{name}": t.detach().to("cpu").contiguous()
                for kind, table in (("m", self.m), ("v", self.v)) for name, t in table.items()}

    def load_state_tensors(self, saved: Mapping[str, torch.Tensor], round_: int) -> None:
        """Restore the moments from checkpoint tensors (the keys state_tensors wrote)."""
        for key, t in saved.items():
            if key.startswith(PREFIX):
                kind, name = key[len(PREFIX):].split("::", 1)
                (self.m if kind == "m" else self.v)[name] = t.to(self.fx.device)
