"""The run directory: config, partition, metrics.jsonl, TensorBoard, atomic checkpoint, summary."""
from __future__ import annotations

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


def start_run_dir(run_dir: Path) -> None:
    """Create a fresh run directory; refuse to overwrite an existing run."""
    if (run_dir / "config.json").exists():
        raise DaliFlError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DaliFlError(f"cannot create run directory {run_dir} ({err.strerror})") from None


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
                          f"and continue with `dali-fl train --resume {run_dir}` (round {round_ - 1} is kept)") from None


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
    state = {k: v for k, v in tensors.items() if not k.startswith(BASE_PREFIX)}
    base = {k[len(BASE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BASE_PREFIX)}
    return int(meta["round"]), state, base


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
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows
