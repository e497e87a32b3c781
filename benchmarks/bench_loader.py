"""Loader benchmark: one simulated FL round of loading (no model) through each loader kind.

Each kind runs in its own child process so that its CPU time and memory are its own: images/s,
CPU core-seconds per 1,000 images over every process the loader started, peak RSS and PSS of the
process tree, and the time to switch from one client to the next. Warm-up round first, then the
median of --repeats rounds.

`dali-resize` and `memmap-resize` read a store at its native --native-size and resize each batch to
--image-size on the device (`--resize-to`), against `dali`/`memmap` reading a store prep resized offline.

    python -m benchmarks.bench_loader --image-size 224 --num-images 3000 --device cpu
    python -m benchmarks.bench_loader --image-size 224 --kinds dali,dali-resize --device cuda --data-on-gpu
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

# Run as a file (`python benchmarks/X.py`, from any directory), Python puts benchmarks/ first on sys.path, not the
# repository: put the repository first, so that `benchmarks` is this package whatever else is installed by that name.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.child import add_child_flag, run_child, serve_child
from benchmarks.measure import MIB, ROOT, command_line, machine_info, shown_path, tree_cpu_seconds
from benchmarks.report import results_dir, table, write_results
from benchmarks.sampler import Sampler
from dali_fl.data.sources import load_synthetic
from dali_fl.data.store import open_store, write_store
from dali_fl.errors import DaliFlError
from dali_fl.loaders import LOADER_KINDS, LoaderWorkers, loader_class, make_loader
from dali_fl.loaders.normalize import IMAGENET

MODULE = "benchmarks.bench_loader"
RESIZE = "-resize"  # kind suffix: the native store, resized on the device
KINDS = (*LOADER_KINDS, *(k + RESIZE for k in LOADER_KINDS if loader_class(k).supports_resize))


@dataclass(frozen=True)
class Settings:
    """One run's settings, in the order the results record them."""

    image_size: int
    num_images: int
    clients: int
    samples_per_client: int
    local_ep: int
    batch_size: int
    repeats: int
    kinds: tuple[str, ...]
    device: str
    augment: bool
    dtype: str
    workers: int
    data_on_gpu: bool
    data_dir: Path
    out: Optional[Path]
    seed: int
    native_size: int = 32

    def __post_init__(self) -> None:
        # JSON (the child's spec) brings lists and strings back; paths absolute because children run
        # from the repository root, not the caller's directory
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "data_dir", Path(self.data_dir).resolve())
        object.__setattr__(self, "out", None if self.out is None else Path(self.out).resolve())

    def as_json(self) -> dict:
        """Every field in JSON types, for the child's spec."""
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    def record(self, out: Path) -> dict:
        """The settings as the results keep them: paths relative to the repository, `out` the folder used."""
        return {**self.as_json(), "data_dir": shown_path(self.data_dir), "out": shown_path(out)}


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image-size", type=int, default=224,
                   help="side of the images served (and stored, except for *-resize)")
    p.add_argument("--native-size", type=int, default=32, help="side of the native store the *-resize kinds read")
    p.add_argument("--num-images", type=int, default=3000, help="synthetic train images")
    p.add_argument("--clients", type=int, default=10, help="clients in the round")
    p.add_argument("--samples-per-client", type=int, default=300, help="IID samples per client")
    p.add_argument("--local-ep", type=int, default=2, help="local epochs per client")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="measured rounds after the warm-up round")
    p.add_argument("--kinds", default=",".join(LOADER_KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random crop (padding 4) + flip, as in training")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="loader output dtype")
    p.add_argument("--workers", type=int, default=LoaderWorkers().num_workers,
                   help="DataLoader workers of the memmap kind (memmap-seed keeps the seed's 4)")
    p.add_argument("--data-on-gpu", action="store_true", help="dali: keep the split in GPU memory")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "bench", help="where stores go")
    p.add_argument("--out", type=Path, help="results folder; unset: benchmarks/results/<machine>-<date>")
    p.add_argument("--seed", type=int, default=0)
    add_child_flag(p)
    return p


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """The run's settings from the parsed flags, or a usage error."""
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        parser.error(f"unknown kinds {bad}; choose from {', '.join(KINDS)}")
    if args.clients * args.samples_per_client > args.num_images:
        parser.error("--clients x --samples-per-client exceeds --num-images (an IID split is disjoint)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available here")
    if args.data_on_gpu and args.device != "cuda":
        parser.error("--data-on-gpu needs --device cuda; it keeps the split in GPU memory")
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    return Settings(**{**fields, "kinds": kinds})


def iid_clients(num_images: int, clients: int, per_client: int, seed: int) -> list[np.ndarray]:
    """Disjoint IID client index sets."""
    perm = np.random.default_rng(seed).permutation(num_images)[:clients * per_client]
    return [np.sort(c) for c in perm.reshape(clients, per_client)]


def run_round(loader: Any, clients: list[np.ndarray], local_ep: int, round_no: int,
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


def measure_kind(s: Settings, kind: str, store_path: str) -> dict:
    """Build the kind's loader once, warm up one round, then measure --repeats rounds."""
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # the seed's 4 workers
    device = torch.device(s.device)
    store = open_store(store_path)
    clients = iid_clients(store.manifest["splits"]["train"]["count"], s.clients, s.samples_per_client, s.seed)
    memory = Sampler(interval=0.2, pss_every_s=0)  # short rounds: PSS at every sample
    memory.start()
    t0 = time.perf_counter()
    base = kind.removesuffix(RESIZE)
    workers = LoaderWorkers(num_workers=s.workers) if base == "memmap" else None
    loader = make_loader(base, store, "train", batch_size=s.batch_size, device=device,
                         norm=IMAGENET, augment=s.augment, out_dtype=getattr(torch, s.dtype),
                         data_on_gpu=s.data_on_gpu and base == "dali", workers=workers,
                         image_size=s.image_size if base != kind else None)
    build_s = time.perf_counter() - t0
    run_round(loader, clients, s.local_ep, 0, device)  # warm-up: page cache, workers, allocators
    rounds = []
    for r in range(1, s.repeats + 1):
        cpu0, mem_cpu0 = tree_cpu_seconds(), memory.own_cpu
        n, secs, switches = run_round(loader, clients, s.local_ep, r, device)
        cpu = tree_cpu_seconds() - cpu0 - (memory.own_cpu - mem_cpu0)
        rounds.append({"images": n, "seconds": secs, "cpu_seconds": cpu, "switch_s": switches})
    loader.close()
    memory.stop()
    return summarize(kind, build_s, rounds, memory.peak)


def summarize(kind: str, build_s: float, rounds: list[dict], peak: dict[str, int]) -> dict:
    """Medians over the measured rounds."""
    med = statistics.median
    switches = [s for r in rounds for s in r["switch_s"]]
    return {"kind": kind, "build_s": build_s,
            "images_per_s": med(r["images"] / r["seconds"] for r in rounds),
            "cpu_core_s_per_1k": med(1000 * r["cpu_seconds"] / r["images"] for r in rounds),
            "switch_ms": 1000 * med(switches) if switches else None,
            "peak_rss_mib": peak["rss"] / MIB, "peak_pss_mib": peak["pss"] / MIB,
            "rounds": rounds}


def measure_in_child(settings: dict, task: dict) -> dict:
    """The child's side of run_child: one kind under the parent's settings."""
    return measure_kind(Settings(**settings), task["kind"], task["store"])


def store_key(s: Settings, kind: str) -> tuple[int, str]:
    """(side, dtype) of the store `kind` reads: the native size for *-resize, float32 for memmap-seed."""
    return (s.native_size if kind.endswith(RESIZE) else s.image_size,
            "float32" if kind == "memmap-seed" else "uint8")


def store_root(s: Settings) -> Path:
    """The folder of this run's stores: one per synthetic source, so another --num-images or --seed never meets them."""
    return s.data_dir / f"loader-n{s.num_images}-seed{s.seed}"  # not bench_round's n<N>-seed<S>: its test split differs


def prepare_stores(s: Settings) -> dict[str, str]:
    """Build (or reuse) every store the kinds read: uint8 at each size, float32 when memmap-seed is measured."""
    source = load_synthetic(s.num_images, 1, seed=s.seed)
    paths = {}
    for size, dtype in sorted({store_key(s, k) for k in s.kinds}):
        t0 = time.perf_counter()
        path, written = write_store(source, store_root(s), size, dtype=dtype, progress=True)
        print(f"{'wrote' if written else 'reusing'} {dtype} store {path} ({time.perf_counter() - t0:.1f} s)",
              file=sys.stderr)
        paths[size, dtype] = str(path)
    return {k: paths[store_key(s, k)] for k in s.kinds}


def run_children(s: Settings, stores: dict[str, str]) -> list[dict]:
    """Measure each kind in a fresh interpreter, so nothing of one kind's run counts for another."""
    results = []
    for kind in s.kinds:
        print(f"measuring {kind} ...", file=sys.stderr)
        results.append(run_child(MODULE, s.as_json(), {"kind": kind, "store": stores[kind]}))
    return results


def markdown(results: list[dict], machine: dict, s: Settings, command: str) -> str:
    """The results as a markdown table with its command and machine."""
    m = machine
    rows = ([r["kind"], f"{r['images_per_s']:.0f}", f"{r['cpu_core_s_per_1k']:.2f}", f"{r['peak_rss_mib']:.0f}",
             f"{r['peak_pss_mib']:.0f}", f"{r['switch_ms']:.1f}" if r["switch_ms"] is not None else "n/a",
             f"{r['build_s']:.2f}"] for r in results)
    return "\n".join([
        f"`{command}`", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB RAM, "
        f"GPU: {m['gpu'] or 'none'}; device `{m['device']}`; torch {m['torch']}, "
        f"DALI {m['dali']}. {s.clients} clients x {s.samples_per_client} samples x "
        f"{s.local_ep} local epochs, batch {s.batch_size}, {s.image_size} px, "
        f"augment {'on' if s.augment else 'off'}, {s.dtype}; "
        f"median of {s.repeats} rounds after a warm-up round."
        + (f" `*-resize` kinds read the {s.native_size} px store and resize to {s.image_size} px on the device."
           if any(k.endswith(RESIZE) for k in s.kinds) else "")
        + (" `dali` kinds keep the split in GPU memory (--data-on-gpu)." if s.data_on_gpu else ""), "",
        *table(("loader", "images/s", "CPU core-s / 1k images", "peak RSS (MiB)", "peak PSS (MiB)",
                "client switch (ms)", "build (s)"), rows)]) + "\n"


def result_name(image_size: int, native_size: int, kinds: Sequence[str], data_on_gpu: bool) -> str:
    """The results' file stem: each setting that changes what is measured has its own, so no run overwrites another."""
    resized = any(k.endswith(RESIZE) for k in kinds)
    return (f"loader-{image_size}px" + (f"-resize-from-{native_size}px" if resized else "")
            + ("-data-on-gpu" if data_on_gpu else ""))


def write_report(results: list[dict], s: Settings, command: str) -> str:
    """Write loader-<px>px[-resize-from-<n>px][-data-on-gpu].{json,md}; returns the markdown."""
    machine = machine_info(s.device)
    folder = results_dir(machine, s.out)
    md = markdown(results, machine, s, command)
    report = {"command": command, "machine": machine, "settings": s.record(folder), "results": results}
    stem = write_results(folder / result_name(s.image_size, s.native_size, s.kinds, s.data_on_gpu), report, md)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return md


def main(argv: Optional[list[str]] = None) -> None:
    """Run the benchmark, or (as a child) measure one kind."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child is not None:
        serve_child(args.child, measure_in_child)
        return
    s = settings_from_args(args, parser)
    try:
        stores = prepare_stores(s)
    except DaliFlError as err:  # a user error: one line and exit 2, as the CLI does
        print(f"error: {err} (bench_loader keeps its stores under --data-dir {s.data_dir}: remove the "
              "folder named, or pass another --data-dir)", file=sys.stderr)
        sys.exit(2)
    results = run_children(s, stores)
    print(write_report(results, s, command_line(MODULE, argv)))


if __name__ == "__main__":
    main()
