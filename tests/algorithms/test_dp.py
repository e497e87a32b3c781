"""DP-FedAvg: clipping, the noise's scale and stream, ε from the accountant, equal weights, exact resume with
noise, and the combinations DP refuses."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import dali_fl.engine.federation as fed
from dali_fl.algorithms.dp import add_noise_, clip_update, epsilon
from dali_fl.engine.run import prepare
from dali_fl.model.build import trainable_state
from tests.algorithms.common import ARGS, RANK_ARGS, assert_refused, config, resumed_pair, train_cli


def test_clipping_bounds_the_update_norm_over_all_tensors():
    start = {"a": torch.zeros(3), "b": torch.ones(2)}
    state = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([1.0, 5.0])}  # Δ = (3,0,0),(0,4): norm 5
    clipped, norm = clip_update(state, start, clip=1.0)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0, 0.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([1.0, 1.8]))
    same, _ = clip_update(state, start, clip=10.0)
    torch.testing.assert_close(same["b"], state["b"])


def test_noise_has_the_dp_fedavg_scale_and_is_reproducible():
    mean = {"w": torch.zeros(200_000)}
    add_noise_(mean, clip=2.0, noise=1.5, num_clients=10, seed=3, round_=4)
    assert float(mean["w"].std()) == pytest.approx(1.5 * 2.0 / 10, rel=0.01)  # z * C / m
    again = {"w": torch.zeros(200_000)}
    add_noise_(again, clip=2.0, noise=1.5, num_clients=10, seed=3, round_=4)
    other = {"w": torch.zeros(200_000)}
    add_noise_(other, clip=2.0, noise=1.5, num_clients=10, seed=3, round_=5)
    assert torch.equal(mean["w"], again["w"]) and not torch.equal(mean["w"], other["w"])


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    e = epsilon(1.0, 0.1, 10, 1e-5)
    assert 0 < e < epsilon(1.0, 0.1, 100, 1e-5)
    assert epsilon(2.0, 0.1, 10, 1e-5) < e
    assert epsilon(0.0, 0.1, 10, 1e-5) == math.inf


def test_dp_clients_weigh_equally_and_their_updates_are_clipped(store, tmp_path, monkeypatch):
    seen = []
    real_add = fed.RunningSum.add

    def add(self, state, weight, *rest):
        seen.append((state, weight))
        return real_add(self, state, weight, *rest)

    monkeypatch.setattr(fed.RunningSum, "add", add)
    fx, _ = prepare(config(store, dp_clip=0.05), tmp_path / "r", resume=False, write=False)
    start = {k: v.clone() for k, v in trainable_state(fx.model).items()}
    fed.run_round(fx, 1)
    fx.close()
    assert [w for _, w in seen] == [1, 1]
    for state, _ in seen:
        norm = math.sqrt(sum(float((state[k] - start[k]).pow(2).sum()) for k in start))
        assert norm <= 0.05 * (1 + 1e-5)


def test_dp_run_reports_epsilon_in_metrics_and_summary(invoke, store, tmp_path):
    train_cli(invoke, store, tmp_path / "r", "--rounds", "2", "--dp-clip", "1", "--dp-noise", "1")
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    eps = [r["dp_epsilon"] for r in rows]
    assert eps == [pytest.approx(epsilon(1.0, 0.5, r, 1e-5)) for r in (1, 2)] and eps[0] < eps[1]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["dp_epsilon"] == eps[-1]


def test_resume_is_bitwise_exact_with_noise_and_a_proximal_term(invoke, store, tmp_path):
    a, b = resumed_pair(invoke, store, tmp_path, "--dp-clip", "0.5", "--dp-noise", "0.8", "--prox-mu", "0.1")
    assert a.keys() == b.keys()
    assert not any(k.startswith("server::") for k in a)  # no server optimizer: no moments
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_dp_noise_without_opacus_is_one_line_before_the_run_starts(invoke, assert_user_error, store, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)  # as if opacus were not installed
    result = invoke("train", "--store", store, "--out", tmp_path / "r", *ARGS, "--dp-clip", "1", "--dp-noise", "1")
    assert_user_error(result, "opacus is not installed", "pip install opacus")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,words", [
    (("--dp-clip", "-1"), ("--dp-clip",)),
    (("--dp-clip", "1", "--dp-noise", "-1"), ("--dp-noise",)),
    (("--dp-noise", "1"), ("--dp-clip",)),
    (("--alg", "fedlora", "--lora-agg", "fedex", "--dp-clip", "1"), ("fedex",)),
])
def test_bad_dp_options_are_one_line(invoke, assert_user_error, store, tmp_path, args, words):
    assert_refused(invoke, assert_user_error, store, tmp_path / "r", ARGS, args, words)


@pytest.mark.parametrize("args,words", [
    (("--lora-agg", "stack", "--dp-clip", "1"), ("stack", "not clipped")),
    (("--lora-ranks", "2,4", "--lora-agg", "zero-pad", "--dp-clip", "1"), ("--dp-clip", "--lora-ranks")),
])
def test_dp_with_lora_it_cannot_bound_is_one_line(invoke, assert_user_error, rank_store, tmp_path, args, words):
    assert_refused(invoke, assert_user_error, rank_store, tmp_path / "r", RANK_ARGS, args, words)
