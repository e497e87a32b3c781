"""The Flower app deployed (a SuperLink and one SuperNode per client, on this machine) against Flower's simulation.

    python -m benchmarks.bench_flower_deploy                  # 2 clients, 16 px synthetic store, FedLoRA r=2, 3 rounds
    python -m benchmarks.bench_flower_deploy --rounds 5 --out runs/deploy

Both engines run the same federation from the same run config: `dali_fl.flower.app.simulate` (Ray, as
`dali-fl flower run`) and `flwr run` against a loopback SuperLink (`dali_fl.flower.deployment`), every process
with one torch thread. Reports each round's time and message bytes, the final weights' largest difference, and
writes flower-deploy-<n>clients.{json,md} to the results folder.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this repository's `benchmarks`, as a file too

from benchmarks.measure import command_line, machine_info
from benchmarks.report import fmt, results_dir, table, write_results

TINY = dict(model="vit_tiny_patch16_224", model_kwargs="patch_size=4,depth=1,embed_dim=32,num_heads=2",
            pretrained=False, frac=1.0, partition="dirichlet", alpha=0.5, local_bs=25, lr=2e-3, lora_r=2,
            alg="fedlora", device="cpu")


def run_both(work: Path, clients: int, rounds: int) -> dict:
    """Simulate, then deploy, the same federation; each engine's rows, wall time and the weights' difference."""
    import torch

    from dali_fl.data.sources import load_synthetic
    from dali_fl.data.store import write_store
    from dali_fl.engine.rundir import read_metrics
    from dali_fl.flower.app import simulate
    from dali_fl.flower.compare import max_weight_diff
    from dali_fl.flower.deployment import LocalDeployment
    from dali_fl.flower.options import run_config_from_options, write_app

    store, _ = write_store(load_synthetic(100 * clients, 50, seed=0), work / "stores", 16, progress=False)
    options = {**TINY, "store": str(store), "num_users": clients, "rounds": rounds}
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    simulate(run_config_from_options(options, work / "simulated"), client_cpus=1)
    t1 = time.perf_counter()
    write_app(work / "app", run_config_from_options(options, work / "deployed"))
    with LocalDeployment(work / "flwr", threads=1) as d:
        d.start_superlink()
        for c in range(clients):
            d.start_node(f"node{c}", c)
        t2, lo = time.perf_counter(), loopback_bytes()
        done = d.run(work / "app", timeout_s=1800)
        t3, lo = time.perf_counter(), loopback_bytes() - lo
    if not (work / "deployed" / "summary.json").exists():
        raise SystemExit(f"the deployed run did not finish:\n{done.stdout[-3000:]}")
    return {"rows": {n: read_metrics(work / n) for n in ("simulated", "deployed")},
            "wall_s": {"simulated": t1 - t0, "deployed": t3 - t2, "deployment_start": t2 - t1},
            "max_abs_diff": max_weight_diff(work / "simulated", work / "deployed"), "loopback_bytes": lo}


def loopback_bytes() -> int:
    """Bytes sent on the loopback interface so far, by every process on the machine (psutil's counters)."""
    import psutil

    nics = psutil.net_io_counters(pernic=True)
    return int(nics["lo"].bytes_sent) if "lo" in nics else 0


def report(result: dict, clients: int) -> str:
    """Per-round time and bytes of both engines, then the medians, wall times and the weights' agreement."""
    sim, dep = result["rows"]["simulated"], result["rows"]["deployed"]
    rows = [(str(s["round"]), fmt(s["round_time_s"]), fmt(d["round_time_s"]),
             f"{s['bytes_down']:,} / {s['bytes_up']:,}", f"{d['bytes_down']:,} / {d['bytes_up']:,}",
             str(d["client_processes"]), str(s["test_acc"]), str(d["test_acc"])) for s, d in zip(sim, dep)]
    lines = [f"{clients} SuperNodes, one client each; FedLoRA r=2, 1-block ViT, 16 px; one torch thread per process.",
             "",
             *table(["round", "simulated s", "deployed s", "simulated bytes down / up", "deployed bytes down / up",
                     "deployed client processes", "simulated acc", "deployed acc"], rows), ""]
    later = {n: [r["round_time_s"] for r in rs[1:]] for n, rs in result["rows"].items()}
    if later["simulated"]:
        lines.append(f"median round after the first: simulated {statistics.median(later['simulated']):.2f} s, "
                     f"deployed {statistics.median(later['deployed']):.2f} s")
    wall = result["wall_s"]
    lines += [f"start to summary: simulated {wall['simulated']:.1f} s (Ray included), deployed "
              f"{wall['deployed']:.1f} s (`flwr run`; starting the SuperLink and SuperNodes took "
              f"{wall['deployment_start']:.1f} s more)",
              f"loopback bytes during `flwr run`, every process on the machine counted: {result['loopback_bytes']:,} "
              f"({result['loopback_bytes'] / max(len(dep), 1):,.0f} per round; the messages' tensors above are a part, "
              "HTTP, logs streamed to `flwr run`, heartbeats and the app bundle the rest)",
              f"final weights: max |simulated - deployed| = {result['max_abs_diff']:.3g}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=2, help="SuperNodes, one dali-fl client each (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>/)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="dali-fl-deploy-") as tmp:
        result = run_both(Path(tmp), args.clients, args.rounds)
    md = report(result, args.clients)
    machine = machine_info("cpu", threads=1)
    doc = {"command": command_line("benchmarks.bench_flower_deploy", argv), "machine": machine, **result}
    stem = write_results(results_dir(machine, args.out) / f"flower-deploy-{args.clients}clients", doc,
                         f"`{doc['command']}`\n\n{md}")
    print(md + f"\nwrote {stem}.json and .md")


if __name__ == "__main__":
    main(sys.argv[1:])
