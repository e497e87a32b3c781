"""SCAFFOLD (option II): the correction in every local step, the variates' update, the drift it removes, exact
resume of its journaled table, and what it refuses."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

import dali_fl.engine.federation as fed
from dali_fl.algorithms.scaffold import Correction, Scaffold
from dali_fl.algorithms.shared_a import SharedA
from dali_fl.config import FederationConfig, LocalConfig, TrainConfig
from dali_fl.engine.local import ClientResult, local_train
from dali_fl.engine.run import prepare
from dali_fl.errors import DaliFlError
from dali_fl.model.build import trainable_state
from tests.algorithms.common import (
    ARGS,
    RANK_ARGS,
    SCAFFOLD,
    assert_refused,
    config,
    model_of,
    rank_config,
    server_round,
    stand_in,
    train_cli,
)
from tests.tiny import kill_at_client


def _scaffold(tmp_path, num_users: int, lr: float, **tensors: torch.Tensor) -> Scaffold:
    """SCAFFOLD without a Federation: `num_users` clients, local lr `lr`, a model whose parameters are `tensors`."""
    cfg = TrainConfig(fed=FederationConfig(num_users=num_users), local=LocalConfig(lr=lr, optimizer="sgd", momentum=0))
    return Scaffold(stand_in(cfg, model=model_of(**tensors), run_dir=tmp_path))


def _done(s: Scaffold, client: int, x: dict, y: dict, steps: int) -> None:
    """The client trained from x to y in `steps` local steps."""
    s.client_done(client, x, y, ClientResult(num_samples=1, loss=0.0, data_wait_s=0.0, compute_s=0.0, steps=steps))


class _Batches:
    """A loader stand-in: the same fixed batches every epoch."""

    def __init__(self, batches):
        self.batches = batches

    def epoch(self, indices, seed, shuffle=True):
        return iter(self.batches)


def test_local_steps_add_the_scaffold_correction_to_every_gradient():
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(3)]
    model = torch.nn.Linear(6, 3)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    corr = [torch.randn(3, 6, generator=gen), torch.randn(3, generator=gen)]
    cfg = LocalConfig(local_ep=1, local_bs=4, lr=0.1, optimizer="sgd", momentum=0.0)
    res = local_train(model, _Batches(batches), torch.arange(12).numpy(), cfg, seed=0, amp=None,
                      device=torch.device("cpu"), terms=[Correction(corr)])
    for x, y in batches:  # the reference: y <- y - lr (grad + c - c_i)
        wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
        torch.nn.functional.cross_entropy(x @ wr.T + br, y).backward()
        w, b = w - 0.1 * (wr.grad + corr[0]), b - 0.1 * (br.grad + corr[1])
    assert res.steps == 3
    torch.testing.assert_close(model.weight.detach(), w)
    torch.testing.assert_close(model.bias.detach(), b)


def test_scaffold_variates_follow_option_two(tmp_path):
    x = {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([[0.5]])}
    s = _scaffold(tmp_path, 4, 0.1, **x)
    s.c = torch.tensor([0.1, -0.2, 0.3])
    ys = {1: {"w": torch.tensor([0.8, 2.1]), "v": torch.tensor([[0.4]])},
          3: {"w": torch.tensor([1.2, 1.7]), "v": torch.tensor([[0.6]])}}
    for client, y in ys.items():
        w, v = s.local_term(client, list(s.fx.model.parameters())).diff  # c - c_i, c_i still 0, in the shapes
        torch.testing.assert_close(w, torch.tensor([0.1, -0.2]))
        torch.testing.assert_close(v, torch.tensor([[0.3]]))
        _done(s, client, x, y, steps=5)
    s.end_round(server_round(x, num_clients=len(ys)))
    flat = lambda d: torch.cat([d["w"], d["v"].reshape(-1)])  # noqa: E731
    c = torch.tensor([0.1, -0.2, 0.3])
    new = {i: -c + (flat(x) - flat(y)) / (5 * 0.1) for i, y in ys.items()}  # c_i was 0
    torch.testing.assert_close(s.c, c + (new[1] + new[3]) / 4)
    s.commit()
    torch.testing.assert_close(s.table.row(3), new[3])
    assert not s.table.row(0).any() and not s.table.row(2).any()


def test_a_client_that_took_no_step_keeps_its_variate(tmp_path):
    x = {"w": torch.tensor([1.0, 2.0])}
    s = _scaffold(tmp_path, 4, 0.1, **x)
    s.c = torch.tensor([0.4, -0.2])
    _done(s, 2, x, x, steps=0)  # no samples: no gradient to learn c_i from (c_i − c would undo the server's c)
    s.end_round(server_round(x, num_clients=1))
    torch.testing.assert_close(s.c, torch.tensor([0.4, -0.2]))
    s.commit()
    assert not s.table.row(2).any()


def test_under_fp16_k_is_the_steps_taken(store, tmp_path, monkeypatch):
    """fp16 used to be refused: the loss scaler's skipped steps counted in K. Now K is the steps that moved y_i."""
    fx, _ = prepare(config(store, scaffold=True, optimizer="sgd", momentum=0.0, amp="fp16", frac=1.0),
                    tmp_path / "r", resume=False, write=True)
    ks = []
    real_done = Scaffold.client_done
    monkeypatch.setattr(Scaffold, "client_done", lambda self, client, start, state, result: (
        ks.append((result.steps, result.skipped_steps)), real_done(self, client, start, state, result)))
    try:
        row = fed.run_round(fx, 1)
        c = next(a for a in fx.algs if isinstance(a, Scaffold)).c
    finally:
        fx.close()
    batches = 2  # each tiny client holds 50 samples: two batches of 25
    assert ks and all(steps + skipped == batches for steps, skipped in ks)
    assert row["amp_skipped_steps"] == sum(skipped for _, skipped in ks) and torch.isfinite(c).all()


