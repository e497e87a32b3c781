"""SCAFFOLD (Karimireddy et al., 2020), option II, over the trainable tensors.

Client i corrects every local gradient by c − c_i. After K local steps at learning rate η from x to
y_i it sets c_i⁺ = c_i − c + (x − y_i)/(K·η), and the server adds (1/N)·Σ_{i∈S}(c_i⁺ − c_i) to c.

The N client variates live in one float32 file in the run directory (`scaffold_clients.f32`, N rows
of D trainable values, sparse until clients are sampled). A round's new rows are kept in memory,
saved inside the round's checkpoint, and only then written to the file; a resume writes the
checkpoint's rows again, so the file always matches the checkpoint, even after a kill mid-round.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from dali_fl.errors import DaliFlError

log = logging.getLogger(__name__)

PREFIX = "scaffold::"
FILE = "scaffold_clients.f32"


class Scaffold:
    """Server variate c on the device, client variates c_i in a memory-mapped file, one round's new rows."""

    def __init__(self, run_dir: Path, num_users: int, like: Mapping[str, torch.Tensor], lr: float):
        self.names = list(like)
        self.shapes = [like[n].shape for n in self.names]
        self.sizes = [like[n].numel() for n in self.names]
        self.num_users, self.lr = num_users, lr
        device = next(iter(like.values())).device
        self.c = torch.zeros(sum(self.sizes), device=device)
        self.path = Path(run_dir) / FILE
        self.created = not self.path.exists()
        self.table = self._open(self.path)
        self.rows: dict[int, torch.Tensor] = {}  # this round's new c_i, on the CPU
        self.delta_sum = torch.zeros_like(self.c)

    def _open(self, path: Path) -> np.memmap:
        need = self.num_users * len(self.c) * 4
        if path.exists():
            if path.stat().st_size != need:
                raise DaliFlError(f"{path} holds {path.stat().st_size} bytes but this run's {self.num_users} "
                                  f"clients x {len(self.c)} trainable values need {need}; it is not this run's file")
            return np.memmap(path, np.float32, "r+", shape=(self.num_users, len(self.c)))
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if need > free:
            raise DaliFlError(f"SCAFFOLD keeps one control variate per client: {self.num_users} clients x "
                              f"{len(self.c):,} trainable values x 4 bytes = {need / 2**30:.1f} GiB, more than the "
                              f"{free / 2**30:.1f} GiB free in {path.parent}; use --alg fedlora or fewer --num-users")
        with open(path, "wb") as f:
            f.truncate(need)  # sparse: zeros until a client is sampled
        return np.memmap(path, np.float32, "r+", shape=(self.num_users, len(self.c)))

    def _flat(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[n].detach().float().reshape(-1) for n in self.names])

    def correction(self, client: int) -> list[torch.Tensor]:
        """c − c_i, one tensor per trainable parameter (in the model's parameter order)."""
        diff = self.c - torch.from_numpy(np.array(self.table[client])).to(self.c.device)
        return [t.view(shape) for t, shape in zip(diff.split(self.sizes), self.shapes)]

    @torch.no_grad()
    def client_done(self, client: int, start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
                    steps: int) -> None:
        """Option II: c_i⁺ = c_i − c + (x − y_i)/(K·η); remember the row and add c_i⁺ − c_i to the round's sum."""
        old = torch.from_numpy(np.array(self.table[client])).to(self.c.device)
        new = old - self.c + (self._flat(start) - self._flat(trained)) / (max(steps, 1) * self.lr)
        self.delta_sum += new - old
        self.rows[client] = new.to("cpu")

    def finish_round(self) -> None:
        """c ← c + (1/N)·Σ_{i∈S}(c_i⁺ − c_i)."""
        self.c += self.delta_sum / self.num_users
        self.delta_sum.zero_()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """c and the round's new client rows, for the checkpoint."""
        out = {f"{PREFIX}c": self.c.to("cpu").contiguous()}
        if self.rows:
            ids = sorted(self.rows)
            out[f"{PREFIX}clients"] = torch.tensor(ids, dtype=torch.int64)
            out[f"{PREFIX}rows"] = torch.stack([self.rows[i] for i in ids]).contiguous()
        return out

    def commit(self) -> None:
        """Write the round's rows into the file (after the checkpoint holding them is on disk)."""
        for client, row in self.rows.items():
            self.table[client] = row.numpy()
        self.table.flush()
        self.rows = {}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], round_: int) -> None:
        """Restore c and re-write the checkpoint's rows (idempotent), so the file matches the checkpoint."""
        if self.created and round_ > 1:  # the checkpoint holds only its own round's rows
            raise DaliFlError(f"{self.path} is missing: the client variates of rounds before {round_} are lost, "
                              "so this SCAFFOLD run cannot be resumed exactly; start a new run")
        if f"{PREFIX}c" not in tensors or tensors[f"{PREFIX}c"].shape != self.c.shape:
            raise DaliFlError("the checkpoint holds no SCAFFOLD state for this model; it does not belong to this run")
        self.c.copy_(tensors[f"{PREFIX}c"])
        if f"{PREFIX}clients" in tensors:
            self.rows = dict(zip(tensors[f"{PREFIX}clients"].tolist(), tensors[f"{PREFIX}rows"]))
            self.commit()
