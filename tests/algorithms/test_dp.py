"""DP-FedAvg: clipping, the noise's scale and stream, Poisson sampling, ε against dp-accounting itself, ε as the
input, adaptive clipping against the paper's Algorithm 1, exact resume with noise, and the inputs DP refuses."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dali_fl.engine.federation as fed
from dali_fl.algorithms import dp_accountant as acc
from dali_fl.algorithms.base import Contribution, ServerRound
from dali_fl.algorithms.dp import DP, UNCLIPPED, add_noise_, clip_update, poisson_sample, privacy_spent
from dali_fl.config import TrainConfig
from dali_fl.engine.run import prepare
from dali_fl.model.build import trainable_state
from dali_fl.seeds import DP_COUNT, NOISE, derive_seed, stream
from tests.algorithms.common import ARGS, RANK_ARGS, assert_refused, config, stand_in, train_cli
from tests.tiny import tiny_config

dpa = pytest.importorskip("dp_accounting")
TIMED = {"round_time_s", "data_wait_s", "compute_s", "aggregate_s", "images_per_s", "peak_gpu_mem_mb", "eval_s"}


def rows_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_clipping_bounds_the_update_norm_over_all_tensors():
    start = {"a": torch.zeros(3), "b": torch.ones(2)}
    state = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([1.0, 5.0])}  # Δ = (3,0,0),(0,4): norm 5
    clipped, norm = clip_update(state, start, clip=1.0)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0, 0.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([1.0, 1.8]))
    same, _ = clip_update(state, start, clip=10.0)
    torch.testing.assert_close(same["b"], state["b"])


def test_noise_has_the_given_scale_and_is_reproducible():
    mean = {"w": torch.zeros(200_000)}
    add_noise_(mean, 0.3, seed=3, round_=4)
    assert float(mean["w"].std()) == pytest.approx(0.3, rel=0.01)
    again, other = {"w": torch.zeros(200_000)}, {"w": torch.zeros(200_000)}
    add_noise_(again, 0.3, seed=3, round_=4)
    add_noise_(other, 0.3, seed=3, round_=5)
    assert torch.equal(mean["w"], again["w"]) and not torch.equal(mean["w"], other["w"])


def test_poisson_draw_has_mean_qn_and_variance_nq_1_minus_q():
    n, q, rounds = 100, 0.1, 4000
    counts = np.array([len(poisson_sample(n, q, seed=0, round_=r)) for r in range(1, rounds + 1)])
    assert abs(counts.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / rounds)
    assert counts.var(ddof=1) == pytest.approx(n * q * (1 - q), rel=0.1)
    assert np.array_equal(poisson_sample(n, q, 0, 7), poisson_sample(n, q, 0, 7))  # (seed, round) alone


def test_dp_runs_sample_through_the_algorithm_hook_and_others_keep_the_fixed_draw(store):
    dp, plain = config(store, dp_clip=1.0), config(store)
    draws = [fed.sample_clients(dp, r) for r in range(1, 65)]
    assert all(np.array_equal(d, poisson_sample(4, 0.5, 0, r)) for r, d in enumerate(draws, 1))
    assert {len(d) for d in draws} > {2}  # sizes vary, as Poisson sampling does
    assert {len(fed.sample_clients(plain, r)) for r in range(1, 65)} == {2}
    fixed = config(store, dp_clip=1.0, dp_sampling="fixed")
    assert all(np.array_equal(fed.sample_clients(fixed, r), fed.sample_clients(plain, r)) for r in range(1, 9))


@pytest.mark.parametrize("q,z,rounds,delta", [(0.1, 1.0, 150, 1e-5), (0.5, 3.0, 20, 1e-5), (0.02, 0.8, 500, 1e-6)])
def test_epsilon_equals_dp_accountings_own_computation_for_poisson(q, z, rounds, delta):
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds)
    pld = dpa.pld.PLDAccountant(value_discretization_interval=acc.PLD_DISCRETIZATION)
    rdp = dpa.rdp.RdpAccountant()
    m = acc.Mechanism(acc.POISSON, q, z, 100)
    assert acc.epsilon_pld(m, rounds, delta) == pld.compose(event).get_epsilon(delta)
    assert acc.epsilon_rdp(m, rounds, delta) == rdp.compose(event).get_epsilon(delta)
    assert acc.epsilon(m, rounds, delta) == acc.epsilon_pld(m, rounds, delta)
    default_grid = dpa.pld.PLDAccountant().compose(event).get_epsilon(delta)  # the library's finer default
    assert acc.epsilon_pld(m, rounds, delta) == pytest.approx(default_grid, rel=1e-3)


@pytest.mark.parametrize("n,m,z,rounds", [(100, 10, 1.0, 150), (20, 10, 4.0, 20)])
def test_epsilon_equals_dp_accountings_own_computation_without_replacement(n, m, z, rounds):
    # replace-one adjacency: one clipped update replaced moves the sum by 2C, a multiplier of z/2
    event = dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(n, m, dpa.GaussianDpEvent(z / 2)), rounds)
    rdp = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    mech = acc.Mechanism(acc.FIXED, m / n, z, n)
    assert acc.epsilon(mech, rounds, 1e-5) == acc.epsilon_rdp(mech, rounds, 1e-5) == \
        rdp.compose(event).get_epsilon(1e-5)


def test_a_tiny_noise_gets_rdps_epsilon_not_a_pld_grid_of_gigabytes():
    # PLD at z=0.001 asked numpy for 3.8 GB and ended in a traceback; at z=0.01 it took a minute.
    tiny = acc.Mechanism(acc.POISSON, 0.5, 0.001, 100)
    assert acc.epsilon(tiny, 3, 1e-5) == acc.epsilon_rdp(tiny, 3, 1e-5) > 1e6
    at_floor = acc.Mechanism(acc.POISSON, 0.5, acc.PLD_MIN_NOISE, 100)
    assert acc.epsilon(at_floor, 3, 1e-5) == acc.epsilon_pld(at_floor, 3, 1e-5) < acc.epsilon_rdp(at_floor, 3, 1e-5)
    assert acc.calibrate(tiny, 3, 1e-5, 1e9) == 1 / 64  # a huge target: halving from 1 stops below 1e-2, quickly


def test_the_issues_table_poisson_against_sampling_without_replacement():
    poisson, fixed = acc.Mechanism(acc.POISSON, 0.1, 1.0, 100), acc.Mechanism(acc.FIXED, 0.1, 1.0, 100)
    assert acc.epsilon_rdp(poisson, 150, 1e-5) == pytest.approx(9.559, abs=1e-3)
    assert acc.epsilon_pld(poisson, 150, 1e-5) < acc.epsilon_rdp(poisson, 150, 1e-5)  # PLD is the tighter
    assert acc.epsilon(fixed, 150, 1e-5) == pytest.approx(120.8, abs=0.1)  # sensitivity 2C
    at_c = acc.Mechanism(acc.FIXED, 0.1, 2.0, 100)  # z/2 = 1: what sensitivity C would claim
    assert acc.epsilon(at_c, 150, 1e-5) == pytest.approx(18.07, abs=0.01)
    assert acc.epsilon(acc.Mechanism(acc.POISSON, 0.1, 0.0, 100), 150, 1e-5) == math.inf


@pytest.mark.parametrize("sampling,q,rounds,target", [(acc.POISSON, 0.1, 150, 4.0), (acc.POISSON, 0.5, 20, 1.0),
                                                      (acc.POISSON, 0.5, 20, 16.0), (acc.FIXED, 0.1, 50, 8.0)])
def test_calibrated_noise_spends_between_95_percent_of_the_target_and_the_target(sampling, q, rounds, target):
    m = acc.Mechanism(sampling, q, 0.0, 100)
    z = acc.calibrate(m, rounds, 1e-5, target)
    spent = acc.epsilon(acc.Mechanism(sampling, q, z, 100), rounds, 1e-5)
    assert 0.95 * target <= spent <= target


def test_an_unreachable_epsilon_says_what_is_reachable(invoke, assert_user_error, store, tmp_path):
    line = assert_user_error(invoke("train", "--store", store, "--out", tmp_path / "r", *ARGS, "--rounds", "5",
                                    "--dp-clip", "1", "--dp-epsilon", "1e-5"), "--dp-epsilon", "reachable")
    reachable = float(line.split("least reachable is ε=")[1].split()[0])
    assert reachable > 1e-5 and not (tmp_path / "r").exists()


def reference_algorithm_1(rounds: list[np.ndarray], c0: float, z: float, sigma_b: float, quantile: float, lr: float,
                          denom: float, seed: int) -> tuple[list[np.ndarray], list[float]]:
    """Andrew et al. (2021), Algorithm 1, server side, with this run's noise streams: (updates, clip after each)."""
    clip, updates, clips = c0, [], []
    z_delta = (z ** -2 - (2 * sigma_b) ** -2) ** -0.5
    for t, deltas in enumerate(rounds, 1):
        norms = np.linalg.norm(deltas, axis=1)
        clipped = deltas * np.minimum(1.0, clip / norms)[:, None]
        gen = torch.Generator().manual_seed(derive_seed(seed, t, NOISE))
        noise = torch.randn(deltas.shape[1], generator=gen, dtype=torch.float32).double().numpy()
        updates.append((clipped.sum(0) + z_delta * clip * noise) / denom)
        # The count is centred (±1/2 a client), so that one client moves it by 1/2: the sensitivity z_delta assumes.
        b = ((norms <= clip).sum() - len(norms) / 2 + stream(seed, t, DP_COUNT).normal(0.0, sigma_b)) / denom + 0.5
        clip = clip * math.exp(-lr * (b - quantile))
        clips.append(clip)
    return updates, clips


