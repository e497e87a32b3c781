"""FedEx-LoRA: the averaged factors plus the residual folded into the base weights are exact, at one rank or mixed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dali_fl.engine.federation as fed
from dali_fl.engine.local import ClientResult
from dali_fl.engine.run import prepare
from tests.algorithms.common import (
    config,
    effective_weights,
    lora_aggregation_error,
    rank_config,
    round_against_the_exact_average,
)


def test_fedex_is_the_exact_average_of_the_clients_effective_weights():
    assert lora_aggregation_error("fedex") < 1e-5


def test_fedex_gives_the_exact_average_of_mixed_rank_effective_weights(rank_store, tmp_path, monkeypatch):
    got, exact, _, _ = round_against_the_exact_average(rank_store, tmp_path, monkeypatch, "fedex")
    for k in exact:
        torch.testing.assert_close(got[k], exact[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("agg", ["fedex", "stack", "fedit"])
def test_a_round_whose_clients_have_no_samples_leaves_the_model_as_it_was(store, tmp_path, monkeypatch, agg):
    # Dirichlet with --min-size 0 leaves some clients empty. A round of only those aggregated nothing, yet FedEx's
    # residual, taken against zero products, folded −s·B@A into the base: the adapter's whole learning, erased.
    fx, _ = prepare(config(store, alg="fedlora", lora_agg=agg, partition="dirichlet", alpha=0.1, min_size=0,
                           num_users=8, frac=0.25, seed=2), tmp_path / agg, resume=False, write=False)
    try:
        empty = np.flatnonzero(fx.partition.sizes() == 0)
        assert len(empty) >= 1
        fed.run_round(fx, 1)
        before = effective_weights(fx)
        assert any(float(before[k].abs().max()) > 0 for k in before)
        monkeypatch.setattr(fed, "sample_clients", lambda cfg, round_: empty[:1])
        row = fed.run_round(fx, 2)
        after = effective_weights(fx)
    finally:
        fx.close()
    assert row["num_clients"] == 1 and row["num_samples"] == 0
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6)


def test_with_mixed_ranks_every_client_starts_from_the_global_model(rank_store, tmp_path, monkeypatch):
    # A rank-r client's truncated adapter at scale alpha/r is not the global one: without D_r in its base weights,
    # a round in which no client moved still moved the model, by 40% of what a training round moves it.
    fx, _ = prepare(rank_config(rank_store, lora_agg="fedex"), tmp_path / "r", resume=False, write=False)
    starts, real = [], fed.local_train

    def idle(model, loader, indices, *args):  # local training that takes no step
        starts.append(effective_weights(fx))
        return ClientResult(len(indices), 0.0, 0.0, 0.0, 0)

    try:
        fed.run_round(fx, 1)
        before = effective_weights(fx)
        monkeypatch.setattr(fed, "local_train", idle)
        fed.run_round(fx, 2)
        after = effective_weights(fx)
        monkeypatch.setattr(fed, "local_train", real)
        moved = fed.run_round(fx, 3)
    finally:
        fx.close()
    assert sorted(fx.ranks.tolist()) == [2, 4, 8] and len(starts) == 3
    for k in before:
        for start in starts:  # each client, whatever its rank, starts where the global model is
            torch.testing.assert_close(start[k], before[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-6)
    assert moved["client_drift"] > 0
