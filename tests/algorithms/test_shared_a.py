"""FedSA-LoRA (`--lora-agg shared-a`): A averaged, each client's own B kept and given back, a held-out fifth
for the personal accuracy, and an exact resume of the journaled B table."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

import dali_fl.engine.federation as fed
from dali_fl.algorithms.shared_a import SharedA
from dali_fl.engine.run import prepare
from dali_fl.model.build import trainable_state
from tests.algorithms.common import RANK_ARGS, assert_refused, rank_config
from tests.tiny import kill_at_client


def test_shared_a_averages_a_and_gives_each_client_back_its_own_b(rank_store, tmp_path, monkeypatch):
    fx, _ = prepare(rank_config(rank_store, lora_agg="shared-a", lora_ranks="", frac=0.67), tmp_path / "r",
                    resume=False, write=True)
    shared = next(a for a in fx.algs if isinstance(a, SharedA))
    starts, ends, real = [], [], fed.local_train

    def recording(model, loader, indices, *args):
        state = trainable_state(model)
        starts.append({k: v.clone() for k, v in state.items()})
        res = real(model, loader, indices, *args)
        ends.append(({k: v.clone() for k, v in trainable_state(model).items()}, res.num_samples, set(indices)))
        return res

    monkeypatch.setattr(fed, "local_train", recording)
    first = fed.sample_clients(fx.cfg, 1).tolist()
    fed.run_round(fx, 1)
    for a in fx.algs:
        a.commit()  # the round's B rows into the table, as the run does after its checkpoint
    total = sum(n for _, n, _ in ends)
    for p in fx.pairs:  # the global A is the clients' weighted mean
        want = sum(s[p.a] * n for s, n, _ in ends) / total
        torch.testing.assert_close(trainable_state(fx.model)[p.a], want)
    trained_b = {c: {p.b: s[p.b] for p in fx.pairs} for c, (s, _, _) in zip(first, ends)}
    second = fed.sample_clients(fx.cfg, 2).tolist()
    fed.run_round(fx, 2)
    for c, start in zip(second, starts[len(first):]):
        for p in fx.pairs:  # a returning client starts from its own B, a new one from zero
            want = trained_b[c][p.b] if c in trained_b else torch.zeros_like(start[p.b])
            torch.testing.assert_close(start[p.b], want, rtol=0, atol=0)
    for c, (_, _, seen) in zip(first, ends):  # nobody trains on its held-out fifth
        assert not seen & set(shared.holdout[c].tolist()) and len(shared.holdout[c]) >= 1
    fx.close()


def test_shared_a_reports_personal_accuracy_and_resumes_bitwise(invoke, rank_store, tmp_path, monkeypatch):
    extra = ("--lora-agg", "shared-a", "--frac", "0.67")
    result = invoke("train", "--store", rank_store, "--out", tmp_path / "full", *RANK_ARGS, "--rounds", "3", *extra)
    assert result.exit_code == 0, result.output
    kill_at_client(monkeypatch, 4)  # round 2, second client
    assert invoke("train", "--store", rank_store, "--out", tmp_path / "half", *RANK_ARGS, "--rounds", "3",
                  *extra).exit_code == 130
    monkeypatch.undo()
    assert invoke("train", "--resume", tmp_path / "half", "--quiet").exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["personal_acc"] <= 1 for r in rows)
    a = load_file(str(tmp_path / "full" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "half" / "checkpoint" / "state.safetensors"))
    assert a.keys() == b.keys() and "shared_a::rows" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "full" / "client_b.f32").read_bytes() == (tmp_path / "half" / "client_b.f32").read_bytes()


def test_shared_a_with_mixed_ranks_is_one_line(invoke, assert_user_error, rank_store, tmp_path):
    assert_refused(invoke, assert_user_error, rank_store, tmp_path / "r", RANK_ARGS,
                   ("--lora-ranks", "2,4", "--lora-agg", "shared-a"), ("shared-a", "one rank"))


def test_personal_accuracy_is_measured_with_the_b_each_client_just_trained(rank_store, tmp_path):
    # The run evaluates before it commits the round's B rows to the table, and the evaluation read the table:
    # round 1 scored every client with B = 0 (0.333 where its trained B gives 0.167).
    fx, _ = prepare(rank_config(rank_store, lora_agg="shared-a", lora_ranks="", lora_r=4, lr=2e-2), tmp_path / "r",
                    resume=False, write=True)
    shared = next(a for a in fx.algs if isinstance(a, SharedA))
    try:
        fed.run_round(fx, 1)
        as_run = shared.evaluate()["personal_acc"]  # where run_rounds calls it: before the commit
        shared.commit()
        assert as_run == shared.evaluate()["personal_acc"]
        shared.table.rows = {}
        for c in range(3):
            shared.table.table[c] = 0  # the table as it was before round 1
        assert as_run != shared.evaluate()["personal_acc"]  # B matters here, so the check above can tell
    finally:
        fx.close()


def test_a_client_uploads_a_and_the_head_but_not_its_b(rank_store, tmp_path):
    # FedSA-LoRA's clients keep B: counting it overstated upload_mb (and the simulated upload time) by its size.
    fx, _ = prepare(rank_config(rank_store, lora_agg="shared-a", lora_ranks=""), tmp_path / "r", resume=False,
                    write=False)
    try:
        state = trainable_state(fx.model)
        b_values = sum(state[p.b].numel() for p in fx.pairs)
        assert b_values > 0 and fx.upload_values(0) == sum(t.numel() for t in state.values()) - b_values
        row = fed.run_round(fx, 1)
    finally:
        fx.close()
    assert row["upload_mb"] == 3 * fx.upload_values(0) * 4 / 1e6