def test_adaptive_clipping_follows_the_papers_algorithm_1_on_random_updates():
    cfg = tiny_config("unused", num_users=100, frac=0.2, dp_clip=0.1, dp_noise=1.0, dp_adaptive_clip=True)
    dp = DP(stand_in(cfg))
    rng = np.random.default_rng(5)
    # Poisson rounds: about qN = 20 clients, rarely exactly 20, so that the count's centring shows.
    sizes = rng.binomial(100, 0.2, size=60)
    dim, rounds = 6, [rng.normal(size=(n, 6)) * rng.lognormal(0.0, 0.5, size=(n, 1)) for n in sizes]
    want_updates, want_clips = reference_algorithm_1(rounds, 0.1, 1.0, 20 / 20, 0.5, 0.2, 20.0, seed=0)
    start = {"w": torch.zeros(dim)}
    for t, deltas in enumerate(rounds, 1):
        scalars, running = {UNCLIPPED: 0.0}, torch.zeros(dim)
        for d in deltas:
            c = dp.contribute(Contribution({"w": torch.tensor(d, dtype=torch.float32)}, 5, 0.0), None, start, scalars)
            running += c.state["w"] * c.weight
        mean = {"w": running / len(deltas)}
        got = dp.privatize(ServerRound(t, len(deltas), start, float(len(deltas)), scalars), mean)
        np.testing.assert_allclose(got["w"].double().numpy(), want_updates[t - 1], rtol=1e-4, atol=1e-6)
        assert dp.clip == pytest.approx(want_clips[t - 1], rel=1e-9)
    median = float(np.median(np.linalg.norm(np.concatenate(rounds), axis=1)))
    assert dp.clip == pytest.approx(median, rel=0.3)  # it found the target quantile (0.5) of the norms


