"""FedProx: the proximal term against its formula, mu = 0 is FedAvg bitwise, a large mu holds clients back."""
from __future__ import annotations

import math

import pytest
import torch

import dali_fl.engine.federation as fed
from dali_fl.algorithms.fedprox import proximal_term
from dali_fl.engine.run import prepare
from dali_fl.model.build import trainable_state
from tests.algorithms.common import ARGS, assert_refused, config, one_round


def test_prox_mu_zero_is_fedavg_bitwise(store, tmp_path):
    a = one_round(store, tmp_path, "a")
    b = one_round(store, tmp_path, "b", prox_mu=0.0)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_proximal_term_and_its_gradient_match_the_formula():
    w = torch.randn(5, 3, requires_grad=True)
    w0 = torch.randn(5, 3)
    term = proximal_term([w], [w0], mu=0.7)
    assert torch.allclose(term, 0.35 * ((w - w0) ** 2).sum())
    term.backward()
    assert torch.allclose(w.grad, 0.7 * (w - w0).detach())


def test_a_large_mu_keeps_clients_closer_to_the_round_start(store, tmp_path):
    def drift(mu: float) -> float:
        fx, _ = prepare(config(store, prox_mu=mu, local_ep=2), tmp_path / f"mu{mu}", resume=False, write=False)
        start = {k: v.clone() for k, v in trainable_state(fx.model).items()}
        fed.run_round(fx, 1)
        moved = sum(float((v - start[k]).pow(2).sum()) for k, v in trainable_state(fx.model).items())
        fx.close()
        return math.sqrt(moved)

    assert drift(100.0) < 0.5 * drift(0.0)


@pytest.mark.parametrize("args,words", [
    (("--prox-mu", "-0.1"), ("--prox-mu",)),
])
def test_bad_fedprox_options_are_one_line(invoke, assert_user_error, store, tmp_path, args, words):
    assert_refused(invoke, assert_user_error, store, tmp_path / "r", ARGS, args, words)
