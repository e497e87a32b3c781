"""What a resume may trust: every run file is checked (kind, identity, agreement) before anything is built or written.

A new run records what it trains on in `run.json` (the sha256 of its partition.json, of its store's
manifest and of its settings) before config.json. A resume then refuses, in one line and before it changes
anything, a run whose files disagree: a partition edited, a setting of config.json edited by hand, a config
pointing at another store, metrics rows that the checkpoint does not account for. The one repair it makes is
the one a kill leaves: a torn last row of metrics.jsonl, or a row one round beyond the checkpoint, dropped
when the run continues.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

from dali_fl import algorithms
from dali_fl.atomic import atomic_write_text
from dali_fl.bounds import fits_int64
from dali_fl.config import TrainConfig
from dali_fl.data.store import MANIFEST, open_store
from dali_fl.engine.rundir import IDENTITY, algorithm_files, metrics_digest, read_meta, read_metrics
from dali_fl.errors import DaliFlError
from dali_fl.safe_fs import check_dir, check_regular, read_bytes, sha256

log = logging.getLogger(__name__)

FIX = "the run cannot be resumed exactly; restore the file or start a new run"
MAX_CONFIG_BYTES = 1 << 20
# Settings that say where and how fast, not what is trained: what --resume may change (rounds, device), what a
# user may edit in config.json (paths to moved files, device placement, loader workers, evaluation batch size).
FREE_FIELDS = {"fed": ("rounds",), "data": ("device", "store", "data_on_gpu", "num_workers", "eval_bs"),
               "clock": ("trace",), "model": ("weights",)}
RUN_FILES = (IDENTITY, "config.json", "partition.json", "metrics.jsonl", "client_ranks.json", "summary.json")


def check_config_file(run_dir: Path) -> None:
    """config.json of a run to resume: a plain file of JSON whose every field has the kind its section declares."""
    path = Path(run_dir) / "config.json"
    if check_regular(path, FIX) is None:
        return  # load_config says that this is not a run
    try:
        doc = json.loads(read_bytes(path, MAX_CONFIG_BYTES, FIX))
    except (ValueError, RecursionError) as err:  # RecursionError: absurdly nested JSON
        raise DaliFlError(f"{path} is not readable JSON ({type(err).__name__}); it was not written by "
                          "this dali-fl") from None
    if not isinstance(doc, dict):
        raise DaliFlError(f"{path} holds no JSON object; it was not written by this dali-fl")
    for section in dataclasses.fields(TrainConfig):
        values = doc.get(section.name)
        if values is None:
            continue  # a section a run from before it lacks; load_config refuses a missing required one
        defaults = section.default_factory()
        if not isinstance(defaults, dict):
            _check_section(path, section.name, defaults, values)
            continue
        _check_object(path, section.name, values)  # the algorithms: name -> that algorithm's Params
        for name, params in values.items():
            if name in defaults:
                _check_section(path, f"{section.name}.{name}", defaults[name], params)
            elif name not in algorithms.REGISTRY:  # its options would be dropped without a word
                raise DaliFlError(f"{path}: {section.name}.{name} is not an algorithm of this dali-fl; it was not "
                                  "written by this dali-fl")


def _check_object(path: Path, label: str, values: object) -> None:
    if not isinstance(values, dict):
        raise DaliFlError(f"{path}: {label} is not an object; it was not written by this dali-fl")


def _check_section(path: Path, label: str, defaults: object, values: object) -> None:
    """Every field of one section has the kind of its default."""
    _check_object(path, label, values)
    for f in dataclasses.fields(defaults):
        if f.name in values and not _same_kind(getattr(defaults, f.name), values[f.name]):
            shown = repr(values[f.name])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise DaliFlError(f"{path}: {label}.{f.name} is {shown}, not a value of its kind (like "
                              f"{getattr(defaults, f.name)!r}); it was not written by this dali-fl")


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, float, bool)) or (isinstance(value, int) and fits_int64(value))


def _same_kind(default: object, value: object) -> bool:
    """Whether a config.json value has the kind of the field's default (an int may stand for a float)."""
    if isinstance(value, int) and not isinstance(value, bool) and not fits_int64(value):
        return False
    if default is None:  # Optional fields (resize_to, weights) hold a scalar or nothing
        return _scalar(value) and not isinstance(value, bool)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (tuple, list)):
        return isinstance(value, list) and all(_same_kind(default[0], v) if default else _scalar(v) for v in value)
    if isinstance(default, dict):
        return isinstance(value, dict) and all(_scalar(v) for v in value.values())
    return True


