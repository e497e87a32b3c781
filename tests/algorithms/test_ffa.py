"""FFA-LoRA: A frozen at its shared init, so averaging B is exact, and only B and the head are sent."""
from __future__ import annotations

import math

import pytest
import torch

import dali_fl.engine.federation as fed
from dali_fl.engine.run import prepare
from dali_fl.model.build import trainable_state
from tests.algorithms.common import RANK_ARGS, assert_refused, config, lora_aggregation_error


def test_ffa_is_the_exact_average_of_the_clients_effective_weights():
    assert lora_aggregation_error("ffa") < 1e-5


def test_an_ffa_run_trains_and_uploads_only_b_and_the_head(store, tmp_path):
    """Regression: counting the upload crashed on FFA's missing A; A is frozen and not sent, so not counted."""
    fx, _ = prepare(config(store, alg="fedlora", lora_agg="ffa", lr=5e-3), tmp_path / "r", resume=False, write=False)
    params = dict(fx.model.named_parameters())
    state = trainable_state(fx.model)
    assert fx.pairs and not any(params[p.a].requires_grad or p.a in state for p in fx.pairs)
    head = sum(t.numel() for n, t in state.items() if "lora_" not in n)
    b_blocks = sum(state[p.b].numel() for p in fx.pairs)
    assert head > 0 and b_blocks > 0
    assert [fx.upload_values(c) for c in range(fx.cfg.fed.num_users)] == [head + b_blocks] * fx.cfg.fed.num_users
    a0 = {p.a: params[p.a].detach().clone() for p in fx.pairs}
    start = {k: v.clone() for k, v in state.items()}
    rows = [fed.run_round(fx, r) for r in (1, 2)]
    after = trainable_state(fx.model)
    fx.close()
    for row in rows:
        assert math.isfinite(row["train_loss"])
        assert row["upload_mb"] == pytest.approx(row["num_clients"] * (head + b_blocks) * 4 / 1e6)
    assert all(after[p.b].any() for p in fx.pairs)  # B moved away from its zero init: the run trained
    assert any(not torch.equal(after[k], start[k]) for k in start)
    assert all(torch.equal(params[p.a].detach(), a0[p.a]) for p in fx.pairs)  # and A did not


def test_ffa_refuses_mixed_ranks_in_one_line(invoke, assert_user_error, rank_store, tmp_path):
    assert_refused(invoke, assert_user_error, rank_store, tmp_path / "r", RANK_ARGS,
                   ("--lora-ranks", "2,4", "--lora-agg", "ffa"), ("ffa", "stack"))
