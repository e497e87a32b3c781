"""The run directory: config, partition, metrics.jsonl, TensorBoard, atomic checkpoint, summary."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dali_fl.atomic import atomic_write_text, recover_dir, replace_dir, temp_dir_for
from dali_fl.errors import DaliFlError

BASE_PREFIX = "base::"  # base weights changed by FedEx-LoRA travel in the checkpoint under this prefix


LOCK = ".lock"


class RunLock:
    """Exclusive hold on a run directory for a whole run (an flock on RUN_DIR/.lock).

    The kernel drops an flock when its process dies, so a kill -9 leaves no stale lock; the
    holder's pid is written into the file only so that a refused second writer can name it.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise DaliFlError(f"cannot create run directory {self.run_dir} ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DaliFlError(f"{self.run_dir} is in use by another dali-fl train (process {holder}); wait for it "
                              "to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays, as removing it would race a new holder
            self.fd = None


def check_fresh(run_dir: Path) -> None:
    """Refuse to start a new run where one was started (config.json, written last, marks it)."""
    if (run_dir / "config.json").exists():
        raise DaliFlError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")


def _is_whole(checkpoint: Path) -> bool:
    return (checkpoint / "meta.json").is_file() and (checkpoint / "state.safetensors").is_file()


def save_checkpoint(run_dir: Path, round_: int, state: dict[str, torch.Tensor],
                    base: dict[str, torch.Tensor], seed: int) -> None:
    """Write checkpoint/ atomically (atomic.replace_dir): trainable state (+ changed base weights) and the round."""
    final = run_dir / "checkpoint"
    tmp = temp_dir_for(final, _is_whole)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tensors.update({BASE_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in base.items()})
    # Every random stream is derived from (seed, round, client, epoch), so these two numbers are the RNG state.
    meta = json.dumps({"round": round_, "rng": {"seed": seed, "next_round": round_ + 1}})
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "meta.json").write_text(meta)
        replace_dir(tmp, final)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DaliFlError(f"cannot write the checkpoint of round {round_} in {run_dir} ({err}); free some space "
                          f"and continue with `dali-fl train --resume {run_dir}` (round {round_ - 1} is kept)"
                          ) from None


def load_checkpoint(run_dir: Path) -> Optional[tuple[int, dict, dict]]:
    """(round, trainable state, base weights) of the last finished round, or None before round 1."""
    final = run_dir / "checkpoint"
    recover_dir(final, _is_whole)  # killed between the two renames: the old checkpoint is whole
    if not final.exists():
        return None
    try:
        meta = json.loads((final / "meta.json").read_text())
        tensors = load_file(str(final / "state.safetensors"))
    except Exception as err:
        raise DaliFlError(f"{final} is unreadable ({type(err).__name__}); the run cannot be resumed") from None
    round_ = meta.get("round") if isinstance(meta, dict) else None
    if type(round_) is not int or round_ < 1:
        raise DaliFlError(f"{final / 'meta.json'} holds no valid round ({round_!r}); the run cannot be resumed")
    state = {k: v for k, v in tensors.items() if not k.startswith(BASE_PREFIX)}
    base = {k[len(BASE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BASE_PREFIX)}
    return round_, state, base


class MetricsLog:
    """metrics.jsonl (one object per round) plus TensorBoard scalars with the same names."""

    def __init__(self, run_dir: Path, start_round: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.rows = [r for r in read_metrics(run_dir) if r["round"] < start_round]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_round)

    def log(self, row: dict) -> None:
        """Append one round's metrics, durably."""
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        for key, value in row.items():
            if key != "round" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, row["round"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """The rounds logged so far (a torn last line from a crash is ignored)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and type(row.get("round")) is int:
            rows.append(row)
        elif n < len(lines):  # only the last line can be torn by a crash; anything else was edited
            raise DaliFlError(f"{path} line {n} is not a round record; fix or delete that line")
    return rows
