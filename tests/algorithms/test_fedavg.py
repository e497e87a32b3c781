"""FedAvg: the engine's running weighted sum against the reference mean, and its round trip across processes."""
from __future__ import annotations

import numpy as np
import torch

from dali_fl.algorithms.fedavg import FedAvg
from dali_fl.config import TrainConfig
from dali_fl.engine.aggregate import RunningSum, mean_of, weighted_mean
from tests.algorithms.common import server_round, stand_in


def test_weighted_mean_matches_hand_computation():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}
    b = {"w": torch.tensor([5.0, 6.0]), "b": torch.tensor(-1.0)}
    mean = weighted_mean([a, b], [3, 1])
    torch.testing.assert_close(mean["w"].float(), torch.tensor([2.0, 3.0]))  # (3*1+5)/4, (3*2+6)/4
    torch.testing.assert_close(mean["b"].float(), torch.tensor(2.0))  # (9-1)/4


def test_running_sum_equals_reference_on_random_states():
    rng = np.random.default_rng(0)
    states = [{"x": torch.from_numpy(rng.normal(size=(4, 3))).float(),
               "y": torch.from_numpy(rng.normal(size=5)).float()} for _ in range(5)]
    counts = [437, 1, 32, 33, 100]
    running = RunningSum()
    for s, n in zip(states, counts):
        running.add(s, n)
    fedavg = FedAvg(stand_in(TrainConfig()))
    got, deltas = fedavg.aggregate(server_round(states[0], num_clients=5, total=running.total), mean_of(running),
                                   {}, {})
    ref = weighted_mean(states, counts)
    assert deltas == {} and running.total == sum(counts)
    for k in ref:
        np.testing.assert_allclose(got[k].numpy(), ref[k].numpy(), rtol=1e-6, atol=1e-6)


def test_flat_round_trip_preserves_sums():
    running = RunningSum()
    running.add({"a": torch.ones(2, 2), "b": torch.arange(3.0)}, 4)
    flat, counts = running.flat()
    other = RunningSum()
    other.add({"a": torch.zeros(2, 2), "b": torch.zeros(3)}, 1)
    other.load_flat(flat * 2, counts * 2)  # as if two identical processes were all-reduced
    assert other.total == 8
    torch.testing.assert_close(other.sums["a"], torch.full((2, 2), 8.0))


def test_counts_cross_processes_exactly():
    # Reduced in float32, a total of 16,777,217 samples came back as 16,777,216 and FedNova's τ sums lost digits.
    running = RunningSum(like={"a": torch.zeros(2)}, scalars=("tau",))
    running.add({"a": torch.ones(2)}, 16_777_217)
    running.scalars["tau"] += 48_653_929.3
    flat, counts = running.flat()
    running.load_flat(flat, counts)
    assert running.total == 16_777_217 and running.scalars["tau"] == 48_653_929.3


def test_client_drift_is_the_mean_over_the_clients_that_trained(store, tmp_path, monkeypatch):
    # A sampled client without samples (Dirichlet --min-size 0) has no update, yet it counted in the mean: with one
    # of three sampled clients empty, client_drift read two thirds of the trained clients' mean.
    import dali_fl.engine.federation as fed
    from dali_fl.engine.run import prepare
    from tests.algorithms.common import config

    drifts = {}
    for name, pick in (("with-empty", lambda sizes: [np.flatnonzero(sizes == 0)[0], *np.flatnonzero(sizes)[:2]]),
                       ("without", lambda sizes: np.flatnonzero(sizes)[:2])):
        fx, _ = prepare(config(store, partition="dirichlet", alpha=0.1, min_size=0, num_users=8, frac=0.25, seed=2),
                        tmp_path / name, resume=False, write=False)
        clients = np.asarray(pick(fx.partition.sizes()))
        monkeypatch.setattr(fed, "sample_clients", lambda cfg, round_, clients=clients: clients)
        try:
            row = fed.run_round(fx, 1)
        finally:
            fx.close()
        drifts[name] = row["client_drift"]
        assert row["num_clients"] == len(clients)
    assert drifts["without"] > 0
    assert abs(drifts["with-empty"] - drifts["without"]) <= 1e-6 * drifts["without"]
