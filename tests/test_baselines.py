"""FedProx, server optimizers and DP-FedAvg: each against a few-line reference, and the degenerate equalities."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dali_fl.engine.federation as fed
from dali_fl.algorithms.dp import add_noise_, clip_update, epsilon
from dali_fl.algorithms.fedopt import ServerOptimizer
from dali_fl.config import ServerConfig, TrainConfig
from dali_fl.engine.aggregate import fedex_base_deltas
from dali_fl.engine.local import proximal_term
from dali_fl.engine.run import prepare
from dali_fl.errors import DaliFlError
from dali_fl.model.build import lora_pairs, trainable_state
from tests.tiny import kill_at_client, tiny_args, tiny_config, tiny_store

TINY = tiny_args(local_bs=25, lr=2e-3)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("stores"))


def _config(store: Path, **options) -> TrainConfig:
    return tiny_config(store, **{"lora_r": 2, "local_bs": 25, "lr": 2e-3, **options})


def _one_round(store: Path, tmp_path: Path, name: str, **options) -> dict[str, torch.Tensor]:
    fx, _ = prepare(_config(store, **options), tmp_path / name, resume=False, write=False)
    fed.run_round(fx, 1)
    state = {k: v.clone() for k, v in trainable_state(fx.model).items()}
    fx.close()
    return state


# --- FedProx -----------------------------------------------------------------------------

def test_prox_mu_zero_is_fedavg_bitwise(store, tmp_path):
    a = _one_round(store, tmp_path, "a")
    b = _one_round(store, tmp_path, "b", prox_mu=0.0)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_proximal_term_and_its_gradient_match_the_formula():
    w = torch.randn(5, 3, requires_grad=True)
    w0 = torch.randn(5, 3)
    term = proximal_term([w], [w0], mu=0.7)
    assert torch.allclose(term, 0.35 * ((w - w0) ** 2).sum())
    term.backward()
    assert torch.allclose(w.grad, 0.7 * (w - w0).detach())


def test_a_large_mu_keeps_clients_closer_to_the_round_start(store, tmp_path, monkeypatch):
    def drift(mu: float) -> float:
        fx, _ = prepare(_config(store, prox_mu=mu, local_ep=2), tmp_path / f"mu{mu}", resume=False, write=False)
        start = {k: v.clone() for k, v in trainable_state(fx.model).items()}
        fed.run_round(fx, 1)
        moved = sum(float((v - start[k]).pow(2).sum()) for k, v in trainable_state(fx.model).items())
        fx.close()
        return math.sqrt(moved)

    assert drift(100.0) < 0.5 * drift(0.0)


# --- server optimizers ---------------------------------------------------------------------

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
    cfg = ServerConfig(server_opt=opt, server_lr=0.1, **({"server_momentum": 0.9} if opt == "momentum" else {}))
    server, x, steps = ServerOptimizer(cfg), x0, []
    for mean in means:
        steps.append((x, mean))
        x = server.step({"w": x}, {"w": mean})["w"]
    torch.testing.assert_close(x, _reference(opt, steps), rtol=1e-6, atol=1e-7)


def test_server_sgd_with_lr_one_is_fedavg(store, tmp_path):
    a = _one_round(store, tmp_path, "none")
    b = _one_round(store, tmp_path, "sgd", server_opt="sgd", server_lr=1.0)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)  # x + (mean - x) = mean up to float rounding


def test_fedex_with_a_server_optimizer_steps_the_factors_and_folds_the_plain_residual(store, tmp_path, monkeypatch):
    fx, _ = prepare(_config(store, alg="fedlora", lora_agg="fedex", server_opt="adam", server_lr=0.05),
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
    want_state = ServerOptimizer(fx.cfg.server).step(start, mean)
    residual = fedex_base_deltas(mean, products, pairs)
    for k, v in trainable_state(fx.model).items():
        torch.testing.assert_close(v, want_state[k], rtol=1e-5, atol=1e-6)
    for p in pairs:
        torch.testing.assert_close(params[p.base].detach(), base0[p.base] + residual[p.base], rtol=1e-5, atol=1e-6)
    fx.close()


def _train(invoke, store, out, *extra):
    result = invoke("train", "--store", store, "--out", out, *TINY, *extra)
    assert result.exit_code == 0, (result.output, result.exception)


@pytest.mark.parametrize("extra", [("--server-opt", "adam", "--server-lr", "0.05"),
                                   ("--dp-clip", "0.5", "--dp-noise", "0.8", "--prox-mu", "0.1")],
                         ids=["adam", "dp-prox"])
def test_resume_is_bitwise_exact_with_server_state_and_noise(invoke, store, tmp_path, extra):
    _train(invoke, store, tmp_path / "full", "--rounds", "3", *extra)
    _train(invoke, store, tmp_path / "half", "--rounds", "1", *extra)
    assert invoke("train", "--resume", tmp_path / "half", "--rounds", "3", "--quiet").exit_code == 0
    a = load_file(str(tmp_path / "full" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "half" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys()
    assert any(k.startswith("server::") for k in a) == (extra[0] == "--server-opt")
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- DP-FedAvg -------------------------------------------------------------------------------

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
    fx, _ = prepare(_config(store, dp_clip=0.05), tmp_path / "r", resume=False, write=False)
    start = {k: v.clone() for k, v in trainable_state(fx.model).items()}
    fed.run_round(fx, 1)
    fx.close()
    assert [w for _, w in seen] == [1, 1]
    for state, _ in seen:
        norm = math.sqrt(sum(float((state[k] - start[k]).pow(2).sum()) for k in start))
        assert norm <= 0.05 * (1 + 1e-5)


def test_dp_run_reports_epsilon_in_metrics_and_summary(invoke, store, tmp_path):
    _train(invoke, store, tmp_path / "r", "--rounds", "2", "--dp-clip", "1", "--dp-noise", "1")
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    eps = [r["dp_epsilon"] for r in rows]
    assert eps == [pytest.approx(epsilon(1.0, 0.5, r, 1e-5)) for r in (1, 2)] and eps[0] < eps[1]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["dp_epsilon"] == eps[-1]


def test_dp_noise_without_opacus_is_one_line_before_the_run_starts(invoke, assert_user_error, store, tmp_path,
                                                                   monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "opacus.accountants", None)  # as if opacus were not installed
    result = invoke("train", "--store", store, "--out", tmp_path / "r", *TINY, "--dp-clip", "1", "--dp-noise", "1")
    assert_user_error(result, "opacus is not installed", "pip install opacus")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,words", [
    (("--prox-mu", "-0.1"), ("--prox-mu",)),
    (("--dp-clip", "-1"), ("--dp-clip",)),
    (("--dp-clip", "1", "--dp-noise", "-1"), ("--dp-noise",)),
    (("--dp-noise", "1"), ("--dp-clip",)),
    (("--server-momentum", "0.5"), ("--server-momentum", "--server-opt momentum")),
    (("--server-opt", "sgd", "--server-betas", "0.8", "0.9"), ("--server-betas", "adam")),
    (("--server-lr", "0.5"), ("--server-lr", "--server-opt")),
    (("--server-opt", "adam", "--server-betas", "1", "0.9"), ("--server-betas", "[0, 1)")),
    (("--alg", "fedlora", "--lora-agg", "fedex", "--dp-clip", "1"), ("fedex",)),
])
def test_bad_baseline_options_are_one_line(invoke, assert_user_error, store, tmp_path, args, words):
    assert_user_error(invoke("train", "--store", store, "--out", tmp_path / "r", *TINY, *args), *words)
    assert not (tmp_path / "r").exists()


# --- SCAFFOLD --------------------------------------------------------------------------------

class _Batches:
    """A loader stand-in: the same fixed batches every epoch."""

    def __init__(self, batches):
        self.batches = batches

    def epoch(self, indices, seed, shuffle=True):
        return iter(self.batches)


def test_local_steps_add_the_scaffold_correction_to_every_gradient():
    from dali_fl.config import LocalConfig
    from dali_fl.engine.local import local_train

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(3)]
    model = torch.nn.Linear(6, 3)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    corr = [torch.randn(3, 6, generator=gen), torch.randn(3, generator=gen)]
    cfg = LocalConfig(local_ep=1, local_bs=4, lr=0.1, optimizer="sgd", momentum=0.0, scaffold=True)
    res = local_train(model, _Batches(batches), torch.arange(12).numpy(), cfg, seed=0, amp=None,
                      device=torch.device("cpu"), correction=corr)
    for x, y in batches:  # the reference: y <- y - lr (grad + c - c_i)
        wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
        torch.nn.functional.cross_entropy(x @ wr.T + br, y).backward()
        w, b = w - 0.1 * (wr.grad + corr[0]), b - 0.1 * (br.grad + corr[1])
    assert res.steps == 3
    torch.testing.assert_close(model.weight.detach(), w)
    torch.testing.assert_close(model.bias.detach(), b)


def test_scaffold_variates_follow_option_two(tmp_path):
    from dali_fl.algorithms.scaffold import Scaffold

    x = {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([[0.5]])}
    s = Scaffold(tmp_path, num_users=4, like=x, lr=0.1)
    s.c = torch.tensor([0.1, -0.2, 0.3])
    ys = {1: {"w": torch.tensor([0.8, 2.1]), "v": torch.tensor([[0.4]])},
          3: {"w": torch.tensor([1.2, 1.7]), "v": torch.tensor([[0.6]])}}
    for client, y in ys.items():
        w, v = s.correction(client)  # c - c_i, with c_i still 0, in the tensors' shapes
        torch.testing.assert_close(w, torch.tensor([0.1, -0.2]))
        torch.testing.assert_close(v, torch.tensor([[0.3]]))
        s.client_done(client, x, y, steps=5)
    s.finish_round()
    flat = lambda d: torch.cat([d["w"], d["v"].reshape(-1)])  # noqa: E731
    c = torch.tensor([0.1, -0.2, 0.3])
    new = {i: -c + (flat(x) - flat(y)) / (5 * 0.1) for i, y in ys.items()}  # c_i was 0
    torch.testing.assert_close(s.c, c + (new[1] + new[3]) / 4)
    s.commit()
    torch.testing.assert_close(s.table.row(3), new[3])
    assert not s.table.row(0).any() and not s.table.row(2).any()


SCAFFOLD = ("--scaffold", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0")


def test_scaffold_resume_after_a_kill_mid_round_is_bitwise_exact(invoke, store, tmp_path, monkeypatch):
    _train(invoke, store, tmp_path / "full", "--rounds", "3", *SCAFFOLD)
    kill_at_client(monkeypatch, 4)  # round 2, second client: its first client's new row must not reach the file
    assert invoke("train", "--store", store, "--out", tmp_path / "half", *TINY, "--rounds", "3",
                  *SCAFFOLD).exit_code == 2
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
    _train(invoke, store, tmp_path / "r", "--rounds", "2", *SCAFFOLD)
    path = tmp_path / "r" / "scaffold_clients.f32"
    path.write_bytes(path.read_bytes()[:-4])
    assert_user_error(invoke("train", "--resume", tmp_path / "r", "--rounds", "3"), "not this run's file")
    path.unlink()
    assert_user_error(invoke("train", "--resume", tmp_path / "r", "--rounds", "3"), "missing", "new run")


def test_scaffold_that_would_not_fit_on_disk_is_one_line(invoke, assert_user_error, store, tmp_path, monkeypatch):
    import dali_fl.engine.client_table as client_table

    monkeypatch.setattr(client_table.shutil, "disk_usage", lambda path: shutil_usage(total=10, used=9, free=1))
    assert_user_error(invoke("train", "--store", store, "--out", tmp_path / "r", *TINY, *SCAFFOLD),
                      "client variates take one row per client", "GiB", "--alg fedlora")


def shutil_usage(**fields):
    import shutil

    return shutil._ntuple_diskusage(**fields)


def test_scaffold_needs_sgd_and_one_process(invoke, assert_user_error, store, tmp_path):
    from dali_fl.engine.federation import RoundHooks
    from dali_fl.engine.run import train

    assert_user_error(invoke("train", "--store", store, "--out", tmp_path / "r", *TINY, "--scaffold"),
                      "--optimizer sgd")

    class TwoProcesses(RoundHooks):
        pass

    with pytest.raises(DaliFlError, match="without --nproc"):
        train(_config(store, scaffold=True, optimizer="sgd"), tmp_path / "r", hooks=TwoProcesses())


def test_scaffold_removes_the_drift_bias_of_fedavg_on_heterogeneous_quadratics(tmp_path):
    """The paper's motivating case: clients f_i = h_i/2 (w - a_i)^2, K local steps, full participation."""
    from dali_fl.algorithms.scaffold import Scaffold

    h, a, lr, steps = torch.tensor([1.0, 10.0]), torch.tensor([0.0, 1.0]), 0.05, 10

    def federate(variates: Scaffold | None) -> float:
        x = torch.zeros(1)
        for _ in range(300):
            ys = []
            for i in range(2):
                y, corr = x.clone(), variates.correction(i)[0] if variates else 0.0
                for _ in range(steps):
                    y = y - lr * (h[i] * (y - a[i]) + corr)
                if variates:
                    variates.client_done(i, {"w": x}, {"w": y}, steps)
                ys.append(y)
            if variates:
                variates.finish_round()
                variates.commit()
            x = sum(ys) / 2
        return float(x)

    optimum = float((h * a).sum() / h.sum())
    assert abs(federate(None) - optimum) > 0.1  # FedAvg settles away from the optimum
    assert federate(Scaffold(tmp_path, 2, {"w": torch.zeros(1)}, lr)) == pytest.approx(optimum, abs=1e-5)
