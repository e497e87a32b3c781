"""FedBuff: the paper's staleness weights, a pure event order, the degenerate case that is synchronous FedAvg
bitwise, stale updates re-based onto the current model, exact resume between and within server steps, FedLoRA
and a server optimizer, and the combinations it refuses."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dali_fl.algorithms.base import AsyncPolicy
from dali_fl.algorithms.fedbuff import staleness_weight
from dali_fl.engine.asynchronous import Schedule, rebased
from dali_fl.engine.clock import Profiles
from dali_fl.engine.run import train
from dali_fl.errors import DaliFlError
from tests.algorithms.common import ARGS, assert_refused, config
from tests.tiny import kill_at_client

ASYNC = dict(async_=True, speed_spread=10.0, concurrency=3, buffer=1, staleness="poly:0.5")


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(run / "checkpoint" / "state.safetensors")).items() if "::" not in k}


def test_staleness_weights_are_the_papers():
    assert staleness_weight("constant")(7) == 1.0
    assert staleness_weight("poly:0.5")(3) == pytest.approx(0.5)
    hinge = staleness_weight("hinge:1,2")
    assert hinge(0) == hinge(2) == 1.0 and hinge(4) == pytest.approx(1 / 3)
    for bad in ("poly", "poly:x", "poly:0", "hinge:1", "linear:1", "constant:2", "poly:-1", "poly:nan"):
        with pytest.raises(DaliFlError, match="does not parse"):
            staleness_weight(bad)


def test_event_order_is_a_pure_function_of_seed_and_clock():
    seconds = np.array([1.0, 7.0, 2.0, 3.5, 5.0, 1.5])
    always = Profiles(np.ones(6), np.ones(6), np.ones(6))

    def steps(seed: int) -> list:
        s = Schedule(seed, seconds, always, AsyncPolicy(4, 2, lambda tau: 1.0))
        return [(tuple((f.client, f.version) for f in arrivals), when) for arrivals, when in
                (s.next_step() for _ in range(6))]

    a, b = steps(0), steps(0)
    assert a == b and a != steps(1)
    assert [when for _, when in a] == sorted(when for _, when in a)
    assert any(version < step for step, (arrivals, _) in enumerate(a) for _, version in arrivals)  # some are stale


def test_a_window_that_opens_while_a_slot_is_free_gets_a_client():
    # Client 0 is always online and takes 100 s; client 1 is online from 5 s to 50 s and takes 1 s. A slot was
    # free at 5 s, but the server only looked again when client 0 arrived: client 1 was never sent a model.
    windows = (np.zeros((0, 2)), np.array([[5.0, 50.0]]))
    s = Schedule(0, np.array([100.0, 1.0]), Profiles(np.ones(2), np.ones(2), np.ones(2), windows),
                 AsyncPolicy(2, 1, lambda tau: 1.0))
    first = [s.next_step() for _ in range(3)]
    assert [([f.client for f in arrivals], when) for arrivals, when in first] == [([1], 6.0), ([1], 7.0), ([1], 8.0)]


def test_a_client_without_samples_is_never_sent_a_model():
    # With no samples, its trip is the download and upload alone: the fastest, so it filled every buffer.
    always = Profiles(np.ones(3), np.ones(3), np.ones(3))
    s = Schedule(0, np.array([5.0, 0.01, 6.0]), always, AsyncPolicy(3, 1, lambda tau: 1.0),
                 trains=np.array([True, False, True]))
    assert all(f.client != 1 for arrivals, _ in (s.next_step() for _ in range(6)) for f in arrivals)


def test_a_buffer_too_few_online_clients_can_fill_says_so():
    # Client 1 leaves at 1 s; client 0 alone cannot fill a buffer of 2 at version 1, though it is online.
    windows = (np.zeros((0, 2)), np.array([[0.0, 1.0]]))
    s = Schedule(0, np.array([1.5, 0.5]), Profiles(np.ones(2), np.ones(2), np.ones(2), windows),
                 AsyncPolicy(2, 2, lambda tau: 1.0))
    s.next_step()
    with pytest.raises(DaliFlError, match=r"buffer of 2: after simulated time 3.0 s only 1 client\(s\) with samples "
                                          r"are online .* lower --buffer"):
        s.next_step()


def test_clients_without_samples_stay_home_in_a_run(store, tmp_path):
    # Dirichlet --min-size 0 leaves client 0 empty at this seed (tests/algorithms/test_fednova.py).
    split = dict(partition="dirichlet", alpha=0.1, min_size=0, num_users=8, seed=2)
    train(config(store, rounds=4, **{**ASYNC, **split}), tmp_path / "run", progress=False)
    assert all(r["num_samples"] > 0 for r in rows(tmp_path / "run"))
    with pytest.raises(DaliFlError, match="--buffer 8 needs that many clients with samples, and the partition "
                                          "leaves 7"):
        train(config(store, rounds=1, **{**ASYNC, **split, "concurrency": 8, "buffer": 8}), tmp_path / "r2",
              progress=False)


def test_stale_update_is_rebased_and_weighed():
    sent, current, trained = torch.zeros(3), torch.ones(3), torch.full((3,), 4.0)
    got = rebased({"w": trained}, {"w": sent}, {"w": current}, 0.5)["w"]
    assert torch.equal(got, torch.full((3,), 3.0))  # 1 + 0.5 · (4 − 0)


@pytest.mark.parametrize("options", [{}, {"alg": "fedlora", "server_opt": "adam", "server_lr": 0.01}],
                         ids=["fedavg", "fedlora-fedadam"])
def test_equal_clients_with_buffer_equal_to_concurrency_is_synchronous_fedavg(store, tmp_path, options):
    # The tiny federation's iid clients hold 50 samples each: with equal speeds every trip takes as long.
    train(config(store, rounds=3, **options), tmp_path / "sync", progress=False)
    train(config(store, rounds=3, async_=True, concurrency=2, buffer=2, **options), tmp_path / "async",
          progress=False)
    got = rows(tmp_path / "async")
    assert all(r["staleness_max"] == 0 and r["num_clients"] == 2 for r in got)
    want, have = weights(tmp_path / "sync"), weights(tmp_path / "async")
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    assert [r["test_acc"] for r in got] == [r["test_acc"] for r in rows(tmp_path / "sync")]
    assert [r["sim_time_s"] for r in got] == [r["sim_time_s"] for r in rows(tmp_path / "sync")]


def test_fast_clients_lap_slow_ones_and_stale_updates_count_less(store, tmp_path):
    train(config(store, rounds=6, **ASYNC), tmp_path / "run", progress=False)
    got = rows(tmp_path / "run")
    assert sum(r["updates_stale"] for r in got) > 0
    assert all(r["num_clients"] == 1 and r["clients_in_flight"] <= 2 for r in got)  # C − K still out
    # One update a step has no spread around the step's mean; a stale one's drift was counted unweighted (0.28).
    assert all(r["update_spread"] <= 1e-2 * r["client_drift"] for r in got)
    assert [r["sim_time_s"] for r in got] == sorted(r["sim_time_s"] for r in got)


@pytest.mark.parametrize("options,part", [(ASYNC, 3),
                                          (dict(async_=True, concurrency=3, buffer=2, staleness="poly:1"), 2)],
                         ids=["C3-K1", "C3-K2-equal-speeds"])
def test_resume_between_and_within_server_steps_is_exact(store, tmp_path, monkeypatch, options, part):
    # The second case's rows differed in the last bits of client_drift: the restored versions' tensors came back
    # in the checkpoint's sorted order, and the drift was summed in it.
    train(config(store, rounds=6, **options), tmp_path / "full", progress=False)
    train(config(store, rounds=part, **options), tmp_path / "part", progress=False)
    saved = load_file(str(tmp_path / "part" / "checkpoint" / "state.safetensors"))
    assert any(k.startswith("async::") for k in saved), "versions that clients in flight need are checkpointed"
    with monkeypatch.context() as m:
        kill_at_client(m, 2)  # dies in step 5, after step 4's checkpoint
        with pytest.raises(KeyboardInterrupt):
            train(config(store, rounds=6, **options), tmp_path / "part", resume=True, progress=False)
    train(config(store, rounds=6, **options), tmp_path / "part", resume=True, progress=False)
    want, have = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(want[k], have[k]) for k in want)
    drop = ("round_time_s", "data_wait_s", "compute_s", "aggregate_s", "images_per_s", "eval_s")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "full")]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / "part")]


def test_fedlora_trains_asynchronously(store, tmp_path):
    train(config(store, rounds=4, alg="fedlora", lora_agg="ffa", **ASYNC), tmp_path / "run", progress=False)
    assert len(rows(tmp_path / "run")) == 4


@pytest.mark.parametrize("args, words", [
    (["--async", "--concurrency", "2", "--buffer", "3"], ["--buffer 3", "--concurrency 2"]),
    (["--async", "--concurrency", "9"], ["--concurrency 9", "4 clients"]),
    (["--async", "--staleness", "poly:"], ["--staleness", "does not parse"]),
    (["--concurrency", "2"], ["--concurrency", "--async"]),
    (["--async", "--dp-clip", "1"], ["--async", "--dp-clip"]),
    (["--async", "--alg", "fedlora", "--lora-agg", "fedex"], ["--async", "fedex"]),
    (["--async", "--deadline", "5"], ["--deadline", "--async"]),
    (["--async", "--scaffold", "--optimizer", "sgd", "--momentum", "0"], ["--async", "--scaffold"]),
])
def test_refusals(invoke, assert_user_error, store, tmp_path, args, words):
    assert_refused(invoke, assert_user_error, store, tmp_path / "run", ARGS, args, words)


def test_flower_refuses_async(store):
    from dali_fl.flower.options import config_from_run_config, run_config_from_options

    with pytest.raises(DaliFlError, match="--async runs in `dali-fl train`"):
        config_from_run_config(run_config_from_options({"store": str(store), "async_": True}, Path("out")))