def settings_sha256(cfg: TrainConfig) -> str:
    """sha256 of the settings that decide what a run trains: config.json less FREE_FIELDS and defaults.

    Numbers are compared by value (a hand reformat may write 100.0 as 100), and a field at its default
    is left out, so that a field a later dali-fl adds (at its default) leaves a run resumable.
    """
    doc, defaults = (_plain(json.loads(c.to_json())) for c in (cfg, TrainConfig()))
    for section, keys in FREE_FIELDS.items():
        for key in keys:
            doc[section].pop(key, None)
    text = json.dumps(_less_defaults(doc, defaults), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: object) -> object:
    """JSON values with whole floats as ints, recursively (100.0 and 100 are the same setting)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _less_defaults(value: object, default: object) -> object:
    """`value` without the object members that equal `default`'s, recursively."""
    if not (isinstance(value, dict) and isinstance(default, dict)):
        return value
    return {k: _less_defaults(v, default.get(k)) for k, v in value.items() if k not in default or v != default[k]}


def _named_files(cfg: TrainConfig) -> dict[str, str]:
    """The files the settings name by a path that may move (the trace, the weights): `section.key` -> path."""
    named = {"clock.trace": cfg.clock.trace, "model.weights": cfg.model.weights}
    return {name: str(path) for name, path in named.items() if path}


