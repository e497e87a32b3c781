"""The simulated clock: each client's compute speed and bandwidth, its time in a round, and stragglers.

A client's time in a round is download + local training + upload: the state it is sent over its download
bandwidth, samples × local epochs over its speed, and the values it sends back over its upload bandwidth.
Speeds and bandwidths are drawn once per run from seeded log-normal distributions around their medians
(`--speed-spread 10`: the 90th percentile is 10× the 10th) or read from a CSV trace. They depend on the
seed alone, and so does every round's timing: nothing here looks at training results, so the clock of
round r can be replayed without training (a resume does that).

Synchronous rounds (`SyncTimeline`) sample as dali-fl always has; `--over-select F` samples ⌈F·m⌉ from the
same (seed, round) stream and aggregates the first m to finish (Bonawitz et al., 2019), `--deadline S`
drops those that would finish after S simulated seconds, and a client outside its trace's availability
windows when sampled is skipped. Dropped and skipped clients are not trained: nothing of theirs reaches
the server or their own state. Without these options every sampled client is aggregated, as before.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from dali_fl import algorithms
from dali_fl.algorithms.base import option
from dali_fl.checks import check_numbers
from dali_fl.errors import DaliFlError
from dali_fl.safe_fs import check_input_file, read_bytes
from dali_fl.seeds import BANDWIDTH, SAMPLE, SPEED, TIEBREAK, stream

if TYPE_CHECKING:
    from dali_fl.config import TrainConfig
    from dali_fl.engine.federation import Federation

Z90 = 1.2815515655446004  # the standard normal's 90th percentile: P90 / P10 = exp(2 · Z90 · sigma)
TRACE_COLUMNS = ("client", "speed", "bandwidth")
TRACE_MAX_BYTES = 1 << 30  # a row per client: a million clients with long windows fit well under it
TRACE_OPTIONAL = ("upload_bandwidth", "available")


DRAWN = ("speed", "speed_spread", "bandwidth", "upload_bandwidth", "bandwidth_spread")  # what --trace replaces


MAX_ROUND_S = 1e12  # about 31,700 years: far beyond any device, far below float overflow over many rounds


@dataclass(frozen=True)
class ClockConfig:
    """The simulated clock's options: client speeds and bandwidths, and how rounds treat stragglers."""

    speed: float = option(100.0, "Simulated clock: median client compute speed, samples per second.")
    speed_spread: float = option(1.0, "Ratio of the 90th to the 10th percentile of client speeds (log-normal, "
                                      "seeded); 1: all equal.")
    bandwidth: float = option(10.0, "Median client download bandwidth, MB/s.")
    upload_bandwidth: float = option(0.0, "Median client upload bandwidth, MB/s (0: same as --bandwidth).")
    bandwidth_spread: float = option(1.0, "Ratio of the 90th to the 10th percentile of client bandwidths "
                                          "(log-normal, seeded); 1: all equal.")
    trace: str = option("", "CSV of client,speed,bandwidth[,upload_bandwidth][,available]; available: windows "
                            "'a-b;c-d' in simulated seconds (empty: always). Replaces the drawn speeds.")
    deadline: float = option(0.0, "Synchronous rounds: drop clients that would finish after S simulated "
                                  "seconds (0: wait for all).")
    over_select: float = option(1.0, "Synchronous rounds: sample ceil(F*m) clients and aggregate the first m to "
                                     "finish (Bonawitz et al., 2019).")

    def __post_init__(self) -> None:
        check_numbers(self, positive=("speed", "bandwidth"), non_negative=("upload_bandwidth", "deadline"))
        for name in ("speed_spread", "bandwidth_spread", "over_select"):
            if getattr(self, name) < 1:
                raise DaliFlError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")


