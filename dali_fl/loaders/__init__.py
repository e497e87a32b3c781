"""Loaders: store + client indices + epoch seed -> normalized NCHW batches on the device.

Kinds: `dali` (the point of the project), `memmap` (the strong DataLoader baseline) and
`memmap-seed` (the per-sample float32 pipeline it replaces, for benchmarks). All follow
`dali_fl.loaders.order`, so the same indices and seed give the same samples, order and augmentation.
`dali` and `memmap` can also resize each batch on the device (`image_size`, see `loaders.resize`).
"""
from __future__ import annotations

import importlib
from typing import Optional, Union

import torch

from dali_fl.data.store import Store
from dali_fl.errors import DaliFlError
from dali_fl.loaders.base import Loader, LoaderConfig, LoaderWorkers
from dali_fl.loaders.normalize import Normalization
from dali_fl.loaders.resize import MAX_RESIZE_TO, check_resize_to, input_size, refuse_resize

LOADER_KINDS = ("dali", "memmap", "memmap-seed")
# Imported on demand so that choosing a memmap kind never loads DALI's 450 MB of operators.
_CLASSES = {"dali": "dali_fl.loaders.dali:DaliLoader",
            "memmap": "dali_fl.loaders.memmap:MemmapLoader",
            "memmap-seed": "dali_fl.loaders.memmap_seed:MemmapSeedLoader"}

__all__ = ["LOADER_KINDS", "MAX_RESIZE_TO", "Loader", "LoaderWorkers", "check_resize", "input_size", "make_loader"]


def loader_class(kind: str) -> type[Loader]:
    """The class that implements `kind`."""
    if kind not in _CLASSES:
        raise DaliFlError(f"unknown loader {kind!r}; choose one of {', '.join(LOADER_KINDS)}")
    module, name = _CLASSES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def check_resize(kind: str, resize_to: object) -> None:
    """Refuse a resize target out of range, or one given to a kind without a resize step."""
    if check_resize_to(resize_to) is not None and not loader_class(kind).supports_resize:
        raise refuse_resize(kind)


def make_loader(kind: str, store: Store, split: str, *, batch_size: int,
                device: Union[torch.device, str], norm: Normalization, augment: bool = False,
                out_dtype: torch.dtype = torch.float32, data_on_gpu: bool = False,
                workers: Optional[LoaderWorkers] = None, image_size: Optional[int] = None) -> Loader:
    """Build the loader once per run and reuse it.

    `image_size` is the side the model takes, resolved once by the run (`--resize-to`, else the store's): the
    loader serves N x N images and resizes each batch on the device when the store's side differs.
    """
    cls = loader_class(kind)
    size = store.image_size if image_size is None else check_resize_to(image_size)
    if size != store.image_size and not cls.supports_resize:
        raise refuse_resize(kind)
    # No batch holds more than the split: capped, a huge --local-bs/--eval-bs gives the same batches, where DALI
    # would try to allocate it (std::bad_alloc). Values that are not counts are left to LoaderConfig's message.
    if type(batch_size) is int and batch_size > 1:
        batch_size = min(batch_size, max(1, len(store.images(split))))
    cfg = LoaderConfig(store=store, split=split, batch_size=batch_size, device=torch.device(device),
                       norm=norm, augment=augment, out_dtype=out_dtype, data_on_gpu=data_on_gpu,
                       workers=workers if workers is not None else cls.default_workers, image_size=size)
    return cls(cfg)
