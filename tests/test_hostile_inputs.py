"""Issue 24: hostile or careless inputs each give one `error:` line, destroy nothing, hang nothing.

One test per class of the issue, each building its hostile inputs itself (symlinks, FIFOs, torn files,
swapped stores, huge integers); every case is a parameter, so `pytest -q` counts them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from dali_fl.data.sources import load_synthetic
from dali_fl.data.store import write_store
from dali_fl.errors import DaliFlError
from tests.tiny import tiny_args, tiny_store

TINY = tiny_args(alg="fedlora", lora_r=2)
SCAFFOLD = tiny_args(alg="fedlora", lora_r=2, optimizer="sgd", scaffold=True, momentum=0)
HUGE = str(2**70)


class _Sha256:
    """Equal to any 64-digit hex string (a digest whose value the test does not fix)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and len(other) == 64 and all(c in "0123456789abcdef" for c in other)


ANY_SHA256 = _Sha256()


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny store and another of the same shape made from another seed."""
    root = tmp_path_factory.mktemp("stores")
    other, _ = write_store(load_synthetic(200, 50, seed=1), root / "other", 16, progress=False)
    return tiny_store(root), other


@pytest.fixture(scope="module")
def finished(stores, tmp_path_factory) -> dict[str, Path]:
    """Finished 2-round runs (plain FedLoRA and SCAFFOLD), trained once and copied by each test."""
    from click.testing import CliRunner

    from dali_fl.cli import cli

    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, args in (("plain", TINY), ("scaffold", SCAFFOLD)):
        out = root / name
        result = CliRunner().invoke(cli, ["train", "--store", str(stores[0]), "--out", str(out), *args,
                                          "--rounds", "2"])
        assert result.exit_code == 0, result.output
        runs[name] = out
    return runs


def _copy(finished: dict[str, Path], tmp_path: Path, name: str = "plain") -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished[name], run, symlinks=True)
    return run


def _snapshot(root: Path) -> dict[str, object]:
    """Every entry under `root` (but the lock, whose holder's pid each take rewrites): kind and content."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel == ".lock":
            continue
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir" if path.is_dir() else "special"
    return out


# --- 1. Never destroy what dali-fl did not write -------------------------------------------------

def _user_file(rel: str) -> Callable[[Path], Path]:
    def make(out: Path) -> Path:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("the user's")
        return out / rel
    return make


# partition.json is what `dali-fl partition --out D/partition.json` writes: a run took it for its own and
# overwrote it (or deleted it when its start failed). A run's own files come with its .lock, taken first.
@pytest.mark.parametrize("rel", ["checkpoint/important.txt", "summary.json", "notes.txt", "metrics.jsonl",
                                 "tensorboard/events.out", "partition.json", "run.json"])
def test_train_out_refuses_a_directory_holding_files_it_did_not_write(invoke, assert_user_error, stores, tmp_path,
                                                                      rel):
    out = tmp_path / "D"
    made = _user_file(rel)(out)
    before = _snapshot(out)
    assert_user_error(invoke("train", "--store", stores[0], "--out", out, *TINY, "--rounds", 1),
                      "not empty and not a dali-fl run", "choose another --out")
    assert _snapshot(out) == before and made.read_text() == "the user's"


def test_a_run_inside_a_store_is_refused(invoke, assert_user_error, stores, tmp_path):
    # `prep --force` replaces the store whole, and the run inside it went with it.
    out = stores[0] / "runs" / "r"
    assert_user_error(invoke("train", "--store", stores[0], "--out", out, *TINY, "--rounds", 1),
                      "inside the store", "prep --force")
    assert not (stores[0] / "runs").exists()


def test_a_failed_start_removes_the_directories_it_made(invoke, assert_user_error, stores, tmp_path):
    result = invoke("train", "--store", stores[0], "--out", tmp_path / "a" / "b" / "c", *TINY, "--rounds", 1,
                    "--model-kwargs", "patch_size=32")  # fails as the model is built, after the run directory
    assert_user_error(result, "patch_size")
    assert not (tmp_path / "a").exists()  # it left a/ and a/b/ behind


@pytest.mark.parametrize("kind", ["plain-dir", "symlink"])
def test_prep_force_replaces_only_a_store(invoke, assert_user_error, tmp_path, kind):
    out = tmp_path / "data"
    target = out / "synthetic-16"
    if kind == "plain-dir":
        _user_file("thesis.tex")(target)
    else:
        _user_file("thesis.tex")(tmp_path / "elsewhere")
        out.mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    result = invoke("prep", "--out", out, "--image-size", 16, "--num-train", 20, "--num-test", 10, "--force",
                    "--quiet")
    assert_user_error(result, "synthetic-16", "--force replaces only a store")
    assert (target / "thesis.tex").read_text() == "the user's"


@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlinked_lock_is_refused_and_nothing_outside_is_written(invoke, assert_user_error, finished, tmp_path,
                                                                    dangling):
    run = _copy(finished, tmp_path)
    outside = tmp_path / "outside.txt"
    if not dangling:
        outside.write_text("precious")
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(outside)
    assert_user_error(invoke("train", "--resume", run, "--rounds", 3, "--quiet"), ".lock", "symlink")
    assert (outside.read_text() == "precious") if not dangling else not outside.exists()


@pytest.mark.parametrize("kind", ["dangling-symlink", "symlink", "directory"])
def test_flower_app_refuses_a_pyproject_that_is_not_a_regular_file(invoke, assert_user_error, stores, tmp_path, kind):
    pytest.importorskip("flwr")
    app = tmp_path / "app"
    app.mkdir()
    outside = tmp_path / "outside.toml"
    if kind == "symlink":
        outside.write_text("precious")
    if kind == "directory":
        (app / "pyproject.toml").mkdir()
    else:
        (app / "pyproject.toml").symlink_to(outside)
    result = invoke("flower", "app", app, "--store", stores[0], *TINY, "--rounds", 1, "--out", tmp_path / "r")
    assert_user_error(result, "pyproject.toml", "not a file dali-fl wrote")
    assert (outside.read_text() == "precious") if kind == "symlink" else not outside.exists()


# --- 2. A resume trusts nothing it has not checked -----------------------------------------------

def _metrics(run: Path) -> list[str]:
    return (run / "metrics.jsonl").read_text().splitlines()


def _write_metrics(run: Path, lines: list[str], end: str = "\n") -> None:
    (run / "metrics.jsonl").write_text("\n".join(lines) + (end if lines else ""))


def _torn_covered_row(run: Path) -> None:
    lines = _metrics(run)
    _write_metrics(run, [lines[0], lines[1][:20]], end="")  # round 2 is in the checkpoint: not a kill's tear


def _duplicated_row(run: Path) -> None:
    lines = _metrics(run)
    _write_metrics(run, [lines[0], lines[0], lines[1]])


def _missing_row(run: Path) -> None:
    _write_metrics(run, _metrics(run)[1:])


def _swapped_rows(run: Path) -> None:
    _write_metrics(run, _metrics(run)[::-1])


def _emptied(run: Path) -> None:
    (run / "metrics.jsonl").write_text("")


def _edited_value(run: Path) -> None:
    rows = [json.loads(line) for line in _metrics(run)]
    rows[0]["test_acc"] = 0.99
    _write_metrics(run, [json.dumps(r) for r in rows])


def _meta_round(value: int) -> Callable[[Path], None]:
    def tamper(run: Path) -> None:
        meta = json.loads((run / "checkpoint" / "meta.json").read_text())
        (run / "checkpoint" / "meta.json").write_text(json.dumps({**meta, "round": value}))
    return tamper


def _moved_sample(run: Path) -> None:
    """One sample moved from client 0 to client 1, with both clients' class counts kept consistent."""
    from dali_fl.data.store import open_store

    labels = open_store(json.loads((run / "config.json").read_text())["data"]["store"]).labels("train")
    doc = json.loads((run / "partition.json").read_text())
    a, b = doc["clients"][0], doc["clients"][1]
    moved = a["indices"].pop()
    b["indices"] = sorted(b["indices"] + [moved])
    a["class_counts"][labels[moved]] -= 1
    b["class_counts"][labels[moved]] += 1
    (run / "partition.json").write_text(json.dumps(doc))


def _swapped_store(other: Path) -> Callable[[Path], None]:
    def tamper(run: Path) -> None:
        cfg = json.loads((run / "config.json").read_text())
        cfg["data"]["store"] = str(other)
        (run / "config.json").write_text(json.dumps(cfg, indent=2))
    return tamper


RESUME_TAMPERS = [
    ("torn-covered-row", _torn_covered_row, ("ends at round 1", "checkpoint holds round 2")),
    ("duplicated-row", _duplicated_row, ("line 2 holds round 1",)),
    ("missing-row", _missing_row, ("line 1 holds round 2",)),
    ("out-of-order", _swapped_rows, ("line 1 holds round 2",)),
    ("emptied", _emptied, ("holds no rounds",)),
    ("edited-value", _edited_value, ("differ from those the checkpoint",)),
    ("meta-behind", _meta_round(1), ("differ from those the checkpoint",)),
    ("rows-beyond-the-checkpoint", lambda run: _write_metrics(run, _metrics(run) + [
        json.dumps({"round": 3}), json.dumps({"round": 4})]), ("goes to round 4", "checkpoint holds round 2")),
    ("meta-ahead", _meta_round(5), ("ends at round 2", "round 5")),
    ("moved-sample", _moved_sample, ("partition.json", "not the partition this run started with")),
    ("config-seed-edited", lambda run: _config_field("fed", "seed", 7)(run), ("written with seed 0", "says 7")),
    ("run-json-garbage", lambda run: (run / "run.json").write_text("{"), ("run.json", "not a run identity")),
    # Hand edits that pass every kind check: the settings' sha256 in run.json tells them.
    ("config-lr-edited", lambda run: _config_field("local", "lr", 0.5)(run), ("config.json", "other than those")),
    ("config-frac-edited", lambda run: _config_field("fed", "frac", 1.0)(run), ("config.json", "other than those")),
    ("config-alg-edited", lambda run: _config_field("fed", "alg", "fedavg")(run), ("config.json", "other than")),
    ("config-clock-edited", lambda run: _config_field("clock", "speed", 5.0)(run), ("config.json", "other than")),
    ("config-lr-refused", lambda run: _config_field("local", "lr", -1.0)(run), ("config.json", "--lr")),
    ("config-a-default-made-explicit", lambda run: _config_field("local", "momentum", 0.5)(run), ("other than",)),
    ("settings-sha256-not-a-digest", lambda run: _identity_field(run, "settings_sha256", "abc"),
     ("run.json", "not a run identity")),
    # A record deleted, so that the run looks older than it is: the checks it fed turned into a warning.
    ("run-json-deleted", lambda run: (run / "run.json").unlink(), ("run.json", "is missing")),
    ("meta-metrics-deleted", lambda run: _older_meta(run, "metrics"), ("meta.json", "lacks the record of its metrics")),
    ("settings-sha256-deleted", lambda run: _older_identity(run, "settings_sha256"),
     ("run.json", "lacks the record of the run's settings")),
    ("weights-sha256-deleted", lambda run: _older_meta(run, "state_sha256", "settings_sha256"),
     ("meta.json", "lacks the sha256 of the checkpoint's weights")),  # an edited weight then resumed
    # A malformed record switched its check off: an edited metrics row then reached summary.json.
    ("meta-metrics-malformed", lambda run: _meta_field(run, "metrics", None), ("meta.json", "did not write")),
    # Another run's checkpoint, copied in with its metrics, agreed with both.
    ("checkpoint-of-other-settings", lambda run: _meta_field(run, "settings_sha256", "0" * 64),
     ("meta.json", "other settings")),
    # The trace's path is free to change, so the settings' sha256 did not see one added to a run started without.
    ("config-unknown-algorithm", lambda run: _config_field("algorithms", "bogus", {"mu": 1.0})(run),
     ("algorithms.bogus", "not an algorithm")),  # its options were dropped without a word
    ("trace-added", lambda run: _config_field("clock", "trace", str(_trace(run.parent / "t.csv")))(run),
     ("clock.trace", "started without")),
]


def _meta_field(run: Path, key: str, value: object) -> None:
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    meta[key] = value
    (run / "checkpoint" / "meta.json").write_text(json.dumps(meta))


def _trace(path: Path) -> Path:
    path.write_text("client,speed,bandwidth\n" + "".join(f"{c},1,1\n" for c in range(64)))
    return path


def _older_meta(run: Path, *keys: str) -> None:
    """checkpoint/meta.json as a dali-fl that did not write `keys` left it."""
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    (run / "checkpoint" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k not in keys}))