def test_one_client_moves_the_adaptive_count_by_half_the_sensitivity_its_noise_is_set_for():
    dp = DP(stand_in(tiny_config("unused", num_users=100, frac=0.2, dp_clip=1.0, dp_noise=1.0, dp_adaptive_clip=True)))
    start, scalars = {"w": torch.zeros(3)}, {UNCLIPPED: 0.0}
    for w, want in ((0.5, 0.5), (2.0, 0.0), (3.0, -0.5)):  # within the clip, then two clipped
        dp.contribute(Contribution({"w": torch.full((3,), w)}, 5, 0.0), None, start, scalars)
        assert scalars[UNCLIPPED] == want


def test_dp_clients_weigh_equally_and_their_updates_are_clipped(store, tmp_path, monkeypatch):
    seen = []
    real_add = fed.RunningSum.add

    def add(self, state, weight, *rest):
        seen.append((state, weight))
        return real_add(self, state, weight, *rest)

    monkeypatch.setattr(fed.RunningSum, "add", add)
    fx, _ = prepare(config(store, dp_clip=0.05, seed=1), tmp_path / "r", resume=False, write=False)
    start = {k: v.clone() for k, v in trainable_state(fx.model).items()}
    fed.run_round(fx, 1)
    fx.close()
    assert len(seen) == len(poisson_sample(4, 0.5, 1, 1)) > 0 and all(w == 1 for _, w in seen)
    for state, _ in seen:
        norm = math.sqrt(sum(float((state[k] - start[k]).pow(2).sum()) for k in start))
        assert norm <= 0.05 * (1 + 1e-5)


