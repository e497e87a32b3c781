"""FFA-LoRA (Sun et al., 2024, "Improving LoRA in Privacy-preserving Federated Learning").

A stays frozen at its shared initialisation, so only B (and the head) trains and is exchanged. With one
A for every client, the mean of B_i A is exactly (mean B) A: the aggregation is exact.
"""
from __future__ import annotations

from dali_fl.algorithms.base import Aggregation


class FFA(Aggregation):
    """Freeze A, average B (`--lora-agg ffa`)."""

    name = "ffa"
    summary = "freeze A, average B (exact)"  # its line in `--lora-agg`'s help
    flag = "--lora-agg ffa"
    freezes_lora_a = True
