"""FedAvg (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data").

Every trainable weight is exchanged, and the new global state is the clients' mean weighted by their
sample counts: sum_i n_i y_i / sum_i n_i (Flower's `aggregate`). The engine's running sum computes it;
this aggregation adds nothing to it.
"""
from __future__ import annotations

from dali_fl.algorithms.base import Aggregation


class FedAvg(Aggregation):
    """The sample-weighted mean of all trainable weights (`--alg fedavg`)."""

    name = "fedavg"
    flag = "--alg fedavg"
    alg = "fedavg"
