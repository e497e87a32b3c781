"""`dali-fl partition`: split a store's train split across simulated clients."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from dali_fl.bounds import check_int64
from dali_fl.cli import NamedPath
from dali_fl.config import option_defaults, refuse_ignored_options
from dali_fl.data.partition import (
    METHODS,
    make_partition,
    plot_format,
    plot_partition,
    save_partition,
    summarize,
)
from dali_fl.data.store import check_outside_stores, open_store
from dali_fl.errors import DaliFlError
from dali_fl.safe_fs import check_output_file

D = option_defaults()  # the same defaults as `dali-fl train`


@click.command("partition")
@click.argument("store", type=NamedPath(path_type=Path))
@click.option("--num-users", type=int, default=D["num_users"], show_default=True,
              help="Number of simulated clients to split the train split across.")
@click.option("--partition", "method", type=click.Choice(METHODS), default=D["partition"], show_default=True,
              help="iid: random equal parts; dirichlet: per-class Dir(alpha) label skew "
                   "(NIID-Bench); shards: label-sorted shards, a few per client (McMahan et al.).")
@click.option("--alpha", type=float, default=D["alpha"], show_default=True,
              help="Dirichlet concentration (dirichlet only): small (0.1) is very skewed, "
                   "large (100) is near IID.")
@click.option("--shards", "shards_per_client", type=int, default=D["shards"], show_default=True,
              help="Shards per client (shards only). A shard is train samples / (--num-users x --shards) "
                   "label-sorted samples: smaller than a class, each shard covers one or two classes; larger, "
                   "several. The summary shows the classes each client got.")
@click.option("--min-size", type=int, default=D["min_size"], show_default=True,
              help="Fewest samples any client may get (dirichlet only); draws are repeated "
                   "until it holds. At most train samples / --num-users.")
@click.option("--seed", type=int, default=D["seed"], show_default=True,
              help="Random seed; the same seed and options give the same partition.")
@click.option("--out", type=click.Path(path_type=str), metavar="FILE", default=None,
              help="Write the partition as JSON here (indices and class counts per client), "
                   "to inspect or to use in your own code; `dali-fl train` makes its own.")
@click.option("--plot", type=click.Path(path_type=str), metavar="FILE", default=None,
              help="Save a clients-by-classes heatmap here, in the format the suffix names "
                   "(.png, .svg, .pdf, .jpg, ...).")
@click.option("--force", is_flag=True,
              help="Replace an existing file at --out or --plot (never a symlink, directory or device).")
def partition(store: Path, num_users: int, method: str, alpha: float, shards_per_client: int,
              min_size: int, seed: int, out: Optional[str], plot: Optional[str], force: bool) -> None:
    """Split STORE's train split across clients and print a summary.

    Prints client sizes and classes per client (min/median/max); --out saves the
    partition as JSON to inspect or to use in your own code (`dali-fl train` makes
    the same partition from the same options and saves its own partition.json);
    --plot saves a heatmap of it. Existing files are kept unless --force is given.

    Example:

    \b
        dali-fl partition data/synthetic-32 --num-users 100 \\
            --partition dirichlet --alpha 0.1 --out runs/p.json --plot runs/p.png
    """
    refuse_ignored_options({"partition": method, "alpha": alpha, "shards": shards_per_client, "min_size": min_size})
    check_int64("--seed", seed)  # train refuses it too, so the same options could not make this partition there
    out_path, plot_path = _check_outputs(out, plot, force)  # before any work, so nothing is half-done
    for flag, path in (("--out", out_path), ("--plot", plot_path)):
        if path is not None:
            check_outside_stores(path, flag)
    opened = open_store(store)
    labels = opened.labels("train")
    p = make_partition(labels, num_users, method, seed=seed, alpha=alpha,
                       shards_per_client=shards_per_client, min_size=min_size,
                       num_classes=opened.num_classes)
    click.echo(summarize(p, labels))
    if out_path is not None:
        save_partition(p, labels, check_output_file(out_path, "--out", force))  # again: it may have appeared
        click.echo(f"wrote {out_path}")
    if plot_path is not None:
        plot_partition(p, labels, check_output_file(plot_path, "--plot", force))
        click.echo(f"wrote {plot_path}")


def _check_outputs(out: Optional[str], plot: Optional[str], force: bool) -> tuple[Optional[Path], Optional[Path]]:
    """Both output paths checked, so that a bad --plot is refused before --out is written."""
    out_path = None if out is None else check_output_file(out, "--out", force)
    plot_path = None if plot is None else check_output_file(plot, "--plot", force)
    if plot_path is not None:
        plot_format(plot_path)
    if out_path is not None and plot_path is not None and out_path.resolve() == plot_path.resolve():
        raise DaliFlError(f"--out and --plot are the same file ({out_path}); give them different paths")
    return out_path, plot_path


COMMANDS = [partition]