def test_with_shared_a_the_variate_is_measured_from_the_client_s_own_b(rank_store, tmp_path, monkeypatch):
    """FedSA-LoRA clients start from their own B, not the round's: option II's x is where the client started."""
    fx, _ = prepare(rank_config(rank_store, lora_agg="shared-a", lora_ranks="", frac=1.0, scaffold=True,
                                optimizer="sgd", momentum=0.0), tmp_path / "r", resume=False, write=True)
    started, given = [], []
    real_start, real_done = SharedA.start_client, Scaffold.client_done

    def start_client(self, client):
        real_start(self, client)
        started.append({k: v.clone() for k, v in trainable_state(self.fx.model).items()})

    def client_done(self, client, start, state, result):
        given.append({k: v.clone() for k, v in start.items()})
        real_done(self, client, start, state, result)

    monkeypatch.setattr(SharedA, "start_client", start_client)
    monkeypatch.setattr(Scaffold, "client_done", client_done)
    try:
        for round_ in (1, 2):  # in round 2 the clients' own B differ from the averaged one
            fed.run_round(fx, round_)
            for a in fx.algs:
                a.commit()
    finally:
        fx.close()
    assert len(given) == len(started) == 6
    for want, got in zip(started, given):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_scaffold_removes_the_drift_bias_of_fedavg_on_heterogeneous_quadratics(tmp_path):
    """The paper's motivating case: clients f_i = h_i/2 (w - a_i)^2, K local steps, full participation."""
    h, a, lr, steps = torch.tensor([1.0, 10.0]), torch.tensor([0.0, 1.0]), 0.05, 10

    def federate(variates: Scaffold | None) -> float:
        x = torch.zeros(1)
        for r in range(1, 301):
            ys = []
            for i in range(2):
                y = x.clone()
                corr = variates.local_term(i, [y]).diff[0] if variates else 0.0
                for _ in range(steps):
                    y = y - lr * (h[i] * (y - a[i]) + corr)
                if variates:
                    _done(variates, i, {"w": x}, {"w": y}, steps)
                ys.append(y)
            if variates:
                variates.end_round(server_round({"w": x}, round_=r, num_clients=2))
                variates.commit()
            x = sum(ys) / 2
        return float(x)

    optimum = float((h * a).sum() / h.sum())
    assert abs(federate(None) - optimum) > 0.1  # FedAvg settles away from the optimum
    assert federate(_scaffold(tmp_path, 2, lr, w=torch.zeros(1))) == pytest.approx(optimum, abs=1e-5)


