"""`dali-fl flower`: the same federation as a Flower app, simulated here (`run`) or written for `flwr run` (`app`)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import NoReturn

import click

# The same options, resolved and validated by the same code, as `dali-fl train`.
from dali_fl.cli import EXIT_INTERRUPTED, NamedPath, explicit_options
from dali_fl.cli.train import CLI_ONLY, cli_config, merged_options, summary_line, train_options
from dali_fl.engine.device import resolve_device
from dali_fl.errors import DaliFlError

NOT_HERE = ("resume", "nproc")  # Flower runs start fresh and place their own client workers


def _engine_options(f):
    f = click.option("--client-gpus", type=float, default=0.0, show_default=True,
                     help="GPUs per simulated client worker (a fraction shares one GPU).")(f)
    return click.option("--client-cpus", type=float, default=1.0, show_default=True,
                        help="CPUs per simulated client worker: Ray runs (CPUs / this) workers.")(f)


def _run_config(ctx: click.Context, p: dict, client_cpus: float, client_gpus: float,
                here: bool = True) -> tuple[dict, int]:
    """(Flower run config, clients) from `dali-fl train` options; refused ones stop here with train's message."""
    from dali_fl.flower.app import check_client_resources, check_fits_here

    check_client_resources(client_cpus, client_gpus)  # before the store is opened, and long before Ray starts
    if here:  # an app may be run on a larger machine than the one that writes it
        check_fits_here(client_cpus, client_gpus)
    given = sorted(set(NOT_HERE) & explicit_options(ctx))
    if given:
        raise DaliFlError(f"--{given[0]} is not available with `dali-fl flower`; use `dali-fl train --{given[0]}`")
    from dali_fl.flower.options import config_from_run_config, run_config_from_options

    p = merged_options(ctx, p)
    device = str(resolve_device(p["gpu"], p["device"]))
    cfg = cli_config(p, device)  # the store check, then TrainConfig.from_options: train's order and words
    if device.startswith("cuda") and client_gpus <= 0:
        raise DaliFlError(f"--device {device} needs --client-gpus > 0 (e.g. 1, or 0.5 to share a GPU): Ray hides the "
                          "GPUs from client workers given none")
    flat = {k: v for k, v in p.items() if k not in CLI_ONLY}
    # The paths as cfg resolved them (absolute, as train saves them): flwr's SuperLink and a later
    # `dali-fl train --resume` run from other working directories.
    # --model-variant, the seed's spelling, goes in as the pretrained it resolved to: beside it, an edited
    # `pretrained` would be overridden without a word.
    resolved = {"store": cfg.data.store, "device": device, "weights": cfg.model.weights, "trace": cfg.clock.trace,
                "pretrained": cfg.model.pretrained, "model_variant": None}
    out = p["out"] or Path("runs") / f"flower-{cfg.fed.alg}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_config = run_config_from_options({**flat, **resolved}, Path(out).absolute())
    config_from_run_config(run_config)  # what the ServerApp will check: the round trip holds
    return run_config, cfg.fed.num_users


@click.group()
def flower() -> None:
    """The same federation as a Flower app (needs `pip install 'dali-fl[flower]'`).

    \b
    Examples:
      dali-fl flower run --store data/cifar10-224 --alg fedlora --lora-agg fedex --out runs/flower-lora
      dali-fl flower app flower-app --store data/cifar10-224 --alg fedlora --out runs/flower-lora
      dali-fl flower compare --preset tiny-32 --store demo/data/synthetic-32 --out runs/engines
      flwr run flower-app local --stream --federation-config "num-supernodes=100 client-resources-num-cpus=1"
    """
    import logging

    from dali_fl.flower import require_flwr

    require_flwr()
    # Flower logs through its own console handler (INFO); passed on to ours as well, its DEBUG lines would show.
    logging.getLogger("flwr").propagate = False


@flower.command("run")
@train_options
@_engine_options
@click.pass_context
def run(ctx: click.Context, client_cpus: float, client_gpus: float, **p) -> None:
    """Simulate the federation on Flower's engine (Ray), one SuperNode per client, writing a dali-fl run directory."""
    run_config, _ = _run_config(ctx, p, client_cpus, client_gpus)
    from dali_fl.flower.app import simulate

    try:
        [summary] = simulate(run_config, client_cpus=client_cpus, client_gpus=client_gpus)
    except KeyboardInterrupt:
        _leave_simulation()
    click.echo(summary_line(summary, run_config["out"], engine=" on Flower"))


def _leave_simulation() -> NoReturn:
    """Exit at once after a Ctrl-C: Flower's simulation threads would keep the interpreter alive until a second one."""
    click.echo("error: interrupted; the run directory keeps the rounds that finished (every file is written "
               "atomically)", err=True)
    try:
        import ray

        ray.shutdown()  # its processes would otherwise outlive this one
    except Exception:  # noqa: BLE001 - leaving anyway: the user asked to stop
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


@flower.command("app")
@click.argument("app_dir", type=NamedPath(file_okay=False, path_type=Path))
@train_options
@_engine_options
@click.pass_context
def app(ctx: click.Context, app_dir: Path, client_cpus: float, client_gpus: float, **p) -> None:
    """Write APP_DIR/pyproject.toml, a Flower app with these options as its run config, and print `flwr run`."""
    from dali_fl.engine.rundir import check_place
    from dali_fl.flower.options import deploy_commands, flwr_command, write_app

    run_config, clients = _run_config(ctx, p, client_cpus, client_gpus, here=False)
    check_app_dir(app_dir)
    out = Path(run_config["out"])
    check_place(out)  # as the server will, at its start: foreign files, or inside a store
    path = write_app(app_dir, run_config)
    click.echo(f"wrote {path}; simulate it with:")
    if (out / "config.json").exists():  # writing an app to continue a run is fine; starting it anew is refused
        click.echo(f"({out} already holds a run: add --run-config resume=true to continue it)")
    click.echo(flwr_command(app_dir, clients, client_cpus, client_gpus))
    click.echo(f"or deploy it on this machine: a SuperLink, a SuperNode per client (partition-id 0 to {clients - 1}, "
               "each on its own --port; or one per site, clients=\"A-B\"), then flwr run (README, Flower, "
               "\"Deployed\"):")
    for line in deploy_commands(app_dir, run_config["store"], clients):
        click.echo(f"  {line}")


def check_app_dir(app_dir: Path) -> None:
    """APP_DIR is not in a store, and its pyproject.toml, if there, is a regular file: a symlink is not followed
    out of APP_DIR, no FIFO read."""
    from dali_fl.data.store import check_outside_stores
    from dali_fl.safe_fs import check_regular

    check_outside_stores(app_dir, "APP_DIR")  # `prep --force` replaces a store whole, the app with it
    if app_dir.is_dir():
        check_regular(app_dir / "pyproject.toml", "choose another APP_DIR")


@flower.command("compare")
@train_options
@_engine_options
@click.pass_context
def compare(ctx: click.Context, client_cpus: float, client_gpus: float, **p) -> None:
    """Run the federation on dali-fl's engine (OUT/dali-fl), then on Flower's (OUT/flower); print both costs."""
    from dali_fl.flower.compare import compare as run_both
    from dali_fl.flower.compare import report
    from dali_fl.flower.options import options_from_run_config

    run_config, _ = _run_config(ctx, p, client_cpus, client_gpus)
    options, out = options_from_run_config(run_config)
    try:
        costs = run_both(options, Path(out), client_cpus=client_cpus, client_gpus=client_gpus)
    except KeyboardInterrupt:
        _leave_simulation()
    click.echo(report(costs))


COMMANDS = [flower]
