"""Heterogeneous LoRA ranks themselves: rank specs, truncation to a client's rank, its upload, resume, bad specs.

How each aggregation treats mixed ranks is tested with the aggregation, under `tests/algorithms/`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dali_fl.engine.federation as fed
from dali_fl.config import TrainConfig
from dali_fl.engine.run import prepare
from dali_fl.errors import DaliFlError
from dali_fl.model.build import trainable_state
from dali_fl.model.ranks import parse_ranks
from tests.tiny import tiny_args, tiny_config, tiny_store

TINY = tiny_args(num_users=3, frac=1, alg="fedlora", lr=5e-3)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("stores"), num_train=150, num_test=30)


def _config(store: Path, **options) -> TrainConfig:
    return tiny_config(store, **{"num_users": 3, "frac": 1.0, "alg": "fedlora", "local_bs": 25, "lr": 5e-3,
                                 "lora_ranks": "2,4,8", **options})


@pytest.mark.parametrize("options", [{"dp_clip": 1.0}, {"fednova": True, "optimizer": "sgd"},
                                     {"scaffold": True, "optimizer": "sgd", "momentum": 0.0}], ids=str)
def test_one_rank_given_as_lora_ranks_is_not_refused_as_mixed(store, options):
    # `--lora-ranks 4` truncates nobody: the model's rank is 4 and so is every client's.
    cfg = _config(store, lora_ranks="4", lora_agg="zero-pad", **options)
    assert cfg.model.lora_r == 4 and not cfg.fed.mixed_ranks()
    with pytest.raises(DaliFlError, match="--lora-ranks"):
        _config(store, lora_ranks="2,4", lora_agg="zero-pad", **options)


def test_rank_specs():
    assert parse_ranks("4", 3, 0).tolist() == [4, 4, 4]
    assert parse_ranks("2,4,8", 5, 0).tolist() == [2, 4, 8, 2, 4]
    drawn = parse_ranks("uniform:2,4,8,16", 50, seed=1)
    assert set(drawn.tolist()) == {2, 4, 8, 16}
    assert parse_ranks("uniform:2,4,8,16", 50, seed=1).tolist() == drawn.tolist()
    assert parse_ranks("uniform:2,4,8,16", 50, seed=2).tolist() != drawn.tolist()


def test_lower_rank_clients_train_only_their_components(store, tmp_path, monkeypatch):
    fx, _ = prepare(_config(store, lora_agg="stack"), tmp_path / "r", resume=False, write=False)
    seen, real = [], fed.local_train

    def checking(model, loader, indices, *args):
        res = real(model, loader, indices, *args)
        state = trainable_state(model)
        seen.append([(int((state[p.a].abs().sum(1) > 0).sum()), int((state[p.b].abs().sum(0) > 0).sum()))
                     for p in fx.pairs])
        return res

    monkeypatch.setattr(fed, "local_train", checking)
    fed.run_round(fx, 1)
    fx.close()
    assert [set(layers) for layers in seen] == [{(2, 2)}, {(4, 4)}, {(8, 8)}]


def test_one_rank_for_all_is_todays_fedlora_bitwise(store, tmp_path):
    states = []
    for name, options in (("plain", {"lora_ranks": "", "lora_r": 4}), ("ranks", {"lora_ranks": "4"})):
        fx, _ = prepare(_config(store, **options), tmp_path / name, resume=False, write=False)
        fed.run_round(fx, 1)
        states.append({k: v.clone() for k, v in trainable_state(fx.model).items()})
        fx.close()
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_upload_counts_each_clients_own_rank(store, tmp_path):
    fx, _ = prepare(_config(store, lora_agg="stack"), tmp_path / "r", resume=False, write=False)
    state = trainable_state(fx.model)
    head = sum(t.numel() for n, t in state.items() if "lora_" not in n)
    per_rank = sum(state[p.a].shape[1] + state[p.b].shape[0] for p in fx.pairs)
    assert [fx.upload_values(c) for c in range(3)] == [head + r * per_rank for r in (2, 4, 8)]
    row = fed.run_round(fx, 1)
    fx.close()
    assert row["upload_mb"] == pytest.approx((3 * head + 14 * per_rank) * 4 / 1e6)
    assert row["update_spread"] is None  # clients of mixed ranks start from different points


def test_mixed_rank_runs_resume_bitwise_and_record_the_ranks(invoke, store, tmp_path):
    extra = ("--lora-ranks", "uniform:2,4,8", "--lora-agg", "stack")
    for out, rounds in (("full", "3"), ("half", "1")):
        result = invoke("train", "--store", store, "--out", tmp_path / out, *TINY, "--rounds", rounds, *extra)
        assert result.exit_code == 0, result.output
    assert invoke("train", "--resume", tmp_path / "half", "--rounds", "3", "--quiet").exit_code == 0
    a = load_file(str(tmp_path / "full" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "half" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("base::") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ranks = json.loads((tmp_path / "full" / "client_ranks.json").read_text())
    assert ranks == parse_ranks("uniform:2,4,8", 3, 0).tolist()
    assert json.loads((tmp_path / "full" / "config.json").read_text())["model"]["lora_r"] == int(np.max(ranks))


@pytest.mark.parametrize("args,words", [
    (("--lora-ranks", "2,0", "--lora-agg", "stack"), ("--lora-ranks", "1..1024")),
    (("--lora-ranks", "1,2,3,4", "--lora-agg", "stack"), ("4 ranks for 3 clients",)),
    (("--lora-ranks", "uniform:", "--lora-agg", "stack"), ("does not parse",)),
    (("--lora-ranks", "2;4", "--lora-agg", "stack"), ("does not parse",)),
    (("--lora-ranks", "4", "--alg", "fedavg"), ("--alg fedlora",)),
])
def test_bad_rank_options_are_one_line(invoke, assert_user_error, store, tmp_path, args, words):
    assert_user_error(invoke("train", "--store", store, "--out", tmp_path / "r", *TINY, *args), *words)
    assert not (tmp_path / "r").exists()



def test_a_lora_r_that_lora_ranks_overrides_is_refused(store):
    # The model's rank is the largest of --lora-ranks; a --lora-r beside it was accepted and ignored.
    with pytest.raises(DaliFlError, match=r"--lora-r 16 does nothing with --lora-ranks, whose largest rank \(8\)"):
        _config(store, lora_r=16, lora_agg="zero-pad")
    assert _config(store, lora_agg="zero-pad").model.lora_r == 8
