"""Several processes (gloo on CPU, NCCL on 2 GPUs): client assignment, 1-vs-2-process equality, a dying rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from dali_fl.data.sources import load_synthetic
from dali_fl.data.store import write_store
from dali_fl.engine.distributed import assign_clients

ARGS = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=4,depth=1,embed_dim=32,num_heads=2",
        "--no-pretrained", "--num-users", "6", "--frac", "0.5", "--partition", "dirichlet", "--alpha", "1",
        "--min-size", "20", "--local-bs", "32", "--loader", "memmap", "--num-workers", "0", "--device", "cpu",
        "--quiet", "--eval-bs", "64"]


def test_assignment_is_balanced_and_deterministic():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 1000, 200)
    clients = rng.choice(200, 37, replace=False)
    shares = assign_clients(clients, sizes, 4)
    assert sorted(np.concatenate(shares).tolist()) == sorted(clients.tolist())
    loads = [int(sizes[s].sum()) for s in shares]
    assert max(loads) - min(loads) <= sizes[clients].max()  # greedy LPT bound
    again = assign_clients(clients[::-1].copy(), sizes, 4)  # input order must not matter
    assert all(np.array_equal(a, b) for a, b in zip(shares, again))
    assert [len(s) for s in assign_clients(np.array([3]), sizes, 2)] == [1, 0]  # idle ranks are fine


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    path, _ = write_store(load_synthetic(300, 100, seed=1), root, 16, progress=False)
    return path


def _cli(*args: object, **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # same threads in every process
    return subprocess.Popen([sys.executable, "-m", "dali_fl", "train", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _run(*args: object) -> str:
    proc = _cli(*args)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    return out


def _accs(run: Path) -> list:
    return [json.loads(x)["test_acc"] for x in (run / "metrics.jsonl").read_text().splitlines()]


GPUS = torch.cuda.device_count()
NCCL = pytest.param("cuda", [], marks=[pytest.mark.gpu, pytest.mark.skipif(
    GPUS < 2, reason=f"NCCL between 2 processes needs 2 GPUs; this machine has {GPUS}")])


# FedNova's τ sums travel in the same all_reduce as the running sum; its clients here take unequal steps.
FEDNOVA = ["--fednova", "--optimizer", "sgd", "--lr", "0.05"]
# DP: every process draws the same Poisson sample and noise; adaptive clipping's count travels in the all_reduce.
# Plain SGD: Adam would blow the rounding-level gradient of the attention's key bias (zero in exact arithmetic)
# up to a step of size lr, which the noised model makes visible above the tolerance.
DP = ["--dp-clip", "0.5", "--dp-noise", "0.5", "--dp-adaptive-clip", "--dp-count-noise", "1", "--optimizer", "sgd",
      "--lr", "0.05"]


@pytest.mark.slow
@pytest.mark.parametrize("device, extra", [("cpu", []), ("cpu", FEDNOVA), ("cpu", DP), NCCL])
def test_one_and_two_processes_reach_the_same_weights(store, tmp_path, device, extra):
    args = [device if prev == "--device" else a for prev, a in zip(["", *ARGS], ARGS)] + ["--amp", "off", *extra]
    _run("--store", store, "--out", tmp_path / "one", "--rounds", "2", *args)
    _run("--store", store, "--out", tmp_path / "two", "--rounds", "2", "--nproc", "2", *args)
    a = load_file(str(tmp_path / "one" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # only the order of the float32 sums differs between 1 and 2 processes
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert _accs(tmp_path / "one") == pytest.approx(_accs(tmp_path / "two"), abs=0.011)  # at most 1 of 100


@pytest.mark.slow
def test_a_dying_rank_stops_the_job_and_resume_finishes(store, tmp_path):
    run = tmp_path / "run"
    # Rounds of this size take a fraction of a second and a finished rank exits at once: rank 1 is found while
    # it starts, and killed as soon as round 1's checkpoint is there, with rounds to go.
    proc = _cli("--store", store, "--out", run, "--rounds", "12", "--nproc", "2", *ARGS)
    deadline, victim = time.time() + 300, None
    while not (run / "checkpoint").exists() and proc.poll() is None and time.time() < deadline:
        found = [p for p in psutil.Process(proc.pid).children(recursive=True) if _is_rank(p, "1")]
        victim = victim or (found[0] if found else None)
        time.sleep(0.05)
    assert victim is not None, "rank 1 not found"
    victim.kill()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error:") and "failed rank" in last and f"--resume {run}" in last
    assert "rank: 1" in out or "local_rank: 1" in out  # torchrun's report names the rank
    _run("--resume", run, "--nproc", "2", "--quiet")
    assert [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 13))


def _is_rank(p: psutil.Process, rank: str) -> bool:
    """Whether p is that rank's dali-fl process; a child that exited while the tree was listed is not."""
    try:
        return p.environ().get("RANK") == rank and "dali_fl" in " ".join(p.cmdline())
    except psutil.Error:
        return False


class _Torchrun:
    """A stand-in for the torchrun process: the first wait is cut by Ctrl-C, the next sees it stop by itself."""

    def __init__(self):
        self.waits, self.killed = [], False

    def wait(self, timeout=None):
        self.waits.append(timeout)
        if len(self.waits) == 1:
            raise KeyboardInterrupt
        return 130

    def kill(self):
        self.killed = True


@pytest.mark.parametrize("started", [False, True])
def test_a_ctrl_c_lets_torchrun_stop_its_ranks_and_says_how_to_go_on(tmp_path, started):
    from dali_fl.cli.train import _wait_for_torchrun

    run = tmp_path / "run"
    if started:
        run.mkdir()
        (run / "config.json").write_text("{}")
    proc = _Torchrun()
    with pytest.raises(KeyboardInterrupt) as err:
        _wait_for_torchrun(proc, run, 2)
    assert not proc.killed and proc.waits == [None, 60]  # waited for its shutdown, did not kill it
    assert (f"--resume {run} --nproc 2" in str(err.value)) == started
