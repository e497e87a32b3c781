"""SCAFFOLD (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning"),
option II, over the trainable tensors.

Client i corrects every local gradient by c − c_i. After K local steps at learning rate η from x to
y_i it sets c_i⁺ = c_i − c + (x − y_i)/(K·η), and the server adds (1/N)·Σ_{i∈S}(c_i⁺ − c_i) to c.
Option II's variate is the mean gradient only for plain SGD steps, so momentum and adaptive optimizers
are refused. The model average is dali-fl's: weighted by sample counts, where the paper takes a uniform
mean over the sampled clients (README). The N client variates live in `RUN/scaffold_clients.f32`,
journaled through the checkpoint (dali_fl.engine.client_table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from dali_fl.algorithms.base import Algorithm, LocalTerm, ServerRound, State, option, refuse_together
from dali_fl.engine.client_table import ClientTable
from dali_fl.errors import DaliFlError
from dali_fl.model.build import trainable_state

PREFIX = "scaffold::"


class Correction(LocalTerm):
    """c − c_i added to every gradient (after AMP's unscale: it is in gradient units)."""

    corrects_grads = True

    def __init__(self, diff: list[torch.Tensor]):
        self.diff = diff

    def correct_(self, params: list[torch.Tensor]) -> None:
        for p, c in zip(params, self.diff):
            p.grad.add_(c.to(p.grad.dtype))


@dataclass(frozen=True)
class ScaffoldParams:
    scaffold: bool = option(False, "SCAFFOLD control variates (option II; needs --optimizer sgd --momentum 0; "
                                   "one process).")


class Scaffold(Algorithm):
    """Server variate c on the device and the clients' variates c_i in a journaled per-client table."""

    name = "scaffold"
    flag = "--scaffold"
    Params = ScaffoldParams
    saved_in = ("local",)
    one_process = True
    files = ("scaffold_clients.f32",)

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.algorithms["scaffold"].scaffold

    @classmethod
    def refuse(cls, cfg) -> None:
        if cfg.local.optimizer != "sgd":
            raise DaliFlError("--scaffold updates its control variates from plain SGD steps (option II); "
                              "add --optimizer sgd --momentum 0")
        if cfg.local.momentum != 0:
            raise DaliFlError(f"--scaffold's option-II variate (x − y_i)/(K·η) is the mean gradient only for plain "
                              f"SGD steps, and --momentum {cfg.local.momentum} makes them heavy-ball; add --momentum 0")
        if cfg.fed.mixed_ranks():
            raise DaliFlError("--scaffold's corrections would train the components a lower-rank client leaves out; "
                              "drop --lora-ranks or --scaffold")
        refuse_together(cfg, cls, "dp", why="its control variates are built from the clients' unclipped, un-noised "
                        "states and feed every later round, which the reported ε does not cover")
        # With a proximal term every step also pulls by mu·(y_k − x), so (x − y_i)/(K·η) is no longer the mean
        # gradient of the client's loss: the variate would carry the pull into every later round's correction.
        refuse_together(cfg, cls, "fedprox", why="option II's variate (x − y_i)/(K·η) would take in the proximal "
                        "pull as if it were the client's gradient; drop --prox-mu or --scaffold")

    def __init__(self, fx):
        super().__init__(fx)
        like = trainable_state(fx.model)
        self.names = list(like)
        self.shapes = [like[n].shape for n in self.names]
        self.sizes = [like[n].numel() for n in self.names]
        self.lr = fx.cfg.local.lr
        self.num_users = fx.cfg.fed.num_users
        self.c = torch.zeros(sum(self.sizes), device=fx.device)
        self.table = ClientTable(fx.run_dir / self.files[0], self.num_users, len(self.c),
                                 "SCAFFOLD's client variates", "use --alg fedlora or fewer --num-users")
        self.delta_sum = torch.zeros_like(self.c)

    def _flat(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[n].detach().float().reshape(-1) for n in self.names])

    def local_term(self, client: int, params: list[torch.Tensor]) -> Optional[LocalTerm]:
        """c − c_i, one tensor per trainable parameter (in the model's parameter order)."""
        diff = self.c - self.table.row(client).to(self.c.device)
        return Correction([t.view(shape) for t, shape in zip(diff.split(self.sizes), self.shapes)])

    @torch.no_grad()
    def client_done(self, client: int, start: State, state: State, result) -> None:
        """Option II: c_i⁺ = c_i − c + (x − y_i)/(K·η); journal the row and add c_i⁺ − c_i to the round's sum."""
        if result.steps == 0:  # no step taken (no samples, or fp16 skipped them all): c_i⁺ = c_i
            return
        old = self.table.row(client).to(self.c.device)
        new = old - self.c + (self._flat(start) - self._flat(state)) / (result.steps * self.lr)
        self.delta_sum += new - old
        self.table.put(client, new)

    def end_round(self, r: ServerRound) -> None:
        """c ← c + (1/N)·Σ_{i∈S}(c_i⁺ − c_i)."""
        self.c += self.delta_sum / self.num_users
        self.delta_sum.zero_()

    def state_tensors(self) -> State:
        """c and the round's new client rows, for the checkpoint."""
        return {f"{PREFIX}c": self.c.to("cpu").contiguous(), **self.table.state_tensors(PREFIX)}

    def commit(self) -> None:
        self.table.commit()

    def load_state_tensors(self, saved: Mapping[str, torch.Tensor], round_: int) -> None:
        """Restore c and the checkpoint's client rows."""
        self.table.load_rows(saved, PREFIX, round_)
        if f"{PREFIX}c" not in saved or saved[f"{PREFIX}c"].shape != self.c.shape:
            raise DaliFlError("the checkpoint holds no SCAFFOLD state for this model; it does not belong to this run")
        self.c.copy_(saved[f"{PREFIX}c"])
