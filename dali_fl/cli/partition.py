"""`dali-fl partition`: split a store's train split across simulated clients."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from dali_fl.config import option_defaults
from dali_fl.data.partition import METHODS, make_partition, plot_partition, save_partition, summarize
from dali_fl.data.store import open_store

D = option_defaults()  # the same defaults as `dali-fl train`


@click.command("partition")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--num-users", type=int, default=D["num_users"], show_default=True,
              help="Number of simulated clients to split the train split across.")
@click.option("--partition", "method", type=click.Choice(METHODS), default=D["partition"], show_default=True,
              help="iid: random equal parts; dirichlet: per-class Dir(alpha) label skew "
                   "(NIID-Bench); shards: label-sorted shards, a few per client (McMahan et al.).")
@click.option("--alpha", type=float, default=D["alpha"], show_default=True,
              help="Dirichlet concentration (dirichlet only): small (0.1) is very skewed, "
                   "large (100) is near IID.")
@click.option("--shards", "shards_per_client", type=int, default=D["shards"], show_default=True,
              help="Shards per client (shards only); each client sees at most about this many "
                   "classes (twice this when shards straddle a class boundary).")
@click.option("--min-size", type=int, default=D["min_size"], show_default=True,
              help="Fewest samples any client may get (dirichlet only); draws are repeated "
                   "until it holds. At most train samples / --num-users.")
@click.option("--seed", type=int, default=D["seed"], show_default=True,
              help="Random seed; the same seed and options give the same partition.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the partition as JSON here (indices and class counts per client).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save a clients-by-classes heatmap PNG here.")
def partition(store: Path, num_users: int, method: str, alpha: float, shards_per_client: int,
              min_size: int, seed: int, out: Optional[Path], plot: Optional[Path]) -> None:
    """Split STORE's train split across clients and print a summary.

    Prints client sizes and classes per client (min/median/max); --out saves the
    partition as JSON for training, --plot saves a heatmap of it.

    Example:

    \b
        dali-fl partition data/synthetic-32 --num-users 100 \\
            --partition dirichlet --alpha 0.1 --out runs/p.json --plot runs/p.png
    """
    opened = open_store(store)
    labels = opened.labels("train")
    p = make_partition(labels, num_users, method, seed=seed, alpha=alpha,
                       shards_per_client=shards_per_client, min_size=min_size,
                       num_classes=opened.num_classes)
    click.echo(summarize(p, labels))
    if out is not None:
        save_partition(p, labels, out)
        click.echo(f"wrote {out}")
    if plot is not None:
        plot_partition(p, labels, plot)
        click.echo(f"wrote {plot}")


COMMANDS = [partition]
