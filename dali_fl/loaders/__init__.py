"""Loaders: store + client indices + epoch seed -> normalized NCHW batches on the device.

Kinds: `dali` (the point of the project), `memmap` (the strong DataLoader baseline) and
`memmap-seed` (the per-sample float32 pipeline it replaces, for benchmarks). All follow
`dali_fl.order`, so the same indices and seed give the same samples, order and augmentation.
"""
from __future__ import annotations

import importlib
from typing import Optional, Union

import torch

from dali_fl.errors import DaliFlError
from dali_fl.loaders.base import Loader, LoaderConfig, LoaderWorkers
from dali_fl.normalize import Normalization
from dali_fl.store import Store

LOADER_KINDS = ("dali", "memmap", "memmap-seed")
# Imported on demand so that choosing a memmap kind never loads DALI's 450 MB of operators.
_CLASSES = {"dali": "dali_fl.loaders.dali:DaliLoader",
            "memmap": "dali_fl.loaders.memmap:MemmapLoader",
            "memmap-seed": "dali_fl.loaders.memmap_seed:MemmapSeedLoader"}

__all__ = ["LOADER_KINDS", "Loader", "LoaderWorkers", "make_loader"]


def loader_class(kind: str) -> type[Loader]:
    """The class that implements `kind`."""
    if kind not in _CLASSES:
        raise DaliFlError(f"unknown loader {kind!r}; choose one of {', '.join(LOADER_KINDS)}")
    module, name = _CLASSES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def make_loader(kind: str, store: Store, split: str, *, batch_size: int,
                device: Union[torch.device, str], norm: Normalization, augment: bool = False,
                out_dtype: torch.dtype = torch.float32, data_on_gpu: bool = False,
                workers: Optional[LoaderWorkers] = None) -> Loader:
    """Build the loader once per run; reuse it for every client, epoch and round."""
    cls = loader_class(kind)
    cfg = LoaderConfig(store=store, split=split, batch_size=batch_size, device=torch.device(device),
                       norm=norm, augment=augment, out_dtype=out_dtype, data_on_gpu=data_on_gpu,
                       workers=workers if workers is not None else cls.default_workers)
    return cls(cfg)
