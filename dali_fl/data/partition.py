"""Split the train split across simulated clients: IID, label-Dirichlet, or label shards."""
from __future__ import annotations

import json
import logging
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from dali_fl.atomic import atomic_write, atomic_write_text
from dali_fl.bounds import INT64_MAX
from dali_fl.errors import DaliFlError
from dali_fl.safe_fs import check_regular, read_bytes

log = logging.getLogger(__name__)

METHODS = ("iid", "dirichlet", "shards")
MAX_ATTEMPTS = 1000  # Dirichlet redraws before giving up: a hopeless setting must not hang
JSON_KEYS = ("method", "seed", "num_classes", "params", "clients")
MAX_PARTITION_BYTES = 1 << 32  # ImageNet-21k's 14 M indices take about 120 MB


@dataclass(frozen=True)
class Partition:
    """Disjoint, sorted int64 train-split indices per client, plus how they were made."""

    method: str
    seed: int
    num_classes: int
    clients: tuple[np.ndarray, ...]
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise DaliFlError(f"partition method must be a non-empty string, not {self.method!r}")
        if not _is_int(self.seed):
            raise DaliFlError(f"partition seed must be an integer, not {self.seed!r}")
        if not _is_int(self.num_classes) or self.num_classes < 1:
            raise DaliFlError(f"num_classes must be a positive integer, not {self.num_classes!r}")
        if not isinstance(self.params, dict):
            raise DaliFlError(f"partition params must be a dict, not {type(self.params).__name__}")
        object.__setattr__(self, "clients", _checked_clients(self.clients))

    def __eq__(self, other: object) -> bool:
        # The generated __eq__ would compare arrays with `==` and fail on their truth value.
        if not isinstance(other, Partition):
            return NotImplemented
        same_meta = (self.method, self.seed, self.num_classes, self.params) == (
            other.method, other.seed, other.num_classes, other.params)
        return same_meta and len(self.clients) == len(other.clients) and all(
            np.array_equal(a, b) for a, b in zip(self.clients, other.clients))

    def __repr__(self) -> str:
        return (f"Partition(method={self.method!r}, seed={self.seed}, "
                f"num_classes={self.num_classes}, num_clients={len(self.clients)}, "
                f"num_samples={int(self.sizes().sum())}, "
                f"params={self.params!r})")

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def sizes(self) -> np.ndarray:
        """Samples per client, int64 shaped (num_clients,)."""
        return np.array([len(c) for c in self.clients], dtype=np.int64)

    def class_counts(self, labels: np.ndarray) -> np.ndarray:
        """Samples per (client, class), int64 shaped (num_clients, num_classes)."""
        labels = _check_labels(labels, self.num_classes)
        top = max((int(c[-1]) for c in self.clients if len(c)), default=-1)
        if top >= len(labels):
            raise DaliFlError(f"partition refers to sample {top}, but there are only {len(labels)} "
                              "labels; was it made for another store?")
        return np.stack([np.bincount(labels[c], minlength=self.num_classes) for c in self.clients])


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _checked_clients(clients: object) -> tuple[np.ndarray, ...]:
    """Read-only int64 copies of the client index arrays, after checking they are a partition."""
    if not isinstance(clients, (tuple, list)) or not clients:
        raise DaliFlError("a partition needs at least one client")
    out = []
    for i, c in enumerate(clients):
        arr = np.asarray(c)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise DaliFlError(f"client {i}: indices must be a 1-D array of integers")
        arr = arr.astype(np.int64)  # copies, so the caller's array cannot change ours
        if arr.size and (arr[0] < 0 or np.any(np.diff(arr) <= 0)):
            raise DaliFlError(f"client {i}: indices must be non-negative, sorted and unique")
        arr.flags.writeable = False
        out.append(arr)
    every = np.concatenate(out)
    if len(np.unique(every)) != len(every):
        raise DaliFlError("clients overlap: some sample is given to more than one client")
    return tuple(out)


