#!/usr/bin/env python3
"""Plot test accuracy and losses per round for one or more run directories into a PNG."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from dali_fl.engine.rundir import read_metrics  # noqa: E402


def plot(run_dirs: list[Path], out: Path) -> Path:
    """Write accuracy and loss curves of the runs side by side; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for run in run_dirs:
        rows = read_metrics(run)
        if not rows:
            raise SystemExit(f"error: {run} has no metrics.jsonl rows; is it a dali-fl run directory?")
        evals = [r for r in rows if r.get("test_acc") is not None]
        ax_acc.plot([r["round"] for r in evals], [r["test_acc"] for r in evals], marker="o", label=run.name)
        # A DP round that sampled no client has no train loss.
        losses = [float("nan") if r["train_loss"] is None else r["train_loss"] for r in rows]
        ax_loss.plot([r["round"] for r in rows], losses, label=f"{run.name} train")
        ax_loss.plot([r["round"] for r in evals], [r["test_loss"] for r in evals], "--", label=f"{run.name} test")
    ax_acc.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="Test accuracy")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories written by `dali-fl train`")
    parser.add_argument("--out", type=Path, help="PNG path (default: RUN/curves.png of the first run)")
    args = parser.parse_args()
    for run in args.runs:
        print(f"{run}:\n  round  test_acc  train_loss  round_time_s")
        for r in read_metrics(run):
            acc = "-" if r.get("test_acc") is None else f"{r['test_acc']:.4f}"
            loss = "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
            print(f"  {r['round']:>5}  {acc:>8}  {loss:>10}  {r['round_time_s']:>12.1f}")
    print(f"curves: {plot(args.runs, args.out or args.runs[0] / 'curves.png')}")


if __name__ == "__main__":
    main()
