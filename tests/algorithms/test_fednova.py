"""FedNova: the momentum normaliser, FedAvg as its degenerate case, the server's rescaling, its refusals."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import dali_fl.engine.federation as fed
from dali_fl.algorithms.fednova import effective_steps
from dali_fl.config import TrainConfig
from dali_fl.engine.run import prepare, train
from dali_fl.errors import DaliFlError
from dali_fl.model.build import trainable_state
from tests.tiny import tiny_args, tiny_config, tiny_store

SGD = dict(optimizer="sgd", lr=0.05, momentum=0.0, local_bs=25)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("fednova"))


@pytest.mark.parametrize("steps, rho", [(1, 0.0), (7, 0.0), (1, 0.9), (5, 0.5), (40, 0.9)])
def test_the_normaliser_is_how_far_torch_s_momentum_sgd_moves_on_a_constant_gradient(steps, rho):
    # x - y = lr * g * ||a||_1 when every gradient is g: the paper's definition of ||a||_1, measured on torch.
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1, momentum=rho)
    for _ in range(steps):
        opt.zero_grad()
        (2.0 * w).sum().backward()  # gradient 2 everywhere
        opt.step()
    assert -float(w.detach()) / (0.1 * 2.0) == pytest.approx(effective_steps(steps, rho), rel=1e-5)
    assert effective_steps(steps, rho) == pytest.approx(sum((1 - rho ** j) / (1 - rho) for j in range(1, steps + 1)))


def test_with_plain_sgd_and_equal_steps_it_is_fedavg(store, tmp_path):
    # The tiny partition is IID over 4 clients of 50 samples: every client takes the same number of steps.
    for name, extra in (("fedavg", {}), ("fednova", {"fednova": True})):
        train(tiny_config(store, rounds=2, **SGD, **extra), tmp_path / name, progress=False)
    a = load_file(str(tmp_path / "fedavg" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "fednova" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alg", ["fedavg", "fedlora"])
def test_a_round_follows_the_paper_s_update_for_unequal_steps(store, tmp_path, monkeypatch, alg):
    cfg = tiny_config(store, rounds=1, partition="dirichlet", alpha=0.5, min_size=5, frac=1.0, alg=alg,
                      fednova=True, **{**SGD, "momentum": 0.5, "local_bs": 8})
    fx, _ = prepare(cfg, tmp_path / "run", resume=False)
    clients: dict[int, tuple] = {}
    real = fed.train_one

    def spy(fx_, round_, client, start, loader):
        update = real(fx_, round_, client, start, loader)
        clients[client] = ({k: v.clone() for k, v in update.state.items()}, update.result)
        return update

    monkeypatch.setattr(fed, "train_one", spy)
    x = {k: v.clone() for k, v in trainable_state(fx.model).items()}
    try:
        fed.run_round(fx, 1)
        got = trainable_state(fx.model)
    finally:
        fx.close()
    steps = {c: res.steps for c, (_, res) in clients.items()}
    assert len(set(steps.values())) > 1, steps  # the partition must make the clients' step counts differ
    n = {c: res.num_samples for c, (_, res) in clients.items()}
    p = {c: n[c] / sum(n.values()) for c in n}
    a = {c: effective_steps(steps[c], 0.5) for c in n}
    tau_eff = sum(p[c] * a[c] for c in n)
    for k in x:
        d = sum(p[c] * (x[k].double() - clients[c][0][k].double()) / a[c] for c in n)
        torch.testing.assert_close(got[k].double(), x[k].double() - tau_eff * d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra, words", [
    ({}, ("--fednova", "--optimizer sgd")),  # the default AdamW has no effective-step count
    ({"optimizer": "sgd", "alg": "fedlora", "lora_agg": "fedex"}, ("--fednova", "fedex")),
    ({"optimizer": "sgd", "alg": "fedlora", "lora_agg": "shared-a"}, ("--fednova", "shared-a")),
    ({"optimizer": "sgd", "prox_mu": 0.1}, ("--fednova", "--prox-mu")),
    ({"optimizer": "sgd", "dp_clip": 1.0}, ("--fednova", "--dp-clip")),
    ({"optimizer": "sgd", "alg": "fedlora", "lora_agg": "zero-pad", "lora_ranks": "2,4"}, ("--fednova", "ranks")),
])
def test_combinations_it_cannot_serve_are_one_line(store, tmp_path, invoke, assert_user_error, extra, words):
    with pytest.raises(DaliFlError):
        TrainConfig.from_options({"store": str(store), "fednova": True, **extra})
    result = invoke("train", *tiny_args(store=store, out=tmp_path / "run", fednova=True, **extra))
    assert_user_error(result, *words)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_run_directories_are_named_after_what_ran(store):
    from dali_fl.algorithms import run_label

    assert run_label(tiny_config(store, fednova=True, **SGD)) == "fedavg-fednova"
    assert run_label(tiny_config(store, alg="fedlora", lora_agg="flora")) == "fedlora-stack"  # paper names alias
    assert run_label(tiny_config(store, alg="fedlora", lora_agg="hetlora", prox_mu=0.1)) == "fedlora-zero-pad-fedprox"
    assert run_label(tiny_config(store, alg="fedlora", lora_agg="fedex", server_opt="adam",
                                 server_lr=0.1)) == "fedlora-fedex-fedadam"


def test_a_client_whose_fp16_steps_were_all_skipped_moves_nothing_and_adds_no_steps(store, tmp_path, monkeypatch):
    # fp16's loss scaler may skip every step of a small client: τ_i = 0 took a_i = 0 and divided by it.
    cfg = tiny_config(store, rounds=1, frac=1.0, fednova=True, amp="fp16", **{**SGD, "momentum": 0.5})
    fx, _ = prepare(cfg, tmp_path / "run", resume=False)
    real, seen = fed.local_train, []

    def first_all_skipped(model, loader, indices, *args, **kwargs):
        result = real(model, loader, indices, *args, **kwargs)
        seen.append(result)
        if len(seen) > 1:
            return result
        for p, v in zip(model.parameters(), start_params):
            p.data.copy_(v)  # as if each of its steps had overflowed
        return dataclasses.replace(result, steps=0, skipped_steps=result.steps + result.skipped_steps)

    monkeypatch.setattr(fed, "local_train", first_all_skipped)
    start_params = [p.detach().clone() for p in fx.model.parameters()]
    try:
        row = fed.run_round(fx, 1)
        got = trainable_state(fx.model)
    finally:
        fx.close()
    n = [r.num_samples for r in seen]
    a = [0.0] + [effective_steps(r.steps, 0.5) for r in seen[1:]]
    assert row["tau_eff"] == pytest.approx(sum(ni * ai for ni, ai in zip(n, a)) / sum(n))
    assert all(torch.isfinite(v).all() for v in got.values())


def test_a_client_without_samples_adds_nothing_and_the_round_goes_on(store, tmp_path):
    # Dirichlet with --min-size 0 may leave a client empty (client 0 at this seed): p_i = 0, so it adds nothing.
    cfg = tiny_config(store, rounds=1, partition="dirichlet", alpha=0.1, min_size=0, num_users=8, frac=1.0, seed=2,
                      fednova=True, **SGD)
    fx, _ = prepare(cfg, tmp_path / "run", resume=False)
    try:
        assert 0 in fx.partition.sizes()
        row = fed.run_round(fx, 1)
    finally:
        fx.close()
    assert row["num_clients"] == 8 and row["tau_eff"] > 0


def test_a_round_the_clock_empties_reports_no_tau_eff(store, tmp_path):
    # Its row repeated the round before's τ_eff: a figure of a round that aggregated nobody, and gone after a resume.
    fx, _ = prepare(tiny_config(store, fednova=True, deadline=0.25, speed_spread=10, **SGD),
                    tmp_path / "run", resume=False, write=False)
    try:
        got = [fed.run_round(fx, r) for r in (1, 2, 3)]
    finally:
        fx.close()
    assert any(r["num_clients"] > 0 for r in got) and any(r["num_clients"] == 0 for r in got)
    assert all((r["tau_eff"] is None) == (r["num_clients"] == 0) for r in got), got
