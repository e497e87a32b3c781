"""FedIT (Zhang et al., 2024, "Towards Building the Federated GPT: Federated Instruction Tuning").

LoRA's A and B (and the head) are averaged separately, weighted by sample counts. The product of the
means is not the mean of the products: FedEx-LoRA (fedex.py) corrects that, FedIT does not.
"""
from __future__ import annotations

from dali_fl.algorithms.base import Aggregation


class FedIT(Aggregation):
    """The weighted mean of A and B separately (`--lora-agg fedit`, the default for FedLoRA)."""

    name = "fedit"
    summary = "average A and B"  # its line in `--lora-agg`'s help
    flag = "--lora-agg fedit"
    rank_hint = "its padded form is zero-pad"
