"""Loader wrappers for the round benchmark: a timed loader, and the compute-only bound."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Optional

import numpy as np


class TimedLoader:
    """Wraps a loader: notes when each epoch's first batch arrives and when the epoch ends."""

    def __init__(self, inner: Any, at_epoch_end: Optional[Callable[[], None]] = None) -> None:
        self.inner = inner
        # Called once an epoch's last batch is consumed, while the loader's workers are still alive; its seconds
        # and CPU are the benchmark's own, which timed_round takes out of the round.
        self.at_epoch_end, self.probe_s, self.probe_cpu_s = at_epoch_end, 0.0, 0.0
        self.epochs: list[tuple[object, Optional[float], float]] = []  # (indices, first batch, end)
        # Seconds spent waiting for the GPU at epoch ends. They pass inside local training's timed next(), so
        # its data wait holds them; timed_round moves them to compute, where the queued work belongs.
        self.sync_s = 0.0

    def epoch(self, indices: np.ndarray, seed: int, shuffle: bool = True) -> Iterator:
        """The inner loader's epoch, timed."""
        return self._timed(self.inner.epoch(indices, seed, shuffle), indices)

    def _timed(self, batches: Iterator, indices: np.ndarray) -> Iterator:
        first, seen = None, 0
        for batch in batches:
            if first is None:
                first = time.perf_counter()
            yield batch
            seen += len(batch[1])
            if self.at_epoch_end is not None and seen >= len(indices):
                start, cpu = time.perf_counter(), time.thread_time()
                self.at_epoch_end()
                self.probe_s += time.perf_counter() - start
                self.probe_cpu_s += time.thread_time() - cpu
        device = getattr(getattr(self.inner, "cfg", None), "device", None) or getattr(self.inner, "device", None)
        if device is not None and device.type == "cuda":
            import torch

            start = time.perf_counter()
            torch.cuda.synchronize(device)  # the client's queued GPU work is compute, not switch time
            self.sync_s += time.perf_counter() - start
        self.epochs.append((indices, first, time.perf_counter()))

    def gaps(self) -> tuple[list[float], list[float]]:
        """(client switches, epoch switches) in seconds: one epoch's end to the next one's first batch."""
        clients, epochs = [], []
        for (prev_idx, _, prev_end), (idx, first, _) in zip(self.epochs, self.epochs[1:]):
            if first is not None:
                (epochs if idx is prev_idx else clients).append(first - prev_end)
        return clients, epochs

    def close(self) -> None:
        """Close the inner loader."""
        self.inner.close()


class CachedBatch:
    """The compute-only bound: one device batch served as views, in the real epoch's batch sizes."""

    def __init__(self, images: Any, labels: Any) -> None:
        self.images, self.labels = images, labels
        self.device = images.device

    @classmethod
    def from_loader(cls, loader: Any, batch_size: int) -> "CachedBatch":
        """The first batch of `loader`, copied (loaders may reuse their output buffers)."""
        images, labels = next(iter(loader.epoch(np.arange(batch_size), 0)))
        return cls(images.clone(), labels.clone())

    def epoch(self, indices: np.ndarray, seed: int, shuffle: bool = True) -> Iterator:
        """Views of the cached batch, sized as the real epoch's batches would be."""
        from dali_fl.loaders.order import batch_bounds

        for a, b in batch_bounds(len(indices), int(self.images.shape[0])):
            yield self.images[: b - a], self.labels[: b - a]

    def close(self) -> None:
        """Nothing to release."""
        return None
