"""FedSA-LoRA (Guo et al., 2025): A is shared and aggregated, B stays with its client between rounds.

Each client's B lives in `RUN/client_b.f32` (journaled through the checkpoint like SCAFFOLD's
variates, so a resume is exact) and is loaded over the global B when the client trains. Each
client holds out a seeded fifth of its samples; the personalized accuracy is measured there, with
the client's own B, beside the global model's accuracy on the test split.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from dali_fl.config import derive_seed
from dali_fl.engine.aggregate import LoraPair
from dali_fl.engine.client_table import ClientTable
from dali_fl.engine.local import evaluate

PREFIX = "shared_a::"
FILE = "client_b.f32"
HOLDOUT = 0.2  # the share of each client's samples kept for its personalized evaluation
HOLDOUT_STREAM = 19


class SharedA:
    """The clients' own B matrices (a journaled table) and their held-out samples."""

    def __init__(self, run_dir: Path, clients: Sequence[np.ndarray], model: nn.Module, pairs: Sequence[LoraPair],
                 seed: int):
        params = dict(model.named_parameters())
        self.names = [p.b for p in pairs]
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        self.table = ClientTable(Path(run_dir) / FILE, len(clients), sum(self.sizes), "clients' own LoRA B",
                                 "use fewer --num-users or a smaller --lora-r")
        self.train, self.holdout = zip(*(_split(idx, derive_seed(seed, c, HOLDOUT_STREAM))
                                         for c, idx in enumerate(clients)))

    @torch.no_grad()
    def load_b_(self, model: nn.Module, client: int) -> None:
        """Put the client's own B (zero before its first round, as LoRA starts) into the model."""
        params = dict(model.named_parameters())
        row = self.table.row(client)
        for name, part, shape in zip(self.names, row.split(self.sizes), self.shapes):
            params[name].copy_(part.view(shape))

    def keep_b(self, client: int, state: Mapping[str, torch.Tensor]) -> None:
        """Journal the client's trained B."""
        self.table.put(client, torch.cat([state[n].detach().float().reshape(-1).cpu() for n in self.names]))

    @torch.no_grad()
    def accuracy(self, model: nn.Module, loader, amp: Optional[torch.dtype], device: torch.device) -> float:
        """Accuracy over every client's held-out samples, each with its own B; the global B is put back."""
        params = dict(model.named_parameters())
        global_b = {n: params[n].detach().clone() for n in self.names}
        correct = total = 0
        for client, idx in enumerate(self.holdout):
            self.load_b_(model, client)
            got, _ = evaluate(model, loader, idx, amp, device)
            correct, total = correct + got, total + len(idx)
        for name, value in global_b.items():
            params[name].copy_(value)
        return correct / max(total, 1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.table.state_tensors(PREFIX)

    def commit(self) -> None:
        self.table.commit()

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], round_: int) -> None:
        self.table.load_rows(tensors, PREFIX, round_)


def _split(indices: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held out): a seeded fifth of the client's samples, at least one when it has two or more."""
    held = math.ceil(HOLDOUT * len(indices)) if len(indices) > 1 else 0
    order = np.random.default_rng(seed).permutation(len(indices))
    return np.sort(indices[order[held:]]), np.sort(indices[order[:held]])
