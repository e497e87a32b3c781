"""Client-level differential privacy: DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private
Recurrent Language Models") with adaptive clipping (Andrew et al., 2021, "Differentially Private Learning
with Adaptive Clipping").

Each round, every client joins independently with probability q = --frac (Poisson sampling, the event the
accountant analyses; `--dp-sampling fixed` draws qN clients without replacement instead and is accounted
for as such). Each sampled client's update Δ_i = y_i − x is clipped to L2 norm C over all trainable
tensors; the clipped updates are summed with equal weights (a client's sample count would leak through
weighting); Gaussian noise of standard deviation z·C is added to the sum, which is divided by the expected
count qN (the fixed-denominator estimator: the actual count is private too). A round that sampled nobody
moves the model by the noise alone. ε at δ comes from Google's dp-accounting (`dp_accountant`).

`--dp-epsilon E` calibrates z so that the run's --rounds spend at most E; `--dp-adaptive-clip` moves C each
round towards the --dp-target-quantile of the clients' update norms, from a count of unclipped clients
noised with std σ_b, and noises the update with z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2), so that both together are
the Gaussian mechanism of multiplier z that the accountant counts (Andrew et al., Theorem 1).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

from dali_fl.algorithms import dp_accountant as acc
from dali_fl.algorithms.base import Algorithm, Contribution, ServerRound, option
from dali_fl.checks import check_choice, check_numbers, flag
from dali_fl.engine.aggregate import State, update_norm
from dali_fl.errors import DaliFlError
from dali_fl.seeds import DP_COUNT, DP_SAMPLE, NOISE, derive_seed, stream

log = logging.getLogger(__name__)
# Adaptive clipping's count: each client adds 1/2 if its update was within the clip, -1/2 if not. Centred so, one
# client moves the sum by at most 1/2: the sensitivity that update_noise's (2σ_b)⁻² assumes (Andrew et al. §3;
# tensorflow_privacy's QuantileEstimatorQuery). Counting 0/1 would spend more than the ε reported under Poisson.
UNCLIPPED = "dp_unclipped"
ADAPTIVE_ONLY = ("dp_target_quantile", "dp_clip_lr", "dp_count_noise")  # read by adaptive clipping alone


def poisson_sample(num_users: int, q: float, seed: int, round_: int) -> np.ndarray:
    """Each client independently with probability q, from a (seed, round) stream: sorted ids, possibly none."""
    return np.flatnonzero(stream(seed, round_, DP_SAMPLE).random(num_users) < q)


@torch.no_grad()
def clip_update(state: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
                clip: float) -> tuple[State, float]:
    """start + Δ·min(1, C/‖Δ‖) over all tensors together, and ‖Δ‖ before clipping."""
    norm = update_norm(state, start)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: start[k].float() + (state[k].float() - start[k].float()) * factor for k in state}, norm


@torch.no_grad()
def add_noise_(mean: State, std: float, seed: int, round_: int) -> None:
    """Add N(0, std²) to every tensor of the aggregate, in place, from a (seed, round) stream."""
    if std <= 0:
        return
    gen = torch.Generator().manual_seed(derive_seed(seed, round_, NOISE))
    for name in sorted(mean):  # a fixed order: the same draws on every run, process and resume
        t = mean[name]
        mean[name] = t + std * torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.device)


def update_noise(z: float, count_noise: float) -> float:
    """The multiplier z_Δ on the update sum that, with std σ_b on the unclipped count, spends what z alone would."""
    if z <= 0:
        return 0.0
    return (z ** -2 - (2 * count_noise) ** -2) ** -0.5


def next_clip(clip: float, unclipped_frac: float, quantile: float, lr: float) -> float:
    """The geometric update C·exp(−η_C (b̃ − γ)) of Andrew et al.: shrink when more than γ fit under C."""
    return clip * math.exp(-lr * (unclipped_frac - quantile))


@dataclass(frozen=True)
class DPParams:
    dp_clip: float = option(0.0, "DP-FedAvg: clip each client's update to this L2 norm (0: off; with "
                            "--dp-adaptive-clip, the initial clip; the paper starts at 0.1); clients weigh equally.")
    dp_noise: float = option(0.0, "DP-FedAvg: noise multiplier z (std z*clip on the clipped sum); with "
                             "--dp-epsilon, the calibrated z is saved here.")
    dp_epsilon: Optional[float] = option(None, "DP-FedAvg: target epsilon for the whole run of --rounds: calibrates "
                                         "the noise multiplier (instead of --dp-noise).", type=float)
    dp_delta: float = option(1e-5, "DP-FedAvg: delta for epsilon.")
    dp_sampling: str = option(acc.POISSON, "DP-FedAvg: poisson (each client with probability --frac; PLD "
                              "accountant) or fixed (--frac of the clients without replacement; RDP accountant for "
                              "replace-one adjacency, sensitivity 2*clip: a far larger epsilon).",
                              choices=acc.SAMPLINGS)
    dp_adaptive_clip: bool = option(False, "DP-FedAvg: adapt the clip each round towards --dp-target-quantile of "
                                    "the clients' update norms (Andrew et al., 2021).")
    dp_target_quantile: float = option(0.5, "Adaptive clipping: the share of clients whose update the clip should "
                                       "leave unclipped.")
    dp_clip_lr: float = option(0.2, "Adaptive clipping: learning rate of the geometric clip update.")
    dp_count_noise: float = option(0.0, "Adaptive clipping: std of the noise on the count of unclipped clients "
                                   "(0: the expected clients per round / 20, the paper's choice).")

    def __post_init__(self) -> None:
        check_numbers(self, non_negative=("dp_clip", "dp_noise", "dp_clip_lr", "dp_count_noise"))
        check_choice(self.dp_sampling, acc.SAMPLINGS, "--dp-sampling")
        if self.dp_epsilon is not None and not self.dp_epsilon > 0:
            raise DaliFlError(f"--dp-epsilon must be > 0 (got {self.dp_epsilon}); leave it out for no target")
        if not 0 < self.dp_delta < 1:
            raise DaliFlError(f"--dp-delta must be in (0, 1) (got {self.dp_delta})")
        if not 0 < self.dp_target_quantile < 1:
            raise DaliFlError(f"--dp-target-quantile must be in (0, 1) (got {self.dp_target_quantile})")
        if self.dp_clip == 0:
            given = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
            if given:
                raise DaliFlError(f"{flag(given[0])} needs --dp-clip C > 0 (the L2 bound of each client's update)")


class DP(Algorithm):
    """Clip every client's update, weigh clients equally, noise the sum (`--dp-clip C --dp-epsilon E`)."""

    name = "dp"
    flag = "--dp-clip"
    Params = DPParams
    saved_in = ("server",)
    saved_before = {"dp_sampling": "fixed"}  # DP runs before Poisson sampling drew a fixed-size sample
    scalars = (UNCLIPPED,)
    summary_keys = ("dp_epsilon", "dp_epsilon_rdp")
    uniform_sample = True  # ε's sampling rate m/N assumes every client is equally likely to count

    @classmethod
    def active(cls, cfg) -> bool:
        return cfg.algorithms["dp"].dp_clip > 0

    @classmethod
    def refuse(cls, cfg) -> None:
        from dali_fl.algorithms import aggregation_of

        agg, p = aggregation_of(cfg), cfg.algorithms["dp"]
        if agg.needs_products:
            raise DaliFlError(f"--dp-clip does not combine with --lora-agg {agg.name} (what it folds into the base "
                              "weights is not clipped); use --lora-agg fedit, ffa or zero-pad")
        if agg.personal_start:  # clipping from the client's own start would not bound what the server's state moves
            raise DaliFlError(f"--dp-clip bounds updates from the global state, which a --lora-agg {agg.name} client "
                              "does not start from (it keeps its own B); use --lora-agg fedit, ffa or zero-pad")
        if cfg.fed.mixed_ranks():
            raise DaliFlError("--dp-clip bounds updates from the global state, which a lower-rank client's truncated "
                              "adapter is not; drop --lora-ranks or --dp-clip")
        if not p.dp_adaptive_clip:  # refused here, not in DPParams: a saved config.json must still load
            default = DPParams.__dataclass_fields__
            ignored = [n for n in ADAPTIVE_ONLY if getattr(p, n) != default[n].default]
            if ignored:
                raise DaliFlError(f"{flag(ignored[0])} {getattr(p, ignored[0])} applies to --dp-adaptive-clip, so "
                                  "drop it or add --dp-adaptive-clip")
        if p.dp_epsilon is not None and p.dp_noise > 0:
            raise DaliFlError("--dp-epsilon calibrates the noise multiplier that --dp-noise sets; give one of them")
        if p.dp_noise == 0 and p.dp_epsilon is None and p.dp_delta != DPParams.dp_delta:
            raise DaliFlError(f"--dp-delta {p.dp_delta:g} is the δ of the ε a noised run reports, and this run adds no "
                              "noise; drop it or add --dp-noise or --dp-epsilon")
        if p.dp_noise > 0 or p.dp_epsilon is not None:
            acc.check_installed()  # ε is reported every round: refuse now rather than after the first one

    @classmethod
    def settle(cls, cfg):
        p = cfg.algorithms["dp"]
        if p.dp_epsilon is not None:
            z = acc.calibrate(mechanism(cfg, 0.0), cfg.fed.rounds, p.dp_delta, p.dp_epsilon)
            # WARNING so that the CLI shows it by default: it is the run's privacy parameter.
            log.warning("DP: --dp-epsilon %g over %d rounds at delta %g: noise multiplier z = %.4f (spends "
                        "epsilon %.4f)", p.dp_epsilon, cfg.fed.rounds, p.dp_delta, z,
                        acc.epsilon(mechanism(cfg, z), cfg.fed.rounds, p.dp_delta))
            p = dataclasses.replace(p, dp_noise=z)
            cfg = dataclasses.replace(cfg, algorithms={**cfg.algorithms, "dp": p})
        elif p.dp_noise == 0:  # a legitimate ablation, but not one to mistake for a private run
            log.warning("DP: --dp-clip without --dp-noise or --dp-epsilon clips each update but adds no noise, so "
                        "the run has no differential-privacy guarantee")
        if p.dp_adaptive_clip and p.dp_noise > 0 and not 2 * count_noise(cfg) > p.dp_noise:
            raise DaliFlError(f"adaptive clipping at noise multiplier {p.dp_noise:.4g} needs a count noise above "
                              f"{p.dp_noise / 2:.4g} (z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2); give "
                              f"--dp-count-noise {p.dp_noise * 0.6:.3g} or more (now {count_noise(cfg):.4g})")
        return cfg

    @classmethod
    def sample(cls, cfg, round_: int) -> Optional[np.ndarray]:
        if cfg.algorithms["dp"].dp_sampling != acc.POISSON:
            return None  # the engine's fixed-size draw without replacement
        return poisson_sample(cfg.fed.num_users, cfg.fed.frac, cfg.fed.seed, round_)

    def __init__(self, fx):
        super().__init__(fx)
        self.clip = self.round_clip = self.params.dp_clip  # adaptive clipping moves it after every round
        report_budget(fx.cfg)

    def contribute(self, c: Contribution, update, start: State, scalars: dict) -> Contribution:
        # Equal weights: a client's sample count must not scale its (bounded) influence.
        state, norm = clip_update(c.state, start, self.clip)
        scalars[UNCLIPPED] += float(norm <= self.clip) - 0.5
        return dataclasses.replace(c, state=state, weight=1, drift=update_norm(state, start))

    def privatize(self, r: ServerRound, mean: State) -> State:
        p, seed = self.params, self.fx.cfg.fed.seed
        z = update_noise(p.dp_noise, count_noise(self.fx.cfg)) if p.dp_adaptive_clip else p.dp_noise
        self.round_clip = self.clip
        if p.dp_sampling == acc.FIXED:  # the fixed m is the denominator: the mean is already the estimate
            denom = r.num_clients
        else:  # the sum over the expected count qN: the actual count stays private
            denom = expected_clients(self.fx.cfg)
            scale = r.total / denom  # the mean divided the sum by the count (every weight is 1)
            mean = {k: r.start[k].float() + (v - r.start[k].float()) * scale for k, v in mean.items()}
        add_noise_(mean, z * self.clip / denom, seed, r.round_)
        if p.dp_adaptive_clip:
            noisy = r.scalars[UNCLIPPED] + stream(seed, r.round_, DP_COUNT).normal(0.0, count_noise(self.fx.cfg))
            self.clip = next_clip(self.clip, noisy / denom + 0.5, p.dp_target_quantile, p.dp_clip_lr)
        return mean

    def metrics(self, round_: int) -> dict:
        eps, eps_rdp = privacy_spent(self.fx.cfg, round_)
        row = {"dp_epsilon": eps, "dp_epsilon_rdp": eps_rdp}
        if self.params.dp_adaptive_clip:
            row["dp_clip"] = self.round_clip  # the clip this round's updates were bounded by
        return row

    def state_tensors(self) -> State:
        if not self.params.dp_adaptive_clip:
            return {}
        return {"dp::clip": torch.tensor([self.clip], dtype=torch.float64)}  # float64: the float, exactly

    def load_state_tensors(self, saved: Mapping[str, torch.Tensor], round_: int) -> None:
        if self.params.dp_adaptive_clip:
            if "dp::clip" not in saved:
                raise DaliFlError(f"the checkpoint of round {round_} lacks adaptive clipping's clip; it does not "
                                  "belong to this run")
            self.clip = float(saved["dp::clip"][0])


