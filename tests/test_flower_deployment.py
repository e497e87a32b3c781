"""The Flower app deployed: a SuperLink and two SuperNodes on the loopback, each node reading its own store copy.

Slow (each `flwr run` starts a ServerApp process, and every instruction a ClientApp process that imports torch
and DALI), so the deployment is started once per test and the assertions are gathered where they can share it.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

pytest.importorskip("flwr")

from dali_fl.data.sources import load_synthetic  # noqa: E402
from dali_fl.data.store import write_store  # noqa: E402
from dali_fl.engine.rundir import read_metrics  # noqa: E402
from dali_fl.flower.app import simulate  # noqa: E402
from dali_fl.flower.deployment import LocalDeployment, node_config  # noqa: E402
from dali_fl.flower.options import run_config_from_options, write_app  # noqa: E402

pytestmark = pytest.mark.slow
# Three clients on two SuperNodes: node 0 holds clients 0 and 2 (a site with several), node 1 holds client 1.
HELD = ([0, 2], 1)
FEDERATION = dict(model="vit_tiny_patch16_224", model_kwargs="patch_size=4,depth=1,embed_dim=32,num_heads=2",
                 pretrained=False, num_users=3, frac=1.0, partition="dirichlet", alpha=0.5, local_bs=25, rounds=2,
                 lr=2e-3, lora_r=2, alg="fedlora", device="cpu")
RUN_S = 400  # one `flwr run` on a shared 2-core machine: about 15 s per round, a minute for a dead node's heartbeat


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> dict:
    """The store, the federation's run config and its run on Flower's simulation engine (`dali-fl flower run`)."""
    root = tmp_path_factory.mktemp("deploy")
    store, _ = write_store(load_synthetic(200, 50, seed=0), root / "stores", 16, progress=False)
    options = {**FEDERATION, "store": str(store)}
    [summary] = simulate(run_config_from_options(options, root / "simulated"))
    assert summary["rounds"] == FEDERATION["rounds"]
    return {"root": root, "store": store, "options": options, "run": root / "simulated"}


def node_store(simulated: dict, node: int) -> Path:
    """A copy of the store in which every train image of the clients the node does not hold is noise.

    Its manifest is the original's, so the node accepts it as the run's store (a node does not re-hash the images
    at every start; `dali-fl verify` would). A node that read any other client's image would train differently.
    """
    copy = simulated["root"] / f"node{node}-store"
    if not copy.exists():
        shutil.copytree(simulated["store"], copy)
        held = np.atleast_1d(HELD[node])
        clients = json.loads((simulated["run"] / "partition.json").read_text())["clients"]
        others = np.concatenate([c["indices"] for i, c in enumerate(clients) if i not in held]).astype(np.int64)
        images = np.load(copy / "train_images.npy", mmap_mode="r+")
        images[others] = np.random.default_rng(node).integers(0, 256, images[others].shape, dtype=np.uint8)
        images.flush()
        del images
    return copy


def write_deployed_app(simulated: dict, name: str) -> tuple[Path, Path]:
    """The app `dali-fl flower app` writes for the same options, with its own run directory: (app, run)."""
    app, run = simulated["root"] / f"{name}-app", simulated["root"] / name
    write_app(app, run_config_from_options(simulated["options"], run))
    return app, run


def assert_same_run(run: Path, simulated_run: Path) -> None:
    """Bitwise-equal final tensors and equal accuracies in every round."""
    got, want = (load_file(str(r / "checkpoint" / "state.safetensors")) for r in (run, simulated_run))
    assert got.keys() == want.keys()
    assert all(bool((got[k] == want[k]).all()) for k in want), "the deployed run's weights differ"
    assert [r["test_acc"] for r in read_metrics(run)] == [r["test_acc"] for r in read_metrics(simulated_run)]


def wait_for_round(run: Path, round_: int, timeout_s: float = RUN_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        if len(rows) >= round_:
            return
        time.sleep(0.2)
    raise AssertionError(f"round {round_} did not finish in {timeout_s} s")


def test_a_node_killed_mid_run_fails_in_one_line_and_the_resumed_run_equals_the_simulated_one(simulated):
    """Two SuperNodes hold three clients, each node on its own store copy: kill one in round 2, resume, and end
    where the simulation (three SuperNodes) ends."""
    app, run = write_deployed_app(simulated, "deployed")
    stores = [node_store(simulated, n) for n in (0, 1)]
    # One torch thread per process, as Flower's simulation gives a worker of one CPU: with two, the weights differ
    # by float rounding (3e-8 measured), since the client's matmuls sum in another order.
    with LocalDeployment(simulated["root"] / "flwr", threads=1) as d:
        d.start_superlink()
        for n in (0, 1):
            d.start_node(f"node{n}", HELD[n], stores[n])
        pending = d.popen_run(app)
        wait_for_round(run, 1)
        d.kill("node1")  # mid-run: round 2 has started, or starts without it (the SuperLink notices in about 60 s)
        out = pending.communicate(timeout=RUN_S)[0]
        failed = [ln for ln in out.splitlines() if "error: client 1 (Flower node" in ln]
        assert len(failed) == 1 and "failed in round 2" in failed[0] and "Node Unavailable" in failed[0], out[-3000:]
        assert [r["round"] for r in read_metrics(run)] == [1]  # round 1 kept, nothing of round 2
        d.start_node("node1", HELD[1], stores[1])
        resumed = d.run(app, {"resume": True}, timeout_s=RUN_S)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        started = d.family()
    assert_same_run(run, simulated["run"])
    assert [r["round"] for r in read_metrics(run)] == [1, 2]
    assert started and not any(p.is_running() and p.status() != "zombie" for p in started)  # all stopped


def test_a_node_on_another_store_ends_the_run_in_a_line_that_names_it(simulated):
    """Another store of the same shape: one line in that node's log, and the ServerApp's line names the node."""
    other, _ = write_store(load_synthetic(200, 50, seed=1), simulated["root"] / "other", 16, progress=False)
    app, run = write_deployed_app(simulated, "refused")
    with LocalDeployment(simulated["root"] / "flwr-refused") as d:
        d.start_superlink()
        d.start_node("node0", HELD[0])
        d.start_node("node1", HELD[1], other)
        res = d.run(app, timeout_s=RUN_S)  # exits 0 whatever the run's outcome: Flower 1.42's `--stream`
    lines = [ln for ln in res.stdout.splitlines() if "error: Flower node" in ln]
    assert len(lines) == 1 and "the SuperNode holding client 1: the store at" in lines[0], res.stdout[-3000:]
    assert "is not the run's" in lines[0] and str(other) in lines[0]
    node_log = d.log_path("node1").read_text()
    refusals = [ln for ln in node_log.splitlines() if "error:" in ln]
    assert len(refusals) == 1 and "is not the run's" in refusals[0]
    assert "Traceback" not in node_log  # the refusal is the node's one line, not an exception's
    assert not run.exists()  # no round finished: nothing of the run is left


def test_flwr_run_without_a_superlink_fails_in_flower_s_words(tmp_path):
    """Nothing listens at the connection's address: `flwr run` fails, and nothing of dali-fl's is in the way."""
    app = tmp_path / "app"
    write_app(app, run_config_from_options({**FEDERATION, "store": str(tmp_path / "store")}, tmp_path / "run"))
    d = LocalDeployment(tmp_path / "flwr")
    d.write_connection()  # the connection only: no SuperLink was started
    res = d.run(app, timeout_s=120)
    assert res.returncode != 0
    said = res.stdout + res.stderr
    assert "Connection to the SuperLink is unavailable" in said, said[-2000:]
    assert not any(word in said for word in ("Traceback", "dali_fl", "error:")), said[-2000:]  # Flower's box only
    assert not (tmp_path / "run").exists()


def test_node_config_quotes_the_store_path():
    assert node_config(3) == "partition-id=3"
    assert node_config(0, Path("/data/a store")) == 'partition-id=0 store="/data/a store"'
    assert node_config([0, 2]) == 'clients="0,2"'