@dataclass(frozen=True)
class Profiles:
    """Every client's speed (samples/s), bandwidths (MB/s) and availability windows (None: always)."""

    speed: np.ndarray
    down: np.ndarray
    up: np.ndarray
    windows: Optional[tuple[np.ndarray, ...]] = None  # per client, (k, 2) [start, end) in simulated seconds

    def available(self, client: int, t: float) -> bool:
        """Whether `client` is online at simulated time t."""
        if self.windows is None or len(self.windows[client]) == 0:
            return True
        w = self.windows[client]
        return bool(np.any((w[:, 0] <= t) & (t < w[:, 1])))

    def next_online(self, t: float) -> Optional[float]:
        """The earliest time after t at which a window opens, or None when none does."""
        if self.windows is None:
            return None
        starts = [float(s) for w in self.windows for s in w[:, 0] if s > t]
        return min(starts) if starts else None


def lognormal(rng: np.random.Generator, median: float, spread: float, n: int) -> np.ndarray:
    """n log-normal draws around `median` whose 90th percentile is `spread` times the 10th."""
    if spread == 1:
        return np.full(n, float(median))
    sigma = math.log(spread) / (2 * Z90)
    return median * np.exp(sigma * rng.standard_normal(n))


def drawn_profiles(clock: ClockConfig, num_users: int, seed: int) -> Profiles:
    """Speeds and bandwidths from the seeded log-normal distributions (one stream each)."""
    speed = lognormal(stream(seed, SPEED), clock.speed, clock.speed_spread, num_users)
    factor = lognormal(stream(seed, BANDWIDTH), 1.0, clock.bandwidth_spread, num_users)  # a slow link is slow both ways
    up = clock.upload_bandwidth or clock.bandwidth
    return Profiles(speed, clock.bandwidth * factor, up * factor)


def _number(row: dict, key: str, path: Path, line: int) -> float:
    try:
        value = float(row[key])
    except (TypeError, ValueError):
        raise DaliFlError(f"trace {path} line {line}: {key} {row.get(key)!r} is not a number") from None
    if not value > 0 or not math.isfinite(value):
        raise DaliFlError(f"trace {path} line {line}: {key} must be > 0 (got {row[key]})")
    return value


def _windows(text: str, path: Path, line: int) -> np.ndarray:
    """'0-3600;7200-9000' -> [[0, 3600], [7200, 9000]]."""
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(";"))):
        try:
            start, end = (float(x) for x in part.split("-"))
        except ValueError:
            raise DaliFlError(f"trace {path} line {line}: availability window {part!r} is not START-END") from None
        if not 0 <= start < end:
            raise DaliFlError(f"trace {path} line {line}: availability window {part!r} must have 0 <= START < END")
        out.append((start, end))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def read_trace(path: Path, num_users: int) -> Profiles:
    """Profiles from a CSV trace naming every client of the federation exactly once."""
    path = Path(path)
    fix = "give --trace a CSV file (client,speed,bandwidth[,upload_bandwidth][,available])"
    real = check_input_file(path, "--trace", fix)
    try:
        text = read_bytes(real, TRACE_MAX_BYTES, fix).decode("utf-8-sig")  # a spreadsheet's BOM is no column
    except UnicodeDecodeError:
        raise DaliFlError(f"--trace {path} is not text; {fix}") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in TRACE_COLUMNS if c not in header]
    unknown = [c for c in header if c not in TRACE_COLUMNS + TRACE_OPTIONAL]
    twice = [c for c in header if header.count(c) > 1]
    if twice:  # csv would keep the last, silently
        raise DaliFlError(f"trace {path}: the header names column {twice[0]} twice")
    if missing or unknown:
        raise DaliFlError(f"trace {path}: header must be {','.join(TRACE_COLUMNS)}[,{'][,'.join(TRACE_OPTIONAL)}] "
                          f"({'missing ' + missing[0] if missing else 'unknown column ' + unknown[0]})")
    rows: dict[int, tuple] = {}
    for line, row in enumerate(reader, 2):
        if None in row:  # more fields than the header: `0-5,10-20` for `0-5;10-20` lost its second window
            raise DaliFlError(f"trace {path} line {line}: {len(row[None])} more field(s) than the header names "
                              f"({','.join(row[None])}); separate availability windows with ';'")
        row = {k.strip(): (v or "").strip() for k, v in row.items()}
        client = _client(row.get("client"), path, line, num_users)
        if client in rows:
            raise DaliFlError(f"trace {path} line {line}: client {client} is listed twice")
        down = _number(row, "bandwidth", path, line)
        up = _number(row, "upload_bandwidth", path, line) if row.get("upload_bandwidth") else down
        rows[client] = (_number(row, "speed", path, line), down, up, _windows(row.get("available", ""), path, line))
    absent = sorted(set(range(num_users)) - set(rows))
    if absent:
        raise DaliFlError(f"trace {path} has no row for client {absent[0]} ({len(rows)} of {num_users} clients)")
    speed, down, up, windows = (list(col) for col in zip(*(rows[c] for c in range(num_users))))
    has_windows = any(len(w) for w in windows)
    return Profiles(np.asarray(speed), np.asarray(down), np.asarray(up), tuple(windows) if has_windows else None)


