"""FedIT: A and B averaged separately, which is not the average of the clients' products."""
from __future__ import annotations

from tests.algorithms.common import RANK_ARGS, assert_refused, lora_aggregation_error


def test_fedit_is_not_the_average_of_the_clients_effective_weights():
    assert lora_aggregation_error("fedit") > 1e-3  # FedIT's mean(B) mean(A) is not the mean of B A


def test_fedit_refuses_mixed_ranks_in_one_line(invoke, assert_user_error, rank_store, tmp_path):
    assert_refused(invoke, assert_user_error, rank_store, tmp_path / "r", RANK_ARGS, ("--lora-ranks", "2,4,8"),
                   ("fedit", "zero-pad"))
