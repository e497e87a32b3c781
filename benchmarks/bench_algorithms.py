"""FL algorithms on one non-IID federation: test accuracy, client drift and upload per round.

    python -m benchmarks.bench_algorithms                       # Dirichlet 0.1, tiny ViT, 32 px, 20 rounds
    python -m benchmarks.bench_algorithms --suite lora-ranks    # FedLoRA with clients of ranks 2..16
    python -m benchmarks.bench_algorithms --suite resize-to     # 224 px store vs 32 px store + --resize-to 224
    python -m benchmarks.bench_algorithms --suite dp            # DP-FedAvg at epsilon 1, 4, 16, inf (delta 1e-5)
    python -m benchmarks.bench_algorithms --suite clock         # stragglers and FedBuff on one simulated budget
    python -m benchmarks.bench_algorithms --rounds 3 --out runs/algs

Every algorithm gets the same store, partition, seed, clients and local SGD; only the algorithm's own
options differ (ALGORITHMS). Writes <suite>-<px>px-alpha<a>-frac<f>.{json,md,png} to the results folder.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

# Run as a file (`python benchmarks/X.py`, from any directory), Python puts benchmarks/ first on sys.path, not the
# repository: put the repository first, so that `benchmarks` is this package whatever else is installed by that name.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import clock_suite
from benchmarks.measure import command_line, machine_info
from benchmarks.report import federation_page, fmt, results_dir, with_ext, write_results

# Each paper's knob at a value its authors use for small models: mu 0.01 (FedProx), server lr 0.01 with
# tau 1e-3 (FedAdam, Reddi et al.), option II (SCAFFOLD), plain-SGD normalisation (FedNova): NIID-Bench's set.
ALGORITHMS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedprox": {"prox_mu": 0.01},
    "fedadam": {"server_opt": "adam", "server_lr": 0.01},
    "scaffold": {"scaffold": True},
    "fednova": {"fednova": True},
}
# FedLoRA with clients of ranks drawn from 2..16 (fedit at one rank 8 for reference): FedEx-LoRA and FLoRA's
# stack are exact for mixed ranks, HetLoRA's zero-padding is not.
LORA_RANKS: dict[str, dict[str, Any]] = {
    "fedit-r8": {"alg": "fedlora", "lora_agg": "fedit", "lora_r": 8},
    "zero-pad": {"alg": "fedlora", "lora_agg": "zero-pad", "lora_ranks": "uniform:2,4,8,16"},
    "fedex": {"alg": "fedlora", "lora_agg": "fedex", "lora_ranks": "uniform:2,4,8,16"},
    "stack": {"alg": "fedlora", "lora_agg": "stack", "lora_ranks": "uniform:2,4,8,16"},
}
NATIVE_PX = 32  # the synthetic source's size: a suite entry without store_size trains on it
# FedAvg from a store prep resized to 224 px against the native 32 px store resized by the loader (issue 12);
# a second seed on the 224 store shows what "within noise" means. Patch 56 keeps tiny-32's 16 tokens at 224 px.
AT_224 = {"model_kwargs": "patch_size=56,depth=4,embed_dim=96,num_heads=3"}
RESIZE_TO: dict[str, dict[str, Any]] = {
    "store-224": {**AT_224, "store_size": 224},
    "native-32+resize-224": {**AT_224, "store_size": 32, "resize_to": 224},
    "store-224-seed1": {**AT_224, "store_size": 224, "seed": 1},
}
# DP-FedAvg's privacy-utility trade: Poisson sampling, the noise calibrated to spend epsilon over the run's rounds
# (delta 1e-5); epsilon inf clips without noise. Each clip is about the mean client drift without DP (0.50 for FedAvg
# in the algorithms suite, 0.40 for fedit at rank 8 in lora-ranks), so that about half the updates are clipped.
DP_EPSILONS = (1.0, 4.0, 16.0, None)
DP_CLIPS = {"fedavg": ({}, 0.5), "fedlora": ({"alg": "fedlora", "lora_agg": "fedit", "lora_r": 8}, 0.4)}
DP_SUITE: dict[str, dict[str, Any]] = {
    f"{alg}-eps{'inf' if eps is None else f'{eps:g}'}": {**opts, "dp_clip": clip, "dp_delta": 1e-5,
                                                          **({} if eps is None else {"dp_epsilon": eps})}
    for alg, (opts, clip) in DP_CLIPS.items() for eps in DP_EPSILONS
}
SUITES = {"algorithms": ALGORITHMS, "lora-ranks": LORA_RANKS, "resize-to": RESIZE_TO, "dp": DP_SUITE,
          "clock": clock_suite.CLOCK}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration (0.1: strongly non-IID)")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--num-users", type=int, default=20)
    p.add_argument("--frac", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate (SCAFFOLD needs plain SGD)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--loader", default="dali")
    p.add_argument("--suite", choices=sorted(SUITES), default="algorithms",
                   help="algorithms: FedAvg/FedProx/FedAdam/SCAFFOLD/FedNova; "
                        "lora-ranks: FedLoRA with mixed client ranks; "
                        "resize-to: FedAvg from a 224 px store vs a 32 px store with --resize-to 224; "
                        "dp: FedAvg and FedLoRA under DP-FedAvg at epsilon 1, 4, 16 and inf; "
                        "clock: sync FedAvg, a deadline, over-selection and FedBuff on one simulated-time budget "
                        "(--rounds: sync FedAvg's rounds in the budget)")
    p.add_argument("--only", nargs="*", help="run only these entries of the suite")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>)")
    return p.parse_args(argv)


def store_px(suite: str) -> int:
    """The image size the suite's models see (the name of its results)."""
    return max(spec.get("resize_to", spec.get("store_size", NATIVE_PX)) for spec in SUITES[suite].values())