def expected_clients(cfg) -> float:
    """qN: the denominator of Poisson sampling's estimate (the fixed sample size m under fixed sampling)."""
    if cfg.algorithms["dp"].dp_sampling == acc.FIXED:
        return float(cfg.fed.clients_per_round)
    return cfg.fed.frac * cfg.fed.num_users


def count_noise(cfg) -> float:
    """σ_b: --dp-count-noise, or the paper's expected clients per round / 20."""
    return cfg.algorithms["dp"].dp_count_noise or expected_clients(cfg) / 20


def mechanism(cfg, noise: float) -> acc.Mechanism:
    """One round of this run's DP-FedAvg at noise multiplier `noise`, as the accountant sees it."""
    fed, p = cfg.fed, cfg.algorithms["dp"]
    q = fed.frac if p.dp_sampling == acc.POISSON else fed.clients_per_round / fed.num_users
    return acc.Mechanism(p.dp_sampling, q, noise, fed.num_users)


def privacy_spent(cfg, rounds: int) -> tuple[Optional[float], Optional[float]]:
    """(ε from the sampling's tightest accountant, ε from RDP) at --dp-delta after `rounds`; None without noise."""
    p = cfg.algorithms["dp"]
    m = mechanism(cfg, p.dp_noise)
    eps_rdp = acc.epsilon_rdp(m, rounds, p.dp_delta)
    eps = acc.epsilon(m, rounds, p.dp_delta) if p.dp_sampling == acc.POISSON else eps_rdp
    return (eps if math.isfinite(eps) else None), (eps_rdp if math.isfinite(eps_rdp) else None)


def report_budget(cfg) -> None:
    """Log what the run's rounds spend; warn when an extended run spends more than the ε it was calibrated for."""
    p = cfg.algorithms["dp"]
    eps, _ = privacy_spent(cfg, cfg.fed.rounds)
    if eps is None:
        return
    log.info("DP: noise multiplier %.4f, %s sampling: %d rounds spend epsilon %.4f at delta %g", p.dp_noise,
             p.dp_sampling, cfg.fed.rounds, eps, p.dp_delta)
    if p.dp_epsilon is not None and eps > p.dp_epsilon * (1 + 1e-9):
        log.warning("DP: %d rounds spend epsilon %.4f, more than the --dp-epsilon %g this run's noise was "
                    "calibrated for (the run was extended)", cfg.fed.rounds, eps, p.dp_epsilon)
