"""Every random stream of a run, named in one place: each is derived from the run seed and a stream tag.

A stream is `np.random.default_rng([seed, ...parts, TAG])` or a 32-bit seed from `derive_seed`. The tags
keep streams apart, so adding one never shifts another, and (seed, round, client, epoch) is the whole RNG
state of a run: that is what makes a resume bitwise exact.
"""
from __future__ import annotations

import numpy as np

SAMPLE = 7  # the round's client sample: (seed, round, SAMPLE)
# Streams that seed torch's generator, as local training does with (seed, round, client), take tags above any
# client id (2**31 + k): with a small tag, (seed, round, TAG) was also client TAG's training key, and DP's noise was
# client 11's dropout stream on CPU.
TORCH_TAG = 2 ** 31
NOISE = TORCH_TAG + 11  # DP-FedAvg's Gaussian noise: derive_seed(seed, round, NOISE)
STACK = TORCH_TAG + 13  # FLoRA's re-initialised adapters: derive_seed(seed, round, STACK)
RANK = 17  # the draw of per-client LoRA ranks: (seed, RANK)
HOLDOUT = 19  # FedSA-LoRA's held-out fifth of each client: derive_seed(seed, client, HOLDOUT)
SPEED = 23  # the simulated clock's client compute speeds: (seed, SPEED)
BANDWIDTH = 29  # the simulated clock's client bandwidths: (seed, BANDWIDTH)
DISPATCH = 31  # asynchronous rounds: the j-th (j >= 1) dispatch at one model version: (seed, version + 1, SAMPLE,
# DISPATCH, j); the first is (seed, version + 1, SAMPLE), the synchronous round's sample
DP_SAMPLE = 37  # DP-FedAvg's Poisson draw of the round's clients: (seed, round, DP_SAMPLE)
DP_COUNT = 41  # adaptive clipping's noise on the clipped count: (seed, round, DP_COUNT)
TIEBREAK = 43  # over-selection's order of clients that finish at the same simulated time: (seed, round, TIEBREAK)
AUGMENT = 0xA06  # the loaders' flips and crops: (epoch seed, AUGMENT)
# Local training takes derive_seed(seed, round, client) and, per epoch, derive_seed(that, epoch): no tag, as
# these were the first streams. The small tags above can equal a client id, so their keys can be a client's
# training key too; those streams are numpy's, which share nothing with torch's generator that training seeds.


def derive_seed(*parts: int) -> int:
    """An independent 32-bit seed for each (run seed, round, client, epoch) tuple."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def stream(*parts: int) -> np.random.Generator:
    """A generator for one named stream, e.g. stream(seed, round_, SAMPLE)."""
    return np.random.default_rng([int(p) for p in parts])