def _client(value: Optional[str], path: Path, line: int, num_users: int) -> int:
    try:
        client = int(value or "")
    except ValueError:
        raise DaliFlError(f"trace {path} line {line}: client {value!r} is not an integer") from None
    if not 0 <= client < num_users:
        raise DaliFlError(f"trace {path} line {line}: client {client} is outside the federation "
                          f"(clients 0..{num_users - 1})")
    return client


def profiles_for(cfg: "TrainConfig") -> Profiles:
    """The run's client profiles: the trace's, or drawn from the seed."""
    if cfg.clock.trace:
        return read_trace(Path(cfg.clock.trace), cfg.fed.num_users)
    return drawn_profiles(cfg.clock, cfg.fed.num_users, cfg.fed.seed)


def refuse(cfg: "TrainConfig") -> None:
    """Clock options that cannot hold for this federation (the trace is read here, before any training)."""
    clock, fed = cfg.clock, cfg.fed
    wanted = math.ceil(clock.over_select * fed.clients_per_round - 1e-9)
    if wanted > fed.num_users:
        raise DaliFlError(f"--over-select {clock.over_select} samples {wanted} clients a round, more than the "
                          f"federation's {fed.num_users}; lower --over-select or --frac")
    drawn = [f for f in fields(ClockConfig) if f.name in DRAWN and getattr(clock, f.name) != f.default]
    if clock.trace and drawn:  # config.json would record them as if they set the clock
        raise DaliFlError(f"--{drawn[0].name.replace('_', '-')} {getattr(clock, drawn[0].name)} sets the drawn "
                          "client speeds and bandwidths, which --trace replaces; drop it or --trace")
    trace = read_trace(Path(clock.trace), fed.num_users) if clock.trace else None
    # Only what leaves sampled clients out: a trace of speeds and bandwidths alone changes the clock, not who counts.
    leaving_out = [flag for flag, on in (("--deadline", clock.deadline > 0), ("--over-select", clock.over_select > 1),
                                         ("--trace", trace is not None and trace.windows is not None)) if on]
    uniform = [c.flag for c in algorithms.active_classes(cfg) if c.uniform_sample]
    if leaving_out and uniform:
        what = "--trace's availability windows" if leaving_out[0] == "--trace" else leaving_out[0]
        raise DaliFlError(f"with {what}, which sampled clients count depends on their simulated time, so a client's "
                          f"inclusion rate is no longer the sampling rate, which {uniform[0]} rests on; drop "
                          f"{leaving_out[0]} or {uniform[0]}")


