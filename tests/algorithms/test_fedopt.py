"""Server optimizers (FedOpt family, FedAvgM): each against the paper's few-line reference, the degenerate
equality with FedAvg, FedEx-LoRA under a server step, exact resume of the moments, and bad options."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dali_fl.engine.federation as fed
from dali_fl.algorithms.fedex import fedex_base_deltas
from dali_fl.algorithms.fedopt import FedOpt, FedOptParams
from dali_fl.config import TrainConfig
from dali_fl.engine.run import prepare
from dali_fl.model.build import trainable_state
from dali_fl.model.lora import lora_pairs
from tests.algorithms.common import (
    ARGS,
    assert_refused,
    config,
    one_round,
    resumed_pair,
    server_round,
    stand_in,
)


def _reference(opt: str, steps: list[tuple[torch.Tensor, torch.Tensor]], lr=0.1, mom=0.9, b1=0.9, b2=0.99,
               tau=1e-3) -> torch.Tensor:
    """Reddi et al. Algorithm 2 (and FedAvgM), written out for one tensor: x_t, Δ_t = mean_t - x_t."""
    x, m, v = None, 0.0, tau ** 2
    for start, mean in steps:
        x = start if x is None else x
        d = mean - x
        if opt == "sgd":
            x = x + lr * d
            continue
        if opt == "momentum":
            m = mom * m + d
            x = x + lr * m
            continue
        m = b1 * m + (1 - b1) * d
        if opt == "adagrad":
            v = v + d * d
        elif opt == "adam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * torch.sign(v - d * d)
        x = x + lr * m / (torch.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adagrad", "adam", "yogi"])
def test_server_optimizers_match_the_paper(opt):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, generator=gen)
    means = [torch.randn(4, 3, generator=gen) for _ in range(3)]
    params = FedOptParams(server_opt=opt, server_lr=0.1, **({"server_momentum": 0.9} if opt == "momentum" else {}))
    server, x, steps = FedOpt(stand_in(TrainConfig(algorithms={"fedopt": params}))), x0, []
    for r, mean in enumerate(means, 1):
        steps.append((x, mean))
        x = server.server_step(server_round({"w": x}, round_=r), {"w": mean})["w"]
    torch.testing.assert_close(x, _reference(opt, steps), rtol=1e-6, atol=1e-7)


def test_server_sgd_with_lr_one_is_fedavg(store, tmp_path):
    a = one_round(store, tmp_path, "none")
    b = one_round(store, tmp_path, "sgd", server_opt="sgd", server_lr=1.0)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)  # x + (mean - x) = mean up to float rounding


def test_fedex_with_a_server_optimizer_steps_the_factors_and_folds_the_plain_residual(store, tmp_path, monkeypatch):
    fx, _ = prepare(config(store, alg="fedlora", lora_agg="fedex", server_opt="adam", server_lr=0.05),
                    tmp_path / "r", resume=False, write=False)
    pairs = lora_pairs(fx.model)
    start = {k: v.clone() for k, v in trainable_state(fx.model).items()}
    params = dict(fx.model.named_parameters())
    base0 = {p.base: params[p.base].detach().clone() for p in pairs}
    clients, real = [], fed.local_train

    def recording(model, loader, indices, *args):
        res = real(model, loader, indices, *args)
        clients.append(({k: v.clone() for k, v in trainable_state(model).items()}, res.num_samples))
        return res

    monkeypatch.setattr(fed, "local_train", recording)
    fed.run_round(fx, 1)
    total = sum(n for _, n in clients)
    mean = {k: sum(s[k] * n for s, n in clients) / total for k in start}
    products = {p.base: sum(s[p.b] @ s[p.a] * n for s, n in clients) / total for p in pairs}
    # A fresh optimizer (no moments yet), as the run's own was before its first step.
    want_state = FedOpt(fx).server_step(server_round(start, num_clients=len(clients), total=total), mean)
    residual = fedex_base_deltas(mean, products, pairs)
    for k, v in trainable_state(fx.model).items():
        torch.testing.assert_close(v, want_state[k], rtol=1e-5, atol=1e-6)
    for p in pairs:
        torch.testing.assert_close(params[p.base].detach(), base0[p.base] + residual[p.base], rtol=1e-5, atol=1e-6)
    fx.close()


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_a_round_whose_clients_have_no_samples_takes_no_server_step(store, tmp_path, monkeypatch, opt):
    # Momentum kept moving the model on a round that aggregated nothing (Dirichlet --min-size 0 leaves clients
    # empty), which a round the clock empties leaves as it was. The moments stay as they were too.
    fx, _ = prepare(config(store, server_opt=opt, server_lr=0.5, partition="dirichlet", alpha=0.1, min_size=0,
                           num_users=8, frac=0.25, seed=2), tmp_path / opt, resume=False, write=False)
    try:
        empty = np.flatnonzero(fx.partition.sizes() == 0)
        fed.run_round(fx, 1)
        before = {k: v.clone() for k, v in trainable_state(fx.model).items()}
        (server,) = [a for a in fx.algs if isinstance(a, FedOpt)]
        moments = {k: v.clone() for k, v in server.state_tensors().items()}
        monkeypatch.setattr(fed, "sample_clients", lambda cfg, round_: empty[:1])
        row = fed.run_round(fx, 2)
        after = trainable_state(fx.model)
        moments_after = server.state_tensors()
    finally:
        fx.close()
    assert len(empty) >= 1 and row["num_samples"] == 0 and moments
    assert any(float(m.abs().max()) > 0 for m in moments.values())  # round 1 left momentum that would move it
    for k in before:
        assert torch.equal(after[k], before[k]), k
    for k in moments:
        assert torch.equal(moments_after[k], moments[k]), k


def test_resume_is_bitwise_exact_with_server_state(invoke, store, tmp_path):
    a, b = resumed_pair(invoke, store, tmp_path, "--server-opt", "adam", "--server-lr", "0.05")
    assert a.keys() == b.keys()
    assert any(k.startswith("server::") for k in a)  # the optimizer's moments are in the checkpoint
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("args,words", [
    (("--server-momentum", "0.5"), ("--server-momentum", "--server-opt momentum")),
    (("--server-opt", "sgd", "--server-betas", "0.8", "0.9"), ("--server-betas", "adam")),
    (("--server-lr", "0.5"), ("--server-lr", "--server-opt")),
    (("--server-opt", "adam", "--server-betas", "1", "0.9"), ("--server-betas", "[0, 1)")),
    # adagrad's v sums the squares: beta2 changed nothing, bitwise, while config.json recorded it
    (("--server-opt", "adagrad", "--server-betas", "0.9", "0.1"), ("--server-betas 0.9 0.1", "adagrad reads beta1")),
])
def test_bad_server_optimizer_options_are_one_line(invoke, assert_user_error, store, tmp_path, args, words):
    assert_refused(invoke, assert_user_error, store, tmp_path / "r", ARGS, args, words)
