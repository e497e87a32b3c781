"""Buffered asynchronous server steps on the simulated clock: the engine's side of buffered asynchronous algorithms.

An algorithm turns this on by returning an `AsyncPolicy` (C clients in flight, K updates a step, a
staleness weight); this module names none. `Schedule` is the event order: which client is dispatched
when, from which model version, and which K arrivals make each server step. It depends on the seed and
the clock alone (never on training results), so it is replayed, not saved: a resume replays it to the last
finished step. Dispatch keeps C clients in flight: whenever slots are free (after an arrival, or when an
availability window opens), the server draws idle clients with samples uniformly from a (seed, version)
stream; arrivals at one instant join the buffer, up to K, before anyone is dispatched (the rest wait for
the next step); a client trains each model version at most once. The first dispatch at version v draws from
the synchronous round v + 1's stream, so with C = K = m and equal client times the steps are the rounds.

Training is lazy: at server step s the K buffered clients are trained, each from the model version it
was sent (kept in memory, and in the checkpoint while clients in flight still need them), with the local
seed of (seed, version + 1, client), as a synchronous round would. Each update is re-based onto the
current model, x + s(τ)·(y − x_v), and added in client order through the engine's `add_update`, reduced,
and stepped by `server_update`: every algorithm hook and server optimizer applies as in rounds.
"""
from __future__ import annotations

import dataclasses
import heapq
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional

import numpy as np
import torch

from dali_fl.algorithms.base import AsyncPolicy
from dali_fl.engine.clock import Profiles, with_samples
from dali_fl.errors import DaliFlError
from dali_fl.model.build import trainable_state
from dali_fl.seeds import DISPATCH, SAMPLE, stream

if TYPE_CHECKING:
    from dali_fl.engine.federation import Federation, RoundHooks
    from dali_fl.loaders import Loader

PREFIX = "async::"  # model versions that clients in flight started from, in the checkpoint
State = dict[str, torch.Tensor]


@dataclass(frozen=True, order=True)
class Flight:
    """One client's trip: it finishes at `finish`; ties go to the lower client id."""

    finish: float
    client: int
    version: int  # the model version it was sent
    sent: float


class Schedule:
    """The pure event order of buffered asynchronous steps (see the module's docstring)."""

    def __init__(self, seed: int, seconds: np.ndarray, profiles: Profiles, policy: AsyncPolicy,
                 trains: Optional[np.ndarray] = None):
        self.seed, self.seconds, self.profiles, self.policy = seed, seconds, profiles, policy
        # Per client: whether it has samples (default: all). One without would be the fastest, every step.
        self.trains = np.ones(len(seconds), bool) if trains is None else trains
        self.t, self.version, self.draws = 0.0, 0, 0
        self.in_flight: list[Flight] = []
        self.last: dict[int, int] = {}  # client -> the last version it was sent

    def _dispatch(self) -> None:
        free = self.policy.concurrency - len(self.in_flight)
        busy = {f.client for f in self.in_flight}
        idle = [c for c in range(len(self.seconds)) if self.trains[c] and c not in busy
                and self.last.get(c) != self.version and self.profiles.available(c, self.t)]
        if free <= 0 or not idle:
            return
        parts = (self.seed, self.version + 1, SAMPLE) + ((DISPATCH, self.draws) if self.draws else ())
        picked = np.sort(np.asarray(idle)[stream(*parts).choice(len(idle), size=min(free, len(idle)),
                                                                replace=False)])
        self.draws += 1
        for c in picked.tolist():
            heapq.heappush(self.in_flight, Flight(self.t + float(self.seconds[c]), c, self.version, self.t))
            self.last[c] = self.version

    def next_step(self) -> tuple[list[Flight], float]:
        """The K arrivals of the next server step (in client order) and its simulated time; advances."""
        buffer: list[Flight] = []
        while len(buffer) < self.policy.buffer:
            self._dispatch()
            nxt = self.profiles.next_online(self.t) if len(self.in_flight) < self.policy.concurrency else None
            if not self.in_flight and nxt is None:
                raise DaliFlError(self._stuck())
            if nxt is not None and (not self.in_flight or nxt < self.in_flight[0].finish):
                self.t = nxt  # a window opens while a slot is free: the server sends a model then
                continue
            self.t = self.in_flight[0].finish
            while self.in_flight and self.in_flight[0].finish == self.t and len(buffer) < self.policy.buffer:
                buffer.append(heapq.heappop(self.in_flight))
        self.version, self.draws = self.version + 1, 0
        return sorted(buffer, key=lambda f: (f.client, f.version)), self.t

    def _stuck(self) -> str:
        """Why the buffer cannot fill: nobody comes online again, or too few clients to train this version."""
        online = [c for c in range(len(self.seconds)) if self.trains[c] and self.profiles.available(c, self.t)]
        step = f"server step {self.version + 1} cannot fill its buffer of {self.policy.buffer}"
        if not online:
            return f"no client is online after simulated time {self.t:.1f} s (see --trace); {step}"
        return (f"{step}: after simulated time {self.t:.1f} s only {len(online)} client(s) with samples are online "
                "(see --trace), and each trains a model version once; lower --buffer")

    def needed(self) -> set[int]:
        """Model versions that clients in flight were sent (besides the current one)."""
        return {f.version for f in self.in_flight}


