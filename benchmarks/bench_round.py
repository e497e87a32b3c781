#!/usr/bin/env python
"""Round benchmark: real federated rounds through each loader kind, against a compute-only bound.

For each loader kind (`dali`, `dali-gpu` = dali with --data-on-gpu where a GPU exists, `memmap`,
`memmap-seed`; `memmap@N` picks N DataLoader workers) this builds the federation once on the same
store, partition, seed and model, runs one warm-up round and then --rounds measured rounds, each
followed by the same round with the loader replaced by one cached device batch (the compute-only
bound). Reported per kind: round time split into data wait / compute / aggregation, data stall
= 1 - bound / measured, CPU core-seconds per round over the whole process tree and the average
number of busy cores, GPU utilization (NVML), peak host RSS/PSS and GPU memory, and the
per-client overhead (previous client's last batch to the next client's first batch).
Evaluation is not run. Each kind runs in a fresh interpreter unless --in-process.

    python benchmarks/bench_round.py --device cpu --threads 1 --num-users 20 --frac 0.2 --rounds 5 \\
        --model-kwargs patch_size=32,depth=1,embed_dim=64,num_heads=2 --kinds dali,memmap,memmap@0,memmap-seed
    python benchmarks/bench_round.py --scaling --device cpu --threads 1 --rounds 3 \\
        --model-kwargs patch_size=32,depth=1,embed_dim=64,num_heads=2
    python benchmarks/bench_round.py --preset fedlora-vit-b16 --num-train 50000 --rounds 3 --device cuda:0
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import machine_info, tree_cpu_seconds  # noqa: E402

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
log = logging.getLogger("bench_round")

# Defaults sized for a small CPU machine; a --preset replaces them, explicit flags win over both.
DEFAULTS = dict(alg="fedavg", model="vit_tiny_patch16_224", model_kwargs="depth=2", image_size=224,
                num_train=2000, num_users=10, frac=0.2, local_ep=1, local_bs=32, lr=3e-4,
                partition="iid", alpha=0.5)
PRESET_KEYS = tuple(DEFAULTS)  # what a preset may set here (its rounds, eval and weights do not apply)
KIND_BASES = ("dali", "dali-gpu", "memmap", "memmap-seed")


# --- arguments ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", help="dali-fl preset (fedavg-vit-b16, fedlora-vit-b16, tiny-32); flags override it")
    a("--alg", choices=("fedavg", "fedlora"), help=f"default {DEFAULTS['alg']}")
    a("--model", help=f"timm model, default {DEFAULTS['model']}")
    a("--model-kwargs", help=f"timm kwargs k=v,..., default {DEFAULTS['model_kwargs']!r}")
    a("--pretrained", action=argparse.BooleanOptionalAction, default=False,
      help="load pretrained weights (default: random init; timing does not depend on them)")
    a("--image-size", type=int, help=f"stored image side, default {DEFAULTS['image_size']}")
    a("--num-train", type=int, help=f"synthetic train images, default {DEFAULTS['num_train']} (scaling: 10000)")
    a("--num-users", type=int, help=f"clients, default {DEFAULTS['num_users']}")
    a("--frac", type=float, help=f"fraction of clients per round, default {DEFAULTS['frac']}")
    a("--partition", choices=("iid", "dirichlet", "shards"),
      help="default iid: equal clients make rounds comparable (presets: dirichlet)")
    a("--alpha", type=float, help="Dirichlet concentration, default 0.5")
    a("--local-ep", type=int, help=f"local epochs, default {DEFAULTS['local_ep']}")
    a("--local-bs", type=int, help=f"local batch size, default {DEFAULTS['local_bs']}")
    a("--lr", type=float, help="local learning rate, default 3e-4")
    a("--kinds", help="comma-separated: dali, dali-gpu, memmap, memmap@N (N workers), memmap-seed; "
                      "default all (dali-gpu only with a GPU; scaling: dali,memmap)")
    a("--workers", type=int, default=2, help="DataLoader workers of `memmap` (memmap-seed keeps the seed's 4)")
    a("--device", help="cpu, cuda or cuda:N (default cuda:0 when present, else cpu)")
    a("--threads", type=int, help="torch intra-op threads (default: torch's own, one per core)")
    a("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="auto = bf16 on GPU, off on CPU")
    a("--augment", action=argparse.BooleanOptionalAction, default=True, help="flip + padded crop, as in training")
    a("--rounds", type=int, default=3, help="measured rounds after one warm-up round (median reported)")
    a("--seed", type=int, default=0)
    a("--scaling", action="store_true", help="scaling mode: clients and image size, same total data")
    a("--scaling-users", default="100,1000,10000", help="client counts measured at the largest size")
    a("--scaling-sizes", default="128,224", help="image sizes measured at the smallest client count")
    a("--scaling-clients", type=int, default=4, help="clients sampled per round in scaling mode")
    a("--data-dir", type=Path, default=ROOT / "data" / "bench-round", help="where the synthetic stores go")
    a("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>)")
    a("--in-process", action="store_true",
      help="measure every kind in this process (fast start; memory peaks are then not per kind)")
    a("--no-plot", action="store_true", help="skip the PNG")
    a("--one-point", type=Path, help=argparse.SUPPRESS)  # internal: child process measuring one point
    return p


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Settings: bench defaults, then the preset's values, then the flags given explicitly."""
    from dali_fl.config import PRESETS

    if args.preset is not None and args.preset not in PRESETS:
        parser.error(f"unknown --preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    preset = {k: v for k, v in PRESETS.get(args.preset, {}).items() if k in PRESET_KEYS}
    base = {**DEFAULTS, "model_kwargs": ""} if args.preset else DEFAULTS  # no depth=2 on a preset's model
    s = {**base, **preset, **{k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}}
    if args.scaling and args.num_train is None:
        s["num_train"] = 10_000
    keep = ("preset", "pretrained", "workers", "threads", "amp", "augment", "rounds", "seed", "scaling",
            "scaling_clients")
    s.update({k: getattr(args, k) for k in keep})
    s["device"] = resolve_device_name(args.device, parser)
    s["kinds"] = parse_kinds(args.kinds, s, parser)
    s["scaling_users"] = int_list(args.scaling_users, "--scaling-users", parser)
    s["scaling_sizes"] = int_list(args.scaling_sizes, "--scaling-sizes", parser)
    if args.rounds < 1 or s["num_train"] < s["local_bs"]:
        parser.error("need --rounds >= 1 and --num-train >= --local-bs (the bound caches one full batch)")
    if args.scaling and max(s["scaling_users"]) > s["num_train"]:
        parser.error(f"--num-train {s['num_train']} is smaller than {max(s['scaling_users'])} clients")
    return s


def resolve_device_name(device: Optional[str], parser: argparse.ArgumentParser) -> str:
    import torch

    if device is None:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def parse_kinds(text: Optional[str], s: dict, parser: argparse.ArgumentParser) -> list[str]:
    """Kind labels to measure; `dali-gpu` is dropped from the default list on a CPU-only run."""
    on_gpu = s["device"].startswith("cuda")
    if text is None:
        default = ["dali", "memmap"] if s["scaling"] else ["dali", "dali-gpu", "memmap", "memmap-seed"]
        return [k for k in default if on_gpu or k != "dali-gpu"]
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    for k in kinds:
        base, _, workers = k.partition("@")
        if base not in KIND_BASES or (workers and (base != "memmap" or not workers.isdigit())):
            parser.error(f"unknown kind {k!r}; choose from {', '.join(KIND_BASES)} or memmap@N")
        if base == "dali-gpu" and not on_gpu:
            parser.error("kind dali-gpu (--data-on-gpu) needs a CUDA device")
    return kinds


def int_list(text: str, flag: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{flag} wants positive integers separated by commas, got {text!r}")
    return values


# --- measurement helpers -------------------------------------------------------------------------


FAST_FIELDS = ("rss", "rss_anon")  # /proc/PID/status counters: cheap, sampled every interval
SLOW_FIELDS = ("pss", "pss_anon", "pss_file", "pss_store")  # page-table walks: about every 5 s
STORE_FILES = "_images.npy"  # the store's image arrays, memory-mapped by every loader kind


def _kib_fields(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}


def fast_memory(pid: int) -> dict[str, int]:
    """RSS and its anonymous part (heaps, tensors, buffers) of one process, in bytes."""
    kib = _kib_fields(Path(f"/proc/{pid}/status").read_text())
    return {"rss": kib["VmRSS"] << 10, "rss_anon": kib.get("RssAnon", 0) << 10}


def slow_memory(pid: int, store_dir: str) -> dict[str, int]:
    """PSS of one process, split into anonymous, file-backed, and the store's mapped image pages."""
    kib = _kib_fields(Path(f"/proc/{pid}/smaps_rollup").read_text())
    store, in_store = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef":  # a mapping's header line; field lines start uppercase
                # this run's store (or its -f32 sibling, for memmap-seed) only, not other open stores
                mapped = line.rstrip().split(maxsplit=5)[5:]
                in_store = bool(mapped) and mapped[0].endswith(STORE_FILES) and \
                    mapped[0].startswith((store_dir + os.sep, store_dir + "-f32" + os.sep))
            elif in_store and line.startswith("Pss:"):
                store += int(line.split()[1])
    return {"pss": kib["Pss"] << 10, "pss_anon": kib.get("Pss_Anon", 0) << 10,
            "pss_file": kib.get("Pss_File", 0) << 10, "pss_store": store << 10}


def tree_memory(store_dir: str, slow: bool = True) -> dict[str, int]:
    """Memory figures in bytes summed over this process and its descendants (Linux /proc)."""
    me = psutil.Process()
    total = dict.fromkeys(FAST_FIELDS + (SLOW_FIELDS if slow else ()), 0)
    for proc in [me, *me.children(recursive=True)]:
        try:
            parts = {**fast_memory(proc.pid), **(slow_memory(proc.pid, store_dir) if slow else {})}
        except (OSError, KeyError):  # exited meanwhile
            continue
        for k, v in parts.items():
            total[k] += v
    return total


def nvml_handle(device):
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

    def __init__(self, store_dir: str, gpu=None, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.store_dir = store_dir
        self.gpu, self.interval = gpu, interval if gpu is None else min(interval, 0.1)
        self.peak = dict.fromkeys(FAST_FIELDS + SLOW_FIELDS, 0)  # each field's own peak
        self._count, self._slow_every = 0, max(1, round(5.0 / self.interval))  # PSS about every 5 s
        self.gpu_samples: list[tuple[float, float, float]] = []  # (time, util %, used MiB)
        self.own_cpu = 0.0  # this thread's CPU time, taken out of the measured rounds
        self._halt = threading.Event()

    def sample(self, full: bool = False) -> None:
        self._count += 1
        for k, v in tree_memory(self.store_dir, slow=full or self._count % self._slow_every == 1).items():
            self.peak[k] = max(self.peak[k], v)
        if self.gpu is not None:
            import pynvml

            util = pynvml.nvmlDeviceGetUtilizationRates(self.gpu).gpu
            used = pynvml.nvmlDeviceGetMemoryInfo(self.gpu).used / MIB
            self.gpu_samples.append((time.perf_counter(), float(util), used))

    def run(self) -> None:
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
        self._halt.set()
        self.join()


class TimedLoader:
    """Wraps a loader: notes when each epoch's first batch arrives and when the epoch ends."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.epochs: list[tuple[object, Optional[float], float]] = []  # (indices, first batch, end)

    def epoch(self, indices: np.ndarray, seed: int, shuffle: bool = True) -> Iterator:
        return self._timed(self.inner.epoch(indices, seed, shuffle), indices)

    def _timed(self, batches: Iterator, indices: np.ndarray) -> Iterator:
        first = None
        for batch in batches:
            if first is None:
                first = time.perf_counter()
            yield batch
        device = getattr(getattr(self.inner, "cfg", None), "device", None) or getattr(self.inner, "device", None)
        if device is not None and device.type == "cuda":
            import torch

            torch.cuda.synchronize(device)  # the client's queued GPU work is compute, not switch time
        self.epochs.append((indices, first, time.perf_counter()))

    def gaps(self) -> tuple[list[float], list[float]]:
        """(client switches, epoch switches) in seconds: one epoch's end to the next one's first batch."""
        clients, epochs = [], []
        for (prev_idx, _, prev_end), (idx, first, _) in zip(self.epochs, self.epochs[1:]):
            if first is not None:
                (epochs if idx is prev_idx else clients).append(first - prev_end)
        return clients, epochs

    def close(self) -> None:
        self.inner.close()


class CachedBatch:
    """The compute-only bound: one device batch served as views, in the real epoch's batch sizes."""

    def __init__(self, images, labels) -> None:
        self.images, self.labels = images, labels
        self.device = images.device

    @classmethod
    def from_loader(cls, loader, batch_size: int) -> "CachedBatch":
        images, labels = next(iter(loader.epoch(np.arange(batch_size), 0)))
        return cls(images.clone(), labels.clone())  # a copy: loaders may reuse their output buffers

    def epoch(self, indices: np.ndarray, seed: int, shuffle: bool = True) -> Iterator:
        from dali_fl.order import batch_bounds

        for a, b in batch_bounds(len(indices), int(self.images.shape[0])):
            yield self.images[: b - a], self.labels[: b - a]

    def close(self) -> None:
        return None


# --- one measured point (one kind, one configuration) ---------------------------------------------

def train_config(s: dict, point: dict, store: str):
    """The TrainConfig of one point: same store, partition, seed and model for every kind."""
    from dali_fl.config import TrainConfig

    base, _, workers = point["kind"].partition("@")
    return TrainConfig.from_options(dict(
        alg=s["alg"], rounds=s["rounds"] + 1, num_users=point["num_users"], frac=point["frac"],
        partition=point["partition"], alpha=s["alpha"], seed=s["seed"], local_ep=s["local_ep"],
        local_bs=s["local_bs"], lr=s["lr"], model=s["model"], model_kwargs=s["model_kwargs"],
        pretrained=s["pretrained"], store=store, loader="dali" if base == "dali-gpu" else base,
        data_on_gpu=base == "dali-gpu", augment=s["augment"], device=s["device"], amp=s["amp"], eval_bs=64,
        num_workers=int(workers) if workers else s["workers"]))


def timed_round(fx, round_: int, loader, sampler: Sampler) -> dict:
    """One real `run_round` with `loader` swapped in, plus CPU, GPU and switch figures."""
    from dali_fl.federation import run_round

    timed = TimedLoader(loader)
    cpu0, own0 = tree_cpu_seconds(), sampler.own_cpu
    t0 = time.perf_counter()
    row = run_round(fx, round_, loader=timed)
    t1 = time.perf_counter()
    cpu = tree_cpu_seconds() - cpu0 - (sampler.own_cpu - own0)
    util, used = sampler.gpu_window(t0, t1)
    clients, epochs = timed.gaps()
    keep = ("round", "num_clients", "num_samples", "round_time_s", "data_wait_s", "compute_s", "aggregate_s",
            "images_per_s", "peak_gpu_mem_mb", "train_loss")
    out = {k: row[k] for k in keep}
    out.update(images=row["num_samples"] * fx.cfg.local.local_ep, cpu_core_s=cpu,
               busy_cores=cpu / row["round_time_s"], gpu_util_pct=util, gpu_used_mib=used,
               client_switch_s=clients, epoch_switch_s=epochs,
               other_s=row["round_time_s"] - row["data_wait_s"] - row["compute_s"] - row["aggregate_s"])
    return out


def measure_point(s: dict, point: dict) -> dict:
    """Build the federation once, warm up one round, then alternate measured and bound rounds."""
    import torch

    from dali_fl.run import prepare

    warnings.filterwarnings("ignore", message="This DataLoader will create")  # the seed's 4 workers
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    device = torch.device(s["device"])
    store_dir = str(Path(point["store"]).resolve())
    sampler = Sampler(store_dir, nvml_handle(device))
    base = tree_memory(store_dir)
    sampler.start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        fx, _ = prepare(train_config(s, point, point["store"]), Path(run_dir), resume=False, write=False)
    build_s = time.perf_counter() - t0
    real = fx.train_loader
    try:
        bound = CachedBatch.from_loader(real, s["local_bs"])
        warm = timed_round(fx, 1, real, sampler)
        rounds, bounds = [], []
        for r in range(2, s["rounds"] + 2):  # same round numbers = same clients for both
            rounds.append(timed_round(fx, r, real, sampler))
            bounds.append(timed_round(fx, r, bound, sampler))
        sampler.sample(full=True)  # mapped store pages only accumulate: the end is their peak
    finally:
        fx.close()
        sampler.stop()
    mem = {**{f"base_{k}_mib": v / MIB for k, v in base.items()},
           **{f"peak_{k}_mib": v / MIB for k, v in sampler.peak.items()}}
    return summarize(point, build_s, warm, rounds, bounds, mem)


def median_row(rows: list[dict]) -> dict:
    """The round with the median round time (the lower one of an even count), so its parts add up."""
    return sorted(rows, key=lambda r: r["round_time_s"])[(len(rows) - 1) // 2]


def med(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(point: dict, build_s: float, warm: dict, rounds: list[dict], bounds: list[dict],
              mem: dict) -> dict:
    """Per-kind figures: the median round's split, medians of the rest, stall against the bound."""
    m, b = median_row(rounds), median_row(bounds)
    stall = 1 - b["round_time_s"] / m["round_time_s"]  # the medians the table shows; odd --rounds keep them exact
    loader_cpu = med((ro["cpu_core_s"] - bo["cpu_core_s"]) / ro["images"] for ro, bo in zip(rounds, bounds))
    switches = [x for r in rounds for x in r["client_switch_s"]]
    bound_switches = [x for r in bounds for x in r["client_switch_s"]]
    gpu_mem = [r["peak_gpu_mem_mb"] for r in rounds if r["peak_gpu_mem_mb"] is not None]
    gpu_used = [r["gpu_used_mib"] for r in rounds if r["gpu_used_mib"] is not None]
    return {**point, "build_s": build_s, "warmup_round_s": warm["round_time_s"], "loadavg_1m": os.getloadavg()[0],
            "images_per_round": m["images"], "clients_per_round": m["num_clients"],
            **{k: m[k] for k in ("round_time_s", "data_wait_s", "compute_s", "aggregate_s", "other_s")},
            "images_per_s": med(r["images_per_s"] for r in rounds),
            "bound_round_time_s": b["round_time_s"], "bound_compute_s": b["compute_s"],
            "data_stall": max(0.0, stall), "data_stall_raw": stall,
            "wait_fraction": med(r["data_wait_s"] / r["round_time_s"] for r in rounds),
            "cpu_core_s": med(r["cpu_core_s"] for r in rounds), "busy_cores": med(r["busy_cores"] for r in rounds),
            "bound_cpu_core_s": med(r["cpu_core_s"] for r in bounds),
            "bound_busy_cores": med(r["busy_cores"] for r in bounds),
            "cpu_core_s_per_1k_images": med(1000 * r["cpu_core_s"] / r["images"] for r in rounds),
            "loader_core_s_per_1k_images": 1000 * loader_cpu,
            "gpu_util_pct": med(r["gpu_util_pct"] for r in rounds),
            "bound_gpu_util_pct": med(r["gpu_util_pct"] for r in bounds),
            "client_switch_ms": 1000 * med(switches) if switches else None,
            "bound_client_switch_ms": 1000 * med(bound_switches) if bound_switches else None,
            "epoch_switch_ms": 1000 * med(x for r in rounds for x in r["epoch_switch_s"])
            if any(r["epoch_switch_s"] for r in rounds) else None,
            "peak_gpu_mem_mib": max(gpu_mem) if gpu_mem else None,
            "peak_gpu_used_mib": max(gpu_used) if gpu_used else None,
            **mem, "rounds": rounds, "bound_rounds": bounds}


# --- the parent: stores, points, children ---------------------------------------------------------

def prepare_stores(s: dict, data_dir: Path, sizes: list[int]) -> dict[int, str]:
    """The uint8 store per image size (and its float32 sibling when memmap-seed is measured)."""
    from dali_fl.sources import load_synthetic
    from dali_fl.store import write_store

    source = load_synthetic(s["num_train"], 64, seed=s["seed"])
    dtypes = ["uint8"] + (["float32"] if any(k.startswith("memmap-seed") for k in s["kinds"]) else [])
    out = data_dir / f"n{s['num_train']}-seed{s['seed']}"  # write_store refuses other settings in place
    paths = {}
    for size in sizes:
        for dtype in dtypes:
            t0 = time.perf_counter()
            path, written = write_store(source, out, size, dtype=dtype, progress=False)
            log.info("%s %s store %s (%.0f s)", "wrote" if written else "reusing", dtype, path.name,
                     time.perf_counter() - t0)
            if dtype == "uint8":
                paths[size] = str(path)
    return paths


def make_points(s: dict, stores: dict[int, str]) -> list[dict]:
    """What to measure: every kind at the settings; in scaling mode, clients x size per kind."""
    if not s["scaling"]:
        return [dict(kind=k, num_users=s["num_users"], frac=s["frac"], partition=s["partition"],
                     image_size=s["image_size"], store=stores[s["image_size"]]) for k in s["kinds"]]
    big, few = max(s["scaling_sizes"]), min(s["scaling_users"])
    grid = [(u, big) for u in s["scaling_users"]] + [(few, z) for z in s["scaling_sizes"] if z != big]
    # IID: 10,000 clients of one image each is the extreme the overhead figure is about.
    return [dict(kind=k, num_users=u, frac=min(1.0, s["scaling_clients"] / u), partition="iid",
                 image_size=z, store=stores[z]) for k in s["kinds"] for u, z in grid]


def run_child(s: dict, point: dict) -> dict:
    """Measure one point in a fresh interpreter, so that its CPU and memory are its own."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"settings": s, "point": point, "result": str(result)}))
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one-point", str(spec)], check=True)
        return json.loads(result.read_text())


def run_points(s: dict, points: list[dict], in_process: bool) -> list[dict]:
    results = []
    for i, point in enumerate(points, 1):
        log.info("[%d/%d] %s, %d clients, %d px ...", i, len(points), point["kind"], point["num_users"],
                 point["image_size"])
        res = measure_point(s, point) if in_process else run_child(s, point)
        log.info("  round %.2f s (bound %.2f s, stall %.1f%%), %.2f busy cores, peak PSS %.0f MiB",
                 res["round_time_s"], res["bound_round_time_s"], 100 * res["data_stall"], res["busy_cores"],
                 res["peak_pss_mib"])
        results.append(res)
    return results


# --- machine, report --------------------------------------------------------------------------------

def command_line(argv: list[str]) -> str:
    """The command as run, with paths outside the repository replaced by a placeholder."""
    words = []
    for w in argv:
        if os.path.isabs(w):
            p = Path(w).resolve()
            w = str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else "<outside-repo>"
        words.append(w)
    return " ".join(["python benchmarks/bench_round.py", *words])


def fmt(value, spec: str = ".2f", none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def round_table(results: list[dict]) -> list[str]:
    lines = ["| loader | round (s) | data wait | compute | aggregate | bound (s) | data stall | images/s "
             "| CPU core-s / round | busy cores | core-s / 1k img | loader core-s / 1k img | GPU util % "
             "| peak RSS / PSS (MiB) | store pages PSS (MiB) | peak GPU (MiB) | client switch (ms) |",
             "|---|" + "---:|" * 16]
    for r in results:
        lines.append(
            f"| {r['kind']} | {r['round_time_s']:.2f} | {r['data_wait_s']:.2f} | {r['compute_s']:.2f} "
            f"| {r['aggregate_s']:.3f} | {r['bound_round_time_s']:.2f} | {100 * r['data_stall']:.1f}% "
            f"| {r['images_per_s']:.1f} | {r['cpu_core_s']:.1f} | {r['busy_cores']:.2f} "
            f"| {r['cpu_core_s_per_1k_images']:.1f} | {r['loader_core_s_per_1k_images']:.1f} "
            f"| {fmt(r['gpu_util_pct'], '.0f')} | {r['peak_rss_mib']:.0f} / {r['peak_pss_mib']:.0f} "
            f"| {r['peak_pss_store_mib']:.0f} | {fmt(r['peak_gpu_mem_mib'], '.0f')} "
            f"| {fmt(r['client_switch_ms'], '.1f')} |")
    return lines


def scaling_table(results: list[dict]) -> list[str]:
    lines = ["| loader | clients | image px | images / client | round (s) | bound (s) | peak RSS (MiB) "
             "| peak PSS (MiB) | of which anonymous | of which store pages | anonymous before build "
             "| client switch (ms) | bound switch (ms) | build (s) |",
             "|---|" + "---:|" * 13]
    for r in results:
        lines.append(
            f"| {r['kind']} | {r['num_users']:,} | {r['image_size']} "
            f"| {r['images_per_round'] / max(r['clients_per_round'], 1):.0f} | {r['round_time_s']:.2f} "
            f"| {r['bound_round_time_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['peak_pss_mib']:.0f} "
            f"| {r['peak_pss_anon_mib']:.0f} | {r['peak_pss_store_mib']:.0f} | {r['base_pss_anon_mib']:.0f} "
            f"| {fmt(r['client_switch_ms'], '.1f')} | {fmt(r['bound_client_switch_ms'], '.1f')} "
            f"| {r['build_s']:.1f} |")
    return lines


def markdown(doc: dict) -> str:
    s, m = doc["settings"], doc["machine"]
    where = (f"Machine `{m['id']}`: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB RAM, "
             f"GPU {m['gpu'] or 'none'}; device `{m['device']}`, torch {m['torch']} ({m['torch_threads']} "
             f"threads), DALI {m['dali']}.")
    what = (f"{s['alg']} on `{s['model']}` ({s['model_kwargs'] or 'no kwargs'}), "
            f"{'pretrained' if s['pretrained'] else 'random init'}, synthetic store of {s['num_train']:,} images, "
            f"local_ep {s['local_ep']}, batch {s['local_bs']}, augment {'on' if s['augment'] else 'off'}, "
            f"amp {s['amp']}; one warm-up round, then the median of {s['rounds']} rounds (each paired with "
            "the same round on one cached device batch: the compute-only bound).")
    if not s["scaling"]:
        what += (f" {s['num_users']} clients, frac {s['frac']}, {s['partition']} partition, "
                 f"{s['image_size']} px, memmap workers {s['workers']}.")
    table = scaling_table(doc["results"]) if s["scaling"] else round_table(doc["results"])
    return "\n".join([f"`{doc['command']}`", "", where, "", what, "", *table]) + "\n"


def write_results(doc: dict, out: Path, plot: bool) -> Path:
    """JSON, markdown and (unless told not to) the PNG, named round-*.{json,md,png} under `out`."""
    s = doc["settings"]
    stem = out / (f"round-scaling-{s['alg']}" if s["scaling"] else f"round-{s['alg']}-{s['image_size']}px")
    out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2))
    stem.with_suffix(".md").write_text(markdown(doc))
    if plot:
        sys.path.insert(0, str(ROOT / "tools"))
        from plot_bench import plot

        plot(doc, stem.with_suffix(".png"))
    return stem


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark; returns the result document (also written under --out)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.one_point is not None:
        spec = json.loads(args.one_point.read_text())
        Path(spec["result"]).write_text(json.dumps(measure_point(spec["settings"], spec["point"])))
        return {}
    s = resolve(args, parser)
    sizes = sorted(set(s["scaling_sizes"])) if s["scaling"] else [s["image_size"]]
    stores = prepare_stores(s, args.data_dir, sizes)
    results = run_points(s, make_points(s, stores), args.in_process)
    for r in results:
        r["store"] = Path(r["store"]).name  # no paths outside the repository in the results
    machine = machine_info(s["device"], s["threads"])
    doc = {"mode": "scaling" if s["scaling"] else "round", "command": command_line(argv),
           "date": dt.date.today().isoformat(), "machine": machine, "settings": s, "results": results}
    out = args.out or ROOT / "benchmarks" / "results" / f"{machine['id']}-{dt.date.today():%Y%m%d}"
    stem = write_results(doc, out, not args.no_plot)
    print(markdown(doc))
    print(f"wrote {stem}.json, .md{'' if args.no_plot else ', .png'}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