@pytest.mark.parametrize("server", [{}, {"server_opt": "momentum"}])
def test_a_round_that_samples_no_client_moves_the_model_by_the_noise_alone(store, tmp_path, server):
    # A server optimizer takes its step on the noise: a round without samples is no step only without noise.
    seed = next(s for s in range(200) if len(poisson_sample(4, 0.5, s, 1)) == 0)
    fx, _ = prepare(config(store, dp_clip=0.5, dp_noise=0.8, seed=seed, **server), tmp_path / "r", resume=False,
                    write=False)
    start = {k: v.clone() for k, v in trainable_state(fx.model).items()}
    row = fed.run_round(fx, 1)
    want = {k: v.float().clone() for k, v in start.items()}
    add_noise_(want, 0.8 * 0.5 / (0.5 * 4), seed, 1)  # std zC / qN on the (empty) sum's estimate
    got = trainable_state(fx.model)
    fx.close()
    assert row["num_clients"] == 0 and row["num_samples"] == 0
    assert row["train_loss"] is None and row["client_drift"] is None and row["update_spread"] is None
    assert row["dp_epsilon"] is not None  # the round still spends privacy: its noise was released
    for k in want:  # momentum's first step is x + 1·(mean − x): equal up to float rounding
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0 if not server else 1e-6)


def test_dp_run_reports_pld_and_rdp_epsilon_in_metrics_and_summary(invoke, store, tmp_path):
    train_cli(invoke, store, tmp_path / "r", "--rounds", "2", "--dp-clip", "1", "--dp-noise", "1")
    rows = rows_of(tmp_path / "r")
    cfg = config(store, dp_clip=1.0, dp_noise=1.0)
    for r in rows:
        eps, eps_rdp = privacy_spent(cfg, r["round"])
        m = acc.Mechanism(acc.POISSON, 0.5, 1.0, 4)
        assert (r["dp_epsilon"], r["dp_epsilon_rdp"]) == (eps, eps_rdp) == \
            (acc.epsilon_pld(m, r["round"], 1e-5), acc.epsilon_rdp(m, r["round"], 1e-5))
    assert rows[0]["dp_epsilon"] < rows[1]["dp_epsilon"] < rows[1]["dp_epsilon_rdp"]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert (summary["dp_epsilon"], summary["dp_epsilon_rdp"]) == (rows[-1]["dp_epsilon"], rows[-1]["dp_epsilon_rdp"])


def test_fixed_sampling_is_accounted_without_replacement(invoke, store, tmp_path):
    train_cli(invoke, store, tmp_path / "r", "--rounds", "1", "--dp-clip", "1", "--dp-noise", "2",
              "--dp-sampling", "fixed")
    row = rows_of(tmp_path / "r")[0]
    assert row["num_clients"] == 2
    assert row["dp_epsilon"] == row["dp_epsilon_rdp"] == acc.epsilon_rdp(acc.Mechanism(acc.FIXED, 0.5, 2.0, 4), 1,
                                                                          1e-5)