def rebased(state: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor],
            weight: float) -> State:
    """x + s·(y − x_v): a stale update moved onto the current model and weighed by its staleness."""
    return {k: current[k].float() + weight * (v.float() - sent[k].float()) for k, v in state.items()}


class AsyncTimeline:
    """Server steps of buffered asynchronous aggregation, one metrics row each."""

    asynchronous = True

    def __init__(self, fx: "Federation", profiles: Profiles, seconds: np.ndarray, policy: AsyncPolicy):
        self.cfg, self.profiles, self.seconds, self.policy = fx.cfg, profiles, seconds, policy
        self.device = fx.device
        self.names = list(trainable_state(fx.model))  # the model's order, which a checkpoint's sorted keys are not
        self.trains = with_samples(fx)
        if self.trains.sum() < policy.buffer:
            raise DaliFlError(f"--buffer {policy.buffer} needs that many clients with samples, and the partition "
                              f"leaves {int(self.trains.sum())}; lower --buffer or raise --min-size")
        self.schedule = self._fresh()
        self.versions: dict[int, State] = {}  # model version -> its trainable state (on the device)

    def _fresh(self) -> Schedule:
        return Schedule(self.cfg.fed.seed, self.seconds, self.profiles, self.policy, self.trains)

    def _catch_up(self, step: int) -> None:
        """Replay the schedule to just before `step` (after a resume, or when steps are replayed)."""
        if self.schedule.version > step - 1:
            self.schedule = self._fresh()
        while self.schedule.version < step - 1:
            self.schedule.next_step()

    def run_step(self, fx: "Federation", step: int, progress: bool, hooks: "RoundHooks", loader: "Loader") -> dict:
        """Server step `step`: train its K buffered clients from their versions, aggregate, step; its row."""
        from dali_fl.engine.federation import add_update, new_sums, round_row, server_update, train_one

        t0 = time.perf_counter()
        self._catch_up(step)
        arrivals, when = self.schedule.next_step()
        current = {k: v.clone() for k, v in trainable_state(fx.model).items()}
        self.versions[step - 1] = current
        running, totals = new_sums(fx, current)
        sizes = np.asarray([len(fx.partition.clients[f.client]) for f in arrivals])
        stale = [step - 1 - f.version for f in arrivals]
        for i in hooks.mine(np.arange(len(arrivals)), sizes).tolist():
            f = arrivals[i]
            sent = self.versions[f.version]
            with fx.sent_base(f.client, sent):
                update = train_one(fx, f.version + 1, f.client, sent, loader)
            weight = self.policy.weight(stale[i])
            if stale[i] or weight != 1.0:  # a fresh update at weight 1 is added as it is: bitwise a round's
                # Its drift too is what it adds to the current model, s·‖y − x_v‖, as update_spread assumes.
                update = dataclasses.replace(update, state=rebased(update.state, sent, current, weight),
                                             drift=weight * update.drift)
            add_update(fx, running, totals, update, current)
        fx.end_clients()
        t_agg = time.perf_counter()
        hooks.reduce(running, totals)
        mean_norm = server_update(fx, step, running, current, len(arrivals))
        self._keep_versions(fx, step)
        row = round_row(fx, step, len(arrivals), running, totals, mean_norm, (t0, t_agg, time.perf_counter()))
        return {**row, "sim_time_s": when, "staleness_mean": float(np.mean(stale)), "staleness_max": int(max(stale)),
                "updates_stale": int(sum(1 for s in stale if s > 0)), "clients_in_flight": len(self.schedule.in_flight)}

    def _keep_versions(self, fx: "Federation", step: int) -> None:
        """Keep the versions clients in flight need, and the new current one."""
        self.versions[step] = {k: v.clone() for k, v in trainable_state(fx.model).items()}
        keep = self.schedule.needed() | {step}
        self.versions = {v: s for v, s in self.versions.items() if v in keep}

    def state_tensors(self) -> dict:
        """The older versions clients in flight still train from (the current one is the model's own state)."""
        current = self.schedule.version
        return {f"{PREFIX}{v}::{name}": t.detach().to("cpu").contiguous()
                for v, state in self.versions.items() if v != current for name, t in state.items()}

    def load_state_tensors(self, saved: Mapping[str, torch.Tensor], step: int) -> None:
        """Restore the versions saved after server step `step`; the schedule is replayed to it."""
        self._catch_up(step + 1)
        loaded: dict[int, State] = {}
        for key, t in saved.items():
            if key.startswith(PREFIX):
                version, name = key[len(PREFIX):].split("::", 1)
                loaded.setdefault(int(version), {})[name] = t.to(self.device)
        if any(set(state) != set(self.names) for state in loaded.values()):
            raise DaliFlError("the checkpoint's model versions do not hold this model's tensors; it does not belong "
                              "to this run")
        # In the model's order, as the run that saved them held them: a drift summed in another order differs.
        self.versions = {v: {n: state[n] for n in self.names} for v, state in loaded.items()}
        lost = self.schedule.needed() - set(self.versions) - {step}
        if lost:
            raise DaliFlError(f"the checkpoint lacks model version {min(lost)}, which clients in flight train from; "
                              "it does not belong to this run")