def run_all(args: argparse.Namespace, work: Path) -> tuple[dict[str, list[dict]], dict[str, float], dict[str, str]]:
    """Train every algorithm on the same images (one store per image size); returns its metrics rows, the
    noise multiplier each DP run settled on (calibrated from its epsilon), and why a run stopped early.

    A run dali-fl stops (a loss that became NaN under heavy DP noise) keeps the rounds it finished, and the
    suite goes on: its row says where it stopped instead of the suite losing every run before it."""
    from dali_fl.config import TrainConfig
    from dali_fl.data.sources import load_synthetic
    from dali_fl.data.store import write_store
    from dali_fl.engine.run import train
    from dali_fl.engine.rundir import read_metrics
    from dali_fl.errors import DaliFlError

    source = load_synthetic(args.num_train, args.num_test, seed=0)
    stores: dict[int, str] = {}
    common = dict(rounds=args.rounds, num_users=args.num_users, frac=args.frac,
                  partition="dirichlet", alpha=args.alpha, min_size=5, optimizer="sgd", momentum=0.0,
                  lr=args.lr, local_ep=2, device=args.device, loader=args.loader, alg="fedavg")
    out, noise, stopped = {}, {}, {}
    suite = SUITES[args.suite]
    if args.suite == "clock":
        store = str(write_store(source, work / "data", NATIVE_PX, progress=False)[0])
        out, args.clock = clock_suite.run_clock(args, common, store, work)
        return out, noise, stopped
    for name in args.only or suite:
        spec = dict(suite[name])
        size = spec.pop("store_size", NATIVE_PX)
        if size not in stores:
            stores[size] = str(write_store(source, work / "data", size, progress=False)[0])
        cfg = TrainConfig.from_options({**common, "store": stores[size], **spec}, preset="tiny-32")
        logging.getLogger(__name__).warning("%s: %d rounds", name, args.rounds)
        try:
            train(cfg, work / name, progress=sys.stderr.isatty())
        except DaliFlError as err:
            logging.getLogger(__name__).warning("%s stopped: %s", name, err)
            stopped[name] = str(err).split(";")[0]  # "training loss became nan in round 8 at client 16"
        out[name] = read_metrics(work / name) if (work / name / "metrics.jsonl").exists() else []
        if "dp" in cfg.algorithms:
            noise[name] = cfg.algorithms["dp"].dp_noise
    return out, noise, stopped


