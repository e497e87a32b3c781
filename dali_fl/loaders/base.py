"""What every loader kind shares: settings, argument checks, and the one epoch loop."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator, Optional, Union

import numpy as np
import torch

from dali_fl.data.store import Store, open_store
from dali_fl.errors import DaliFlError
from dali_fl.loaders.normalize import Normalization
from dali_fl.loaders.order import Batch, epoch_plan

Pair = tuple[torch.Tensor, torch.Tensor]  # (images NCHW, labels int64), both on the device
Served = tuple[torch.Tensor, torch.Tensor, np.ndarray]  # a kind's batch plus the rows it read

OUT_DTYPES = (torch.float32, torch.float16)  # what crop_mirror_normalize can emit (no bfloat16)
DEVICE_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class LoaderWorkers:
    """Host-side parallelism: DataLoader knobs for the memmap kinds, the thread pool for DALI."""

    num_workers: int = 2  # this project's dev machines have 2 cores; raise it on a server
    pin_memory: bool = True  # takes effect only when the device is CUDA: nothing else gains
    prefetch_factor: int = 2
    persistent_workers: bool = True
    dali_threads: int = 2  # DALI's CPU operator threads (threads, not processes)

    def __post_init__(self) -> None:
        if self.num_workers < 0 or self.prefetch_factor < 1 or self.dali_threads < 1:
            raise DaliFlError(f"loader workers need num_workers >= 0, prefetch_factor >= 1 and "
                              f"dali_threads >= 1; got {self}")

    def dataloader_kwargs(self, device: torch.device) -> dict:
        """Keyword arguments for torch's DataLoader (it rejects prefetching without workers)."""
        kw = {"num_workers": self.num_workers,
              "pin_memory": self.pin_memory and device.type == "cuda"}
        if self.num_workers > 0:
            kw.update(prefetch_factor=self.prefetch_factor,
                      persistent_workers=self.persistent_workers)
        return kw


@dataclass(frozen=True)
class LoaderConfig:
    """Everything a loader kind is built from; checked once, here."""

    store: Store
    split: str
    batch_size: int
    device: torch.device
    norm: Normalization
    image_size: int  # the side served, resolved once by the run; resized on the device if not the store's
    augment: bool = False
    out_dtype: torch.dtype = torch.float32
    data_on_gpu: bool = False
    workers: LoaderWorkers = field(default_factory=LoaderWorkers)

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, (int, np.integer)) \
                or self.batch_size < 1:
            raise DaliFlError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if self.out_dtype not in OUT_DTYPES:
            raise DaliFlError(f"loader output dtype {self.out_dtype} is not supported; use float32 "
                              "or float16 (DALI's crop_mirror_normalize has no bfloat16; "
                              "cast in the model)")
        if self.device.type not in DEVICE_TYPES:
            raise DaliFlError(f"device {self.device} is not supported by the loaders; "
                              "use cpu or cuda")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise DaliFlError(f"device {self.device} was requested but CUDA is not available here; "
                              "use --device cpu")
        self.store.labels(self.split)  # a missing split is a DaliFlError naming the splits there

    @property
    def resize(self) -> Optional[int]:
        """The side to resize each batch to on the device, or None when no resize is needed."""
        return None if self.image_size == self.store.image_size else self.image_size


def check_indices(indices: np.ndarray, n: int, where: str) -> np.ndarray:
    """The client's indices as int64, or a DaliFlError when they cannot index the split."""
    arr = np.asarray(indices)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise DaliFlError(f"client indices must be a 1-D integer array, got {arr.dtype} "
                          f"shaped {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise DaliFlError(f"client indices must lie in [0, {n}) for {where}; "
                          f"got values from {arr.min()} to {arr.max()}")
    return arr


