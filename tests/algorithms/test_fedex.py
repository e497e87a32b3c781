"""FedEx-LoRA: the averaged factors plus the residual folded into the base weights are exact, at one rank or mixed."""
from __future__ import annotations

import torch

from tests.algorithms.common import lora_aggregation_error, round_against_the_exact_average


def test_fedex_is_the_exact_average_of_the_clients_effective_weights():
    assert lora_aggregation_error("fedex") < 1e-5


def test_fedex_gives_the_exact_average_of_mixed_rank_effective_weights(rank_store, tmp_path, monkeypatch):
    got, exact, _, _ = round_against_the_exact_average(rank_store, tmp_path, monkeypatch, "fedex")
    for k in exact:
        torch.testing.assert_close(got[k], exact[k], rtol=1e-5, atol=1e-6)
