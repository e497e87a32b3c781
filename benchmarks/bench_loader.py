#!/usr/bin/env python
"""Loader benchmark: one simulated FL round of loading (no model) through each loader kind.

Each kind runs in its own child process so that its CPU time and memory are its own: images/s,
CPU core-seconds per 1,000 images over every process the loader started, peak RSS and PSS of the
process tree, and the time to switch from one client to the next. Warm-up round first, then the
median of --repeats rounds.

    python benchmarks/bench_loader.py --image-size 224 --num-images 3000 --device cpu
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import machine_info, tree_cpu_seconds  # noqa: E402

import numpy as np
import psutil
import torch

from dali_fl.loaders import LOADER_KINDS, LoaderWorkers, make_loader
from dali_fl.normalize import IMAGENET
from dali_fl.sources import load_synthetic
from dali_fl.store import open_store, write_store

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image-size", type=int, default=224, help="side of the stored images")
    p.add_argument("--num-images", type=int, default=3000, help="synthetic train images")
    p.add_argument("--clients", type=int, default=10, help="clients in the round")
    p.add_argument("--samples-per-client", type=int, default=300, help="IID samples per client")
    p.add_argument("--local-ep", type=int, default=2, help="local epochs per client")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="measured rounds after the warm-up round")
    p.add_argument("--kinds", default=",".join(LOADER_KINDS), help="comma-separated loader kinds")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random crop (padding 4) + flip, as in training")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="loader output dtype")
    p.add_argument("--workers", type=int, default=LoaderWorkers().num_workers,
                   help="DataLoader workers of the memmap kind (memmap-seed keeps the seed's 4)")
    p.add_argument("--data-on-gpu", action="store_true", help="dali: keep the split in GPU memory")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "bench", help="where stores go")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="results directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--one-kind", help=argparse.SUPPRESS)  # internal: measure one kind, print JSON
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in args.kinds if k not in LOADER_KINDS]
    if bad:
        p.error(f"unknown kinds {bad}; choose from {', '.join(LOADER_KINDS)}")
    if args.clients * args.samples_per_client > args.num_images:
        p.error("--clients x --samples-per-client exceeds --num-images (an IID split is disjoint)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available here")
    return args


# --- measurement helpers ---------------------------------------------------------------------


class TreeMemory(threading.Thread):
    """Samples RSS and PSS summed over the process tree; keeps the peaks."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak_rss, self.peak_pss = interval, 0, 0
        self.own_cpu = 0.0  # this thread's CPU time, subtracted from the loader's
        self._stop_event = threading.Event()

    def sample(self) -> tuple[int, int]:
        me = psutil.Process()
        rss = pss = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                rss, pss = rss + info.rss, pss + info.pss
            except psutil.Error:
                pass
        return rss, pss

    def run(self) -> None:
        start = time.thread_time()
        while not self._stop_event.is_set():
            rss, pss = self.sample()
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.own_cpu = time.thread_time() - start
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def iid_clients(num_images: int, clients: int, per_client: int, seed: int) -> list[np.ndarray]:
    """Disjoint IID client index sets."""
    perm = np.random.default_rng(seed).permutation(num_images)[:clients * per_client]
    return [np.sort(c) for c in perm.reshape(clients, per_client)]


def run_round(loader, clients: list[np.ndarray], local_ep: int, round_no: int,
              device: torch.device) -> tuple[int, float, list[float]]:
    """One round of loading; returns (images, seconds, client-switch seconds)."""
    images, switches, last = 0, [], None
    start = time.perf_counter()
    for c, idx in enumerate(clients):
        for e in range(local_ep):
            for b, (x, y) in enumerate(loader.epoch(idx, seed=round_no * 10_000 + c * 100 + e)):
                x.sum(), y.sum()  # touch the batch as a training step would
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                if e == 0 and b == 0 and last is not None:
                    switches.append(now - last)  # previous client's last batch -> this one's first
                images += len(y)
                last = now
    return images, time.perf_counter() - start, switches


# --- one kind (child process) ----------------------------------------------------------------

def measure_kind(args: argparse.Namespace, kind: str) -> dict:
    """Build the kind's loader once, warm up one round, then measure --repeats rounds."""
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # the seed's 4 workers
    device = torch.device(args.device)
    store = open_store(args.store_paths[kind])
    clients = iid_clients(store.manifest["splits"]["train"]["count"], args.clients,
                          args.samples_per_client, args.seed)
    memory = TreeMemory()
    memory.start()
    t0 = time.perf_counter()
    workers = LoaderWorkers(num_workers=args.workers) if kind == "memmap" else None
    loader = make_loader(kind, store, "train", batch_size=args.batch_size, device=device,
                         norm=IMAGENET, augment=args.augment, out_dtype=getattr(torch, args.dtype),
                         data_on_gpu=args.data_on_gpu and kind == "dali", workers=workers)
    build_s = time.perf_counter() - t0
    run_round(loader, clients, args.local_ep, 0, device)  # warm-up: page cache, workers, allocators
    rounds = []
    for r in range(1, args.repeats + 1):
        cpu0, mem_cpu0 = tree_cpu_seconds(), memory.own_cpu
        n, secs, switches = run_round(loader, clients, args.local_ep, r, device)
        cpu = tree_cpu_seconds() - cpu0 - (memory.own_cpu - mem_cpu0)
        rounds.append({"images": n, "seconds": secs, "cpu_seconds": cpu, "switch_s": switches})
    loader.close()
    memory.stop()
    return summarize(kind, build_s, rounds, memory)


