"""Round benchmark: real federated rounds through each loader kind, against a compute-only bound.

For each loader kind (`dali`, `dali-gpu` = dali with --data-on-gpu where a GPU exists, `memmap`,
`memmap-seed`; `memmap@N` picks N DataLoader workers; a `-resize` suffix reads the --native-size store
and resizes to --image-size on the device, i.e. `--resize-to`) this builds the federation once on the same
store, partition, seed and model, runs one warm-up round and then --rounds measured rounds, each
followed by the same round with the loader replaced by one cached device batch (the compute-only
bound). Reported per kind: round time split into data wait / compute / aggregation, data stall
= 1 - bound / measured, CPU core-seconds per round over the whole process tree and the average
number of busy cores, GPU utilization (NVML), peak host RSS/PSS and GPU memory, and the
per-client overhead (previous client's last batch to the next client's first batch).
Evaluation is not run. Each kind runs in a fresh interpreter unless --in-process.

    python -m benchmarks.bench_round --device cpu --threads 1 --num-users 20 --frac 0.2 --rounds 5 \\
        --model-kwargs patch_size=32,depth=1,embed_dim=64,num_heads=2 --kinds dali,memmap,memmap@0,memmap-seed
    python -m benchmarks.bench_round --scaling --device cpu --threads 1 --rounds 3 \\
        --model-kwargs patch_size=32,depth=1,embed_dim=64,num_heads=2
    python -m benchmarks.bench_round --preset fedlora-vit-b16 --num-train 50000 --rounds 3 --device cuda:0
    python -m benchmarks.bench_round --preset fedlora-vit-b16 --num-train 50000 --rounds 3 --device cuda:0 \\
        --kinds dali,dali-gpu,dali-resize,dali-gpu-resize --native-size 32
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from pathlib import Path
from typing import Optional

# Run as a file (`python benchmarks/X.py`, from any directory), Python puts benchmarks/ first on sys.path, not the
# repository: put the repository first, so that `benchmarks` is this package whatever else is installed by that name.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.child import add_child_flag, run_child, serve_child
from benchmarks.measure import ROOT, command_line, machine_info
from benchmarks.plot import measured, plot
from benchmarks.report import results_dir, with_ext, write_results
from benchmarks.round_point import measure_point
from benchmarks.round_report import markdown
from benchmarks.round_settings import DEFAULTS, RESIZE, Settings, settings_from_args

MODULE = "benchmarks.bench_round"
log = logging.getLogger("bench_round")


def build_parser() -> argparse.ArgumentParser:
    """The command line; flags left unset take the preset's or the bench's default."""
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", help="dali-fl preset (fedavg-vit-b16, fedlora-vit-b16, tiny-32); flags override it")
    a("--alg", choices=("fedavg", "fedlora"), help=f"default {DEFAULTS['alg']}")
    a("--model", help=f"timm model, default {DEFAULTS['model']}")
    a("--model-kwargs", help=f"timm kwargs k=v,..., default {DEFAULTS['model_kwargs']!r}")
    a("--pretrained", action=argparse.BooleanOptionalAction, default=False,
      help="load pretrained weights (default: random init; timing does not depend on them)")
    a("--image-size", type=int, help=f"image side the model sees, default {DEFAULTS['image_size']}")
    a("--native-size", type=int, default=32, help="side of the native store the -resize kinds read")
    a("--num-train", type=int, help=f"synthetic train images, default {DEFAULTS['num_train']} (scaling: 10000)")
    a("--num-users", type=int, help=f"clients, default {DEFAULTS['num_users']}")
    a("--frac", type=float, help=f"fraction of clients per round, default {DEFAULTS['frac']}")
    a("--partition", choices=("iid", "dirichlet", "shards"),
      help="default iid: equal clients make rounds comparable (presets: dirichlet)")
    a("--alpha", type=float, help="Dirichlet concentration, default 0.5")
    a("--local-ep", type=int, help=f"local epochs, default {DEFAULTS['local_ep']}")
    a("--local-bs", type=int, help=f"local batch size, default {DEFAULTS['local_bs']}")
    a("--lr", type=float, help="local learning rate, default 3e-4")
    a("--kinds", help="comma-separated: dali, dali-gpu, memmap, memmap@N (N workers), memmap-seed, and "
                      "dali-resize, dali-gpu-resize, memmap-resize (native store, resized on the device); "
                      "default all (dali-gpu only with a GPU; scaling: dali,memmap)")
    a("--workers", type=int, default=2, help="DataLoader workers of `memmap` (memmap-seed keeps the seed's 4)")
    a("--device", help="cpu, cuda or cuda:N (default cuda:0 when present, else cpu)")
    a("--threads", type=int, help="torch intra-op threads (default: torch's own, one per core)")
    a("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="auto = bf16 on GPU, off on CPU")
    a("--compile", action="store_true", help="torch.compile the model (the warm-up round pays the compile)")
    a("--gpu-mem-gib", type=float,
      help="cap torch's CUDA allocator at this many GiB (set_per_process_memory_fraction) to learn whether the run "
           "fits a smaller card; a kind that runs out of memory is reported as such; ignored on the CPU")
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
    a("--label", help="appended to the results' file name, so that runs of other kinds at the same settings "
                      "keep files of their own (round-fedlora-224px-LABEL.json)")
    add_child_flag(p)
    return p


def prepare_stores(s: Settings, sizes: list[int]) -> dict[int, str]:
    """The uint8 store per image size (and its float32 sibling when memmap-seed is measured)."""
    from dali_fl.data.sources import load_synthetic
    from dali_fl.data.store import write_store

    source = load_synthetic(s.num_train, 64, seed=s.seed)
    dtypes = ["uint8"] + (["float32"] if any(k.startswith("memmap-seed") for k in s.kinds) else [])
    out = s.data_dir / f"n{s.num_train}-seed{s.seed}"  # write_store refuses other settings in place
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


def store_sizes(s: Settings) -> list[int]:
    """The image sizes whose stores the run reads: the size(s) measured, and the native size for -resize kinds."""
    sizes = set(s.scaling_sizes) if s.scaling else {s.image_size}
    if any(RESIZE in k for k in s.kinds):
        sizes.add(s.native_size)
    return sorted(sizes)


def make_points(s: Settings, stores: dict[int, str]) -> list[dict]:
    """What to measure: every kind at the settings; in scaling mode, clients x size per kind."""
    def data(kind: str, size: int) -> dict:  # a -resize kind reads the native store and resizes to `size`
        resized = RESIZE in kind
        return dict(image_size=size, store=stores[s.native_size if resized else size],
                    resize_to=size if resized else None)

    if not s.scaling:
        return [dict(kind=k, num_users=s.num_users, frac=s.frac, partition=s.partition, **data(k, s.image_size))
                for k in s.kinds]
    big, few = max(s.scaling_sizes), min(s.scaling_users)
    grid = [(u, big) for u in s.scaling_users] + [(few, z) for z in s.scaling_sizes if z != big]
    # IID: 10,000 clients of one image each is the extreme the overhead figure is about.
    return [dict(kind=k, num_users=u, frac=min(1.0, s.scaling_clients / u), partition="iid", **data(k, z))
            for k in s.kinds for u, z in grid]


def run_points(s: Settings, points: list[dict]) -> list[dict]:
    """Measure every point, each in a fresh interpreter unless --in-process."""
    results = []
    for i, point in enumerate(points, 1):
        log.info("[%d/%d] %s, %d clients, %d px ...", i, len(points), point["kind"], point["num_users"],
                 point["image_size"])
        res = measure_point(s, point) if s.in_process else run_child(MODULE, s.record(), point)
        if res.get("out_of_memory"):
            log.info("  out of memory under the %s GiB cap: %s", s.gpu_mem_gib, res["out_of_memory"])
            results.append(res)
            continue
        log.info("  round %.2f s (bound %.2f s, stall %.1f%%), %.2f busy cores, peak PSS %.0f MiB",
                 res["round_time_s"], res["bound_round_time_s"], 100 * res["data_stall"], res["busy_cores"],
                 res["peak_pss_mib"])
        results.append(res)
    return results


def measure_in_child(settings: dict, point: dict) -> dict:
    """The child's side of run_child: one point under the parent's settings."""
    return measure_point(Settings(**settings), point)


def write_all(doc: dict, s: Settings) -> Path:
    """JSON, markdown and (unless --no-plot) the PNG: round-*.{json,md,png} in the results folder."""
    stem = write_results(results_dir(doc["machine"], s.out) / result_name(s), doc, markdown(doc))
    if s.plot and measured(doc["results"]):
        plot(doc, with_ext(stem, ".png"))
    return stem


def result_name(s: Settings) -> str:
    """The results' file stem; compiled and memory-capped runs have their own, so no run overwrites another."""
    name = f"round-scaling-{s.alg}" if s.scaling else f"round-{s.alg}-{s.image_size}px"
    cap = f"-gpu{s.gpu_mem_gib:g}gib" if s.gpu_mem_gib is not None else ""  # also on CPU, where it is ignored
    return name + ("-compile" if s.compile else "") + cap + (f"-{s.label}" if s.label else "")


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark; returns the result document (also written under --out)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child is not None:
        serve_child(args.child, measure_in_child)
        return {}
    s = settings_from_args(args, parser)
    stores = prepare_stores(s, store_sizes(s))
    results = run_points(s, make_points(s, stores))
    for r in results:
        r["store"] = Path(r["store"]).name  # no paths outside the repository in the results
    doc = {"mode": "scaling" if s.scaling else "round", "command": command_line(MODULE, argv),
           "date": dt.date.today().isoformat(), "machine": machine_info(s.device, s.threads),
           "settings": s.record(), "results": results}
    stem = write_all(doc, s)
    print(markdown(doc))
    print(f"wrote {stem}.json, .md{', .png' if s.plot else ''}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    main()
