"""A Flower deployment on this machine: one SuperLink and SuperNodes on free loopback ports, without TLS.

This is what the deployment tests and the cost benchmark start, and what a user can start to try the deployed
path before spreading it over machines (README, Flower section). Every process lives under one FLWR_HOME,
so Flower's state and its connection list stay there, and every process started here, with the children Flower
starts from it (SuperExec, ServerApp and ClientApp processes), is stopped by its id on exit, whatever happened.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import psutil

from dali_fl.errors import DaliFlError

log = logging.getLogger(__name__)

CONNECTION = "dali-fl-deployment"  # the SuperLink connection `flwr run` is given, in FLWR_HOME/config.toml
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_config(clients: Union[int, Sequence[int]], store: Optional[Path] = None) -> str:
    """A SuperNode's --node-config: the dali-fl client(s) it holds and, when not the run's, the store it reads."""
    many = not isinstance(clients, int)
    items = [f'clients="{",".join(str(int(c)) for c in clients)}"' if many else f"partition-id={int(clients)}"]
    if store is not None:
        items.append(f'store="{Path(store).absolute()}"')  # a TOML string: quoted
    return " ".join(items)


def superlink_command(port: int) -> list[str]:
    """`flower-superlink` on the loopback, without TLS, without installing app dependencies at run time."""
    return ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation"]


def supernode_command(superlink_port: int, port: int, config: str) -> list[str]:
    """`flower-supernode` connected to the loopback SuperLink, with its own ClientApp API port and node config."""
    return ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{superlink_port}", "--host", "127.0.0.1",
            "--port", str(port), "--node-config", config]


def connection_toml(port: int) -> str:
    """FLWR_HOME/config.toml: the loopback SuperLink as the connection `flwr run APP dali-fl-deployment` uses."""
    return (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n')


def _wait_listening(port: int, proc: subprocess.Popen, name: str, log_path: Path) -> None:
    """Return once something accepts on the port; a process that exits first fails with its log's last line."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DaliFlError(f"{name} exited with status {proc.returncode} before listening on 127.0.0.1:{port} "
                              f"({last_line(log_path)})")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DaliFlError(f"{name} did not listen on 127.0.0.1:{port} within {START_TIMEOUT_S:.0f} s; see {log_path}")


def last_line(path: Path) -> str:
    """The last non-empty line of a log (what a one-line error quotes)."""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.exists() else []
    return lines[-1][:300] if lines else "no output"


def _family(proc: subprocess.Popen) -> list[psutil.Process]:
    """A process and every descendant: Flower detaches some children into their own session, out of its group."""
    try:
        top = psutil.Process(proc.pid)
        return [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal(family: Sequence[psutil.Process], kill: bool) -> None:
    for p in family:
        try:
            p.kill() if kill else p.terminate()
        except psutil.NoSuchProcess:
            pass


def stop_tree(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM a process and its descendants, SIGKILL what is left after `grace_s`, and reap it."""
    family = _family(proc)
    _signal(family, kill=False)
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    _signal(alive, kill=True)
    psutil.wait_procs(alive, timeout=grace_s)
    proc.wait(timeout=grace_s)


@dataclass
class LocalDeployment:
    """A SuperLink and named SuperNodes under `home` (FLWR_HOME and logs); a context manager that stops them all."""

    home: Path
    port: int = 0
    threads: Optional[int] = None  # OMP_NUM_THREADS of every process; 1 matches simulation workers of one CPU
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """Every process's environment: FLWR_HOME inside `home`, no update check, and this Python's scripts first.

        The SuperLink and SuperNodes start `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by name: they
        must be the ones of the environment dali-fl is installed in, even when it is not on PATH (a venv run as
        `.venv/bin/python`).
        """
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**os.environ, "PATH": path, "FLWR_HOME": str(self.home / "flwr-home"), "FLWR_DISABLE_UPDATE_CHECK": "1"}
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env

    def log_path(self, name: str) -> Path:
        return self.home / f"{name}.log"

    def _spawn(self, name: str, command: Sequence[str]) -> subprocess.Popen:
        if name in self.procs and self.procs[name].poll() is None:
            raise DaliFlError(f"{name} is already running (pid {self.procs[name].pid})")
        out = open(self.log_path(name), "ab")
        env = self.env()
        try:
            proc = subprocess.Popen([_which(command[0], env), *command[1:]], stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=self.home)
        finally:
            out.close()
        self.procs[name] = proc
        log.info("started %s (pid %d): %s", name, proc.pid, shlex.join(command))
        return proc

    def write_connection(self) -> None:
        """FLWR_HOME/config.toml naming the SuperLink's address (on a free port unless `port` is set)."""
        (self.home / "flwr-home").mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        (self.home / "flwr-home" / "config.toml").write_text(connection_toml(self.port))

    def start_superlink(self) -> None:
        """Start the SuperLink on a free port and write the connection `flwr run` uses."""
        self.write_connection()
        proc = self._spawn("superlink", superlink_command(self.port))
        _wait_listening(self.port, proc, "flower-superlink", self.log_path("superlink"))

    def start_node(self, name: str, clients: Union[int, Sequence[int]], store: Optional[Path] = None) -> None:
        """Start a SuperNode holding dali-fl client(s) `clients` (and reading `store`, when given)."""
        port = free_port()
        proc = self._spawn(name, supernode_command(self.port, port, node_config(clients, store)))
        _wait_listening(port, proc, f"flower-supernode {name}", self.log_path(name))

    def run_command(self, app_dir: Path, run_config: Optional[Mapping[str, object]] = None) -> list[str]:
        """`flwr run APP dali-fl-deployment --stream [--run-config k=v ...]`."""
        command = [_which("flwr", self.env()), "run", str(Path(app_dir).absolute()), CONNECTION, "--stream"]
        for key, value in (run_config or {}).items():
            command += ["--run-config", f"{key}={_toml(value)}"]
        return command

    def run(self, app_dir: Path, run_config: Optional[Mapping[str, object]] = None,
            timeout_s: float = 600.0) -> subprocess.CompletedProcess:
        """Submit the app and follow its log until the run ends: (return code, stdout, stderr)."""
        return subprocess.run(self.run_command(app_dir, run_config), env=self.env(), cwd=self.home,
                              capture_output=True, text=True, timeout=timeout_s)

    def popen_run(self, app_dir: Path, run_config: Optional[Mapping[str, object]] = None) -> subprocess.Popen:
        """`run`, without waiting: stdout and stderr merged, as text."""
        return subprocess.Popen(self.run_command(app_dir, run_config), env=self.env(), cwd=self.home,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def family(self) -> list[psutil.Process]:
        """Every process started here that is still running, with its descendants."""
        return [p for proc in self.procs.values() for p in _family(proc)]

    def kill(self, name: str) -> None:
        """Kill one process (and its children) at once, as a crash would."""
        family = _family(self.procs[name])
        _signal(family, kill=True)
        psutil.wait_procs(family, timeout=STOP_GRACE_S)

    def stop(self) -> None:
        """Stop every process started here: SuperNodes first, then the SuperLink."""
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            stop_tree(self.procs[name])

    def __enter__(self) -> "LocalDeployment":
        self.home.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _which(name: str, env: Mapping[str, str]) -> str:
    """A Flower script's path on the environment's PATH; missing: one line saying how to install it."""
    found = shutil.which(name, path=env.get("PATH"))
    if found is None:
        raise DaliFlError(f"{name} is not installed here; install the Flower extra: pip install 'dali-fl[flower]'")
    return found


def _toml(value: object) -> str:
    """A --run-config value as TOML: booleans lower-case, strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
