"""SCAFFOLD (Karimireddy et al., 2020), option II, over the trainable tensors.

Client i corrects every local gradient by c − c_i. After K local steps at learning rate η from x to
y_i it sets c_i⁺ = c_i − c + (x − y_i)/(K·η), and the server adds (1/N)·Σ_{i∈S}(c_i⁺ − c_i) to c.
The N client variates live in `RUN/scaffold_clients.f32`, journaled through the checkpoint
(dali_fl.engine.client_table).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from dali_fl.engine.client_table import ClientTable
from dali_fl.errors import DaliFlError

PREFIX = "scaffold::"
FILE = "scaffold_clients.f32"


class Scaffold:
    """Server variate c on the device and the clients' variates c_i in a journaled per-client table."""

    def __init__(self, run_dir: Path, num_users: int, like: Mapping[str, torch.Tensor], lr: float):
        self.names = list(like)
        self.shapes = [like[n].shape for n in self.names]
        self.sizes = [like[n].numel() for n in self.names]
        self.lr = lr
        self.num_users = num_users
        device = next(iter(like.values())).device
        self.c = torch.zeros(sum(self.sizes), device=device)
        self.table = ClientTable(Path(run_dir) / FILE, num_users, len(self.c), "SCAFFOLD's client variates",
                                 "use --alg fedlora or fewer --num-users")
        self.delta_sum = torch.zeros_like(self.c)

    def _flat(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[n].detach().float().reshape(-1) for n in self.names])

    def correction(self, client: int) -> list[torch.Tensor]:
        """c − c_i, one tensor per trainable parameter (in the model's parameter order)."""
        diff = self.c - self.table.row(client).to(self.c.device)
        return [t.view(shape) for t, shape in zip(diff.split(self.sizes), self.shapes)]

    @torch.no_grad()
    def client_done(self, client: int, start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
                    steps: int) -> None:
        """Option II: c_i⁺ = c_i − c + (x − y_i)/(K·η); journal the row and add c_i⁺ − c_i to the round's sum."""
        old = self.table.row(client).to(self.c.device)
        new = old - self.c + (self._flat(start) - self._flat(trained)) / (max(steps, 1) * self.lr)
        self.delta_sum += new - old
        self.table.put(client, new)

    def finish_round(self) -> None:
        """c ← c + (1/N)·Σ_{i∈S}(c_i⁺ − c_i)."""
        self.c += self.delta_sum / self.num_users
        self.delta_sum.zero_()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """c and the round's new client rows, for the checkpoint."""
        return {f"{PREFIX}c": self.c.to("cpu").contiguous(), **self.table.state_tensors(PREFIX)}

    def commit(self) -> None:
        self.table.commit()

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], round_: int) -> None:
        """Restore c and the checkpoint's client rows."""
        self.table.load_rows(tensors, PREFIX, round_)
        if f"{PREFIX}c" not in tensors or tensors[f"{PREFIX}c"].shape != self.c.shape:
            raise DaliFlError("the checkpoint holds no SCAFFOLD state for this model; it does not belong to this run")
        self.c.copy_(tensors[f"{PREFIX}c"])
