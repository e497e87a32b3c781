"""The one sample order and augmentation draw that every loader kind follows.

Every loader turns (indices, seed) into the same list of `Batch` records here, so two kinds
given the same client and epoch seed serve the same samples in the same order with the same
flips and crops, and can be compared tensor for tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dali_fl.seeds import AUGMENT, stream

PAD = 4  # zero pixels added on each side before the random crop, as RandomCrop(size, padding=4)


@dataclass(frozen=True)
class Batch:
    """One batch to serve: store rows in order, plus each sample's flip and crop offset."""

    rows: np.ndarray  # int64 (n,) row numbers in the store split
    flip: np.ndarray  # bool (n,) mirror horizontally after the crop
    offsets: np.ndarray  # int32 (n, 2) top-left (dy, dx) of the HxW crop in the padded image

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def epoch_order(indices: np.ndarray, seed: int, shuffle: bool = True) -> np.ndarray:
    """The epoch's sample order: a seeded permutation of `indices` (or `indices` as given)."""
    indices = np.asarray(indices, dtype=np.int64)
    # The same draws as permutation(indices), which raises on an empty read-only array (a client with no samples).
    return indices[np.random.default_rng(seed).permutation(len(indices))] if shuffle else indices.copy()


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch; the last one is short, never padded and never dropped."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [(a, min(n, a + batch_size)) for a in range(0, n, batch_size)]


def augment_params(rng: np.random.Generator, n: int,
                   pad: int = PAD) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample flip (p=0.5) and crop offsets (dy, dx) in [0, 2*pad], drawn from `rng`."""
    flip = rng.random(n) < 0.5
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2)).astype(np.int32)
    return flip, offsets


def identity_params(n: int, pad: int = PAD) -> tuple[np.ndarray, np.ndarray]:
    """The parameters that leave images unchanged: no flip, crop centred on the original."""
    return np.zeros(n, dtype=bool), np.full((n, 2), pad, dtype=np.int32)


def epoch_plan(indices: np.ndarray, seed: int, batch_size: int, *, shuffle: bool = True,
               augment: bool = False, pad: int = PAD) -> list[Batch]:
    """The epoch as a list of batches, augmentation drawn batch by batch from one generator."""
    order = epoch_order(indices, seed, shuffle)
    # One generator per epoch, consumed in batch order, so batch k's draws do not depend on
    # how (or whether) a loader prefetches.
    rng = stream(seed, AUGMENT)
    plan = []
    for a, b in batch_bounds(len(order), batch_size):
        flip, offsets = augment_params(rng, b - a, pad) if augment else identity_params(b - a, pad)
        plan.append(Batch(order[a:b], flip, offsets))
    return plan