def _check_labels(labels: np.ndarray, num_classes: Optional[int] = None) -> np.ndarray:
    """Labels as int64 after checking they are 1-D non-negative integers below num_classes."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise DaliFlError(f"labels must be a 1-D array of integers "
                          f"(got {arr.dtype} shaped {arr.shape})")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise DaliFlError(f"labels must be non-negative (found {int(arr.min())})")
    if num_classes is not None and arr.size and arr.max() >= num_classes:
        raise DaliFlError(f"label {int(arr.max())} is out of range for {num_classes} classes")
    return arr


def _check_args(n: int, num_users: int, method: str, alpha: float, shards_per_client: int,
                min_size: int) -> None:
    """Reject arguments no method can honour, with the option to change."""
    if method not in METHODS:
        raise DaliFlError(f"unknown partition method {method!r}; "
                          f"choose one of {', '.join(METHODS)}")
    if not _is_int(num_users) or num_users < 1:
        raise DaliFlError(f"--num-users must be at least 1 (got {num_users})")
    if num_users > n:
        raise DaliFlError(f"--num-users {num_users} is more than the {n} train samples; "
                          "use fewer users")
    if method == "dirichlet":
        if not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
            raise DaliFlError(f"--alpha must be a finite number > 0 (got {alpha}); "
                              "small means skewed labels, large means near IID")
        if not _is_int(min_size) or min_size < 0:
            raise DaliFlError(f"--min-size must be a non-negative integer (got {min_size})")
        if min_size * num_users > n:
            raise DaliFlError(f"--min-size {min_size} x --num-users {num_users} needs more "
                              f"than the {n} train samples; use --min-size {n // num_users} "
                              "or fewer users")
    if method == "shards":
        if not _is_int(shards_per_client) or shards_per_client < 1:
            raise DaliFlError(f"--shards must be at least 1 (got {shards_per_client})")
        if shards_per_client * num_users > n:
            raise DaliFlError(f"--shards {shards_per_client} x --num-users {num_users} shards is "
                              f"more than the {n} train samples; lower --shards or --num-users")


def make_partition(labels: np.ndarray, num_users: int, method: str = "iid", *, seed: int = 0,
                   alpha: float = 0.5, shards_per_client: int = 2, min_size: int = 10,
                   num_classes: Optional[int] = None) -> Partition:
    """Partition range(len(labels)) over num_users clients, seeded by `seed` alone."""
    labels = _check_labels(labels, num_classes)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 1
    _check_args(len(labels), num_users, method, alpha, shards_per_client, min_size)
    if not _is_int(seed) or seed < 0:
        raise DaliFlError(f"--seed must be a non-negative integer (got {seed!r})")
    rng = np.random.default_rng(seed)
    if method == "iid":
        clients, params = _iid(len(labels), num_users, rng), {}
    elif method == "dirichlet":
        clients = _dirichlet(labels, num_classes, num_users, float(alpha), min_size, rng)
        params = {"alpha": float(alpha), "min_size": int(min_size)}
    else:
        clients = _shards(labels, num_users, shards_per_client, rng)
        params = {"shards_per_client": int(shards_per_client)}
    return Partition(method, int(seed), int(num_classes), tuple(clients), params)


def _iid(n: int, num_users: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle, then cut into num_users parts whose sizes differ by at most one."""
    return [np.sort(part) for part in np.array_split(rng.permutation(n), num_users)]


def _group(owner: np.ndarray, num_users: int) -> list[np.ndarray]:
    """Sorted sample indices of each client, from each sample's owning client."""
    order = np.argsort(owner, kind="stable")  # stable: indices stay ascending within a client
    return np.split(order, np.cumsum(np.bincount(owner, minlength=num_users))[:-1])


