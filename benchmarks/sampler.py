"""A background thread that keeps peak tree memory and samples GPU utilization (NVML) with timestamps."""
from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from typing import Any, Optional

from benchmarks.measure import MIB
from benchmarks.memory import FAST_FIELDS, SLOW_FIELDS, tree_memory

log = logging.getLogger(__name__)


def nvml_handle(device: Any) -> Optional[Any]:
    """The NVML handle of a torch CUDA device (matched by PCI bus id), or None without NVML."""
    if device.type != "cuda":
        return None
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:  # by PCI address: CUDA_VISIBLE_DEVICES renumbers devices, NVML does not
            props = torch.cuda.get_device_properties(index)
            bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode())
        except Exception:  # noqa: BLE001 - older torch without PCI ids, or an odd bus id
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
            return pynvml.nvmlDeviceGetHandleByIndex(int(visible[index]) if visible[index:] and
                                                     visible[index].strip().isdigit() else index)
    except Exception as err:  # noqa: BLE001 - no NVML means no utilization figures, not a failed run
        log.warning("NVML unavailable (%s): GPU utilization will be null", err)
        return None


class Sampler(threading.Thread):
    """Background sampling: peak tree RSS/PSS, and GPU utilization and used memory with timestamps."""

    def __init__(self, store_dir: Optional[str] = None, gpu: Any = None, interval: float = 0.25,
                 pss_every_s: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.store_dir = store_dir  # None: no walk over the mappings, pss_store stays 0
        self.gpu, self.interval = gpu, interval if gpu is None else min(interval, 0.1)
        self.peak = dict.fromkeys(FAST_FIELDS + SLOW_FIELDS, 0)  # each field's own peak
        # PSS walks every page table, so it is read every pss_every_s (0: every sample)
        self._count, self._slow_every = 0, max(1, round(pss_every_s / self.interval))
        self.gpu_samples: list[tuple[float, float, float]] = []  # (time, util %, used MiB)
        self.own_cpu = 0.0  # this thread's CPU time, taken out of the measured figures
        self._halt = threading.Event()

    def sample(self, full: bool = False) -> None:
        """One sample; `full` also reads PSS whatever the schedule."""
        self._count += 1
        slow = full or (self._count - 1) % self._slow_every == 0
        for k, v in tree_memory(self.store_dir, slow=slow).items():
            self.peak[k] = max(self.peak[k], v)
        if self.gpu is not None:
            import pynvml

            util = pynvml.nvmlDeviceGetUtilizationRates(self.gpu).gpu
            used = pynvml.nvmlDeviceGetMemoryInfo(self.gpu).used / MIB
            self.gpu_samples.append((time.perf_counter(), float(util), used))

    def run(self) -> None:
        """Sample every interval until stopped, keeping this thread's CPU time up to date."""
        start = time.thread_time()
        while not self._halt.is_set():
            self.sample()
            self.own_cpu = time.thread_time() - start
            self._halt.wait(self.interval)

    def gpu_window(self, t0: float, t1: float) -> tuple[Optional[float], Optional[float]]:
        """(mean utilization %, peak used MiB) over samples taken in [t0, t1]; None without a GPU."""
        window = [s for s in list(self.gpu_samples) if t0 <= s[0] <= t1]
        if not window:
            return None, None
        return statistics.fmean(s[1] for s in window), max(s[2] for s in window)

    def stop(self) -> None:
        """End the thread and wait for it."""
        self._halt.set()
        self.join()