class Loader(ABC):
    """Built once per run; `epoch(indices, seed)` yields normalized NCHW batches on the device.

    Each kind states its own facts here: the store dtype it reads, where that store lives
    relative to the one the user names, its host-side worker defaults, whether it can
    keep a split resident in GPU memory, and whether it can resize on the device.
    """

    kind: ClassVar[str]
    store_dtype: ClassVar[str] = "uint8"
    default_workers: ClassVar[LoaderWorkers] = LoaderWorkers()
    supports_data_on_gpu: ClassVar[bool] = False
    supports_resize: ClassVar[bool] = True

    def __init__(self, cfg: LoaderConfig) -> None:
        self._check_store(cfg)
        if cfg.data_on_gpu and not self.supports_data_on_gpu:
            raise DaliFlError(f"--data-on-gpu is a feature of the dali loader, not of {self.kind}")
        self.cfg = cfg
        self.num_rows = int(cfg.store.labels(cfg.split).shape[0])
        self._epoch_id = 0  # bumps on every epoch() call; an older epoch's generator then stops

    def epoch(self, indices: np.ndarray, seed: int, shuffle: bool = True) -> Iterator[Pair]:
        """Yield (images, labels) for one pass over `indices`, ordered and augmented from `seed`."""
        where = f"the {self.cfg.split} split of {self.cfg.store.path}"
        rows = check_indices(indices, self.num_rows, where)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DaliFlError(f"epoch seed must be a non-negative integer, got {seed!r}")
        plan = epoch_plan(rows, int(seed), self.cfg.batch_size, shuffle=shuffle,
                          augment=self.cfg.augment)
        self._epoch_id += 1
        return self._serve(plan, rows, self._epoch_id)

    def _serve(self, plan: list[Batch], rows: np.ndarray, epoch_id: int) -> Iterator[Pair]:
        """The one epoch loop: every kind's batches pass the same checks against the plan."""
        if not plan:
            return
        served = self._batches(plan, rows)
        for batch in [*plan, None]:  # the extra step lets the kind reach its own end of epoch
            # Checked before pulling: a stale generator must not consume the newer epoch's batches.
            if epoch_id != self._epoch_id:
                raise RuntimeError("this epoch was superseded by a later epoch() call "
                                   "on the same loader")
            got = next(served, None)
            if batch is None:
                if got is not None:
                    raise RuntimeError(f"{self.kind} loader served more batches than the epoch has")
                return
            # Each kind reports the rows it actually read; a batch of another client or epoch
            # (a reuse bug) fails loudly here instead of silently training on the wrong data.
            if got is None or not np.array_equal(got[2], batch.rows):
                raise RuntimeError(f"{self.kind} loader served rows that are not this epoch's "
                                   "next batch")
            yield got[0], got[1]

    @classmethod
    def open_store(cls, path: Union[str, Path]) -> Store:
        """The store this kind reads for the store at `path` (the same one, for uint8 kinds)."""
        return open_store(path)

    @classmethod
    def workers_for(cls, num_workers: int) -> LoaderWorkers:
        """Host-side settings for a run's --num-workers (kinds without DataLoader workers ignore it)."""
        return cls.default_workers

    @classmethod
    def _check_store(cls, cfg: LoaderConfig) -> None:
        """Refuse a store of the wrong dtype, naming the prep command that makes the right one."""
        if cfg.store.dtype == cls.store_dtype:
            return
        m = cfg.store.manifest
        raise DaliFlError(f"the {cls.kind} loader reads a {cls.store_dtype} store but {cfg.store.path} holds "
                          f"{cfg.store.dtype}; make one with `dali-fl prep --source {m['source']} "
                          f"--image-size {cfg.store.image_size} --dtype {cls.store_dtype}` "
                          "(plus the same --source-path/--out)")

    @abstractmethod
    def _batches(self, plan: list[Batch], rows: np.ndarray) -> Iterator[Served]:
        """Yield (images, labels, rows read) for each batch of `plan`, in order."""

    def close(self) -> None:  # noqa: B027  (optional: kinds without resources keep this no-op)
        """Free worker processes, pipelines and device memory; the loader is unusable after."""

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def device_index(device: torch.device) -> Optional[int]:
    """CUDA ordinal of `device` (the current one for a bare "cuda"), None for the CPU."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()