def _older_identity(run: Path, *keys: str) -> None:
    """run.json as a dali-fl that did not write `keys` left it."""
    ident = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({k: v for k, v in ident.items() if k not in keys}))


def _identity_field(run: Path, key: str, value: object) -> None:
    ident = json.loads((run / "run.json").read_text())
    ident[key] = value
    (run / "run.json").write_text(json.dumps(ident))


def _reformatted(run: Path) -> None:
    """What `jq .` does to config.json: whole floats lose their `.0`, keys may move, indentation changes."""
    text = (run / "config.json").read_text()
    cfg = json.loads(text.replace(".0,", ",").replace(".0\n", "\n"))
    (run / "config.json").write_text(json.dumps(dict(reversed(list(cfg.items()))), indent=4))


def _placement_edited(run: Path) -> None:
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"].update(num_workers=0, eval_bs=64, data_on_gpu=False)  # where and how fast, not what
    del cfg["data"]["resize_to"]  # as a config.json from before a field existed: its default
    (run / "config.json").write_text(json.dumps(cfg))


RESUME_ACCEPTS = [("reformatted", _reformatted), ("placement-edited", _placement_edited)]


@pytest.mark.parametrize("name,edit", RESUME_ACCEPTS, ids=[t[0] for t in RESUME_ACCEPTS])
def test_edits_that_do_not_change_what_is_trained_resume(invoke, finished, tmp_path, name, edit):
    run = _copy(finished, tmp_path)
    edit(run)
    result = invoke("train", "--resume", run, "--rounds", 3, "--quiet")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name,tamper,words", RESUME_TAMPERS, ids=[t[0] for t in RESUME_TAMPERS])
