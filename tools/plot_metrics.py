#!/usr/bin/env python3
"""Plot test accuracy and losses per round (or against simulated time) for one or more run directories.

    python tools/plot_metrics.py RUN [RUN ...] [--x sim_time] [--out curves.png|.svg|.pdf] [--force]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install
EXIT_INTERRUPTED = 130  # as the dali-fl command: 128 + SIGINT

try:  # a Ctrl-C while these load is one line too
    from dali_fl.atomic import atomic_write
    from dali_fl.data.partition import plot_format
    from dali_fl.engine.rundir import read_metrics
    from dali_fl.errors import DaliFlError
    from dali_fl.safe_fs import check_output_file, check_regular
except KeyboardInterrupt:
    sys.stderr.write("error: interrupted\n")
    raise SystemExit(EXIT_INTERRUPTED) from None

X_AXES = {"round": ("round", "round"), "sim_time": ("sim_time_s", "simulated time (s)")}


def load(run_dirs: list[Path], x: str = "round") -> dict[Path, list[dict]]:
    """Every run's metrics rows, each checked before anything is printed or drawn; a bad run is one error line."""
    key = X_AXES[x][0]
    runs = {}
    for run in run_dirs:
        if not run.is_dir():
            fail(f"{run} {'is not a directory' if run.exists() else 'does not exist'}; give a run directory "
                 "written by `dali-fl train`")
        try:
            rows = read_metrics(run)
        except DaliFlError as err:
            fail(str(err))
        if not rows:
            fail(f"{run} has no metrics.jsonl rows; is it a dali-fl run directory?")
        if any(key not in r for r in rows):
            fail(f"{run} has rows without {key} (written before the simulated clock); plot it against --x round")
        check_fields(run, rows)
        runs[run] = rows
    return runs


NUMBERS = {"round_time_s": False, "test_acc": True, "test_loss": True, "train_loss": True}  # name: may be null


def check_fields(run: Path, rows: list[dict]) -> None:
    """The columns this tool reads are numbers (or null where a round may lack them): an edited or foreign file is
    one line, not a traceback halfway through the table."""
    for n, row in enumerate(rows, 1):
        for name, nullable in NUMBERS.items():
            value = row.get(name)
            if not (value is None and nullable) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                fail(f"{run / 'metrics.jsonl'} row {n} has {name} = {value!r}, not a number; is it a dali-fl run?")
        if row.get("test_acc") is not None and row.get("test_loss") is None:
            fail(f"{run / 'metrics.jsonl'} row {n} has test_acc without test_loss; is it a dali-fl run?")


def fail(message: str) -> NoReturn:
    """One `error:` line on stderr and exit 2, as the dali-fl command does."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def plot(runs: dict[Path, list[dict]], out: Path, x: str = "round") -> Path:
    """Write accuracy and loss curves of the runs side by side, against rounds or simulated time; the PNG path."""
    key, label = X_AXES[x]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for run, rows in runs.items():
        evals = [r for r in rows if r.get("test_acc") is not None]
        trained = [r for r in rows if r.get("train_loss") is not None]  # a round may aggregate nobody
        ax_acc.plot([r[key] for r in evals], [r["test_acc"] for r in evals], marker="o", label=run.name)
        ax_loss.plot([r[key] for r in trained], [r["train_loss"] for r in trained], label=f"{run.name} train")
        ax_loss.plot([r[key] for r in evals], [r["test_loss"] for r in evals], "--", label=f"{run.name} test")
    ax_acc.set(xlabel=label, ylabel="test accuracy", ylim=(0, 1), title="Test accuracy")
    ax_loss.set(xlabel=label, ylabel="cross-entropy", title="Loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if x == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no round 1.5
    fig.tight_layout()
    try:  # format= explicitly: atomic_write's temp file has no image suffix
        atomic_write(out, lambda tmp: fig.savefig(tmp, format=plot_format(out), dpi=120))
    finally:
        plt.close(fig)
    return out


def output_path(args: argparse.Namespace) -> Path:
    """--out checked as `dali-fl partition` checks it (kept unless --force); the default RUN/curves.png is ours."""
    try:
        if args.out is None:
            out = args.runs[0] / "curves.png"
            check_regular(out, "remove it or give --out")  # replaced, but never through a symlink
        else:
            out = check_output_file(args.out, "--out", args.force)
        plot_format(out)
    except DaliFlError as err:
        fail(str(err))
    return out


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line and exit 2, as the dali-fl command's are."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see `{self.prog} --help`)")


def main() -> None:
    parser = _Parser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories written by `dali-fl train`")
    parser.add_argument("--out", help="image path; its suffix names the format (default: RUN/curves.png of the "
                        "first run, replaced each time)")
    parser.add_argument("--force", action="store_true", help="replace an existing file at --out")
    parser.add_argument("--x", choices=sorted(X_AXES), default="round",
                        help="x axis: round, or sim_time (the simulated clock's sim_time_s)")
    args = parser.parse_args()
    runs, out = load(args.runs, args.x), output_path(args)
    for run, rows in runs.items():
        print(f"{run}:\n  round  test_acc  train_loss  round_time_s  sim_time_s")
        for r in rows:
            acc = "-" if r.get("test_acc") is None else f"{r['test_acc']:.4f}"
            loss = "-" if r.get("train_loss") is None else f"{r['train_loss']:.4f}"
            sim = "-" if r.get("sim_time_s") is None else f"{r['sim_time_s']:.1f}"
            print(f"  {r['round']:>5}  {acc:>8}  {loss:>10}  {r['round_time_s']:>12.1f}  {sim:>10}")
    print(f"curves: {plot(runs, out, args.x)}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # atomic_write has removed its temporary file: nothing half-written is left
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
