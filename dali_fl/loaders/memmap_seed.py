"""The pipeline being replaced, reproduced for benchmarks: float32 store, per-sample CPU work.

Faithful to the seed code in what costs: images stored as float32 in [0, 1] (4x the bytes of
uint8), each sample normalized (and flipped/cropped) on its own in a worker process, and a new
`DataLoader(num_workers=4, pin_memory=True, prefetch_factor=2)` for every client, because the
seed's LocalUpdate built one per client per round. Here a DataLoader is built whenever
`epoch()` gets indices different from the previous call and is reused for that client's local
epochs; its workers are not persistent, so (as in the seed) they start again every epoch.
Augmentation uses the shared plan instead of torchvision's own RNG so that the tensors stay
comparable with the other kinds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from dali_fl.data.store import Store, open_store
from dali_fl.errors import DaliFlError
from dali_fl.loaders.base import Loader, LoaderConfig, LoaderWorkers, Served
from dali_fl.loaders.memmap import Epochs, StoreRows
from dali_fl.loaders.normalize import Normalization
from dali_fl.loaders.order import Batch
from dali_fl.loaders.transforms import crop_flip

SEED_WORKERS = LoaderWorkers(num_workers=4, pin_memory=True, prefetch_factor=2,
                             persistent_workers=False)

Item = tuple[int, bool, int, int]  # (row, flip, dy, dx) of one sample


class SeedSamples(StoreRows):
    """Per-sample Dataset over the float32 store: pad/crop/flip, then normalize, on the CPU."""

    def __init__(self, store: Store, split: str, norm: Normalization, augment: bool) -> None:
        super().__init__(store, split)
        self.augment = augment
        self.mean = torch.tensor(norm.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(norm.std, dtype=torch.float32).view(3, 1, 1)

    def __getitem__(self, item: Item) -> tuple[torch.Tensor, int, int]:
        row, flip, dy, dx = item
        x = torch.from_numpy(np.array(self.images[row]))  # (H, W, 3) float32 in [0, 1]
        if self.augment:
            x = crop_flip(x[None], torch.tensor([flip]), torch.tensor([[dy, dx]]))[0]
        x = (x.permute(2, 0, 1) - self.mean) / self.std  # torchvision's Normalize: divide by std
        return x.contiguous(), int(self.labels[row]), row


class PlanBatchSampler(Sampler):
    """Yields each batch of the current plan as a list of per-sample items."""

    def __init__(self) -> None:
        self.plan: list[Batch] = []

    def __iter__(self) -> Iterator[list[Item]]:
        plan = self.plan  # bound at iter(): a later swap cannot reach this epoch
        for b in plan:
            yield [(int(r), bool(f), int(dy), int(dx))
                   for r, f, (dy, dx) in zip(b.rows, b.flip, b.offsets)]

    def __len__(self) -> int:
        return len(self.plan)


class MemmapSeedLoader(Loader):
    """The old per-sample float32 pipeline, one new DataLoader per client."""

    kind = "memmap-seed"
    store_dtype = "float32"
    default_workers = SEED_WORKERS  # the seed's own settings: what this kind exists to reproduce
    supports_resize = False  # the seed resized offline only; this kind reproduces that pipeline

    def __init__(self, cfg: LoaderConfig) -> None:
        super().__init__(cfg)
        self._dataset = SeedSamples(cfg.store, cfg.split, cfg.norm, cfg.augment)
        self._client: Optional[np.ndarray] = None
        self._sampler = PlanBatchSampler()
        self._loader: Optional[DataLoader] = None
        self._epochs = Epochs()
        self._pinned = False

    @classmethod
    def open_store(cls, path: Union[str, Path]) -> Store:
        """The float32 sibling (`<store>-f32`) that `prep --dtype float32` writes beside a uint8 store."""
        store = open_store(path)
        if store.dtype == cls.store_dtype:
            return store
        sibling = Path(f"{store.path}-f32")
        if not sibling.exists():
            raise DaliFlError(f"--loader memmap-seed reads a float32 store; make it with `dali-fl prep --source "
                              f"{store.manifest['source']} --image-size {store.image_size} --dtype float32`")
        f32 = open_store(sibling)
        differs = _other_data(store.manifest, f32.manifest)
        if differs:  # the run, its partition and a resume's checks all go by the uint8 store's data
            raise DaliFlError(f"{sibling}, the float32 store --loader memmap-seed reads for {store.path}, was made "
                              f"from other data ({differs}); rebuild it with `dali-fl prep --dtype float32 --force` "
                              "from the same source")
        return f32

    def _loader_for(self, rows: np.ndarray) -> DataLoader:
        """The client's DataLoader: new when the indices change, as the seed's LocalUpdate did."""
        if self._loader is None or self._client is None or not np.array_equal(rows, self._client):
            self._epochs.stop()
            self._sampler = PlanBatchSampler()
            kw = self.cfg.workers.dataloader_kwargs(self.cfg.device)
            self._pinned = kw["pin_memory"]
            self._loader = DataLoader(self._dataset, batch_sampler=self._sampler, **kw)
            self._client = rows.copy()
        return self._loader

    def _batches(self, plan: list[Batch], rows: np.ndarray) -> Iterator[Served]:
        loader = self._loader_for(rows)
        self._sampler.plan = plan
        dev, dtype = self.cfg.device, self.cfg.out_dtype
        for images, labels, read in self._epochs(loader):
            x = images.to(dev, non_blocking=self._pinned).to(dtype)
            yield x, labels.to(dev, non_blocking=self._pinned), read.numpy()

    def close(self) -> None:
        self._epochs.stop()
        self._loader = None


def _other_data(uint8: dict, f32: dict) -> str:
    """What the float32 sibling's manifest says that the uint8 store's does not (the same source and labels), or ''."""
    for key in ("source", "classes", "image_size", "interpolation"):
        if uint8.get(key) != f32.get(key):
            return f"its {key} differs"
    for split, entry in uint8["splits"].items():
        other = f32["splits"].get(split) or {}
        for what, a, b in (("images", entry.get("source_sha256"), other.get("source_sha256")),
                           ("labels", entry["labels"]["sha256"], (other.get("labels") or {}).get("sha256"))):
            if a != b:
                return f"its {split} {what} differ"
    return ""