def mean_of(values: list) -> Any:
    """The mean of the values that are defined (a round that sampled no client has no drift), or None."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def dp_markdown(doc: dict) -> str:
    """The privacy-utility table: per run, the target epsilon, the calibrated z, epsilon spent, accuracy."""
    rows = []
    for name, metrics in doc["results"].items():
        spec, last = SUITES["dp"][name], (metrics or [{}])[-1]
        accs = [r["test_acc"] for r in metrics]
        rows.append([name, "fedlora" if spec.get("alg") == "fedlora" else "fedavg", fmt(spec["dp_clip"], "g"),
                     fmt(spec.get("dp_epsilon", float("inf")), "g"), fmt(doc["noise"].get(name), ".3f"),
                     fmt(last.get("dp_epsilon"), ".3f"), fmt(last.get("dp_epsilon_rdp"), ".3f"),
                     fmt(accs[-1] if accs else None, ".3f"), fmt(max(accs, default=None), ".3f"),
                     fmt(mean_of([r["num_clients"] for r in metrics]), ".1f"),
                     doc["stopped"].get(name, "")])
    cols = ["run", "alg", "clip", "target epsilon", "z", "epsilon spent (PLD)", "epsilon (RDP)", "final acc",
            "best acc", "clients / round", "stopped early"]
    s = doc["settings"]
    settings = (f"Dirichlet alpha {s['alpha']}, {s['num_users']} clients, each sampled with probability "
                f"{s['frac']} (Poisson), {s['rounds']} rounds, delta 1e-5, tiny ViT (tiny-32 preset, 32 px), "
                f"local SGD lr {s['lr']}, 2 local epochs. z is calibrated so that the {s['rounds']} rounds "
                "spend at most the target epsilon; inf clips without noise.")
    return federation_page(doc, "DP-FedAvg privacy-utility", settings, cols, rows)


def markdown(doc: dict) -> str:
    """One row per run: options, final and best accuracy, per-round accuracy gap to the first run, drift, time."""
    rows = []
    first_name, first = next(iter(doc["results"].items()))
    for name, metrics in doc["results"].items():
        accs = [r["test_acc"] for r in metrics]
        gaps = [abs(a - r["test_acc"]) for a, r in zip(accs, first)]
        drift = mean_of([r["client_drift"] for r in metrics])
        spread = mean_of([r.get("update_spread") for r in metrics])  # undefined for mixed ranks
        secs = sum(r["round_time_s"] for r in metrics) / len(metrics)
        upload = sum(r["upload_mb"] for r in metrics) / len(metrics)
        opts = ", ".join(f"{k}={v}" for k, v in SUITES[doc["settings"]["suite"]][name].items()) or "-"
        rows.append([name, opts, fmt(accs[-1], ".3f"), fmt(max(accs), ".3f"),
                     f"{sum(gaps) / len(gaps):.3f} / {max(gaps):.3f}", fmt(drift, ".3f"),
                     fmt(spread, ".3f"), fmt(upload, ".2f"), fmt(secs, ".2f")])
    cols = ["run", "options", "final acc", "best acc", f"mean / max round gap to {first_name}", "client drift",
            "update spread", "upload MB / round", "s / round"]
    s = doc["settings"]
    settings = (f"Dirichlet alpha {s['alpha']}, {s['num_users']} clients, frac {s['frac']}, {s['rounds']} "
                f"rounds, tiny ViT (tiny-32 preset, {store_px(s['suite'])} px), local SGD lr {s['lr']}, "
                "2 local epochs. Means over rounds of the client drift (mean L2 norm of a client's update) "
                "and the update spread (weighted standard deviation of the clients' updates around their "
                "mean).")
    return federation_page(doc, s["suite"], settings, cols, rows)


def plot(doc: dict, path: Path) -> None:
    """Accuracy, client drift and update spread per round, one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_d, ax_s) = plt.subplots(1, 3, figsize=(15, 4))
    for name, metrics in doc["results"].items():
        rounds = [r["round"] for r in metrics]
        ax_a.plot(rounds, [r["test_acc"] for r in metrics], label=name)
        ax_d.plot(rounds, [float("nan") if r["client_drift"] is None else r["client_drift"] for r in metrics],
                  label=name)
        spread = [float("nan") if r.get("update_spread") is None else r["update_spread"] for r in metrics]
        ax_s.plot(rounds, spread, label=name)
    ax_a.set(xlabel="round", ylabel="test accuracy", title=f"Dirichlet alpha {doc['settings']['alpha']}")
    ax_d.set(xlabel="round", ylabel="mean ||y_i - x||", title="client drift")
    ax_s.set(xlabel="round", ylabel="weighted std of y_i - x", title="update spread around the mean")
    ax_a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(SUITES[args.suite]))
    if unknown:
        sys.exit(f"error: --only {unknown[0]} is not in the {args.suite} suite ({', '.join(SUITES[args.suite])})")
    with tempfile.TemporaryDirectory() as work:
        results, noise, stopped = run_all(args, Path(work))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "clock")}
    doc = {"machine": machine_info(args.device), "settings": settings,
           "command": command_line("benchmarks.bench_algorithms", argv), "results": results, "noise": noise,
           "stopped": stopped}
    if args.suite == "clock":
        doc["clock"] = args.clock
    md, draw = {"clock": (clock_suite.markdown, clock_suite.plot), "dp": (dp_markdown, plot)}.get(args.suite,
                                                                                                   (markdown, plot))
    name = f"{args.suite}-{store_px(args.suite)}px-alpha{args.alpha:g}-frac{args.frac:g}"
    stem = results_dir(doc["machine"], args.out) / name
    text = md(doc)
    write_results(stem, doc, text)
    draw(doc, with_ext(stem, ".png"))
    print(text)
    print(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
