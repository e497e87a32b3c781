"""One measured point of the round benchmark: a kind at one configuration, against the compute-only bound."""
from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Optional

from benchmarks.flops import peak_tflops, train_flops_per_image
from benchmarks.measure import MIB, tree_cpu_seconds
from benchmarks.memory import tree_memory
from benchmarks.round_settings import RESIZE, Settings
from benchmarks.sampler import Sampler, nvml_handle
from benchmarks.wrappers import CachedBatch, TimedLoader

log = logging.getLogger("bench_round")
ROUND_KEYS = ("round", "num_clients", "num_samples", "round_time_s", "data_wait_s", "compute_s", "aggregate_s",
              "images_per_s", "peak_gpu_mem_mb", "train_loss")


def train_config(s: Settings, point: dict, store: str) -> Any:
    """The TrainConfig of one point: same store, partition, seed and model for every kind."""
    from dali_fl.config import TrainConfig

    base, _, workers = point["kind"].partition("@")
    base = base.removesuffix(RESIZE)
    dirichlet = {"alpha": s.alpha} if point["partition"] == "dirichlet" else {}  # the scaling points are IID
    return TrainConfig.from_options(dict(
        alg=s.alg, rounds=s.rounds + 1, num_users=point["num_users"], frac=point["frac"],
        partition=point["partition"], **dirichlet, seed=s.seed, local_ep=s.local_ep,
        local_bs=s.local_bs, lr=s.lr, model=s.model, model_kwargs=s.model_kwargs,
        pretrained=s.pretrained, store=store, loader="dali" if base == "dali-gpu" else base,
        data_on_gpu=base == "dali-gpu", augment=s.augment, device=s.device, amp=s.amp, eval_bs=64,
        resize_to=point.get("resize_to"), compile=s.compile,
        **({"num_workers": int(workers) if workers else s.workers} if base == "memmap" else {})))


def timed_round(fx: Any, round_: int, loader: Any, sampler: Sampler) -> dict:
    """One real `run_round` with `loader` swapped in, plus CPU, GPU and switch figures."""
    from dali_fl.engine.federation import run_round

    timed = TimedLoader(loader, at_epoch_end=partial(sampler.sample, full=True) if transient_workers(loader) else None)
    cpu0, own0 = tree_cpu_seconds(), sampler.own_cpu
    t0 = time.perf_counter()
    row = run_round(fx, round_, loader=timed)
    t1 = time.perf_counter()
    cpu = tree_cpu_seconds() - cpu0 - (sampler.own_cpu - own0) - timed.probe_cpu_s
    util, used = sampler.gpu_window(t0, t1)
    clients, epochs = timed.gaps()
    out = {k: row[k] for k in ROUND_KEYS}
    # The epoch-end GPU syncs ran inside the data-wait timer (see TimedLoader.sync_s): they waited for compute.
    # The epoch-end memory probes ran there too, and are the benchmark's, not the round's.
    round_s, images = row["round_time_s"] - timed.probe_s, row["num_samples"] * fx.cfg.local.local_ep
    out.update(round_time_s=round_s, data_wait_s=row["data_wait_s"] - timed.sync_s - timed.probe_s,
               compute_s=row["compute_s"] + timed.sync_s, images_per_s=images / round_s)
    out.update(images=images, cpu_core_s=cpu, busy_cores=cpu / round_s, gpu_util_pct=util, gpu_used_mib=used,
               client_switch_s=clients, epoch_switch_s=epochs,
               other_s=round_s - out["data_wait_s"] - out["compute_s"] - row["aggregate_s"])
    return out


def transient_workers(loader: Any) -> bool:
    """Whether the loader's DataLoader workers exit at each epoch's end, taking their mapped store pages along."""
    workers = getattr(getattr(loader, "cfg", None), "workers", None)
    return workers is not None and workers.num_workers > 0 and not workers.persistent_workers


