"""`bench_algorithms --suite clock`: synchronous rounds, stragglers and FedBuff on one simulated-time budget.

Clients get log-normal compute speeds whose 90th percentile is 10x their 10th. The budget is the simulated
time synchronous FedAvg (no deadline) takes for `--rounds` rounds; every other run gets as many rounds or
server steps as end within it, counted on the clock before training (the clock never depends on training).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import federation_page, fmt

SPREAD = {"speed": 50.0, "speed_spread": 10.0}
CLOCK: dict[str, dict[str, Any]] = {
    "sync": dict(SPREAD),
    "sync-deadline-p70": {**SPREAD, "deadline": "p70"},  # the 70th percentile of client time, filled in at run time
    "sync-over-select-1.3": {**SPREAD, "over_select": 1.3},
    "fedbuff-c10-k5": {**SPREAD, "async_": True, "concurrency": 10, "buffer": 5},
    "fedbuff-c20-k5": {**SPREAD, "async_": True, "concurrency": 20, "buffer": 5},
}


def _fx(cfg, work: Path):
    from dali_fl.engine.run import prepare

    return prepare(cfg, work / "probe", resume=False, write=False)[0]


def rounds_within(fx, budget: float, cap: int = 100_000) -> int:
    """How many rounds (or server steps) of this run end within `budget` simulated seconds."""
    from dali_fl.engine.federation import sample_clients

    timeline, n = fx.timeline, 0
    while n < cap:
        end = (timeline.schedule.next_step()[1] if timeline.asynchronous
               else timeline.plan(n + 1, sample_clients).end_s)
        if end > budget:
            return n
        n += 1
    return n


def run_clock(args, common: dict, store: str, work: Path) -> tuple[dict, dict]:
    """Train every run of the suite to the budget; (metrics rows per run, settings: budget, deadline, rounds)."""
    import logging

    from dali_fl.config import TrainConfig
    from dali_fl.engine.run import train
    from dali_fl.engine.rundir import read_metrics

    def config(spec: dict, rounds: int) -> TrainConfig:
        return TrainConfig.from_options({**common, "store": store, **spec, "rounds": rounds,
                                         "eval_every": max(1, rounds // 20)}, preset="tiny-32")

    fx = _fx(config(CLOCK["sync"], args.rounds), work)
    seconds = fx.timeline.seconds
    budget = _end_of(fx, args.rounds)
    fx.close()
    deadline = float(np.percentile(seconds, 70))
    out, rounds = {}, {}
    for name in args.only or CLOCK:
        spec = {k: (deadline if v == "p70" else v) for k, v in CLOCK[name].items()}
        fx = _fx(config(spec, 1), work)
        rounds[name] = rounds_within(fx, budget)
        fx.close()
        logging.getLogger(__name__).warning("%s: %d rounds within %.0f simulated s", name, rounds[name], budget)
        train(config(spec, rounds[name]), work / name, progress=False)
        out[name] = read_metrics(work / name)
    extra = {"budget_s": budget, "deadline_s": deadline, "rounds": rounds,
             "client_seconds": {"p10": float(np.percentile(seconds, 10)), "p50": float(np.median(seconds)),
                                "p90": float(np.percentile(seconds, 90))}}
    return out, extra


def _plain():
    from dali_fl.engine.federation import sample_clients

    return sample_clients


def _end_of(fx, rounds: int) -> float:
    """Simulated time at the end of synchronous round `rounds`."""
    return fx.timeline.plan(rounds, _plain()).end_s


def markdown(doc: dict) -> str:
    """One row per run: accuracy at the budget, server steps, client updates aggregated, dropped and stale."""
    s, x = doc["settings"], doc["clock"]
    rows = []
    for name, metrics in doc["results"].items():
        evals = [r for r in metrics if r.get("test_acc") is not None]
        dropped = sum(r.get("clients_dropped", 0) for r in metrics)
        stale = sum(r.get("updates_stale", 0) for r in metrics)
        staleness = [r["staleness_mean"] for r in metrics if "staleness_mean" in r]
        rows.append([name, fmt(evals[-1]["test_acc"], ".3f"), fmt(max(r["test_acc"] for r in evals), ".3f"),
                     str(len(metrics)), str(sum(r["num_clients"] for r in metrics)), str(dropped), str(stale),
                     fmt(float(np.mean(staleness)) if staleness else None, ".2f", "-"),
                     fmt(metrics[-1]["sim_time_s"], ".0f")])
    cols = ["run", "acc at budget", "best acc", "server steps", "updates aggregated", "dropped", "stale",
            "mean staleness", "sim time of last step (s)"]
    c = x["client_seconds"]
    settings = (f"Dirichlet alpha {s['alpha']}, {s['num_users']} clients, frac {s['frac']} (m = "
                f"{round(s['frac'] * s['num_users'])}), tiny ViT (tiny-32 preset), local SGD lr {s['lr']}, "
                "2 local epochs. Log-normal client speeds around 50 samples/s, 90th/10th percentile 10x; "
                f"client time p10/p50/p90 {c['p10']:.1f}/{c['p50']:.1f}/{c['p90']:.1f} s. "
                f"Budget: {x['budget_s']:.0f} simulated s (synchronous FedAvg's {s['rounds']} rounds); "
                f"deadline {x['deadline_s']:.1f} s "
                "(70th percentile of client time).")
    return federation_page(doc, "Simulated clock", settings, cols, rows)


def plot(doc: dict, path: Path) -> None:
    """Test accuracy against simulated time, one line per run, the budget marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, metrics in doc["results"].items():
        evals = [r for r in metrics if r.get("test_acc") is not None]
        ax.plot([r["sim_time_s"] for r in evals], [r["test_acc"] for r in evals], marker=".", label=name)
    ax.axvline(doc["clock"]["budget_s"], color="grey", linestyle="--", label="budget")
    ax.set(xlabel="simulated time (s)", ylabel="test accuracy",
           title=f"Stragglers and FedBuff, Dirichlet alpha {doc['settings']['alpha']}, speeds 10x spread")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