def test_epsilon_as_the_input_calibrates_saves_and_an_extension_reports_what_it_spends(invoke, store, tmp_path,
                                                                                       caplog):
    train_cli(invoke, store, tmp_path / "r", "--rounds", "2", "--dp-clip", "1", "--dp-epsilon", "20")
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["algorithms"]["dp"]
    z = saved["dp_noise"]
    assert saved["dp_epsilon"] == 20 and z == acc.calibrate(acc.Mechanism(acc.POISSON, 0.5, 0, 4), 2, 1e-5, 20)
    assert any(f"z = {z:.4f}" in r.getMessage() for r in caplog.records)  # printed at the start
    rows = rows_of(tmp_path / "r")
    assert 0.95 * 20 <= rows[-1]["dp_epsilon"] <= 20
    caplog.clear()
    assert invoke("train", "--resume", tmp_path / "r", "--rounds", "4", "--quiet").exit_code == 0
    again = json.loads((tmp_path / "r" / "config.json").read_text())["algorithms"]["dp"]
    assert again["dp_noise"] == z  # the noise that ran, not a new calibration
    rows = rows_of(tmp_path / "r")
    assert rows[-1]["dp_epsilon"] == acc.epsilon_pld(acc.Mechanism(acc.POISSON, 0.5, z, 4), 4, 1e-5) > 20
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["dp_epsilon"] == rows[-1]["dp_epsilon"]
    assert any("more than the --dp-epsilon 20" in r.getMessage() for r in caplog.records)


DP_RESUME = ("--dp-clip", "0.5", "--dp-noise", "0.8", "--dp-adaptive-clip", "--dp-count-noise", "1",
             "--prox-mu", "0.1")


