"""HetLoRA (Cho et al., 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models").

Clients of different ranks send factors that are zero-padded to the largest rank, and the server averages
the padded factors. The result is inexact: the product of the means misses the mean of the products
(`tests/algorithms/test_zero_pad.py` measures by how much).
"""
from __future__ import annotations

from dali_fl.algorithms.base import Aggregation


class ZeroPad(Aggregation):
    """Average the zero-padded factors (`--lora-agg zero-pad`, or `hetlora`)."""

    name = "zero-pad"
    summary = "pad to the largest rank and average"  # its line in `--lora-agg`'s help
    flag = "--lora-agg zero-pad"
    aliases = ("hetlora",)
    mixed_ranks = True
