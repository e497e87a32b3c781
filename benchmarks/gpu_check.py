"""The GPU check in one command: environment, GPU tests, loader and round benchmarks, one summary page.

    make gpu-check                                          # a GPU machine: python -m benchmarks.gpu_check
    python -m benchmarks.gpu_check --quick --out runs/chk   # every step tiny, on the CPU when there is no GPU

Writes the loader and round results, `gpu-tests.txt` and `summary.md` to --out (default
benchmarks/results/<gpu>-<date>/). `make test` runs --quick, so the harness works before a GPU arrives.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

from benchmarks import bench_loader, bench_round
from benchmarks.measure import ROOT, machine_info
from benchmarks.report import fmt, results_dir, table

TINY_MODEL = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=4,depth=1,embed_dim=32,num_heads=2"]
# The seed's configuration at ViT-B/16 224 px with random init; one local epoch and two rounds fit the budget.
SEED_ROUND = ["--model", "vit_base_patch16_224", "--model-kwargs", "", "--image-size", "224", "--num-train", "5000",
              "--num-users", "10", "--frac", "1", "--local-ep", "1", "--local-bs", "32", "--rounds", "2"]


def environment(quick: bool) -> dict:
    """GPU, driver, torch, CUDA, DALI, timm, peft; a full check without CUDA or DALI stops with one line."""
    import peft
    import timm
    import torch

    env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "timm": timm.__version__,
           "peft": peft.__version__, "cuda_available": torch.cuda.is_available()}
    try:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    except ImportError:
        env["dali"] = None
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), driver=_driver())
    if not quick and not (env["cuda_available"] and env["dali"]):
        missing = "CUDA" if not env["cuda_available"] else "DALI (nvidia-dali-cuda120)"
        sys.exit(f"error: the GPU check needs {missing}; install it or run with --quick")
    return env


def _driver() -> Optional[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # NVML is optional: the figures do not depend on it
        return None


def gpu_tests(out: Path) -> dict:
    """`pytest -m gpu`, its output kept in gpu-tests.txt (all skipped, with reasons, without a GPU)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True)
    (out / "gpu-tests.txt").write_text(proc.stdout + proc.stderr)
    lines = proc.stdout.strip().splitlines()
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else ""}


def loader_args(out: Path, data: Path, device: str, quick: bool) -> list[list[str]]:
    """bench_loader runs: every kind on the device, then the DALI kinds with the split in GPU memory."""
    size = ["--image-size", "32", "--num-images", "200", "--clients", "2", "--samples-per-client", "50",
            "--local-ep", "1", "--repeats", "1"] if quick else []
    runs = [[*size, "--device", device, "--kinds", "dali,memmap,memmap-seed,dali-resize,memmap-resize"]]
    if device == "cuda":
        runs.append([*size, "--device", device, "--kinds", "dali,dali-resize", "--data-on-gpu"])
    return [[*r, "--out", str(out), "--data-dir", str(data / "loader")] for r in runs]


def round_args(out: Path, data: Path, device: str, quick: bool) -> list[list[str]]:
    """bench_round at the seed's configuration (FedLoRA and FedAvg), or tiny with --quick."""
    kinds = "dali,dali-gpu,memmap,memmap@4,memmap@8,memmap-seed" if device.startswith("cuda") else "dali,memmap"
    shape = (["--image-size", "16", "--num-train", "200", "--num-users", "4", "--frac", "0.5", "--rounds", "1",
              *TINY_MODEL, "--in-process", "--no-plot"] if quick else SEED_ROUND)
    runs = [[*shape, "--alg", alg, "--kinds", kinds, "--device", device] for alg in ("fedlora", "fedavg")]
    # torch.compile against eager in the same check: FedLoRA through dali, compiled (its own results folder).
    runs.append([*shape, "--alg", "fedlora", "--kinds", "dali", "--device", device, "--compile"])
    return [[*r, "--out", str(out / "compiled" if "--compile" in r else out), "--data-dir", str(data / "round")]
            for r in runs]


def summary(env: dict, tests: dict, rounds: list[dict]) -> str:
    """One page: the environment, the GPU tests, and per round benchmark a row per loader kind."""
    lines = ["# GPU check", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in env.items()), "",
             f"GPU tests (`pytest -m gpu`): {tests['summary']} (exit {tests['returncode']}); see gpu-tests.txt.", ""]
    cols = ["kind", "round s", "bound s", "data stall", "busy cores", "CPU core-s / 1k img", "GPU util %",
            "peak RSS MiB", "peak GPU MiB", "TFLOP/s", "MFU"]
    for doc in rounds:
        s = doc["settings"]
        compiled = ", torch.compile" if s.get("compile") else ""
        lines += [f"## {s['alg']}, {s['model']} at {s['image_size']} px on {doc['machine']['device']}{compiled}", ""]
        rows = [[r["kind"], fmt(r["round_time_s"]), fmt(r["bound_round_time_s"]), fmt(100 * r["data_stall"], ".1f"),
                 fmt(r["busy_cores"]), fmt(r["cpu_core_s_per_1k_images"]), fmt(r.get("gpu_util_pct"), ".0f"),
                 fmt(r["peak_rss_mib"], ".0f"), fmt(r.get("peak_gpu_mem_mib"), ".0f"),
                 fmt(r.get("achieved_tflops"), ".3f"), fmt(r.get("mfu"), ".1%")] for r in doc["results"]]
        lines += [*table(cols, rows), ""]
    lines += ["TFLOP/s: model training FLOPs per image (torch's FlopCounterMode on one step) x images / compute "
              "time of the median round; MFU against the device's dense bf16 peak (benchmarks/flops.py).", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> Path:
    """Run every step; returns the folder written."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every step tiny, on the CPU when there is no GPU")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<gpu>-<date>/)")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "gpu-check", help="where the stores are made")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    env = environment(args.quick)
    device = "cuda" if env["cuda_available"] else "cpu"
    out = args.out or results_dir(machine_info(device))
    out.mkdir(parents=True, exist_ok=True)
    tests = gpu_tests(out)
    for run in loader_args(out, args.data_dir, device, args.quick):
        bench_loader.main(run)
    rounds = [bench_round.main(run)
              for run in round_args(out, args.data_dir, "cuda:0" if device == "cuda" else "cpu", args.quick)]
    (out / "environment.json").write_text(json.dumps(env, indent=2))
    (out / "summary.md").write_text(summary(env, tests, rounds))
    print(f"wrote {out}/summary.md")
    return out


if __name__ == "__main__":
    main()
