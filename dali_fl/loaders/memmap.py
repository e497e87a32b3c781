"""The strong baseline: one reused DataLoader over the uint8 memmap, [resize,] transforms on the device."""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dali_fl.data.store import RowReader, Store
from dali_fl.errors import DaliFlError
from dali_fl.loaders.base import Loader, LoaderConfig, LoaderWorkers, Served
from dali_fl.loaders.order import Batch
from dali_fl.loaders.resize import interpolation, resize_nhwc
from dali_fl.loaders.transforms import Uint8Normalizer, batch_params, crop_flip


class StoreRows(Dataset):
    """A store split as a Dataset of whole batches: `ds[batch]` gathers the batch's rows."""

    def __init__(self, store: Store, split: str) -> None:
        self.store, self.split = store, split
        self.labels = store.labels(split)
        self._images: Optional[RowReader] = None

    @property
    def images(self) -> RowReader:
        # Opened lazily in each process: a pickled memmap would carry the whole array with it.
        if self._images is None:
            self._images = self.store.row_reader(self.split)
        return self._images

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = batch.rows
        return (torch.from_numpy(self.images[rows]), torch.from_numpy(self.labels[rows]),
                torch.from_numpy(rows))


class PlanSampler(Sampler):
    """Yields the current epoch's plan items; the plan is swapped between epochs."""

    def __init__(self) -> None:
        self.plan: list = []

    def __iter__(self) -> Iterator:
        # Bound when the DataLoader starts an epoch (iter()), so swapping the plan later
        # cannot change the epoch in flight, and an epoch started after the swap sees only it.
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


class Epochs:
    """Runs a DataLoader's epochs and keeps the last one's iterator, so that its workers can be stopped."""

    def __init__(self) -> None:
        self._it: Optional[Iterator] = None

    def __call__(self, loader: DataLoader) -> Iterator:
        self._it = iter(loader)  # for persistent workers this is the loader's own, reused iterator
        try:
            yield from self._it
        except DaliFlError as err:  # raised in a worker: torch re-raises it with the worker's traceback inside
            raise DaliFlError(str(err).strip().splitlines()[-1].split("DaliFlError: ", 1)[-1]) from None

    def stop(self) -> None:
        """Stop the workers now, those of an epoch left unfinished too, rather than whenever they are collected."""
        if self._it is not None and hasattr(self._it, "_shutdown_workers"):
            self._it._shutdown_workers()  # private, but the only deterministic way to end them
        self._it = None


class MemmapLoader(Loader):
    """DataLoader(batch_size=None) over whole-batch gathers; [resize,] flip/crop/normalize on the device."""

    kind = "memmap"

    def __init__(self, cfg: LoaderConfig) -> None:
        super().__init__(cfg)
        self._sampler, self._epochs = PlanSampler(), Epochs()
        kw = cfg.workers.dataloader_kwargs(cfg.device)
        self._pinned = kw["pin_memory"]
        # batch_size=None: each sampler item is a whole batch, gathered with one fancy index.
        self._loader = DataLoader(StoreRows(cfg.store, cfg.split), sampler=self._sampler,
                                  batch_size=None, **kw)
        self._normalize = Uint8Normalizer(cfg.norm, cfg.device, cfg.out_dtype)
        self._method = interpolation(cfg.store)

    @classmethod
    def workers_for(cls, num_workers: int) -> LoaderWorkers:
        return dataclasses.replace(cls.default_workers, num_workers=num_workers)

    def _batches(self, plan: list[Batch], rows: np.ndarray) -> Iterator[Served]:
        self._sampler.plan = plan  # swap first: the iter() below starts the workers' prefetch
        dev = self.cfg.device
        for batch, (images, labels, read) in zip(plan, self._epochs(self._loader)):
            x = images.to(dev, non_blocking=self._pinned)
            if self.cfg.resize is not None:  # on the device, before the crop: padding keeps its 4 px at N
                x = resize_nhwc(x, self.cfg.resize, self._method)
            if self.cfg.augment:
                x = crop_flip(x, *batch_params(batch, dev))
            yield self._normalize(x), labels.to(dev, non_blocking=self._pinned), read.numpy()

    def close(self) -> None:
        self._epochs.stop()
        self._loader = None
