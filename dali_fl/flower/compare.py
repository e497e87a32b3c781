"""The same federation on dali-fl's engine and on Flower's simulation engine, side by side: cost and agreement."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file

from dali_fl.config import TrainConfig
from dali_fl.engine.run import train
from dali_fl.engine.rundir import read_metrics
from dali_fl.errors import DaliFlError
from dali_fl.flower.app import simulate
from dali_fl.flower.options import run_config_from_options


def compare(options: Mapping[str, Any], out: Path, client_cpus: float = 1.0, client_gpus: float = 0.0) -> dict:
    """Run OUT/dali-fl (dali_fl.engine.run.train) then OUT/flower (simulate) with the same options; what each cost.

    Both engines get the threads of one Flower worker (Ray gives a worker `client_cpus` of them): on a busy
    machine two spinning OpenMP threads can cost several times one, which would swamp the comparison.
    """
    out, saved = Path(out), torch.get_num_threads()
    for name in ("dali-fl", "flower"):  # before either engine starts: train's --resume hint would not apply here
        if (out / name / "config.json").exists():
            raise DaliFlError(f"{out} already holds a comparison ({out / name} is a run); choose another --out")
    torch.set_num_threads(max(1, int(client_cpus)))
    try:
        t0 = time.perf_counter()
        train(TrainConfig.from_options(options), out / "dali-fl", progress=False)
        t1 = time.perf_counter()
        simulate(run_config_from_options(options, out / "flower"), client_cpus=client_cpus, client_gpus=client_gpus)
        t2 = time.perf_counter()
    finally:
        torch.set_num_threads(saved)
    rows = {name: read_metrics(out / name) for name in ("dali-fl", "flower")}
    return {"wall_s": {"dali-fl": t1 - t0, "flower": t2 - t1}, "rows": rows, "threads": max(1, int(client_cpus)),
            "max_abs_diff": max_weight_diff(out / "dali-fl", out / "flower"),
            "same_accuracies": [r["test_acc"] for r in rows["dali-fl"]] == [r["test_acc"] for r in rows["flower"]]}


def max_weight_diff(run_a: Path, run_b: Path) -> float:
    """The largest |a - b| over the final checkpoints' tensors of two runs."""
    a, b = (load_file(str(Path(r) / "checkpoint" / "state.safetensors")) for r in (run_a, run_b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def report(result: dict) -> str:
    """A Markdown table of one comparison: per-round time and accuracy of each engine, then the totals."""
    lines = ["| round | dali-fl s | Flower s | dali-fl acc | Flower acc | Flower bytes down / up |",
             "|---:|---:|---:|---:|---:|---:|"]
    for a, b in zip(result["rows"]["dali-fl"], result["rows"]["flower"]):
        lines.append(f"| {a['round']} | {a['round_time_s']:.3f} | {b['round_time_s']:.3f} | {a['test_acc']} | "
                     f"{b['test_acc']} | {b['bytes_down']:,} / {b['bytes_up']:,} |")
    wall, later = result["wall_s"], {k: [r["round_time_s"] for r in v[1:]] for k, v in result["rows"].items()}
    if later["flower"]:
        lines += ["", f"median round after the first: dali-fl {statistics.median(later['dali-fl']):.3f} s, "
                  f"Flower {statistics.median(later['flower']):.3f} s"]
    lines += ["", f"torch threads per engine process: {result['threads']}",
              f"wall time, start to summary: dali-fl {wall['dali-fl']:.1f} s, Flower {wall['flower']:.1f} s "
              "(Ray start, worker imports and model builds included)",
              f"final weights: max |dali-fl - Flower| = {result['max_abs_diff']:.3g}; "
              f"accuracies {'equal' if result['same_accuracies'] else 'DIFFER'} in every round"]
    return "\n".join(lines)