def test_a_tampered_resume_is_refused_and_changes_nothing(invoke, assert_user_error, finished, tmp_path,
                                                          name, tamper, words):
    run = _copy(finished, tmp_path)
    tamper(run)
    before = _snapshot(run)
    assert_user_error(invoke("train", "--resume", run, "--rounds", 4, "--quiet"), *words)
    assert _snapshot(run) == before  # config.json still says 2 rounds, no file written or removed


def test_a_resume_on_another_store_of_the_same_shape_is_refused(invoke, assert_user_error, stores, finished,
                                                                tmp_path):
    run = _copy(finished, tmp_path)
    _swapped_store(stores[1])(run)
    before = _snapshot(run)
    assert_user_error(invoke("train", "--resume", run, "--rounds", 3, "--quiet"), "not the store this run started on")
    assert _snapshot(run) == before


@pytest.mark.parametrize("tail", ['{"round": 3, "test_a', '{"round": 3, "test_acc": 0.1}\n'])
def test_a_kills_leftovers_are_repaired_to_the_rows_the_checkpoint_covers(invoke, finished, tmp_path, tail):
    run = _copy(finished, tmp_path)
    kept = _metrics(run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(tail)  # a torn row 3, or a whole row 3 logged just before a kill took its checkpoint
    result = invoke("train", "--resume", run, "--rounds", 3, "--quiet")
    assert result.exit_code == 0, result.output
    assert _metrics(run)[:2] == kept and [json.loads(x)["round"] for x in _metrics(run)] == [1, 2, 3]


def test_a_run_from_before_run_json_resumes_with_a_warning_and_gets_one(invoke, finished, tmp_path):
    run = _copy(finished, tmp_path)
    (run / "run.json").unlink()
    _older_meta(run, "metrics", "state_sha256", "settings_sha256")  # nor did its checkpoint record these
    result = invoke("train", "--resume", run, "--rounds", 3, "--quiet")
    assert result.exit_code == 0, result.output
    assert set(json.loads((run / "run.json").read_text())) == {"partition_sha256", "store_manifest_sha256",
                                                                "settings_sha256", "files_sha256"}


def test_a_run_whose_run_json_predates_the_settings_sha256_resumes_and_records_it(invoke, finished, tmp_path,
                                                                                    caplog):
    run = _copy(finished, tmp_path)
    ident = json.loads((run / "run.json").read_text())
    del ident["settings_sha256"]
    (run / "run.json").write_text(json.dumps(ident))
    _older_meta(run, "state_sha256", "settings_sha256")  # which came with the settings' record
    result = invoke("train", "--resume", run, "--rounds", 3, "--quiet")
    assert result.exit_code == 0, result.output
    assert "records no sha256 of the checkpoint's weights" in caplog.text  # what goes unchecked is said
    assert json.loads((run / "run.json").read_text()) == dict(ident, settings_sha256=ANY_SHA256)
    _config_field("local", "lr", 0.5)(run)  # from now on a hand edit is told
    assert invoke("train", "--resume", run, "--rounds", 4, "--quiet").exit_code == 2


def test_rounds_device_and_the_store_path_may_change_on_resume(invoke, assert_user_error, stores, finished,
                                                               tmp_path):
    run = _copy(finished, tmp_path)
    _swapped_store(tmp_path / "moved-store")(run)
    assert_user_error(invoke("train", "--resume", run, "--rounds", 3), "does not exist", "set data.store")
    moved = tmp_path / "moved-store"
    shutil.copytree(stores[0], moved)
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"]["store"] = str(moved)  # the store moved: the same manifest at another path
    (run / "config.json").write_text(json.dumps(cfg, indent=2))
    result = invoke("train", "--resume", run, "--rounds", 3, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["fed"]["rounds"] == 3


# --- 3. No tracebacks from values ----------------------------------------------------------------

def _config_field(section: str, key: str, value: object) -> Callable[[Path], None]:
    def tamper(run: Path) -> None:
        cfg = json.loads((run / "config.json").read_text())
        cfg[section][key] = value
        (run / "config.json").write_text(json.dumps(cfg))
    return tamper


def _deep_config(run: Path) -> None:
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text.replace('"store": ', '"store": ' + "[" * 100_000 + "]" * 100_000 + ", "
                                                  '"x": ', 1))


def _huge_partition_index(run: Path) -> None:
    """An index of 10**30 in a partition whose run.json agrees (so the reader itself must refuse it)."""
    doc = json.loads((run / "partition.json").read_text())
    doc["clients"][0]["indices"][-1] = 10**30
    (run / "partition.json").write_text(json.dumps(doc))
    ident = json.loads((run / "run.json").read_text())
    ident["partition_sha256"] = hashlib.sha256((run / "partition.json").read_bytes()).hexdigest()
    (run / "run.json").write_text(json.dumps(ident))


def _client_out_of_range(run: Path) -> None:
    """A client id out of range in a checkpoint whose meta.json agrees (so the reader itself must refuse it)."""
    path = run / "checkpoint" / "state.safetensors"
    tensors = load_file(str(path))
    tensors["scaffold::clients"] = torch.tensor([0, 10**6], dtype=torch.int64)
    save_file(tensors, str(path))
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    meta["state_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (run / "checkpoint" / "meta.json").write_text(json.dumps(meta))


VALUE_TAMPERS = [
    ("config-deeply-nested", "plain", _deep_config, ("config.json", "RecursionError")),
    ("config-store-not-a-string", "plain", _config_field("data", "store", 5), ("data.store is 5",)),
    ("config-store-a-list", "plain", _config_field("data", "store", ["a"]), ("data.store",)),
    ("config-seed-beyond-64-bits", "plain", _config_field("fed", "seed", 2**70), ("fed.seed",)),
    ("config-lr-huge-int", "plain", _config_field("local", "lr", 10**400), ("local.lr",)),
    ("config-rounds-a-string", "plain", _config_field("fed", "rounds", "3"), ("fed.rounds",)),
    ("config-algorithm-option-a-string", "plain", _config_field("algorithms", "fedprox", {"prox_mu": "x"}),
     ("algorithms.fedprox.prox_mu",)),
    ("config-algorithms-not-an-object", "plain", _config_field("algorithms", "fedprox", 5), ("algorithms.fedprox",)),
    ("config-not-an-object", "plain", lambda run: (run / "config.json").write_text("[1, 2]"), ("no JSON object",)),
    ("partition-index-10**30", "plain", _huge_partition_index, ("partition.json", "sample indices")),
    ("client-table-index-out-of-range", "scaffold", _client_out_of_range, ("clients 0..3", "does not belong")),
]


@pytest.mark.parametrize("name,kind,tamper,words", VALUE_TAMPERS, ids=[t[0] for t in VALUE_TAMPERS])
def test_hostile_values_in_run_files_are_one_line(invoke, assert_user_error, finished, tmp_path, name, kind, tamper,
                                                  words):
    run = _copy(finished, tmp_path, kind)
    tamper(run)
    before = _snapshot(run)
    assert_user_error(invoke("train", "--resume", run, "--rounds", 3, "--quiet"), *words)
    assert _snapshot(run) == before


@pytest.mark.parametrize("args,words", [
    (("--seed", HUGE), ("--seed", "64 bits")),
    (("--seed", "-" + HUGE), ("--seed",)),
    (("--seed", str(2**64)), ("--seed", "64 bits")),
    (("--rounds", HUGE), ("--rounds", "64 bits")),
    (("--num-users", HUGE), ("--num-users", "64 bits")),
    (("--local-ep", HUGE), ("--local-ep", "64 bits")),
    (("--local-bs", HUGE), ("--local-bs", "64 bits")),
    (("--eval-bs", "-" + HUGE), ("--eval-bs",)),
    # Each of these was a traceback (torch's or dp-accounting's overflow, timm's KeyError), an out-of-memory kill
    # (--num-workers, --nproc), a run that hung (reg_tokens), or a value config.json recorded but nothing used.
    (("--lr", "1e300"), ("--lr", "float32")),
    (("--optimizer", "sgd", "--momentum", "2"), ("--momentum", "[0, 1)")),  # accepted, as server momentum is not
    (("--server-opt", "adam", "--server-tau", "1e300"), ("--server-tau", "float32")),
    (("--dp-clip", "1", "--dp-noise", "1e300"), ("--dp-noise", "float32")),
    (("--lora-r", HUGE), ("--lora-r", "1..1024")),
    (("--num-workers", "100000"), ("--num-workers", "256")),
    (("--nproc", HUGE), ("--nproc", "CPU cores")),
    *((("--model-kwargs", f"patch_size=4,depth=1,embed_dim=32,num_heads=2,{kw}"), words) for kw, words in [
        ("act_layer=bogus", ("act_layer", "bogus")), ("drop_rate=nan", ("drop_rate", "0 to 1")),
        ("reg_tokens=99999", ("reg_tokens", "0 to 64")), ("num_classes=5", ("num_classes", "store")),
        ("qkv_bias=maybe", ("qkv_bias=maybe", "true or false")),  # built with biases, "maybe" recorded
        ("depth=abc", ("depth=abc", "whole number"))]),  # a TypeError traceback comparing "abc" with 1
])
def test_huge_integer_options_are_one_line_before_any_directory(invoke, assert_user_error, stores, tmp_path, args,
                                                                words):
    assert_user_error(invoke("train", "--store", stores[0], "--out", tmp_path / "r", *TINY, "--rounds", 1, *args),
                      *words)
    assert not (tmp_path / "r").exists()


SYNTH = ("--num-train", "5", "--num-test", "5", "--image-size", "8")


@pytest.mark.parametrize("args,words", [
    # "" was the current directory: prep wrote ./synthetic-8, flower app ./pyproject.toml
    (("prep", "--out", "", *SYNTH), ("--out", "is empty")),
    (("verify", ""), ("STORE", "is empty")),
    (("partition", ""), ("STORE", "is empty")),
    (("flower", "app", "", "--store", "STORE"), ("APP_DIR", "is empty")),
    (("train", "--store", "STORE", "--out", ""), ("--out", "is empty")),
    (("verify", "EMPTY"), ("is not a store", "prep")),  # it said to rebuild with --force what prep never made
    (("prep", "--out", "STORE", *SYNTH), ("is a store",)),  # prep --force of the outer store deleted the inner
    (("flower", "app", "STORE", "--store", "STORE"), ("is a store", "APP_DIR")),
    # Inside a store, which `prep --force` of it deleted without a word:
    (("prep", "--out", "STORE/sub", *SYNTH), ("--out", "inside the store")),
    (("partition", "STORE", "--out", "STORE/p.json"), ("--out", "inside the store")),
    (("partition", "STORE", "--plot", "STORE/p.png"), ("--plot", "inside the store")),
    (("flower", "app", "STORE/app", "--store", "STORE"), ("APP_DIR", "inside the store")),
    (("prep", "--download", "--out", "OUT", *SYNTH), ("--download does nothing",)),
    (("prep", "--source", "npz", "--download", "--out", "OUT"), ("--download fetches CIFAR only",)),  # accepted
    (("prep", "--source", "npz", "--num-train", "10", "--out", "OUT"), ("--num-train", "synthetic source only")),
    (("prep", "--seed", HUGE, "--out", "OUT", *SYNTH), ("--seed", "64 bits")),  # a store no reader would open
    (("partition", "STORE", "--seed", HUGE), ("--seed", "64 bits")),
    (("train", "--store", "STORE", "--out", "OUT", "--trace", "LOOP"), ("--trace", "symlink loop")),  # traceback
    (("train", "--store", "STORE", "--out", "OUT", "--data-dir", "EMPTY"), ("--data-dir", "--store")),  # ignored
])
def test_empty_paths_non_stores_and_loops_are_one_line_and_write_nothing(invoke, assert_user_error, stores, tmp_path,
                                                                         monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    os.symlink(tmp_path / "b.csv", tmp_path / "a.csv")
    os.symlink(tmp_path / "a.csv", tmp_path / "b.csv")
    subst = {"STORE": str(stores[0]), "EMPTY": str(tmp_path / "empty"), "OUT": str(tmp_path / "out"),
             "LOOP": str(tmp_path / "a.csv")}
    store_files = sorted(p.name for p in stores[0].iterdir())
    given = [subst.get(a, a.replace("STORE/", f"{stores[0]}/")) for a in args]
    assert_user_error(invoke(*given, *(TINY if args[0] == "train" else ())), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv", "empty"]
    assert sorted(p.name for p in stores[0].iterdir()) == store_files


def test_an_optimizer_step_that_overflows_float32_is_one_line(invoke, assert_user_error, stores, tmp_path):
    # Adam's first step size is lr / (1 - beta1): 1e38 became 1e39, and torch raised in the middle of a client.
    result = invoke("train", "--store", stores[0], "--out", tmp_path / "r", *TINY, "--rounds", 1, "--lr", "1e38")
    assert_user_error(result, "overflowed float32 in round 1", "--out NEW")


@pytest.mark.parametrize("loader", ["dali", "memmap"])
def test_a_batch_size_beyond_the_data_is_capped_not_allocated(invoke, stores, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    result = invoke("train", "--store", stores[0], "--out", tmp_path / "r", *tiny_args(alg="fedlora", lora_r=2,
                    loader=loader), "--rounds", 1, "--local-bs", 10**12, "--eval-bs", 10**9)
    assert result.exit_code == 0, result.output  # DALI threw std::bad_alloc (or a pybind TypeError) here


# --- 5. Nothing hangs ----------------------------------------------------------------------------

FIFO_AT = ["metrics.jsonl", "partition.json", "config.json", "run.json", "checkpoint/meta.json",
           "checkpoint/state.safetensors", "scaffold_clients.f32", ".lock"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rel", FIFO_AT)
def test_a_fifo_where_a_run_file_belongs_is_refused_not_waited_on(invoke, assert_user_error, finished, tmp_path, rel):
    run = _copy(finished, tmp_path, "scaffold")
    (run / rel).unlink()
    os.mkfifo(run / rel)
    assert_user_error(invoke("train", "--resume", run, "--rounds", 3, "--quiet"), rel.split("/")[-1], "FIFO")


@pytest.mark.timeout(60)
def test_a_fifo_where_a_new_client_table_is_made_is_refused_not_waited_on(invoke, assert_user_error, finished,
                                                                          tmp_path):
    run = _copy(finished, tmp_path, "scaffold")
    (run / "scaffold_clients.f32").unlink()  # lost: a resume makes a new table, under its pending name
    os.mkfifo(run / ".scaffold_clients.f32.tmp")
    assert_user_error(invoke("train", "--resume", run, "--rounds", 3, "--quiet"), ".scaffold_clients.f32.tmp")


def test_a_directory_where_summary_json_belongs_is_refused_before_any_round(invoke, assert_user_error, finished,
                                                                             tmp_path):
    run = _copy(finished, tmp_path)
    (run / "summary.json").unlink()
    (run / "summary.json").mkdir()
    before = _snapshot(run)
    assert_user_error(invoke("train", "--resume", run, "--rounds", 3, "--quiet"), "summary.json", "a directory")
    assert _snapshot(run) == before  # no round 3 trained and then lost


@pytest.mark.timeout(60)
def test_a_fifo_as_pyproject_is_refused_by_flower_app(invoke, assert_user_error, stores, tmp_path):
    pytest.importorskip("flwr")
    (tmp_path / "app").mkdir()
    os.mkfifo(tmp_path / "app" / "pyproject.toml")
    result = invoke("flower", "app", tmp_path / "app", "--store", stores[0], *TINY, "--rounds", 1)
    assert_user_error(result, "pyproject.toml", "FIFO")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,words", [
    (("--client-cpus", "0"), ("--client-cpus 0.0", "> 0")),
    (("--client-cpus", "-1"), ("--client-cpus",)),
    (("--client-cpus", "nan"), ("--client-cpus nan",)),
    (("--client-gpus", "-1"), ("--client-gpus -1.0", ">= 0")),
    (("--client-gpus", "inf"), ("--client-gpus inf",)),
    (("--client-cpus", "4096"), ("--client-cpus 4096", "CPUs Ray has here")),  # Ray would hang, placing none
    (("--client-gpus", "4096"), ("--client-gpus 4096", "GPUs this machine has")),
])
def test_flower_engine_options_ray_cannot_place_are_refused_before_it_starts(invoke, assert_user_error, stores,
                                                                              tmp_path, args, words):
    pytest.importorskip("flwr")
    for command in ("run", "compare"):
        result = invoke("flower", command, "--store", stores[0], *TINY, "--rounds", 1, "--out", tmp_path / "r", *args)
        assert_user_error(result, *words)
    assert not (tmp_path / "r").exists()


def test_client_cpus_are_checked_against_the_cpus_ray_counts(monkeypatch):
    # Ray counts a container's CPU quota, which the CPU affinity does not show: past it, Ray waits for ever.
    pytest.importorskip("ray")
    from ray._private import utils

    from dali_fl.flower.app import check_fits_here

    monkeypatch.setattr(utils, "get_num_cpus", lambda **kwargs: 1)
    with pytest.raises(DaliFlError, match="--client-cpus 2 is more than the 1 CPUs Ray has here"):
        check_fits_here(2, 0)
    check_fits_here(1, 0)
    check_fits_here(2, 0, num_cpus=2)  # a Ray started with num_cpus has that many


# --- 6. One line, also at the top level ----------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (("--bogus", "train"), ("--bogus",)),
    (("-x",), ("-x",)),
    (("--verbose=3", "train"), ("--verbose",)),
])
def test_top_level_usage_errors_are_one_line(invoke, assert_user_error, args, words):
    result = invoke(*args)
    assert "Usage:" not in result.output
    assert_user_error(result, *words)


def test_an_offline_download_leaves_no_directory_behind(invoke, assert_user_error, tmp_path, monkeypatch):
    pytest.importorskip("torchvision")

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)  # offline here, whatever this machine's network
    out = tmp_path / "fresh" / "data"
    assert_user_error(invoke("prep", "--source", "cifar10", "--download", "--out", out), "could not download")
    assert not (tmp_path / "fresh").exists()
    out.mkdir(parents=True)  # an existing --out stays, empty as it was
    assert_user_error(invoke("prep", "--source", "cifar10", "--download", "--out", out), "could not download")
    assert list(out.iterdir()) == []