def measure_point(s: Settings, point: dict) -> dict:
    """One kind's figures; under --gpu-mem-gib on a GPU, a kind that runs out of memory is a result, not a crash."""
    import torch

    warnings.filterwarnings("ignore", message="This DataLoader will create")  # the seed's 4 workers
    if s.threads:
        torch.set_num_threads(s.threads)
    cap = cap_gpu_memory(s.device, s.gpu_mem_gib)
    try:
        figures = measure_rounds(s, point)
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one; DALI's copies into torch raise plain ones
        if cap is None or not ("out of memory" in str(err) or isinstance(err, torch.cuda.OutOfMemoryError)):
            raise
        log.warning("%s: out of memory under the %s GiB cap", point["kind"], s.gpu_mem_gib)
        return {**point, **cap, **gpu_peaks(s.device), "fits_gpu_mem_cap": False,
                "out_of_memory": str(err).strip().splitlines()[0]}
    if cap is None:
        return figures
    return {**figures, **cap, "peak_gpu_reserved_mib": gpu_peaks(s.device)["peak_gpu_reserved_mib"],
            "fits_gpu_mem_cap": True}


def cap_gpu_memory(device: str, gib: Optional[float]) -> Optional[dict]:
    """Cap torch's CUDA allocator at `gib` GiB of the device; None (nothing capped) on the CPU or without a cap."""
    import torch

    if gib is None:
        return None
    if not device.startswith("cuda"):
        log.info("--gpu-mem-gib %s ignored: device %s has no GPU memory to cap", gib, device)
        return None
    dev = torch.device(device)
    total = torch.cuda.get_device_properties(dev).total_memory
    fraction = min(1.0, gib * 2**30 / total)
    # Applies to what torch reserves (its cache included); DALI's own pools and the CUDA context are outside it.
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    return {"gpu_mem_cap_gib": gib, "gpu_mem_fraction": fraction, "gpu_total_mib": total / MIB}


def gpu_peaks(device: str) -> dict:
    """torch's peak allocated and reserved GPU memory of this process so far, in MiB."""
    import torch

    dev = torch.device(device)
    return {"peak_gpu_mem_mib": torch.cuda.max_memory_allocated(dev) / MIB,
            "peak_gpu_reserved_mib": torch.cuda.max_memory_reserved(dev) / MIB}


def measure_rounds(s: Settings, point: dict) -> dict:
    """Build the federation once, warm up one round, then alternate measured and bound rounds."""
    import torch

    from dali_fl.engine.run import prepare

    store_dir = str(Path(point["store"]).resolve())
    sampler = Sampler(store_dir, nvml_handle(torch.device(s.device)))
    base = tree_memory(store_dir)
    sampler.start()
    fx = None
    try:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            fx, _ = prepare(train_config(s, point, point["store"]), Path(run_dir), resume=False, write=False)
        build_s = time.perf_counter() - t0
        flops = train_flops_per_image(fx.model, point["image_size"], fx.device)  # the size the model sees
        real = fx.train_loader
        bound = CachedBatch.from_loader(real, s.local_bs)
        warm = timed_round(fx, 1, real, sampler)
        rounds, bounds = [], []
        for r in range(2, s.rounds + 2):  # same round numbers = same clients for both
            rounds.append(timed_round(fx, r, real, sampler))
            bounds.append(timed_round(fx, r, bound, sampler))
        sampler.sample(full=True)  # mapped store pages only accumulate: the end is their peak
    finally:
        if fx is not None:
            fx.close()
        sampler.stop()
    mem = {**{f"base_{k}_mib": v / MIB for k, v in base.items()},
           **{f"peak_{k}_mib": v / MIB for k, v in sampler.peak.items()}}
    return {**summarize(point, build_s, warm, rounds, bounds, mem), **compute_figures(flops, rounds, s.device)}