def client_seconds(fx: "Federation", profiles: Profiles) -> np.ndarray:
    """Each client's simulated time for one round: download + local training + upload."""
    cfg = fx.cfg
    base_values = 0
    if fx.uses_products:  # the changed base weights go down too (as on Flower's wire)
        params = dict(fx.model.named_parameters())
        base_values = sum(params[p.base].numel() for p in fx.pairs)
    by_rank: dict[int, int] = {}
    out = np.zeros(cfg.fed.num_users)
    for c in range(cfg.fed.num_users):
        rank = -1 if fx.ranks is None else int(fx.ranks[c])
        if rank not in by_rank:
            by_rank[rank] = fx.upload_values(c)
        values = by_rank[rank]
        samples = len(fx.train_indices(c)) * cfg.local.local_ep
        down_mb, up_mb = (values + base_values) * 4 / 1e6, values * 4 / 1e6  # float32 values
        with np.errstate(over="ignore", divide="ignore"):  # checked below, in one line
            out[c] = down_mb / profiles.down[c] + samples / profiles.speed[c] + up_mb / profiles.up[c]
    check_round_seconds(out)
    return out


def check_round_seconds(seconds: np.ndarray) -> None:
    """Refuse speeds and bandwidths so small that a round's time overflows: metrics.jsonl would hold Infinity."""
    worst = float(seconds.max(initial=0.0))
    if not worst <= MAX_ROUND_S:  # also nan
        raise DaliFlError(f"a client's simulated round would take {worst:.3g} s, more than {MAX_ROUND_S:.0e} s: "
                          "--speed, --bandwidth, their spreads or the trace's values are far below any device's; "
                          "raise them")


def sample(cfg: "TrainConfig", round_: int, plain) -> np.ndarray:
    """The round's sample: `plain` (the engine's sample_clients) unless over-selecting; (seed, round) only."""
    fed = cfg.fed
    if cfg.clock.over_select == 1:
        return plain(cfg, round_)
    size = math.ceil(cfg.clock.over_select * fed.clients_per_round - 1e-9)
    return np.sort(stream(fed.seed, round_, SAMPLE).choice(fed.num_users, size=size, replace=False))


@dataclass(frozen=True)
class RoundPlan:
    """One synchronous round on the clock: who trains, who was dropped or skipped, when it starts and ends."""

    round_: int
    clients: np.ndarray  # aggregated, in client order
    sampled: int
    dropped: int  # stragglers cut by the deadline or by over-selection
    unavailable: int  # sampled while offline
    start_s: float
    end_s: float

    def metrics(self) -> dict:
        """The plan's columns of the round's metrics row."""
        return {"sim_time_s": self.end_s, "sim_round_s": self.end_s - self.start_s, "clients_sampled": self.sampled,
                "clients_dropped": self.dropped, "clients_unavailable": self.unavailable}


def plan_round(round_: int, t: float, sampled: np.ndarray, seconds: np.ndarray, profiles: Profiles,
               clock: ClockConfig, m: int, trains: Optional[np.ndarray] = None,
               tiebreak: Optional[np.ndarray] = None) -> RoundPlan:
    """Which of the sampled clients the round aggregates, and when it ends (it starts at t).

    Over-selection keeps the first m to finish; a client without samples (`trains` False) comes last, as it
    returns nothing, and equal times go by `tiebreak` (a per-round draw; default: the client id).
    """
    online = [int(c) for c in sampled if profiles.available(int(c), t)]
    by_finish = sorted(online, key=lambda c: (trains is not None and not trains[c], seconds[c],
                                              c if tiebreak is None else tiebreak[c]))
    meets = [c for c in by_finish if clock.deadline <= 0 or seconds[c] <= clock.deadline]
    target = m if clock.over_select > 1 else len(online)
    kept = meets[:target]
    if kept and (len(kept) == target or clock.deadline <= 0):  # without a deadline the server has all it gets
        end = t + float(max(seconds[c] for c in kept))
    elif clock.deadline > 0 and online:
        end = t + clock.deadline  # the server waited for the deadline
    else:  # nobody online: the server waits for the next window to open (or keeps its time)
        nxt = profiles.next_online(t)
        end = t + clock.deadline if clock.deadline > 0 else (nxt if nxt is not None else t)
    return RoundPlan(round_, np.asarray(sorted(kept), dtype=np.int64), len(sampled), len(online) - len(kept),
                     len(sampled) - len(online), t, end)


