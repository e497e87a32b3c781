"""The run directory: config, partition, metrics.jsonl, TensorBoard, atomic checkpoint, summary."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from safetensors import SafetensorError

from dali_fl.atomic import atomic_write_text, recover_dir, replace_dir, temp_dir_for, what_to_do
from dali_fl.data.layout import store_around
from dali_fl.errors import DaliFlError
from dali_fl.safe_fs import check_dir, check_regular, open_regular, read_bytes

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch loads only with a checkpoint, so tools that only read metrics start without it
    import torch

BASE_PREFIX = "base::"  # base weights an aggregation changed travel in the checkpoint under this prefix


LOCK = ".lock"
IDENTITY = "run.json"
# What a run writes before config.json (with the algorithms' own files): a directory holding only these is a run
# that never finished starting.
STARTING = (LOCK, IDENTITY, "partition.json", "client_ranks.json")
MAX_META_BYTES = 1 << 20
MAX_METRICS_BYTES = 1 << 30  # about a million rounds of rows


def algorithm_files(pending: bool = False) -> tuple[str, ...]:
    """The files that algorithms keep in a run directory (each declares its own `files`); with `pending`, also
    the names new ones have until their first commit."""
    from dali_fl import algorithms  # here, not at the top: algorithms import engine modules
    from dali_fl.engine.client_table import pending_name

    names = tuple(f for cls in algorithms.REGISTRY.values() for f in cls.files)
    return names + tuple(pending_name(n) for n in names) if pending else names


class RunLock:
    """Exclusive hold on a run directory for a whole run (an flock on RUN_DIR/.lock).

    The kernel drops an flock when its process dies, so a kill -9 leaves no stale lock; the
    holder's pid is written into the file only so that a refused second writer can name it.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        check_ours(self.run_dir)  # before the lock file is made: a foreign directory is left as it was
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DaliFlError(f"cannot create run directory {self.run_dir} ({err.strerror})") from None
        # No symlink followed (a planted one would have the pid written outside the run), no FIFO blocked on.
        fd = open_regular(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, fix="remove it and run again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DaliFlError(f"{self.run_dir} is in use by another dali-fl train (process {holder}); wait for it "
                              "to finish or choose another --out") from None
        with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, the pid only names it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays, as removing it would race a new holder
            self.fd = None


def check_fresh(run_dir: Path, resume: Optional[str] = None, elsewhere: str = "choose another --out") -> None:
    """Refuse to start a new run where one was started (config.json, written last, marks it), or on foreign files;
    `resume` is how the caller's user continues one (default: train's --resume), `elsewhere` how they start anew."""
    if (run_dir / "config.json").exists() or (run_dir / "config.json").is_symlink():
        raise DaliFlError(f"{run_dir} already holds a run; continue it with {resume or f'--resume {run_dir}'} or "
                          f"{elsewhere}")
    check_place(run_dir)


def check_place(run_dir: Path) -> None:
    """Refuse a run directory that holds foreign files or lies inside a store."""
    check_ours(run_dir)
    store = store_around(Path(run_dir).absolute().parent)
    if store is not None:  # `prep --force` replaces a store whole, and a run inside it would go too
        raise DaliFlError(f"--out {run_dir} is inside the store {store}, which `dali-fl prep --force` replaces "
                          "whole; choose an --out outside it")


def _starting_name(name: str) -> bool:
    """A name a run writes before its config.json (atomic writes leave `.NAME.XXXX.tmp` while they work)."""
    return name in STARTING or name in algorithm_files() or (name.startswith(".") and name.endswith(".tmp"))


