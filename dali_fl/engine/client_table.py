"""Per-client state that outlives a round (control variates, clients' own adapters): one file, journaled.

N rows of D float32 values live in a file in the run directory, sparse until clients are sampled. A
round's new rows are kept in memory, saved inside the round's checkpoint, and only then written to
the file; a resume writes the checkpoint's rows again, so the file always matches the checkpoint,
even after a kill mid-round.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from dali_fl.errors import DaliFlError
from dali_fl.safe_fs import open_regular


def pending_name(name: str) -> str:
    """Where a new table lives until its first commit gives it `name`."""
    return f".{name}.tmp"


class ClientTable:
    """`num_users` rows of `width` float32 values in `path`, with this round's new rows journaled."""

    def __init__(self, path: Path, num_users: int, width: int, what: str, hint: str):
        self.path, self.num_users, self.width, self.what = Path(path), num_users, width, what
        self.created = not self.path.exists()
        # A new file takes its name at its first commit: one a refused resume made would pass for a run's own
        # (zeros of the right size) at the next resume, which would then continue without a word.
        self.pending = self.path.with_name(pending_name(self.path.name)) if self.created else None
        self.rows: dict[int, torch.Tensor] = {}  # this round's new rows, on the CPU
        self.table = self._open(hint)

    def _open(self, hint: str) -> np.memmap:
        need = self.num_users * self.width * 4
        if not self.created and self.path.stat().st_size != need:
            raise DaliFlError(f"{self.path} holds {self.path.stat().st_size} bytes but this run's {self.num_users} "
                              f"clients x {self.width} values need {need}; it is not this run's file")
        if self.created:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.path.parent).free
            if need > free:
                raise DaliFlError(f"{self.what} take one row per client: {self.num_users} clients x {self.width:,} "
                                  f"values x 4 bytes = {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB "
                                  f"free in {self.path.parent}; {hint}")
            fd = open_regular(self.pending, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # no link followed, no FIFO
            try:
                os.ftruncate(fd, need)  # sparse: zeros until a client is sampled
            finally:
                os.close(fd)
        return np.memmap(self.pending or self.path, np.float32, "r+", shape=(self.num_users, self.width))

    def row(self, client: int) -> torch.Tensor:
        """The client's newest row: this round's if it has one, else the file's (a copy, on the CPU)."""
        if client in self.rows:  # an evaluation after the client trained, before the round's commit
            return self.rows[client].clone()
        return torch.from_numpy(np.array(self.table[client]))

    def put(self, client: int, row: torch.Tensor) -> None:
        """The client's new row, written to the file only by `commit`."""
        self.rows[client] = row.detach().to("cpu", torch.float32)

    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """This round's new rows, for the checkpoint."""
        if not self.rows:
            return {}
        ids = sorted(self.rows)
        return {f"{prefix}clients": torch.tensor(ids, dtype=torch.int64),
                f"{prefix}rows": torch.stack([self.rows[i] for i in ids]).contiguous()}

    def commit(self) -> None:
        """Write the round's rows into the file (after the checkpoint holding them is on disk)."""
        for client, row in self.rows.items():
            self.table[client] = row.numpy()
        self.table.flush()
        if self.pending is not None:  # the mapping follows the renamed file
            os.replace(self.pending, self.path)
            self.pending = None
        self.rows = {}

    def load_rows(self, tensors: Mapping[str, torch.Tensor], prefix: str, round_: int) -> None:
        """Re-write the checkpoint's rows (idempotent), so the file matches the checkpoint."""
        if self.created and round_ > 1:  # the checkpoint holds only its own round's rows
            raise DaliFlError(f"{self.path} is missing: the {self.what} of rounds before {round_} are lost, so "
                              "this run cannot be resumed exactly; start a new run")
        if f"{prefix}clients" in tensors:
            ids = self._checked_ids(tensors, prefix)  # all checked before any row is written
            self.rows = dict(zip(ids, tensors[f"{prefix}rows"]))
            self.commit()

    def _checked_ids(self, tensors: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
        """The checkpoint's client ids, refused unless distinct, in range and matched by rows of the right width."""
        ids, rows = tensors[f"{prefix}clients"], tensors.get(f"{prefix}rows")
        n = self.num_users
        ok = ids.dim() == 1 and not ids.is_floating_point() and rows is not None \
            and tuple(rows.shape) == (len(ids), self.width)
        values = ids.tolist() if ok else []
        if not ok or len(set(values)) != len(values) or any(not 0 <= i < n for i in values):
            raise DaliFlError(f"the checkpoint's {self.what} are not rows of clients 0..{n - 1} with {self.width} "
                              "values each; it does not belong to this run")
        return values