def test_scaffold_resume_after_a_kill_mid_round_is_bitwise_exact(invoke, store, tmp_path, monkeypatch):
    train_cli(invoke, store, tmp_path / "full", "--rounds", "3", *SCAFFOLD)
    kill_at_client(monkeypatch, 4)  # round 2, second client: its first client's new row must not reach the file
    assert invoke("train", "--store", store, "--out", tmp_path / "half", *ARGS, "--rounds", "3",
                  *SCAFFOLD).exit_code == 130
    monkeypatch.undo()
    assert invoke("train", "--resume", tmp_path / "half", "--quiet").exit_code == 0
    a = load_file(str(tmp_path / "full" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "half" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys() and "scaffold::c" in a and "scaffold::rows" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    variates = [(tmp_path / d / "scaffold_clients.f32").read_bytes() for d in ("full", "half")]
    assert variates[0] == variates[1] and any(variates[0])


def test_scaffold_refuses_a_foreign_or_lost_variates_file(invoke, assert_user_error, store, tmp_path):
    train_cli(invoke, store, tmp_path / "r", "--rounds", "2", *SCAFFOLD)
    path = tmp_path / "r" / "scaffold_clients.f32"
    path.write_bytes(path.read_bytes()[:-4])
    assert_user_error(invoke("train", "--resume", tmp_path / "r", "--rounds", "3"), "not this run's file")
    path.unlink()
    assert_user_error(invoke("train", "--resume", tmp_path / "r", "--rounds", "3"), "missing", "new run")
    assert not path.exists()  # a refused resume made a zeroed file, which the next resume then ran with
    assert_user_error(invoke("train", "--resume", tmp_path / "r", "--rounds", "3"), "missing", "new run")


def test_scaffold_that_would_not_fit_on_disk_is_one_line(invoke, assert_user_error, store, tmp_path, monkeypatch):
    import dali_fl.engine.client_table as client_table

    monkeypatch.setattr(client_table.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(total=10, used=9, free=1))
    assert_user_error(invoke("train", "--store", store, "--out", tmp_path / "r", *ARGS, *SCAFFOLD),
                      "client variates take one row per client", "GiB", "--alg fedlora")


def test_scaffold_needs_sgd_and_one_process(invoke, assert_user_error, store, tmp_path):
    from dali_fl.engine.federation import RoundHooks
    from dali_fl.engine.run import train

    assert_user_error(invoke("train", "--store", store, "--out", tmp_path / "r", *ARGS, "--scaffold"),
                      "--optimizer sgd")

    class TwoProcesses(RoundHooks):
        pass

    with pytest.raises(DaliFlError, match="without --nproc"):
        train(config(store, scaffold=True, optimizer="sgd", momentum=0.0), tmp_path / "r", hooks=TwoProcesses())


# --- combinations it refuses, in one line, before any training ---------------------------------

@pytest.mark.parametrize("options,words", [
    ({}, ("--scaffold", "--momentum 0", "0.9")),  # heavy-ball SGD at the default momentum
    ({"momentum": 0.0, "dp_clip": 1.0}, ("--scaffold", "--dp-clip")),
    ({"momentum": 0.0, "alg": "fedlora", "lora_agg": "stack"}, ("--lora-agg stack", "--scaffold", "re-initialises")),
    ({"momentum": 0.0, "prox_mu": 0.01}, ("--scaffold", "--prox-mu", "proximal")),
], ids=["default-momentum", "dp-clip", "stack", "prox-mu"])
def test_scaffold_refusals_from_options_are_one_line(store, options, words):
    with pytest.raises(DaliFlError) as refused:
        config(store, scaffold=True, optimizer="sgd", **options)
    message = str(refused.value)
    assert len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("args,words", [
    (("--scaffold", "--optimizer", "sgd"), ("--scaffold", "--momentum 0")),  # the README's spelling, momentum 0.9
    (("--scaffold", "--optimizer", "sgd", "--momentum", "0", "--dp-clip", "1"), ("--scaffold", "--dp-clip")),
], ids=["default-momentum", "dp-clip"])
def test_scaffold_refusals_on_the_command_line_are_one_line(invoke, assert_user_error, store, tmp_path, args, words):
    assert_refused(invoke, assert_user_error, store, tmp_path / "r", ARGS, args, words)


def test_scaffold_with_mixed_ranks_is_one_line(invoke, assert_user_error, rank_store, tmp_path):
    assert_refused(invoke, assert_user_error, rank_store, tmp_path / "r", RANK_ARGS,
                   ("--lora-ranks", "2,4", "--lora-agg", "zero-pad", "--scaffold", "--optimizer", "sgd", "--momentum",
                    "0"), ("--scaffold", "--lora-ranks"))
