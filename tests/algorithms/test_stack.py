"""FLoRA (`--lora-agg stack`): the stacked product is the exact average at mixed ranks; adapters restart."""
from __future__ import annotations

import torch

from dali_fl.model.build import trainable_state
from tests.algorithms.common import RANK_ARGS, assert_refused, round_against_the_exact_average


def test_stack_gives_the_exact_average_of_mixed_rank_effective_weights(rank_store, tmp_path, monkeypatch):
    got, exact, _, fx = round_against_the_exact_average(rank_store, tmp_path, monkeypatch, "stack")
    for k in exact:
        torch.testing.assert_close(got[k], exact[k], rtol=1e-5, atol=1e-6)
    state = trainable_state(fx.model)  # every client starts the next round from a fresh adapter
    assert all(not state[p.b].any() for p in fx.pairs)


def test_stack_with_a_server_optimizer_is_one_line(invoke, assert_user_error, rank_store, tmp_path):
    assert_refused(invoke, assert_user_error, rank_store, tmp_path / "r", RANK_ARGS,
                   ("--lora-ranks", "2,4", "--lora-agg", "stack", "--server-opt", "adam"), ("stack", "--server-opt"))