def _dirichlet(labels: np.ndarray, num_classes: int, num_users: int, alpha: float,
               min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """NIID-Bench label-Dirichlet split, redrawn until every client has min_size samples."""
    by_class = [np.flatnonzero(labels == k) for k in range(num_classes)]
    for attempt in range(1, MAX_ATTEMPTS + 1):
        owner = _dirichlet_draw(by_class, len(labels), num_users, alpha, rng)
        if owner is not None and np.bincount(owner, minlength=num_users).min() >= min_size:
            log.debug("dirichlet partition accepted after %d draw(s)", attempt)
            return _group(owner, num_users)
    raise DaliFlError(f"no Dirichlet partition with at least {min_size} samples per client in "
                      f"{MAX_ATTEMPTS} draws (alpha {alpha}, {num_users} users, {len(labels)} "
                      "samples); lower --min-size, raise --alpha, or use fewer --num-users")


def _dirichlet_draw(by_class: list[np.ndarray], n: int, num_users: int, alpha: float,
                    rng: np.random.Generator) -> Optional[np.ndarray]:
    """One draw: the owning client of each sample, or None when the draw is degenerate."""
    owner = np.empty(n, dtype=np.int64)
    sizes = np.zeros(num_users, dtype=np.int64)
    for idx in by_class:
        idx = rng.permutation(idx)
        p = rng.dirichlet(np.full(num_users, alpha))
        p = p * (sizes < n / num_users)  # clients already at their fair share take no more
        if not p.sum() > 0:
            return None  # every open client drew (numerically) zero: redraw rather than divide by 0
        cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(int)[:-1]
        counts = np.diff(np.concatenate(([0], cuts, [len(idx)])))
        owner[idx] = np.repeat(np.arange(num_users), counts)
        sizes += counts
    return owner


def _shards(labels: np.ndarray, num_users: int, shards_per_client: int,
            rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al.: label-sorted shards, shards_per_client random ones per client."""
    # Shuffle first so that the order within a class, and so each shard's samples, is random.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    num_shards = num_users * shards_per_client
    # array_split spreads the remainder one sample each over the first shards: all are covered.
    shards = np.array_split(by_label, num_shards)
    order = rng.permutation(num_shards).reshape(num_users, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in order]


def partition_to_json(p: Partition, labels: np.ndarray) -> dict:
    """The partition as the JSON-ready dict written by save_partition."""
    counts = p.class_counts(labels)
    return {
        "method": p.method,
        "seed": int(p.seed),
        "num_classes": int(p.num_classes),
        "params": dict(p.params),
        "clients": [{"indices": c.tolist(), "class_counts": row.tolist()}
                    for c, row in zip(p.clients, counts)],
    }


def save_partition(p: Partition, labels: np.ndarray, path: Path | str) -> None:
    """Write the partition as JSON (atomically), with per-client class counts."""
    text = json.dumps(partition_to_json(p, labels), separators=(",", ":"))
    atomic_write_text(path, text + "\n")
    log.info("wrote partition of %d clients to %s", p.num_clients, path)


def load_partition(path: Path | str, num_samples: Optional[int] = None) -> Partition:
    """Read and check a partition JSON file; any problem is a DaliFlError naming the file."""
    path = Path(path)
    if check_regular(path, "make it again with `dali-fl partition STORE --out FILE`") is None:  # FIFOs block
        raise DaliFlError(f"partition file {path} does not exist; make it with "
                          "`dali-fl partition STORE --out FILE`")
    try:
        doc = json.loads(read_bytes(path, MAX_PARTITION_BYTES))
    except (ValueError, RecursionError) as err:
        raise DaliFlError(f"partition file {path} is not readable JSON ({type(err).__name__}: {err})") from None
    try:
        p = _from_json(doc)
        if num_samples is not None:
            top = max((int(c[-1]) for c in p.clients if len(c)), default=-1)
            if top >= num_samples:
                raise DaliFlError(f"index {top} is out of range for {num_samples} train samples; "
                                  "was it made for another store?")
    except DaliFlError as err:
        raise DaliFlError(f"partition file {path}: {err}") from None
    return p


def _from_json(doc: object) -> Partition:
    """Partition from the parsed JSON document, checking the schema as it goes."""
    if not isinstance(doc, dict) or any(k not in doc for k in JSON_KEYS):
        raise DaliFlError(f"not a partition (expected an object with keys {', '.join(JSON_KEYS)})")
    if not isinstance(doc["clients"], list):
        raise DaliFlError("'clients' must be a list")
    num_classes = doc["num_classes"]
    clients = [_client_from_json(i, c, num_classes) for i, c in enumerate(doc["clients"])]
    return Partition(doc["method"], doc["seed"], num_classes, tuple(clients), doc["params"])


def _client_from_json(i: int, client: object, num_classes: object) -> np.ndarray:
    """One client's sorted indices, after checking the entry's shape and its class counts."""
    if not isinstance(client, dict) or "indices" not in client or "class_counts" not in client:
        raise DaliFlError(f"client {i} must be an object with 'indices' and 'class_counts'")
    indices, counts = client["indices"], client["class_counts"]
    if not isinstance(indices, list) or not all(type(v) is int and 0 <= v <= INT64_MAX for v in indices):
        raise DaliFlError(f"client {i}: 'indices' must be a list of sample indices (integers in 0..{INT64_MAX})")
    if not isinstance(counts, list) or not all(type(v) is int and 0 <= v <= INT64_MAX for v in counts):
        raise DaliFlError(f"client {i}: 'class_counts' must be a list of non-negative integers")
    if len(counts) != num_classes or sum(counts) != len(indices):
        raise DaliFlError(f"client {i}: 'class_counts' does not match num_classes or 'indices'")
    return np.sort(np.asarray(indices, dtype=np.int64))


def _min_med_max(values: np.ndarray) -> str:
    median = float(np.median(values))
    return f"min {int(values.min())} / median {median:g} / max {int(values.max())}"


def summarize(p: Partition, labels: np.ndarray) -> str:
    """A few human-readable lines: clients, sizes, classes per client, method and params."""
    sizes = p.sizes()
    classes = (p.class_counts(labels) > 0).sum(axis=1)
    params = ", ".join(f"{k}={v}" for k, v in p.params.items())
    return "\n".join([
        f"method: {p.method}" + (f" ({params})" if params else "") + f", seed {p.seed}",
        f"clients: {p.num_clients}, samples: {int(sizes.sum())}, classes: {p.num_classes}",
        f"client sizes: {_min_med_max(sizes)}",
        f"classes per client: {_min_med_max(classes)}",
    ])


IMAGE_FORMATS = {"png", "svg", "svgz", "pdf", "jpg", "jpeg", "tif", "tiff", "webp", "eps", "ps"}


def plot_format(path: Path | str) -> str:
    """The image format a plot path's suffix names (`png`, `svg`, `pdf`, `jpg`, ...), or a one-line refusal."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: slow to import

    # pgf needs LaTeX and raw/rgba write pixels without a header: only image formats that stand alone.
    supported = set(FigureCanvasAgg.get_supported_filetypes()) & IMAGE_FORMATS
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in supported:
        common = ", ".join(f".{f}" for f in ("png", "svg", "pdf", "jpg") if f in supported)
        named = f"suffix .{fmt}" if fmt else "no suffix"
        raise DaliFlError(f"plot file {path} has {named}, not an image format matplotlib writes; "
                          f"use one such as {common}")
    return fmt


def plot_partition(p: Partition, labels: np.ndarray, path: Path | str) -> None:
    """Save a clients-by-classes heatmap of sample counts, in the format the path's suffix names."""
    fmt = plot_format(path)  # before drawing: an unknown suffix is refused without work
    import matplotlib  # lazy: plotting is optional and matplotlib is slow to import

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    counts = p.class_counts(labels)
    height = min(12.0, 2.5 + 0.12 * p.num_clients)  # grows with clients, capped to stay a page
    width = min(14.0, 4.0 + 0.3 * p.num_classes)
    fig, ax = plt.subplots(figsize=(width, height))
    try:
        im = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
        fig.colorbar(im, ax=ax, label="samples")
        ax.set_xlabel("class")
        ax.set_ylabel("client")
        # Integer ticks, thinned by matplotlib when there are too many to read.
        ax.xaxis.set_major_locator(MaxNLocator(nbins=min(p.num_classes, 20), integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=min(p.num_clients, 20), integer=True))
        params = ", ".join(f"{k}={v}" for k, v in p.params.items() if k != "min_size")
        ax.set_title(f"{p.method} partition" + (f" ({params})" if params else "")
                     + f": {p.num_clients} clients")
        fig.tight_layout()
        # format= explicitly: the temp file's .tmp suffix would otherwise decide it.
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=100))
    finally:
        plt.close(fig)
    log.info("wrote partition plot to %s", path)