def test_resume_at_every_round_boundary_is_bitwise_exact_with_dp(invoke, store, tmp_path):
    train_cli(invoke, store, tmp_path / "full", "--rounds", "4", *DP_RESUME)
    want = load_file(str(tmp_path / "full" / "checkpoint" / "state.safetensors"))
    assert "dp::clip" in want  # adaptive clipping's state is in the checkpoint
    want_rows = [{k: v for k, v in r.items() if k not in TIMED} for r in rows_of(tmp_path / "full")]
    assert len({r["dp_clip"] for r in want_rows}) == 4  # the clip moved every round
    for stop in (1, 2, 3):
        half = tmp_path / f"stop{stop}"
        train_cli(invoke, store, half, "--rounds", str(stop), *DP_RESUME)
        assert invoke("train", "--resume", half, "--rounds", "4", "--quiet").exit_code == 0
        got = load_file(str(half / "checkpoint" / "state.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (stop, k)
        assert [{k: v for k, v in r.items() if k not in TIMED} for r in rows_of(half)] == want_rows


def test_dp_without_dp_accounting_is_one_line_before_the_run_starts(invoke, assert_user_error, store, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # as if dp-accounting were not installed
    result = invoke("train", "--store", store, "--out", tmp_path / "r", *ARGS, "--dp-clip", "1", "--dp-noise", "1")
    assert_user_error(result, "dp-accounting", "pip install dp-accounting")
    assert not (tmp_path / "r").exists()


def test_a_dp_run_from_before_poisson_sampling_resumes_with_its_fixed_draw(store):
    doc = json.loads(config(store, dp_clip=1.0, dp_noise=1.0).to_json())
    del doc["algorithms"]["dp"]["dp_sampling"]  # as config.json was written before
    assert TrainConfig.from_json(json.dumps(doc)).algorithms["dp"].dp_sampling == "fixed"


@pytest.mark.parametrize("args,words", [
    (("--dp-clip", "-1"), ("--dp-clip",)),
    (("--dp-clip", "1", "--dp-noise", "-1"), ("--dp-noise",)),
    (("--dp-noise", "1"), ("--dp-clip",)),
    (("--dp-epsilon", "1"), ("--dp-epsilon", "--dp-clip")),
    (("--dp-clip", "1", "--dp-epsilon", "0"), ("--dp-epsilon", "> 0")),
    (("--dp-clip", "1", "--dp-epsilon", "-2"), ("--dp-epsilon", "> 0")),
    (("--dp-clip", "1", "--dp-delta", "0"), ("--dp-delta", "(0, 1)")),
    (("--dp-clip", "1", "--dp-delta", "1.5"), ("--dp-delta", "(0, 1)")),
    (("--dp-clip", "1", "--dp-delta", "0.01"), ("--dp-delta 0.01", "adds no noise")),  # recorded, never read
    (("--dp-clip", "1", "--dp-adaptive-clip", "--dp-target-quantile", "0"), ("--dp-target-quantile", "(0, 1)")),
    (("--dp-clip", "1", "--dp-adaptive-clip", "--dp-target-quantile", "1"), ("--dp-target-quantile", "(0, 1)")),
    (("--dp-clip", "1", "--dp-epsilon", "4", "--dp-noise", "1"), ("--dp-epsilon", "--dp-noise")),
    (("--dp-clip", "1", "--dp-noise", "1", "--dp-adaptive-clip"), ("--dp-count-noise",)),
    (("--alg", "fedlora", "--lora-agg", "fedex", "--dp-clip", "1"), ("fedex",)),
])
def test_bad_dp_options_are_one_line(invoke, assert_user_error, store, tmp_path, args, words):
    assert_refused(invoke, assert_user_error, store, tmp_path / "r", ARGS, args, words)


@pytest.mark.parametrize("args,words", [
    (("--lora-agg", "stack", "--dp-clip", "1"), ("stack", "not clipped")),
    (("--lora-ranks", "2,4", "--lora-agg", "zero-pad", "--dp-clip", "1"), ("--dp-clip", "--lora-ranks")),
    # Each client starts from its own B: the clip spent its bound on ‖B_i − B‖ and moved B in rounds nobody trained.
    (("--lora-ranks", "", "--lora-agg", "shared-a", "--dp-clip", "1"), ("--dp-clip", "shared-a", "own B")),
])
def test_dp_with_lora_it_cannot_bound_is_one_line(invoke, assert_user_error, rank_store, tmp_path, args, words):
    assert_refused(invoke, assert_user_error, rank_store, tmp_path / "r", RANK_ARGS, args, words)


def test_clipping_without_noise_warns_that_the_run_is_not_private(store, caplog):
    tiny_config(store, dp_clip=0.5)
    assert any("no differential-privacy guarantee" in r.getMessage() for r in caplog.records)
    caplog.clear()
    tiny_config(store, dp_clip=0.5, dp_noise=1.0)
    assert not any("no differential-privacy guarantee" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("client", [11, 12])
def test_the_noise_is_not_a_clients_training_stream(client):
    # Local training seeds torch with derive_seed(seed, round, client); with tag 11 the round's noise was client 11's
    # dropout stream on CPU, draw for draw.
    noise = {"w": torch.zeros(64)}
    add_noise_(noise, 1.0, seed=0, round_=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(0, 3, client))
        training = torch.randn(64)
    assert not torch.equal(noise["w"], training)
    assert abs(float(torch.corrcoef(torch.stack([noise["w"], training]))[0, 1])) < 0.5


def test_a_round_of_only_clients_without_samples_steps_on_the_noise_and_reports_no_loss(store, tmp_path):
    """DP weighs such a client 1, so the round has weight but no samples: train_loss divided by zero."""
    cfg = config(store, num_users=12, frac=1 / 12, partition="dirichlet", alpha=0.02, min_size=0, dp_clip=0.3,
                 dp_noise=0.5, dp_sampling="fixed", rounds=100)
    fx, _ = prepare(cfg, tmp_path / "run", resume=False, write=False)
    try:
        empty = set(np.flatnonzero(fx.partition.sizes() == 0).tolist())
        round_ = next(r for r in range(1, 100) if set(fed.sample_clients(cfg, r).tolist()) <= empty)
        before = {k: v.clone() for k, v in trainable_state(fx.model).items()}
        row = fed.run_round(fx, round_)
        after = trainable_state(fx.model)
    finally:
        fx.close()
    assert row["num_clients"] == 1 and row["num_samples"] == 0 and row["train_loss"] is None
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the noise moved the model