def record_identity(cfg: TrainConfig, run_dir: Path, fresh: bool) -> None:
    """run.json: sha256 of partition.json, the store's manifest, the settings and the files they name.

    A run started by an older dali-fl gets what its run.json lacks now, from its files as they are.
    """
    path = Path(run_dir) / IDENTITY
    doc = None if fresh else _read_identity(run_dir)
    if doc is not None and "settings_sha256" in doc and "files_sha256" in doc:
        return
    doc = doc or {"partition_sha256": sha256(Path(run_dir) / "partition.json", FIX),
                  "store_manifest_sha256": sha256(Path(cfg.data.store) / MANIFEST, FIX)}
    if "settings_sha256" not in doc:
        doc["settings_sha256"] = settings_sha256(cfg)
    if "files_sha256" not in doc:  # not setdefault: hashing a weights file is worth skipping when recorded
        doc["files_sha256"] = {name: sha256(file, FIX) for name, file in _named_files(cfg).items()}
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def check_resume(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuse a resume whose files are of the wrong kind or disagree; reads only, so a refusal changes nothing."""
    run_dir = Path(run_dir)
    for name in RUN_FILES + algorithm_files():  # a FIFO would block the reader, a symlink would be written through
        check_regular(run_dir / name, FIX)
    check_dir(run_dir / "tensorboard", FIX)
    if not Path(cfg.data.store).exists():
        raise DaliFlError(f"the store {cfg.data.store} that {run_dir / 'config.json'} names does not exist; if it "
                          "moved, set data.store in config.json to its new path (its manifest is checked), or make "
                          "it again with `dali-fl prep`")
    identity = _read_identity(run_dir)
    meta = read_meta(run_dir)
    _check_same_generation(run_dir, identity, meta)
    _check_identity(cfg, run_dir, identity)
    done = meta["round"] if meta else 0
    rng = (meta or {}).get("rng")
    seed = rng.get("seed") if isinstance(rng, dict) else None
    if type(seed) is int and seed != cfg.fed.seed:
        raise DaliFlError(f"{run_dir / 'checkpoint'} was written with seed {seed} but config.json says "
                          f"{cfg.fed.seed}; {FIX}")
    _check_meta_records(run_dir, identity, meta)
    check_metrics(run_dir, done, (meta or {}).get("metrics"))
    _check_settings(cfg, run_dir, identity)  # last: the checks above name the file and the field more precisely


def _check_meta_records(run_dir: Path, identity: Optional[dict], meta: Optional[dict]) -> None:
    """The checkpoint's records are dali-fl's (a malformed one must not switch its check off), and it was written
    by this run: one copied in from a run of other settings, with that run's metrics, agreed with both."""
    if meta is None:
        return
    checkpoint = run_dir / "checkpoint" / "meta.json"
    covered = meta.get("metrics")
    if "metrics" in meta and not (isinstance(covered, dict) and _is_sha256(covered.get("sha256"))):
        raise DaliFlError(f"{checkpoint} holds a record of its metrics rows that dali-fl did not write; {FIX}")
    settings = meta.get("settings_sha256")  # absent: written before checkpoints recorded it
    if settings is None:
        return
    recorded = (identity or {}).get("settings_sha256")
    if recorded is None:  # a resume of an older run records it before its first checkpoint
        raise DaliFlError(f"{run_dir / IDENTITY} lacks the record of the run's settings that the dali-fl which "
                          f"wrote {checkpoint} keeps; {FIX}")
    if settings != recorded:
        raise DaliFlError(f"{checkpoint} was written by a run of other settings than this one's (their sha256 "
                          f"differs from the one in {IDENTITY}); {FIX}")


def _check_same_generation(run_dir: Path, identity: Optional[dict], meta: Optional[dict]) -> None:
    """Records that one dali-fl writes together are all there: an older run lacks all of them, never just some.

    run.json came with the checkpoint's metrics record, and its settings record with the checkpoint's sha256;
    deleting one of them must not turn the checks it feeds into an older run's warning.
    """
    if meta is None:
        return
    checkpoint = run_dir / "checkpoint" / "meta.json"
    if identity is None and "metrics" in meta:
        raise DaliFlError(f"{run_dir / IDENTITY} is missing, though {checkpoint} was written by a dali-fl that "
                          f"writes it; {FIX}")
    if identity is not None and "metrics" not in meta:
        raise DaliFlError(f"{checkpoint} lacks the record of its metrics rows that the dali-fl which wrote "
                          f"{IDENTITY} keeps; {FIX}")
    if identity is not None and "state_sha256" in meta and "settings_sha256" not in identity:
        raise DaliFlError(f"{run_dir / IDENTITY} lacks the record of the run's settings that the dali-fl which "
                          f"wrote {checkpoint} keeps; {FIX}")
    # Development versions of one day (0.1.0, before any release) wrote the settings' record without the weights'
    # sha256; accepting that pair let an edited weight through once both of meta.json's records were deleted.
    if identity is not None and "settings_sha256" in identity and "state_sha256" not in meta:
        raise DaliFlError(f"{checkpoint} lacks the sha256 of the checkpoint's weights that the dali-fl which wrote "
                          f"{run_dir / IDENTITY} keeps; {FIX}")


def _read_identity(run_dir: Path) -> Optional[dict]:
    """run.json's record (None when absent: a run started by an older dali-fl); one that is not dali-fl's is refused."""
    path = run_dir / IDENTITY
    if check_regular(path, FIX) is None:
        return None
    try:
        doc = json.loads(read_bytes(path, MAX_CONFIG_BYTES, FIX))
    except (ValueError, RecursionError):
        doc = None
    keys = ("partition_sha256", "store_manifest_sha256")
    files = doc.get("files_sha256", {}) if isinstance(doc, dict) else None
    if (not isinstance(doc, dict) or not all(_is_sha256(doc.get(k)) for k in keys)
            or not _is_sha256(doc.get("settings_sha256", "0" * 64))
            or not isinstance(files, dict) or not all(map(_is_sha256, files.values()))):
        raise DaliFlError(f"{path} is not a run identity written by dali-fl; {FIX}")
    return doc


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _check_settings(cfg: TrainConfig, run_dir: Path, doc: Optional[dict]) -> None:
    """config.json holds the settings the run started with (`doc`: run.json's record), less FREE_FIELDS."""
    if doc is None:
        return  # _check_identity warned: a run from before run.json
    if "settings_sha256" not in doc:
        log.warning("%s records no sha256 of the run's settings (it was started by an older dali-fl): config.json "
                    "is not checked this time", run_dir / IDENTITY)
        return
    _check_named_files(cfg, run_dir, doc.get("files_sha256"))
    if settings_sha256(cfg) != doc["settings_sha256"]:
        free = ", ".join(f"{section}.{key}" for section, keys in FREE_FIELDS.items() for key in keys)
        raise DaliFlError(f"{run_dir / 'config.json'} holds settings other than those this run started with "
                          f"(their sha256 differs from the one in {IDENTITY}); a resume may change only {free}; "
                          "restore the file or start a new run with the new settings")


def _changed(path: Path | str, digest: str, fix: str = FIX) -> bool:
    """Whether a file differs from the sha256 recorded for it (a missing one is its reader's to report)."""
    return check_regular(path, fix) is not None and sha256(path, fix) != digest


def _check_named_files(cfg: TrainConfig, run_dir: Path, recorded: Optional[dict]) -> None:
    """The trace and the weights config.json names are the files the run started with, wherever they moved, and
    it names no file the run started without (None: a run.json from before these records)."""
    if recorded is None:
        return
    named = _named_files(cfg)
    added = sorted(set(named) - set(recorded))
    if added:  # the paths are free to change, so the settings' sha256 does not see one added
        raise DaliFlError(f"{run_dir / 'config.json'} names a {added[0]} file ({named[added[0]]}) that this run "
                          f"started without ({IDENTITY} records none); {FIX}")
    for name, digest in recorded.items():
        if name not in named:
            raise DaliFlError(f"{run_dir / 'config.json'} no longer names the {name} file this run started with "
                              f"({IDENTITY} holds its sha256); {FIX}")
        if _changed(named[name], digest):
            raise DaliFlError(f"{named[name]} ({name} in config.json) is not the file this run started with (its "
                              f"sha256 differs from the one in {IDENTITY}); {FIX}")


def _check_identity(cfg: TrainConfig, run_dir: Path, doc: Optional[dict]) -> None:
    """partition.json and the store are the ones the run started with (`doc`: run.json's record of their sha256)."""
    if doc is None:
        log.warning("%s has no %s (it was started by an older dali-fl): its partition and store are not checked "
                    "this time", run_dir, IDENTITY)
        return
    partition = run_dir / "partition.json"
    if _changed(partition, doc["partition_sha256"]):
        raise DaliFlError(f"{partition} is not the partition this run started with (its sha256 differs from "
                          f"the one in {IDENTITY}); {FIX}")
    manifest = Path(cfg.data.store) / MANIFEST
    fix = "the store's own check says what is wrong"
    if _changed(manifest, doc["store_manifest_sha256"], fix):
        raise DaliFlError(f"the store {cfg.data.store} in config.json is not the store this run started on (its "
                          f"{MANIFEST} differs from the one recorded in {IDENTITY}); point config.json back at "
                          "that store, or start a new run")
    _check_labels(Path(cfg.data.store))


def _check_labels(store: Path) -> None:
    """The store's label files are the ones its manifest names (a few bytes an image: cheap, unlike the images)."""
    for entry in open_store(store).manifest["splits"].values():
        path = store / entry["labels"]["file"]
        if sha256(path) != entry["labels"]["sha256"]:
            raise DaliFlError(f"{path} differs from the labels {store / MANIFEST} records (its sha256), so the run "
                              f"would go on with other labels; `dali-fl verify {store}` checks the whole store")


def check_metrics(run_dir: Path, done: int, covered: Optional[dict]) -> None:
    """metrics.jsonl holds rounds 1..done (+1 when a kill fell between its row and the checkpoint), as recorded."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = read_metrics(run_dir)
    rounds = [r["round"] for r in rows]
    for line, round_ in enumerate(rounds, 1):
        if round_ != line:
            raise DaliFlError(f"{path} line {line} holds round {round_} where round {line} belongs (a row "
                              f"duplicated, missing or out of order); {FIX}")
    n = len(rounds)
    if n < done:
        held = f"ends at round {n}" if n else "holds no rounds"
        raise DaliFlError(f"{path} {held} but the checkpoint holds round {done}; {FIX}")
    if n > done + 1:
        raise DaliFlError(f"{path} goes to round {n} but the checkpoint holds round {done} (a kill leaves at most "
                          f"one row beyond it); {FIX}")
    if covered is not None:
        if metrics_digest(rows[:done]) != covered["sha256"]:
            raise DaliFlError(f"{path} rounds 1..{done} differ from those the checkpoint of round {done} "
                              f"recorded; {FIX}")
