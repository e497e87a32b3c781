"""ε of DP-FedAvg from Google's `dp-accounting`, and the noise multiplier that spends a target ε.

Two samplings, each with the accountant that matches it:

- Poisson (`--dp-sampling poisson`): each client joins a round independently with probability q, under
  add/remove-one adjacency (sensitivity C). The PLD accountant gives ε (the tightest), RDP beside it.
- Fixed size (`--dp-sampling fixed`): m = qN clients drawn without replacement, under replace-one adjacency,
  where one client's clipped update replaced by another's moves the sum by up to 2C: a Gaussian of
  multiplier z/2 on that sensitivity. dp-accounting has this event for RDP only, so ε is the RDP figure.

For N=100, m=10, z=1 and 150 rounds at δ=1e-5 this gives 8.60 (PLD) and 9.56 (RDP) for Poisson against
120.8 for fixed size: the reason Poisson is the default.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Iterator

from dali_fl.errors import DaliFlError

POISSON, FIXED = "poisson", "fixed"
SAMPLINGS = (POISSON, FIXED)
# The PLD's value grid: 1e-3 gives ε to 4 decimals of the library's 1e-4 default in a tenth of the time (it is a
# pessimistic discretization either way), and ε is computed every round.
PLD_DISCRETIZATION = 1e-3
MAX_NOISE = 1e3  # calibration searches noise multipliers below this
# PLD's grid grows as 1/z²: at z=0.01 one ε took 63 s and 1.3 GB, at z=0.001 it asked for 3.8 GB. Below this z,
# where ε exceeds 100 under any sampling rate, RDP's bound (looser, milliseconds) stands in for it.
PLD_MIN_NOISE = 0.1


@dataclass(frozen=True)
class Mechanism:
    """One round of DP-FedAvg as the accountant sees it: sampling, its rate, the noise multiplier, N."""

    sampling: str
    q: float  # Poisson: each client's probability; fixed: m / N
    noise: float  # z, on the sensitivity C of one client's clipped update
    num_users: int

    @property
    def sample_size(self) -> int:
        return max(1, int(round(self.q * self.num_users)))


def _library():
    """The `dp_accounting` module, or a one-line DaliFlError when it is missing."""
    try:
        import dp_accounting
    except ImportError:  # a declared dependency, but a hand-made environment may lack it
        raise DaliFlError("DP-FedAvg reports ε through Google's dp-accounting, which is not installed; "
                          "pip install dp-accounting (or drop --dp-noise/--dp-epsilon)") from None
    return dp_accounting


def check_installed() -> None:
    """Raise the one-line DaliFlError now when dp-accounting is missing (before a run starts)."""
    _library()


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """RDP orders whose series does not converge are left out by the library, which says so through absl's logger
    for each one: correct, and of no use to a user."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def event(m: Mechanism, rounds: int):
    """The dp-accounting event of `rounds` rounds of the mechanism."""
    dpa = _library()
    if m.sampling == POISSON:
        one = dpa.PoissonSampledDpEvent(m.q, dpa.GaussianDpEvent(m.noise))
    else:  # replace-one moves the clipped sum by up to 2C: multiplier z/2 on that sensitivity
        one = dpa.SampledWithoutReplacementDpEvent(m.num_users, m.sample_size, dpa.GaussianDpEvent(m.noise / 2))
    return dpa.SelfComposedDpEvent(one, rounds)


def epsilon_rdp(m: Mechanism, rounds: int, delta: float) -> float:
    """ε at δ after `rounds` rounds from dp-accounting's RDP accountant; inf without noise."""
    if m.noise <= 0:
        return math.inf
    if rounds <= 0:
        return 0.0
    dpa = _library()
    relation = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE if m.sampling == POISSON else \
        dpa.NeighboringRelation.REPLACE_ONE
    accountant = dpa.rdp.RdpAccountant(neighboring_relation=relation)
    with _quiet_absl():
        accountant.compose(event(m, rounds))
        return float(accountant.get_epsilon(delta))


def epsilon_pld(m: Mechanism, rounds: int, delta: float) -> float:
    """ε at δ from dp-accounting's PLD accountant (Poisson sampling); inf without noise."""
    if m.noise <= 0:
        return math.inf
    if rounds <= 0:
        return 0.0
    accountant = _library().pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    accountant.compose(event(m, rounds))
    return float(accountant.get_epsilon(delta))


def epsilon(m: Mechanism, rounds: int, delta: float) -> float:
    """The tightest ε dp-accounting has for the sampling at a cost that stays small: PLD for Poisson (RDP below
    PLD_MIN_NOISE), RDP for fixed size."""
    if m.sampling == POISSON and m.noise >= PLD_MIN_NOISE:
        return epsilon_pld(m, rounds, delta)
    return epsilon_rdp(m, rounds, delta)


def calibrate(m: Mechanism, rounds: int, delta: float, target: float) -> float:
    """The noise multiplier z (m.noise is ignored) whose `rounds` rounds spend between 0.99·target and target."""
    seen: dict[float, float] = {}

    def eps(z: float) -> float:
        if z not in seen:
            seen[z] = epsilon(Mechanism(m.sampling, m.q, z, m.num_users), rounds, delta)
        return seen[z]

    least = eps(MAX_NOISE)
    if least > target:
        raise DaliFlError(f"--dp-epsilon {target:g} cannot be spent over {rounds} rounds at any noise multiplier "
                          f"below {MAX_NOISE:g}: the least reachable is ε={least:.4g} at δ={delta:g}; give "
                          f"--dp-epsilon {least * 1.01:.3g} or more, fewer --rounds or a smaller --frac")
    lo, hi = 1.0, 1.0  # bracket: eps(lo) > target >= eps(hi)
    while eps(hi) > target:
        lo, hi = hi, min(2 * hi, MAX_NOISE)
    while lo == hi or eps(lo) <= target:
        if lo < 1e-2:  # even a tiny noise stays under the target: take it
            return hi
        lo, hi = lo / 2, lo
    # eps is continuous and decreasing in z: bisect in log space until the bound is within 1% of the target.
    for _ in range(60):
        if eps(hi) >= 0.99 * target or hi / lo < 1 + 1e-6:
            break
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
    return hi
