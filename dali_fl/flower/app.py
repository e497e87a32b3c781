"""The Flower ServerApp and ClientApp of dali-fl, and a run on Flower's simulation engine from Python.

`server_app` reads the run config Flower hands it (`flwr run` of an app written by `dali-fl flower app`);
`make_server_app(run_configs)` bakes configs in, which the Python simulation API needs because
`flwr.simulation.run_simulation` passes none. `client_app` takes its config from each instruction.
"""
from __future__ import annotations

import json
import logging
import math
import os
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from dali_fl.engine.rundir import check_fresh
from dali_fl.errors import DaliFlError
from dali_fl.flower.client import handle_query, handle_train
from dali_fl.flower.options import config_from_run_config, resume_of
from dali_fl.flower.server import serve

log = logging.getLogger("flwr.dali_fl")


def _main(grid: Grid, context: Context, run_configs: Optional[Sequence[Mapping[str, Any]]] = None) -> None:
    """The ServerApp: validate each config as `dali-fl train` would, then serve its rounds."""
    try:
        for run_config in run_configs if run_configs is not None else [context.run_config]:
            resume = resume_of(run_config)
            # A resume keeps what the saved run derived (DP's noise for its first --rounds), as train's does.
            cfg, run_dir = config_from_run_config(run_config, settle=not resume)
            serve(grid, cfg, run_dir, resume=resume)
    except DaliFlError as err:
        log.error("error: %s", err)  # the one line `dali-fl train` would print, in Flower's log stream
        raise


def make_server_app(run_configs: Optional[Sequence[Mapping[str, Any]]] = None) -> ServerApp:
    """A ServerApp running these federations in turn; None: the one in the run config Flower hands it."""
    app = ServerApp()
    app.main()(partial(_main, run_configs=None if run_configs is None else [dict(c) for c in run_configs]))
    return app


server_app = make_server_app()
# The clients take their config from the server's instructions, so one ClientApp serves every run.
client_app = ClientApp()
client_app.train()(handle_train)
client_app.query()(handle_query)


def simulate(*run_configs: Mapping[str, Any], client_cpus: float = 1.0, client_gpus: float = 0.0,
             num_cpus: Optional[int] = None) -> list[dict]:
    """Run federations in turn on Flower's simulation engine (Ray workers, one SuperNode per client).

    Every config is checked first, so a refused one stops in one line before Ray starts; several share one
    engine start (about 10 s of Ray on a 2-core machine). Returns each run's summary.
    """
    from flwr.simulation import run_simulation

    check_client_resources(client_cpus, client_gpus)
    check_fits_here(client_cpus, client_gpus, num_cpus)
    checked = [config_from_run_config(c) for c in run_configs]
    for _, run_dir in checked:
        check_fresh(run_dir, f"`dali-fl train --resume {run_dir}`")  # the Flower commands have no --resume
    if len({run_dir.absolute() for _, run_dir in checked}) < len(checked):
        raise DaliFlError("two of the federations share one run directory; give each its own `out`")
    backend: dict = {"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus}}
    if num_cpus is not None:
        backend["init_args"] = {"num_cpus": num_cpus}
    run_simulation(make_server_app(run_configs), client_app, num_supernodes=max(c.fed.num_users for c, _ in checked),
                   backend_config=backend)
    return [_summary(run_dir) for _, run_dir in checked]


def check_client_resources(client_cpus: float, client_gpus: float) -> None:
    """Refuse what Ray cannot place (it would start, place no client and never end): CPUs > 0, GPUs >= 0, finite."""
    if not (isinstance(client_cpus, (int, float)) and math.isfinite(client_cpus) and client_cpus > 0):
        raise DaliFlError(f"--client-cpus {client_cpus} must be a finite number > 0 (CPUs per client worker, "
                          "e.g. 1 or 0.5)")
    if not (isinstance(client_gpus, (int, float)) and math.isfinite(client_gpus) and client_gpus >= 0):
        raise DaliFlError(f"--client-gpus {client_gpus} must be a finite number >= 0 (GPUs per client worker, "
                          "e.g. 0, 0.5 or 1)")


def ray_cpus() -> float:
    """The CPUs Ray will find on this machine: its own count, else the CPUs this process may run on."""
    try:  # Ray counts os.cpu_count() less a container's cgroup quota or cpuset, not the CPU affinity
        from ray._private.utils import get_num_cpus  # private, but the function ray.init itself calls

        return get_num_cpus(override_docker_cpu_warning=True)
    except (ImportError, AttributeError, TypeError):  # no Ray (flower app) or another Ray: the affinity
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_fits_here(client_cpus: float, client_gpus: float, num_cpus: Optional[int] = None) -> None:
    """Refuse a client worker larger than this machine's Ray (`num_cpus`, else the CPUs Ray finds; the GPUs torch
    sees): Ray would start, place no client and never end."""
    cpus = num_cpus or ray_cpus()
    if client_cpus > cpus:
        raise DaliFlError(f"--client-cpus {client_cpus} is more than the {cpus} CPUs Ray has here, so no client "
                          f"worker could start; use at most {cpus}")
    if client_gpus > 0:
        import torch

        gpus = torch.cuda.device_count()
        if client_gpus > gpus:
            raise DaliFlError(f"--client-gpus {client_gpus} is more than the {gpus} GPUs this machine has, so no "
                              f"client worker could start; {'use at most ' + str(gpus) if gpus else 'use 0'}")


def _summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    if not path.is_file():  # the engine logs a ServerApp failure it could not hand back
        raise DaliFlError(f"the Flower simulation ended without finishing {run_dir}; see Flower's log above")
    return json.loads(path.read_text())
