"""FedSA-LoRA (Guo et al., 2025, "Selective Aggregation for Low-Rank Adaptation in Federated Learning"):
A is shared and aggregated, B stays with its client between rounds.

Each client's B lives in `RUN/client_b.f32` (journaled through the checkpoint like SCAFFOLD's
variates, so a resume is exact) and is loaded over the global B when the client trains. Each
client holds out a seeded fifth of its samples; the personalized accuracy is measured there, with
the client's own B, beside the global model's accuracy on the test split (which uses the mean B).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from dali_fl.algorithms.base import Aggregation, State
from dali_fl.engine.client_table import ClientTable
from dali_fl.engine.local import evaluate
from dali_fl.seeds import HOLDOUT as HOLDOUT_STREAM
from dali_fl.seeds import derive_seed

PREFIX = "shared_a::"
HOLDOUT = 0.2  # the share of each client's samples kept for its personalized evaluation


class SharedA(Aggregation):
    """The clients' own B matrices (a journaled table) and their held-out samples (`--lora-agg shared-a`)."""

    name = "shared-a"
    summary = "average A, each client keeps its B (personal_acc is reported)"  # its line in `--lora-agg`'s help
    flag = "--lora-agg shared-a"
    aliases = ("fedsa",)
    one_process = True
    personal_start = True  # each client trains from its own B
    files = ("client_b.f32",)

    def __init__(self, fx):
        super().__init__(fx)
        params = dict(fx.model.named_parameters())
        self.names = [p.b for p in fx.pairs]
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        clients = fx.partition.clients
        self.table = ClientTable(fx.run_dir / self.files[0], len(clients), sum(self.sizes), "clients' own LoRA B",
                                 "use fewer --num-users or a smaller --lora-r")
        self.train, self.holdout = zip(*(_split(idx, derive_seed(fx.cfg.fed.seed, c, HOLDOUT_STREAM))
                                         for c, idx in enumerate(clients)))
        # The train split, unaugmented, for the personal accuracy on each client's held-out samples.
        self.loader = fx.make_loader("train", fx.cfg.data.eval_bs, augment=False)

    def kept_tensors(self) -> frozenset[str]:
        """B stays with its client: only A (and the head) travel. The simulator still averages B, for test_acc."""
        return frozenset(self.names)

    def train_indices(self, client: int, indices: np.ndarray) -> np.ndarray:
        return self.train[client]

    @torch.no_grad()
    def start_client(self, client: int) -> None:
        """Put the client's own B (zero before its first round, as LoRA starts) into the model."""
        params = dict(self.fx.model.named_parameters())
        row = self.table.row(client)
        for name, part, shape in zip(self.names, row.split(self.sizes), self.shapes):
            params[name].copy_(part.view(shape))

    def client_done(self, client: int, start: State, state: State, result) -> None:
        """Journal the client's trained B."""
        self.table.put(client, torch.cat([state[n].detach().float().reshape(-1).cpu() for n in self.names]))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Accuracy over every client's held-out samples, each with its own B; the global B is put back."""
        fx = self.fx
        params = dict(fx.model.named_parameters())
        global_b = {n: params[n].detach().clone() for n in self.names}
        correct = total = 0
        for client, idx in enumerate(self.holdout):
            self.start_client(client)
            got, _ = evaluate(fx.model, self.loader, idx, fx.amp, fx.device)
            correct, total = correct + got, total + len(idx)
        for name, value in global_b.items():
            params[name].copy_(value)
        return {"personal_acc": correct / max(total, 1)}

    def state_tensors(self) -> State:
        return self.table.state_tensors(PREFIX)

    def commit(self) -> None:
        self.table.commit()

    def load_state_tensors(self, saved: Mapping[str, torch.Tensor], round_: int) -> None:
        self.table.load_rows(saved, PREFIX, round_)

    def close(self) -> None:
        self.loader.close()


def _split(indices: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held out): a seeded fifth of the client's samples, at least one when it has two or more."""
    held = math.ceil(HOLDOUT * len(indices)) if len(indices) > 1 else 0
    order = np.random.default_rng(seed).permutation(len(indices))
    return np.sort(indices[order[held:]]), np.sort(indices[order[:held]])