class SyncTimeline:
    """The clock of synchronous rounds: a pure function of the seed, replayed from round 1 when a run resumes."""

    asynchronous = False

    def __init__(self, fx: "Federation", profiles: Profiles, seconds: np.ndarray):
        self.cfg, self.profiles, self.seconds = fx.cfg, profiles, seconds
        self.trains = with_samples(fx)
        self.t, self.next_round = 0.0, 1

    def plan(self, round_: int, plain) -> RoundPlan:
        """Round `round_`'s plan; `plain(cfg, round_)` is the engine's sample."""
        if round_ != self.next_round:  # resumed (or replayed): the clock of the rounds before is re-derived
            self.t, self.next_round = 0.0, 1
            while self.next_round < round_:
                self.plan(self.next_round, plain)
        tiebreak = stream(self.cfg.fed.seed, round_, TIEBREAK).random(self.cfg.fed.num_users)
        p = plan_round(round_, self.t, sample(self.cfg, round_, plain), self.seconds, self.profiles, self.cfg.clock,
                       self.cfg.fed.clients_per_round, self.trains, tiebreak)
        self.t, self.next_round = p.end_s, round_ + 1
        return p

    def state_tensors(self) -> dict:
        """Nothing: the clock of synchronous rounds is re-derived from the seed."""
        return {}

    def load_state_tensors(self, saved, round_: int) -> None:
        """Nothing to load (see state_tensors)."""


def with_samples(fx: "Federation") -> np.ndarray:
    """Per client, whether it has samples to train on: one without returns nothing, however fast."""
    return np.asarray([len(fx.train_indices(c)) > 0 for c in range(fx.cfg.fed.num_users)])


def check_deadline(clock: ClockConfig, seconds: np.ndarray, trains: np.ndarray) -> None:
    """A deadline that no client with samples can meet would leave every round untrained (an empty client's
    transfers alone may fit it)."""
    fastest = seconds[trains].min() if trains.any() else math.inf
    if clock.deadline > 0 and clock.deadline < fastest:
        raise DaliFlError(f"--deadline {clock.deadline:g} s: no client with samples can finish a round in time (the "
                          f"fastest takes {fastest:.3g} s); raise --deadline")


def timeline_for(fx: "Federation"):
    """The run's timeline: synchronous rounds, or the buffered asynchronous driver an algorithm asks for."""
    profiles = profiles_for(fx.cfg)
    seconds = client_seconds(fx, profiles)
    check_deadline(fx.cfg.clock, seconds, with_samples(fx))
    policy = next((p for p in (a.async_policy() for a in fx.algs) if p is not None), None)
    if policy is None:
        return SyncTimeline(fx, profiles, seconds)
    from dali_fl.engine.asynchronous import AsyncTimeline

    return AsyncTimeline(fx, profiles, seconds, policy)


def empty_row(fx: "Federation", plan: RoundPlan) -> dict:
    """The row of a round that aggregated nobody (all sampled clients offline or late): the model is unchanged."""
    row = {"round": plan.round_, "test_acc": None, "test_loss": None, "train_loss": None, "num_clients": 0,
           "num_samples": 0, "round_time_s": 0.0, "data_wait_s": 0.0, "compute_s": 0.0, "aggregate_s": 0.0,
           "images_per_s": 0.0, "upload_mb": 0.0, "client_drift": None, "update_spread": None,
           "peak_gpu_mem_mb": None, **plan.metrics()}
    if fx.cfg.data.amp == "fp16":
        row["amp_skipped_steps"] = 0
    for a in fx.algs:
        row.update(a.metrics(plan.round_))
    return row