def summarize(kind: str, build_s: float, rounds: list[dict], memory: TreeMemory) -> dict:
    """Medians over the measured rounds."""
    med = statistics.median
    switches = [s for r in rounds for s in r["switch_s"]]
    return {"kind": kind, "build_s": build_s,
            "images_per_s": med(r["images"] / r["seconds"] for r in rounds),
            "cpu_core_s_per_1k": med(1000 * r["cpu_seconds"] / r["images"] for r in rounds),
            "switch_ms": 1000 * med(switches) if switches else None,
            "peak_rss_mib": memory.peak_rss / MIB, "peak_pss_mib": memory.peak_pss / MIB,
            "rounds": rounds}


# --- parent: stores, children, report ----------------------------------------------------------

def prepare_stores(args: argparse.Namespace) -> dict[str, str]:
    """Build (or reuse) the uint8 store, and the float32 one when memmap-seed is measured."""
    source = load_synthetic(args.num_images, 1, seed=args.seed)
    paths = {}
    for dtype in sorted({"float32" if k == "memmap-seed" else "uint8" for k in args.kinds}):
        path, written = write_store(source, args.data_dir, args.image_size, dtype=dtype,
                                    progress=True)
        print(f"{'wrote' if written else 'reusing'} {dtype} store {path}", file=sys.stderr)
        paths[dtype] = str(path)
    return {k: paths["float32" if k == "memmap-seed" else "uint8"] for k in args.kinds}


def run_children(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """Measure each kind in a fresh interpreter, so nothing of one kind's run counts for another."""
    results = []
    for kind in args.kinds:
        with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
            cmd = [sys.executable, __file__, *argv, "--one-kind", kind]
            env = {**os.environ, "BENCH_STORES": json.dumps(args.store_paths),
                   "BENCH_OUT": out.name}
            print(f"measuring {kind} ...", file=sys.stderr)
            subprocess.run(cmd, check=True, env=env)
            results.append(json.load(open(out.name)))
    return results



def markdown(results: list[dict], machine: dict, args: argparse.Namespace, command: str) -> str:
    """The results as a markdown table with its command and machine."""
    m = machine
    lines = [f"`{command}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB RAM, "
             f"GPU: {m['gpu'] or 'none'}; device `{m['device']}`; torch {m['torch']}, "
             f"DALI {m['dali']}. {args.clients} clients x {args.samples_per_client} samples x "
             f"{args.local_ep} local epochs, batch {args.batch_size}, {args.image_size} px, "
             f"augment {'on' if args.augment else 'off'}, {args.dtype}; "
             f"median of {args.repeats} rounds after a warm-up round.", "",
             "| loader | images/s | CPU core-s / 1k images | peak RSS (MiB) | peak PSS (MiB) "
             "| client switch (ms) | build (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        switch = f"{r['switch_ms']:.1f}" if r["switch_ms"] is not None else "n/a"
        lines.append(f"| {r['kind']} | {r['images_per_s']:.0f} | {r['cpu_core_s_per_1k']:.2f} "
                     f"| {r['peak_rss_mib']:.0f} | {r['peak_pss_mib']:.0f} | {switch} "
                     f"| {r['build_s']:.2f} |")
    return "\n".join(lines) + "\n"


def write_results(results: list[dict], args: argparse.Namespace, command: str) -> str:
    """Write loader-<machine>-<date>.{json,md} under --out; returns the markdown."""
    machine = machine_info(args.device)
    name = machine["gpu"] if args.device == "cuda" else machine["cpu"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + f"-{machine['cores']}c"
    stem = args.out / f"loader-{slug}-{dt.date.today():%Y%m%d}"
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(results, machine, args, command)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("one_kind", "store_paths")}
    report = {"command": command, "machine": machine, "settings": settings, "results": results}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(md)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return md


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.one_kind:
        args.store_paths = json.loads(os.environ["BENCH_STORES"])
        Path(os.environ["BENCH_OUT"]).write_text(json.dumps(measure_kind(args, args.one_kind)))
        return
    args.store_paths = prepare_stores(args)
    results = run_children(args, argv)
    command = "python benchmarks/bench_loader.py " + " ".join(argv)
    print(write_results(results, args, command.strip()))


if __name__ == "__main__":
    main()