def check_ours(run_dir: Path) -> None:
    """Refuse a run directory that holds files dali-fl did not write: a run may replace or delete its own only."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or (run_dir / "config.json").is_file():
        return  # absent (it will be made), not a directory (mkdir says so), or a run: its own names only are touched
    names = os.listdir(run_dir)
    started = LOCK in names  # a run takes its lock before it writes anything: without one, a partition.json is yours
    foreign = sorted(name for name in names if name != LOCK and not (started and _starting_name(name)))
    if foreign:
        raise DaliFlError(f"{run_dir} is not empty and not a dali-fl run (it holds {foreign[0]!r}"
                          f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); dali-fl would overwrite "
                          "or delete them, so choose another --out (or a new directory inside it)")


def _is_whole(checkpoint: Path) -> bool:
    return (checkpoint / "meta.json").is_file() and (checkpoint / "state.safetensors").is_file()


def save_checkpoint(run_dir: Path, round_: int, state: dict[str, torch.Tensor],
                    base: dict[str, torch.Tensor], seed: int, settings_sha256: str) -> None:
    """Write checkpoint/ atomically (atomic.replace_dir): trainable state (+ changed base weights) and the round."""
    from safetensors.torch import save

    final = run_dir / "checkpoint"
    tmp = temp_dir_for(final, _is_whole)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tensors.update({BASE_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in base.items()})
    # Every random stream is derived from (seed, round, client, epoch), so these two numbers are the RNG state.
    # The metrics rows the round closes are fingerprinted, so that a resume can tell them from edited ones.
    covered = [r for r in read_metrics(run_dir) if r["round"] <= round_]
    try:
        blob = save(tensors)  # the file's bytes, fingerprinted too: an edited weight is refused on resume
        meta = json.dumps({"round": round_, "rng": {"seed": seed, "next_round": round_ + 1},
                           "metrics": {"rows": len(covered), "sha256": metrics_digest(covered)},
                           "state_sha256": hashlib.sha256(blob).hexdigest(), "settings_sha256": settings_sha256})
        (tmp / "state.safetensors").write_bytes(blob)
        (tmp / "meta.json").write_text(meta)
        replace_dir(tmp, final)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        fix = (what_to_do(err, "") if isinstance(err, OSError) else "") or "free some space"
        raise DaliFlError(f"cannot write the checkpoint of round {round_} in {run_dir} ({err}); {fix} "
                          f"and continue with `dali-fl train --resume {run_dir}` "
                          f"({f'round {round_ - 1} is kept' if round_ > 1 else 'it starts again at round 1'})"
                          ) from None
    except BaseException:  # Ctrl-C mid-write: the last whole checkpoint stays, the half-written one goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(run_dir: Path) -> Optional[dict]:
    """checkpoint/meta.json (its round checked), or None before round 1; the checkpoint's files are checked too."""
    final = run_dir / "checkpoint"
    fix = "the run cannot be resumed"
    if not check_dir(final, fix):
        recover_dir(final, _is_whole)  # killed between the two renames: the old checkpoint is whole
    if not check_dir(final, fix):
        return None
    if check_regular(final / "state.safetensors", fix) is None:
        raise DaliFlError(f"{final / 'state.safetensors'} is missing; {fix}")
    try:
        meta = json.loads(read_bytes(final / "meta.json", MAX_META_BYTES, fix))
    except (ValueError, RecursionError) as err:
        raise DaliFlError(f"{final / 'meta.json'} is unreadable ({type(err).__name__}); {fix}") from None
    round_ = meta.get("round") if isinstance(meta, dict) else None
    if type(round_) is not int or not 1 <= round_ < 1 << 62:
        raise DaliFlError(f"{final / 'meta.json'} holds no valid round ({round_!r}); {fix}")
    return meta


def load_checkpoint(run_dir: Path) -> Optional[tuple[int, dict, dict]]:
    """(round, trainable state, base weights) of the last finished round, or None before round 1."""
    meta = read_meta(run_dir)
    if meta is None:
        return None
    from safetensors.torch import load

    final = run_dir / "checkpoint"
    blob = read_bytes(final / "state.safetensors", 1 << 62, "the run cannot be resumed")
    want = meta.get("state_sha256")  # None: written before the checkpoint was fingerprinted
    if want is None:
        log.warning("%s records no sha256 of the checkpoint's weights (an older dali-fl wrote it): they are not "
                    "checked", final / "meta.json")
    elif hashlib.sha256(blob).hexdigest() != want:
        raise DaliFlError(f"{final / 'state.safetensors'} is not the file {final / 'meta.json'} recorded (its sha256 "
                          "differs): it was changed after the run wrote it, so the run cannot be resumed")
    try:
        tensors = load(blob)
    except Exception as err:
        raise DaliFlError(f"{final} is unreadable ({type(err).__name__}); the run cannot be resumed") from None
    state = {k: v for k, v in tensors.items() if not k.startswith(BASE_PREFIX)}
    base = {k[len(BASE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BASE_PREFIX)}
    return meta["round"], state, base


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
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:  # a torn row is dropped on resume; the round's checkpoint was not written yet
            run_dir = self.path.parent
            raise DaliFlError(f"cannot append round {row['round']} to {self.path} ({err.strerror or err}); "
                              f"{what_to_do(err, '') or 'free some space'} and continue with `dali-fl train "
                              f"--resume {run_dir}`") from None
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
    if check_regular(path, "the run cannot be resumed") is None:
        return []
    text = read_bytes(path, MAX_METRICS_BYTES, "the run cannot be resumed").decode(errors="replace")
    lines = text.splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if isinstance(row, dict) and type(row.get("round")) is int:
            rows.append(row)
        elif n < len(lines) or text.endswith("\n"):  # only an unfinished last line is torn; anything else was edited
            raise DaliFlError(f"{path} line {n} is not a round record; fix or delete that line")
    return rows


def metrics_digest(rows: list[dict]) -> str:
    """sha256 of metrics rows, independent of how their file was spelled."""
    text = "\n".join(json.dumps(r, sort_keys=True) for r in rows)
    return hashlib.sha256(text.encode()).hexdigest()