def compute_figures(flops_per_image: float, rounds: list[dict], device: str) -> dict:
    """Achieved model TFLOP/s over the compute time of the median round, and MFU against the device's bf16 peak."""
    import torch

    m = median_row(rounds)
    achieved = flops_per_image * m["images"] / m["compute_s"] / 1e12 if m["compute_s"] > 0 else None
    peak = peak_tflops(torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None)
    return {"train_gflops_per_image": flops_per_image / 1e9, "achieved_tflops": achieved, "peak_tflops": peak,
            "mfu": achieved / peak if achieved is not None and peak else None}


def median_row(rows: list[dict]) -> dict:
    """The round with the median round time (the lower one of an even count): every figure shown comes from it."""
    return sorted(rows, key=lambda r: r["round_time_s"])[(len(rows) - 1) // 2]


def med(values: Iterable[Optional[float]]) -> Optional[float]:
    """Median of the values that were measured; None if none was."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(point: dict, build_s: float, warm: dict, rounds: list[dict], bounds: list[dict],
              mem: dict) -> dict:
    """Per-kind figures: the median round's, against the median bound round's, so a row is one round."""
    m, b = median_row(rounds), median_row(bounds)
    stall = 1 - b["round_time_s"] / m["round_time_s"]
    return {**point, "build_s": build_s, "warmup_round_s": warm["round_time_s"], "loadavg_1m": os.getloadavg()[0],
            "images_per_round": m["images"], "clients_per_round": m["num_clients"], "median_round": m["round"],
            **{k: m[k] for k in ("round_time_s", "data_wait_s", "compute_s", "aggregate_s", "other_s",
                                 "images_per_s")},
            "bound_round_time_s": b["round_time_s"], "bound_compute_s": b["compute_s"],
            "data_stall": max(0.0, stall), "data_stall_raw": stall,
            "wait_fraction": m["data_wait_s"] / m["round_time_s"],
            **cpu_figures(m, b), **switch_figures(rounds, bounds), **gpu_memory(rounds),
            **mem, "rounds": rounds, "bound_rounds": bounds}


def cpu_figures(m: dict, b: dict) -> dict:
    """CPU and GPU use of the median round and of the median bound round."""
    loader_cpu = m["cpu_core_s"] - b["cpu_core_s"]
    # A round that used less CPU than its bound measured noise (psutil counts in clock ticks), not a loader cost.
    return {"cpu_core_s": m["cpu_core_s"], "busy_cores": m["busy_cores"],
            "bound_cpu_core_s": b["cpu_core_s"], "bound_busy_cores": b["busy_cores"],
            "cpu_core_s_per_1k_images": 1000 * m["cpu_core_s"] / m["images"],
            "loader_core_s_per_1k_images": 1000 * loader_cpu / m["images"] if loader_cpu >= 0 else None,
            "gpu_util_pct": m["gpu_util_pct"], "bound_gpu_util_pct": b["gpu_util_pct"]}


def switch_figures(rounds: list[dict], bounds: list[dict]) -> dict:
    """Median per-client and per-epoch overhead in ms, of the measured rounds and of the bound."""
    switches = [x for r in rounds for x in r["client_switch_s"]]
    bound_switches = [x for r in bounds for x in r["client_switch_s"]]
    epochs = [x for r in rounds for x in r["epoch_switch_s"]]
    return {"client_switch_ms": 1000 * med(switches) if switches else None,
            "bound_client_switch_ms": 1000 * med(bound_switches) if bound_switches else None,
            "epoch_switch_ms": 1000 * med(epochs) if epochs else None}


def gpu_memory(rounds: list[dict]) -> dict:
    """Peak GPU memory over the measured rounds: torch's allocated, and NVML's device-used; None on CPU."""
    gpu_mem = [r["peak_gpu_mem_mb"] for r in rounds if r["peak_gpu_mem_mb"] is not None]
    gpu_used = [r["gpu_used_mib"] for r in rounds if r["gpu_used_mib"] is not None]
    return {"peak_gpu_mem_mib": max(gpu_mem) if gpu_mem else None,
            "peak_gpu_used_mib": max(gpu_used) if gpu_used else None}
